"""A `flwr` command the coordinator runs ends when the coordinator stops, instead of
retrying against a SuperLink that is going away for up to FLWR_TIMEOUT_S (a SIGTERMed
`coordinator serve` was killed after 10 s, its scheduler waiting on `flwr`)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from consortium.errors import ChildProcessFailedError
from consortium.processes import pid_alive
from coordinator.federated import flower_app
from coordinator.federated.flower_app import FlowerCli


def fake_flwr(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "flwr"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\n{body}\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def cli(tmp_path: Path) -> tuple[FlowerCli, threading.Event]:
    stopping = threading.Event()
    return FlowerCli(tmp_path / "data", "127.0.0.1:9", None, stopping=stopping), stopping


def test_a_running_command_is_killed_when_the_coordinator_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: tuple[FlowerCli, threading.Event]
) -> None:
    flower, stopping = cli
    script = fake_flwr(tmp_path, "exec sleep 600")
    monkeypatch.setattr(flower_app, "venv_executable", lambda name: str(script))
    timer = threading.Timer(0.3, stopping.set)
    timer.start()
    try:
        with pytest.raises(ChildProcessFailedError, match="ended: the coordinator is stopping"):
            flower.list_supernodes()
    finally:
        timer.cancel()
    pid = int((tmp_path / "pid").read_text())
    assert not pid_alive(pid)  # killed and reaped, not left behind


def test_no_command_starts_once_the_coordinator_is_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: tuple[FlowerCli, threading.Event]
) -> None:
    flower, stopping = cli
    script = fake_flwr(tmp_path, 'echo \'{"success": true, "nodes": []}\'')
    monkeypatch.setattr(flower_app, "venv_executable", lambda name: str(script))
    assert flower.list_supernodes() == []  # runs while the coordinator serves
    os.unlink(tmp_path / "pid")
    stopping.set()
    with pytest.raises(ChildProcessFailedError, match="not run: the coordinator is stopping"):
        flower.list_supernodes()
    assert not (tmp_path / "pid").exists()


def test_a_failing_command_still_reports_its_exit_and_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: tuple[FlowerCli, threading.Event]
) -> None:
    flower, _ = cli
    script = fake_flwr(tmp_path, "echo 'cannot reach the SuperLink' >&2; exit 3")
    monkeypatch.setattr(flower_app, "venv_executable", lambda name: str(script))
    with pytest.raises(ChildProcessFailedError, match=r"failed \(exit 3\): cannot reach"):
        flower.list_supernodes()
