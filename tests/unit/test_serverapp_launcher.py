"""How often the ServerApp launcher asks the SuperLink for work: often while an
approved run waits for its ServerApp or one runs, seldom when idle, and at once when the
job runner approves a run. (Launching and refusing against a real SuperLink:
tests/security/test_flower_attacks.py and the federated job tests.)"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from consortium.net import reserve_free_port
from consortium.processes import ChildProcess
from consortium.provenance.signing import SigningKey
from coordinator.federated.approvals import RunApprovals
from coordinator.federated.serverapp_launcher import (
    IDLE_POLL_INTERVAL_S,
    POLL_INTERVAL_S,
    RuntimeEndpoint,
    ServerAppLauncher,
    _Started,
)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[tuple[ServerAppLauncher, RunApprovals]]:
    approvals = RunApprovals(SigningKey.generate())
    # Nothing listens there: every poll fails and the loop waits, as while a SuperLink
    # restarts; what is tested is the interval it picks and that it stops.
    runtime = RuntimeEndpoint(f"127.0.0.1:{reserve_free_port()}", None)
    launcher = ServerAppLauncher(
        runtime, b"s" * 32, approvals, tmp_path / "tokens", tmp_path / "log", {}, lambda _: None
    )
    try:
        yield launcher, approvals
    finally:
        launcher.stop()


def test_an_idle_launcher_polls_seldom_and_an_approval_wakes_it(
    launcher: tuple[ServerAppLauncher, RunApprovals],
) -> None:
    server_apps, approvals = launcher
    assert server_apps._poll_interval_s() == IDLE_POLL_INTERVAL_S
    server_apps._wake.clear()
    approvals.approve("41", "ab" * 32, "job-1")
    assert server_apps._wake.is_set()
    assert server_apps._poll_interval_s() == POLL_INTERVAL_S  # its ServerApp is awaited
    server_apps._handled.add("41")  # launched (or refused)
    assert server_apps._poll_interval_s() == IDLE_POLL_INTERVAL_S
    assert POLL_INTERVAL_S < IDLE_POLL_INTERVAL_S


def test_stop_does_not_wait_out_an_idle_poll(
    launcher: tuple[ServerAppLauncher, RunApprovals],
) -> None:
    server_apps, _ = launcher
    started = time.monotonic()
    server_apps.stop()
    assert not server_apps._thread.is_alive()
    assert time.monotonic() - started < IDLE_POLL_INTERVAL_S


def test_an_exited_serverapp_is_reaped_its_exit_kept_and_its_log_closed(
    launcher: tuple[ServerAppLauncher, RunApprovals], tmp_path: Path
) -> None:
    """A run's ServerApp ends on its own: the coordinator, which runs for months, must
    not keep its zombie (a pid each) or its open log (a descriptor each)."""
    server_apps, _ = launcher
    process = ChildProcess("flwr-serverapp", ["sh", "-c", "exit 4"], tmp_path / "app.log")
    token = tmp_path / "tokens" / "run-7"
    token.write_text("token")
    server_apps._started.append(_Started("7", process, token))
    deadline = time.monotonic() + 30
    while process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    server_apps._reap()

    assert server_apps.exit_code("7") == 4
    assert not token.exists()
    assert process.popen.returncode == 4  # reaped
    assert not psutil.pid_exists(process.pid) or psutil.Process(process.pid).ppid() != os.getpid()
    assert process._log_file.closed
