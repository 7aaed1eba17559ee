"""`client join` start-up cannot leak: a failure injected before any join step stops
exactly what the earlier steps started (a real SuperNode against a real coordinator),
and a run that ends leaves the consortium and stops everything.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.join import JOIN_STEPS, SiteNode
from client.settings import ClientSettings
from consortium.data import TEXT_DIR
from coordinator.state import SqliteStateStore
from coordinator.state.records import NodeRecord, NodeState
from tests.conftest import Processes
from tests.helpers import start_coordinator
from tests.integration.startup_checks import Baseline, InjectedStartError, StartRecorder

INSTITUTION = "alpha"


@dataclass(frozen=True)
class RunningCoordinator:
    address: str
    data_dir: Path

    def nodes(self) -> list[NodeRecord]:
        store = SqliteStateStore(self.data_dir / "state.db")
        try:
            return store.list_nodes()
        finally:
            store.close()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    """One loopback `coordinator serve` without Ray, shared by this module's tests (a
    process of its own: its threads and children are not the client's)."""
    root = tmp_path_factory.mktemp("join")
    processes = Processes(root / "logs")
    try:
        address = start_coordinator(processes, root / "coordinator")
        yield RunningCoordinator(address, root / "coordinator")
    finally:
        processes.stop_all()


def settings_for(tmp_path: Path, coordinator: RunningCoordinator) -> ClientSettings:
    data = tmp_path / "data"
    (data / TEXT_DIR).mkdir(parents=True)
    (data / TEXT_DIR / "notes.txt").write_text("local text that never leaves the site\n")
    return ClientSettings(
        coordinator=coordinator.address,
        institution=INSTITUTION,
        data=data,
        insecure=True,
        state_dir=tmp_path / "state",
        connect_attempts=1,
        ray_enabled=False,
        # Its loader is a daemon thread left to finish its imports (client/join.py): as
        # in the test profile, off, so every thread the run starts is one it joins.
        preload_client_app=False,
    )


@pytest.mark.parametrize("step", JOIN_STEPS)
def test_join_failure_at_step_stops_everything_started(
    tmp_path: Path, coordinator: RunningCoordinator, step: str
) -> None:
    settings = settings_for(tmp_path, coordinator)
    recorder = StartRecorder(Baseline.now(), fail_at=step)
    with pytest.raises(InjectedStartError):
        SiteNode(settings, on_start_step=recorder).run(threading.Event())
    assert recorder.steps == list(JOIN_STEPS[: JOIN_STEPS.index(step) + 1])
    if JOIN_STEPS.index(step) > JOIN_STEPS.index("supernode"):
        # The SuperNode was started (its log exists); `assert_nothing_left` below sees
        # every child still running, whether or not a snapshot caught this one.
        assert (settings.resolved_state_dir / "supernode.log").exists()
    recorder.assert_nothing_left()
    assert not settings.metrics_address_file.exists()
    if JOIN_STEPS.index(step) > JOIN_STEPS.index("register"):
        # Registered, then failed: the node told the coordinator it left.
        states = {node.state for node in coordinator.nodes()}
        assert NodeState.GONE in states


def test_join_run_ended_by_stop_leaves_and_stops_everything(
    tmp_path: Path, coordinator: RunningCoordinator
) -> None:
    settings = settings_for(tmp_path, coordinator)
    stop = threading.Event()

    def stop_once_heartbeating(name: str) -> None:
        recorder(name)
        if name == "heartbeat":
            stop.set()  # the run starts its last step, then ends at once

    recorder = StartRecorder(Baseline.now())
    before = {node.node_id for node in coordinator.nodes()}
    SiteNode(settings, on_start_step=stop_once_heartbeating).run(stop)
    assert recorder.steps == list(JOIN_STEPS)
    recorder.assert_nothing_left()
    assert not settings.metrics_address_file.exists()
    joined = [node for node in coordinator.nodes() if node.node_id not in before]
    assert [node.state for node in joined] == [NodeState.GONE]
