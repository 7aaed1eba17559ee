"""Replacing the Ray token after a revocation: when, how, and only once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from coordinator.ray.token_rotation import RayTokenRotation
from coordinator.state import SqliteStateStore


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStateStore(tmp_path / "state.db")
        self.token = tmp_path / "pki" / "ray-token"
        self.token.parent.mkdir()
        self.token.write_text("old-token")
        self.excludes = tmp_path / "ray" / "token-excludes.json"
        self.restarts: list[str] = []
        self.busy = False
        self.fail = False
        self.rotation = RayTokenRotation(
            self.store, self.token, self.excludes, self.restart, lambda: self.busy
        )

    def restart(self) -> None:
        if self.fail:
            raise RuntimeError("the head did not come up")
        self.restarts.append(self.token.read_text())

    def revoke(self, name: str) -> None:
        self.store.add_certificate(f"{name}-serial", name, f"{name}-fingerprint", 2**40)
        self.store.revoke_institution(name)


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_nothing_happens_without_a_revocation(harness: Harness) -> None:
    harness.rotation.sync()
    assert harness.restarts == [] and harness.token.read_text() == "old-token"


def test_a_revocation_replaces_the_token_restarts_the_head_once(harness: Harness) -> None:
    harness.revoke("beta")
    harness.rotation.sync()
    new = harness.token.read_text()
    assert new != "old-token" and len(new) == 64
    assert harness.restarts == [new]  # the head restarted with the new token in place
    assert oct(harness.token.stat().st_mode & 0o777) == "0o600"
    assert json.loads(harness.excludes.read_text()) == ["beta"]
    harness.rotation.sync()  # already excluded: no second rotation
    assert harness.restarts == [new]


def test_rotation_waits_for_the_running_pretraining_job(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.revoke("beta")
    harness.busy = True
    with caplog.at_level(logging.WARNING):
        harness.rotation.sync()
        harness.rotation.sync()
    assert harness.restarts == [] and harness.token.read_text() == "old-token"
    assert (
        sum("when the running pretraining job ends" in r.getMessage() for r in caplog.records) == 1
    )
    harness.busy = False
    harness.rotation.sync()
    assert len(harness.restarts) == 1


def test_a_failed_restart_is_retried_at_the_next_step(harness: Harness) -> None:
    harness.revoke("beta")
    harness.fail = True
    harness.rotation.sync()
    assert not harness.excludes.exists()
    harness.fail = False
    harness.rotation.sync()
    assert len(harness.restarts) == 1 and json.loads(harness.excludes.read_text()) == ["beta"]
