"""`DriverProcessEngine`: a pretraining run's Ray driver lives in a child process, so the
coordinator hears its steps and its end over a socket and survives its crash.

The children here run stand-in drivers (tests/pretrain_drivers.py) that speak the
driver's protocol without a Ray cluster; the real driver runs in the pretraining
integration tests and the chaos run."""

from __future__ import annotations

import socket
import threading
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
import pytest

from consortium.processes import ChildProcess
from consortium.tensor_digest import arrays_digest
from coordinator.jobs.spec import parse_submitted_spec
from coordinator.pretraining import ControllerState, PretrainJobSpec
from coordinator.pretraining import driver_wire as wire
from coordinator.pretraining.api import PretrainResult
from coordinator.pretraining.driver_wire import DriverRequest
from coordinator.pretraining.engine import DriverProcessEngine
from coordinator.pretraining.errors import (
    DriverDiedError,
    DriverProtocolError,
    PretrainFailedError,
)
from coordinator.pretraining.records import OuterStepRecord
from coordinator.ray.head import RayCluster
from tests.helpers import TINY_PRETRAIN, wait_for
from tests.pretrain_drivers import PWNED, WAIT, command, step_record

_SPEC = parse_submitted_spec(
    'name = "tiny"\n' + TINY_PRETRAIN + "inner_steps = 2\nouter_steps = 3\n"
)
assert isinstance(_SPEC, PretrainJobSpec)
SPEC: PretrainJobSpec = _SPEC


class Run:
    """One engine run with what it heard, its driver a stand-in."""

    def __init__(
        self, tmp_path: Path, driver: str, stop_grace_s: float = 20.0, claims: bool = False
    ) -> None:
        self.log = tmp_path / "pretrain-driver.log"
        self.revoked: frozenset[str] = frozenset()  # the coordinator's state, as it changes
        self.nodes: dict[str, str] = {}  # its claims' node -> institution, as they change
        self.engine = DriverProcessEngine(
            RayCluster("127.0.0.1:1", None),
            self.log,
            stop_grace_s=stop_grace_s,
            command=command(driver),
            revoked=lambda: self.revoked,
            node_institutions=(lambda: self.nodes) if claims else None,
        )
        self.checkpoints = tmp_path / "checkpoints"
        self.steps: list[OuterStepRecord] = []
        self.waits: list[str | None] = []
        self.stop = threading.Event()

    def run(self) -> PretrainResult:
        return self.engine.run(
            SPEC, self.checkpoints, self.steps.append, self.stop, self.waits.append
        )


def drivers_left() -> list[psutil.Process]:
    """Stand-in drivers still alive anywhere on this machine (each runs in a session of
    its own, so not necessarily as this process's child)."""
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "tests.pretrain_drivers" in (p.info["cmdline"] or [])
    ]


def test_steps_waits_and_the_result_cross_from_the_driver(tmp_path: Path) -> None:
    run = Run(tmp_path, "waits_steps_and_finishes")
    finished = run.run()
    assert run.waits == [WAIT, None]
    assert run.steps == [step_record(0)]
    assert finished.state is ControllerState.FINISHED
    assert finished.model_digest == arrays_digest(finished.weights)
    assert finished.records == (step_record(0),)
    assert finished.weights["w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_a_run_that_fails_in_the_driver_fails_with_its_message(tmp_path: Path) -> None:
    with pytest.raises(PretrainFailedError, match=r"^2 outer steps in a row got too few"):
        Run(tmp_path, "fails").run()


def test_a_driver_crash_is_reported_and_this_process_lives_on(tmp_path: Path) -> None:
    run = Run(tmp_path, "crashes_after_a_step")
    with pytest.raises(DriverDiedError, match="the pretraining driver died of SIGSEGV"):
        run.run()
    assert run.steps == [step_record(0)]  # what it finished before crashing is kept
    assert not drivers_left()


def test_the_driver_hears_each_revocation_from_the_coordinator_alone(tmp_path: Path) -> None:
    """The planner's deny list comes over the driver's socket, from the coordinator's
    state: with the request, then within a second of every change. (Ray's KV store,
    writable by every cluster member, is not read.)"""
    run = Run(tmp_path, "reports_revocations")
    run.revoked = frozenset({"gamma"})
    outcome: list[PretrainResult] = []
    thread = threading.Thread(target=lambda: outcome.append(run.run()))
    thread.start()
    try:
        wait_for("the request's revoked set", lambda: "revoked: gamma" in run.waits, 30.0)
        run.revoked = frozenset({"beta", "gamma"})
        wait_for("the revocation of beta", lambda: "revoked: beta,gamma" in run.waits, 30.0)
        run.revoked = frozenset()
        wait_for("beta and gamma restored", lambda: run.waits[-1] == "revoked: ", 30.0)
    finally:
        run.stop.set()
        thread.join(30.0)
    assert run.waits == ["revoked: gamma", "revoked: beta,gamma", "revoked: "]
    assert [r.state for r in outcome] == [ControllerState.RUNNING]


def test_the_driver_hears_which_institution_each_node_counts_for_from_the_coordinator(
    tmp_path: Path,
) -> None:
    """With claims (mutual TLS), the institution of each Ray node comes over the driver's
    socket from the coordinator's claims, with the request and within a second of every
    change, never from the node's own labels; without, the driver is told nothing and
    nodes' declarations count."""
    run = Run(tmp_path, "reports_node_institutions", claims=True)
    run.nodes = {"n1": "alpha"}
    outcome: list[PretrainResult] = []
    thread = threading.Thread(target=lambda: outcome.append(run.run()))
    thread.start()
    try:
        wait_for("the request's nodes", lambda: "nodes: n1=alpha" in run.waits, 30.0)
        run.nodes = {"n1": "alpha", "n2": "beta"}
        wait_for("beta's node bound", lambda: "nodes: n1=alpha,n2=beta" in run.waits, 30.0)
    finally:
        run.stop.set()
        thread.join(30.0)
    assert run.waits == ["nodes: n1=alpha", "nodes: n1=alpha,n2=beta"]
    assert [r.state for r in outcome] == [ControllerState.RUNNING]

    plain = Run(tmp_path / "plain", "reports_node_institutions")
    thread = threading.Thread(target=plain.run)
    thread.start()
    try:
        wait_for("the plain-text request", lambda: "nodes: declared" in plain.waits, 30.0)
    finally:
        plain.stop.set()
        thread.join(30.0)
    assert plain.waits == ["nodes: declared"]


def test_a_stopped_run_ends_after_its_step(tmp_path: Path) -> None:
    run = Run(tmp_path, "stops_when_asked")
    run.stop.set()
    stopped = run.run()
    assert stopped.state is ControllerState.RUNNING
    assert run.steps == [step_record(0)]


def test_a_driver_that_does_not_stop_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    run = Run(tmp_path, "ignores_stop", stop_grace_s=1.0)
    threading.Timer(1.0, run.stop.set).start()
    with pytest.raises(DriverDiedError, match="did not stop within 1 s"):
        run.run()
    assert not drivers_left()


@pytest.mark.parametrize(("told", "exitcode"), [("stop", 0), ("nothing: the pipe closes", 1)])
def test_a_driver_whose_coordinator_has_gone_exits_at_once(
    told: str, exitcode: int, tmp_path: Path
) -> None:
    """An orphan finishing its step would race the next driver for the workers and the
    checkpoint: it exits as soon as the coordinator's end of the socket closes."""
    ours, theirs = socket.socketpair()
    with theirs:
        fd = theirs.fileno()
        argv = [*command("waits_for_stop"), "--fd", str(fd)]
        child = ChildProcess("driver", argv, tmp_path / "driver.log", pass_fds=(fd,))
    conn = Connection(ours.detach())
    try:
        wire.send_request(conn, DriverRequest(RayCluster("127.0.0.1:1", None), SPEC, tmp_path))
        if told == "stop":
            wire.send_stop(conn)
        conn.close()
        assert child.popen.wait(30) == exitcode
    finally:
        child.stop()


def test_the_coordinator_never_unpickles_what_a_subverted_driver_sends(tmp_path: Path) -> None:
    """The driver unpickles what Ray's workers return; one that a worker subverted sends
    a pickle that would run code where the signing key is. It is refused unread."""
    run = Run(tmp_path, "sends_a_pickle")
    with pytest.raises(DriverProtocolError, match="not JSON"):
        run.run()
    assert not (run.checkpoints / PWNED).exists()
    assert run.steps == []
    assert not drivers_left()  # killed, not waited for


@pytest.mark.parametrize(
    ("driver", "refusal"),
    [
        ("sends_a_malformed_step", "malformed outer step"),
        ("sends_weights_other_than_its_digest", "do not have the model digest"),
        # Refused from the frame's length, before a byte of it is read or parsed.
        ("sends_a_message_longer_than_any", "sent a message longer than"),
        ("sends_weights_larger_than_the_model", "sent weights longer than"),
    ],
)
def test_a_driver_message_that_is_not_what_it_claims_ends_the_run(
    tmp_path: Path, driver: str, refusal: str
) -> None:
    run = Run(tmp_path, driver)
    with pytest.raises(DriverProtocolError, match=refusal):
        run.run()
    assert run.steps == []
    assert not drivers_left()


def test_a_step_crosses_the_wire_as_it_was_recorded() -> None:
    """JSON and back, validated: every field of a record as the driver had it."""
    checked = replace(
        step_record(3),
        verified=("alpha/abcd/cpu0",),
        verification_failed={"beta/ef01/cpu0": "ef01" * 14},
        workers_lost={"beta/ef01/cpu0": "verification failed: its pseudo-gradient differs"},
    )
    ours, theirs = socket.socketpair()
    with Connection(ours.detach()) as sender, Connection(theirs.detach()) as receiver:
        for record in (step_record(3), checked):
            wire.send_step(sender, record)
            assert wire.read_message(receiver, 0) == wire.Step(record)
