"""A local user on the coordinator host who binds the SuperLink's Runtime API port first
(an --insecure SuperLink restarting on the same port) and hands the ServerApp launcher a
task naming an approved run (any local user lists runs through the Control API): no
ServerApp starts to install and import that user's FAB."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.net import reserve_free_port
from consortium.provenance.signing import SigningKey
from coordinator.federated.approvals import RunApprovals
from coordinator.federated.serverapp_launcher import (
    FAB_MISMATCH,
    FOREIGN_RUNTIME_API,
    RuntimeEndpoint,
    ServerAppLauncher,
)

APPROVED_FAB = "ab" * 32
Launched = list[str]


def _launcher(
    tmp_path: Path, listeners: frozenset[int]
) -> tuple[ServerAppLauncher, RunApprovals, list[str]]:
    approvals = RunApprovals(SigningKey.generate())
    refusals: list[str] = []
    # Nothing listens there: the loop's own polls fail; the tasks are handed in below.
    runtime = RuntimeEndpoint(f"127.0.0.1:{reserve_free_port()}", None)
    launcher = ServerAppLauncher(
        runtime,
        b"s" * 32,
        approvals,
        tmp_path / "tokens",
        tmp_path / "log",
        {},
        lambda _: None,
        on_refusal=refusals.append,
        approval_wait_s=0.1,
        listener_uids=lambda _: listeners,
    )
    return launcher, approvals, refusals


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> Iterator[Launched]:
    runs: Launched = []
    monkeypatch.setattr(ServerAppLauncher, "_launch", lambda _, __, run_id: runs.append(run_id))
    yield runs


def test_a_task_from_a_port_another_user_holds_starts_no_serverapp(
    tmp_path: Path, launched: Launched
) -> None:
    launcher, approvals, refusals = _launcher(tmp_path, frozenset({os.getuid() + 1}))
    try:
        approvals.approve("41", APPROVED_FAB, "job-1")
        launcher._launch_if_approved("squatters-token", "41", APPROVED_FAB)
    finally:
        launcher.stop()
    assert launched == []
    assert refusals == [FOREIGN_RUNTIME_API]


def test_a_task_of_an_approved_run_naming_no_app_starts_no_serverapp(
    tmp_path: Path, launched: Launched
) -> None:
    launcher, approvals, refusals = _launcher(tmp_path, frozenset({os.getuid()}))
    try:
        approvals.approve("41", APPROVED_FAB, "job-1")
        launcher._launch_if_approved("token", "41", "")
    finally:
        launcher.stop()
    assert launched == []
    assert refusals == [FAB_MISMATCH]


def test_the_approved_run_and_app_from_our_own_superlink_start(
    tmp_path: Path, launched: Launched
) -> None:
    launcher, approvals, refusals = _launcher(tmp_path, frozenset({os.getuid()}))
    try:
        approvals.approve("41", APPROVED_FAB, "job-1")
        launcher._launch_if_approved("token", "41", APPROVED_FAB)
    finally:
        launcher.stop()
    assert launched == ["41"] and refusals == []
