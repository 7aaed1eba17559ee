"""A local user on a site host who binds the SuperNode's Runtime API port first (while
it starts or restarts) and hands the task runner a task of an approved run, with a
node_config of its choosing: the site executes nothing of it."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from client.federated import task_runner
from client.federated.task_input import TaskHeader
from client.federated.task_runner import SiteTaskRunner
from consortium.run_approval import RefusalReason, listening_uids

FAB = b"the consortium's approved app"
APPROVED = ("4242", hashlib.sha256(FAB).hexdigest(), "job-1")
SQUATTER_UID = os.getuid() + 1


def _squatters_header(tmp_path: Path) -> TaskHeader:
    """A real approved run (its id, FAB and job are seen by every member's site), with
    the squatter's node_config: its own data dir and a workload the site never listed."""
    run = Run.create_empty(int(APPROVED[0]))
    run.override_config = {"job-id": APPROVED[2]}
    context = Context(
        run_id=int(APPROVED[0]),
        node_id=3,
        node_config={
            "data-dir": str(tmp_path / "the-site-users-home"),
            "workloads": "anything",
            "signing-key": str(tmp_path / "squatter.key"),
            "coordinator-key": "",
        },
        state=RecordDict(),
        run_config={},
    )
    return TaskHeader(context=context, run=run, fab=Fab(APPROVED[1], FAB, {}))


class _Client:
    def close(self) -> None:
        pass


class _Heartbeat:
    is_running = False

    def __init__(self, *_: Any) -> None:
        pass

    def start(self) -> None:
        pass


def _runner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, listeners: frozenset[int] | None
) -> tuple[SiteTaskRunner, list[Context], list[RefusalReason]]:
    monkeypatch.setattr(
        task_runner.RuntimeHttpClient, "from_server_address", staticmethod(lambda **_: _Client())
    )
    monkeypatch.setattr(task_runner, "HeartbeatSender", _Heartbeat)
    monkeypatch.setattr(task_runner, "make_task_heartbeat_fn_http", lambda _: None)
    monkeypatch.setattr(task_runner, "pull_task_header", lambda _: _squatters_header(tmp_path))
    monkeypatch.setattr(task_runner, "pull_task_message", lambda *_, **__: None)
    monkeypatch.setattr(task_runner, "push_message", lambda *_: None)
    monkeypatch.setattr(task_runner, "push_task_output", lambda *_: None)
    executed: list[Context] = []
    refusals: list[RefusalReason] = []

    def approved_only(run_id: str, fab_hash: str, job_id: str) -> None:
        assert (run_id, fab_hash, job_id) == APPROVED  # the coordinator approved it

    def app(message: Message, context: Context) -> Message:
        executed.append(context)
        return message

    runner = SiteTaskRunner(
        lambda: "127.0.0.1:9094",
        b"secret",
        approved_only,
        app,
        on_refused=refusals.append,
        listener_uids=lambda _: listeners,
    )
    return runner, executed, refusals


def test_a_task_from_a_port_another_user_holds_executes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runner, executed, refusals = _runner(monkeypatch, tmp_path, frozenset({SQUATTER_UID}))
    runner._execute("squatters-token", 1)
    assert executed == []  # the ClientApp never saw the squatter's node_config
    assert refusals == [RefusalReason.FOREIGN_RUNTIME_API]
    assert runner.counts.refused == 1


def test_a_port_shared_with_another_users_listener_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    both = frozenset({os.getuid(), SQUATTER_UID})
    runner, executed, _ = _runner(monkeypatch, tmp_path, both)
    runner._execute("squatters-token", 1)
    assert executed == []


def test_the_sites_own_supernode_port_executes_the_approved_task(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runner, executed, refusals = _runner(monkeypatch, tmp_path, frozenset({os.getuid()}))
    runner._execute("token", 1)
    assert len(executed) == 1 and refusals == []


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="Linux's socket table")
def test_the_listener_of_a_port_is_found_with_its_owner() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert listening_uids(f"127.0.0.1:{port}") == {os.getuid()}
    assert listening_uids(f"127.0.0.1:{port}") == frozenset()
