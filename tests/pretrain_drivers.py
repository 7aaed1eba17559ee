"""Stand-in pretraining drivers for `DriverProcessEngine`'s tests: they speak the driver's
protocol (coordinator/pretraining/driver.py) without a Ray cluster.

``python -m tests.pretrain_drivers NAME --fd N`` runs the one named, as the engine runs
the real driver. A module of its own with light imports: one that imported torch would
spend seconds before its first message."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from consortium.tensor_digest import arrays_digest
from coordinator.pretraining import driver_wire as wire
from coordinator.pretraining.accounting import account
from coordinator.pretraining.driver import (
    ClusterPolicy,
    DriverBody,
    listen_for_stop,
    serve_one_request,
)
from coordinator.pretraining.driver_wire import DriverRequest
from coordinator.pretraining.records import ControllerState, OuterStepRecord, WorkerStepResult

if TYPE_CHECKING:
    from coordinator.pretraining.api import PretrainResult

WAIT = "needs 2 CPU workers, the cluster offers 1"


def step_record(step: int) -> OuterStepRecord:
    result = WorkerStepResult(
        worker="alpha/abcd/cpu0",
        institution="alpha",
        node_id="abcd",
        device="cpu",
        position=0,
        shard_ids=(step,),
        seed=step,
        pseudo_gradient_digest=f"pg{step}",
        bytes_received=10,
        bytes_sent=10,
        compute_s=1.5,
        inner_steps=4,
        tokens=128,
        train_loss=2.0 - step / 10,
    )
    return OuterStepRecord(
        step=step,
        results=(result,),
        workers_lost={},
        step_seed=step,
        aggregate_digest=f"agg{step}",
        model_digest=f"model{step}",
        val_loss=3.0 - step / 10,
        wall_s=2.0,
    )


def result(request: DriverRequest, state: ControllerState) -> PretrainResult:
    from coordinator.pretraining.api import PretrainResult  # torch: only when one ends

    records = (step_record(0),)
    weights = {"w": np.ones((2, 2), dtype=np.float32)}
    return PretrainResult(
        job=request.spec.name,
        state=state,
        steps_completed=1,
        model_digest=arrays_digest(weights),
        val_loss=3.0,
        weights=weights,
        corpus_digest="corpus",
        records=records,
        accounting=account(request.spec.name, list(records)),
    )


def waits_steps_and_finishes(conn: Connection, request: DriverRequest) -> None:
    wire.send_wait(conn, WAIT)
    wire.send_wait(conn, None)
    wire.send_step(conn, step_record(0))
    wire.send_done(conn, result(request, ControllerState.FINISHED))


def fails(conn: Connection, request: DriverRequest) -> None:
    wire.send_error(conn, "2 outer steps in a row got too few results")


def crashes_after_a_step(conn: Connection, request: DriverRequest) -> None:
    wire.send_step(conn, step_record(0))
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGSEGV)


def stops_when_asked(conn: Connection, request: DriverRequest) -> None:
    """As the real driver: ends its run after the current step when told to stop."""
    wire.send_step(conn, step_record(0))
    if wire.is_stop(conn.recv_bytes()):
        wire.send_done(conn, result(request, ControllerState.RUNNING))


def ignores_stop(conn: Connection, request: DriverRequest) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wire.send_step(conn, step_record(0))
    time.sleep(600)


def reports_revocations(conn: Connection, request: DriverRequest) -> None:
    """The real driver's control thread keeping the revoked set, which this reports as
    a wait reason ("revoked: a,b") at start and on every change, until told to stop."""
    stop = threading.Event()
    policy = ClusterPolicy(request.revoked, request.node_institutions)
    threading.Thread(target=listen_for_stop, args=(conn, stop, policy), daemon=True).start()
    reported: frozenset[str] | None = None
    while not stop.wait(0.05):
        if (now := policy.revoked()) != reported:
            wire.send_wait(conn, "revoked: " + ",".join(sorted(now)))
            reported = now
    wire.send_done(conn, result(request, ControllerState.RUNNING))


def reports_node_institutions(conn: Connection, request: DriverRequest) -> None:
    """The real driver's control thread keeping the institution of each Ray node, which
    this reports as a wait reason ("nodes: n1=alpha,n2=beta", or "nodes: declared" when
    nodes' own declarations count) at start and on every change, until told to stop."""
    stop = threading.Event()
    policy = ClusterPolicy(request.revoked, request.node_institutions)
    threading.Thread(target=listen_for_stop, args=(conn, stop, policy), daemon=True).start()
    reported: str | None = None
    while not stop.wait(0.05):
        nodes = policy.node_institutions()
        pairs = sorted(nodes.items()) if nodes is not None else []
        now = "declared" if nodes is None else ",".join(f"{k}={v}" for k, v in pairs)
        if now != reported:
            wire.send_wait(conn, "nodes: " + now)
            reported = now
    wire.send_done(conn, result(request, ControllerState.RUNNING))


def waits_for_stop(conn: Connection, request: DriverRequest) -> None:
    """The real driver's control thread, alone: exits 0 once told to stop."""
    listen_for_stop(conn, threading.Event())


# --- a driver subverted by a worker (it unpickles what Ray's workers return) ---------
PWNED = "pwned"  # the file a pickle would create in the checkpoint dir


class Exploit:
    """Unpickling this runs code: it creates `PWNED` in the checkpoint dir."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.target = str(checkpoint_dir / PWNED)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.target),))


def sends_a_pickle(conn: Connection, request: DriverRequest) -> None:
    request.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    conn.send(("step", Exploit(request.checkpoint_dir)))  # what a pickling driver sent
    time.sleep(600)


def sends_a_malformed_step(conn: Connection, request: DriverRequest) -> None:
    conn.send_bytes(json.dumps({"kind": "step", "record": {"step": "first"}}).encode())
    time.sleep(600)


def sends_weights_other_than_its_digest(conn: Connection, request: DriverRequest) -> None:
    honest = result(request, ControllerState.FINISHED)
    wire.send_done(conn, replace(honest, weights={"w": np.zeros((2, 2), dtype=np.float32)}))
    time.sleep(600)


def sends_a_message_longer_than_any(conn: Connection, request: DriverRequest) -> None:
    """A JSON message of numbers one byte past the cap: about five times its size in
    Python objects, had the coordinator parsed it."""
    conn.send_bytes(b"[" + b"0," * (wire.MAX_MESSAGE_BYTES // 2) + b"0]")
    time.sleep(600)


def sends_weights_larger_than_the_model(conn: Connection, request: DriverRequest) -> None:
    honest = result(request, ControllerState.FINISHED)
    limit = request.spec.bytelm_config.parameter_bytes() + wire.WEIGHTS_HEADER_BYTES
    bloated = {"w": np.zeros(limit // 4 + 1, dtype=np.float32)}
    wire.send_done(conn, replace(honest, weights=bloated))
    time.sleep(600)


def command(name: str) -> tuple[str, ...]:
    """The command line that runs stand-in `name` (the engine adds ``--fd N``)."""
    return (sys.executable, "-m", "tests.pretrain_drivers", name)


if __name__ == "__main__":
    BODIES: dict[str, DriverBody] = {
        body.__name__: body
        for body in (
            waits_steps_and_finishes,
            fails,
            crashes_after_a_step,
            stops_when_asked,
            ignores_stop,
            reports_revocations,
            reports_node_institutions,
            waits_for_stop,
            sends_a_pickle,
            sends_a_malformed_step,
            sends_weights_other_than_its_digest,
            sends_a_message_longer_than_any,
            sends_weights_larger_than_the_model,
        )
    }
    serve_one_request(BODIES[sys.argv[1]], sys.argv[2:])
