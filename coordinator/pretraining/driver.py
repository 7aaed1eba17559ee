"""The pretraining driver: the child process that joins the coordinator's Ray cluster
as a driver and runs one pretraining run (`DriverProcessEngine` starts it as
``python -m coordinator.pretraining.driver --fd N``, its output in the data dir's
``logs/pretrain-driver.log``).

Ray's driver threads live here, not in `coordinator serve`: a driver that crashes when
its Ray head goes away (ray-project/ray#30679, a segfault in Ray's
``ray_listen_error_messages`` thread) takes only this process down, and the coordinator
re-queues the job, which resumes from its checkpoint.

The two processes talk over a socket pair (fd N here) in the frames of
`driver_wire`: JSON and safetensors, never pickle, since this process unpickles what
Ray's workers return and the coordinator holds the signing key. The coordinator sends
the request, every change of the set of revoked institutions and of the institution
each Ray node counts for, and at most a stop (end the run after its current step);
this process sends each outer step, each change of its wait reason, and the result or
the error. A closed socket (the coordinator died) ends
the driver at once.

The planner learns which institutions are revoked, and which institution each Ray node
counts for, from the coordinator alone, over this socket: not from anything in the Ray
cluster, where every member holds the cluster's token and could write it, and where a
node declares its own institution (coordinator/ray/claims.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection

from consortium.startup import load
from coordinator.pretraining import driver_wire as wire
from coordinator.pretraining.driver_wire import DriverRequest
from coordinator.ray.head import RayCluster

log = logging.getLogger(__name__)


def drive(conn: Connection, request: DriverRequest) -> None:
    """The driver process's body: connect, run (or resume) the run, report, leave."""
    # The coordinator ends this process by message (or by signal after a grace period):
    # a Ctrl-C meant for `coordinator serve` reaches its whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=request.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    policy = ClusterPolicy(request.revoked, request.node_institutions)
    threading.Thread(
        target=listen_for_stop, args=(conn, stop, policy), name="driver-control", daemon=True
    ).start()
    try:
        _connect(request.cluster)
        from coordinator.pretraining.api import run_pretraining  # torch and Ray
        from coordinator.pretraining.cluster import RayClusterView

        result = run_pretraining(
            request.spec,
            request.checkpoint_dir,
            lambda record: wire.send_step(conn, record),
            cluster_view=RayClusterView(
                request.spec.device,
                revoked_institutions=policy.revoked,
                node_institutions=policy.node_institutions,
            ),
            stop=stop,
            on_wait=lambda reason: wire.send_wait(conn, reason),
        )
    except Exception as error:  # reported to the coordinator, which fails or re-queues
        log.exception("pretraining run %s failed", request.spec.name)
        wire.send_error(conn, str(error) or type(error).__name__)
        return
    finally:
        stop.set()  # the run is over: a closing socket is no news now
    wire.send_done(conn, result)
    _disconnect()


def _connect(cluster: RayCluster) -> None:
    import ray
    from ray._private import ray_constants

    from consortium.ray_env import use_ray_auth_in_this_process

    # The driver authenticates like every other Ray process of the cluster, with the
    # token file as it is now (after a rotation, the new token).
    use_ray_auth_in_this_process(cluster.token_path, cluster.tls)
    # Ray's C++ failure-signal handler would turn the coordinator's SIGTERM into an
    # abort 3 s later (absl's alarm), with a core dump's worth of noise in its log.
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    ray.init(address=cluster.address, logging_level=logging.WARNING)


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class ClusterPolicy:
    """What the coordinator last said about the cluster: the revoked institutions and
    the institution each Ray node counts for (None: nodes' declarations). The planner
    reads both before every plan; each is one reference swapped, so a reader sees the
    old value or the new one."""

    def __init__(
        self, revoked: frozenset[str], node_institutions: Mapping[str, str] | None = None
    ) -> None:
        self._revoked = revoked
        self._nodes = dict(node_institutions) if node_institutions is not None else None

    def revoked(self) -> frozenset[str]:
        return self._revoked

    def node_institutions(self) -> Mapping[str, str] | None:
        return self._nodes

    def set_revoked(self, names: frozenset[str]) -> None:
        if names != self._revoked:
            log.info("revoked institutions now: %s", ", ".join(sorted(names)) or "none")
        self._revoked = names

    def set_node_institutions(self, nodes: Mapping[str, str]) -> None:
        if nodes != self._nodes:
            log.info("Ray nodes counted for institutions now: %d", len(nodes))
        self._nodes = dict(nodes)


def listen_for_stop(
    conn: Connection, stop: threading.Event, policy: ClusterPolicy | None = None
) -> None:
    """Set `stop` on the coordinator's "stop", and `policy` on its ``revoked`` and
    ``nodes`` frames; exit at once if its end of the socket closes.

    A coordinator that died (or gave up on this run) re-queues the job, and the next
    driver resumes from the checkpoint: an orphan finishing its step would race that
    driver for the workers and the checkpoint. Its Ray actors die with it."""
    try:
        while not wire.is_stop(frame := conn.recv_bytes()):
            if policy is None:
                continue
            if (names := wire.revoked_in(frame)) is not None:
                policy.set_revoked(names)
            elif (nodes := wire.node_institutions_in(frame)) is not None:
                policy.set_node_institutions(nodes)
    except (EOFError, OSError):
        if not stop.is_set():
            log.warning("the coordinator has gone; ending this pretraining driver")
            os._exit(1)
    stop.set()


DriverBody = Callable[[Connection, DriverRequest], None]


def serve_one_request(body: DriverBody, argv: list[str] | None = None) -> None:
    """A driver process's entry point: take the connection's fd from ``--fd``, read the
    request, and run `body` on it."""
    parser = argparse.ArgumentParser(description="Consortium's pretraining driver")
    parser.add_argument("--fd", type=int, required=True, help="the coordinator's socket")
    conn = Connection(parser.parse_args(argv).fd)
    body(conn, wire.read_request(conn))


if __name__ == "__main__":
    # Ray and torch, which every run needs, load with the garbage collector paused
    # (consortium/startup.py) while the coordinator prepares the request.
    load("coordinator.pretraining.api:run_pretraining")
    serve_one_request(drive)
