"""Where a pretraining run executes: the `PretrainEngine` seam of `PretrainRunner`.

`DriverProcessEngine` runs `run_pretraining` (DiLoCo on the contributed workers) in a
child process that joins the coordinator's Ray cluster as its driver. It is started as a
plain child (its own process group and log file, like the SuperLink), not through
`multiprocessing`, whose spawn start would add a resource-tracker process holding the
coordinator's stderr open until it exits. Tests hand the runner an engine that replays
outer steps, so the runner's bookkeeping (rounds, provenance, accounting, the job's end)
is tested without a Ray cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from consortium.aggregation.kernel_cache import CACHE_DIR_ENV, seed_kernel_cache
from consortium.processes import ChildProcess
from consortium.ray_env import prepare_ray_temp_dir, share_ray_credentials, short_temp_dir
from consortium.sandbox import Sandbox, new_private_dir, remove_private_dir, sandbox_for
from coordinator.pretraining import driver_wire as wire
from coordinator.pretraining.driver_wire import DriverRequest, Failed, Step, Wait
from coordinator.pretraining.errors import (
    DriverDiedError,
    DriverProtocolError,
    PretrainFailedError,
)
from coordinator.pretraining.records import OuterStepRecord
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.ray.head import RayCluster

if TYPE_CHECKING:
    from coordinator.pretraining.api import PretrainResult

log = logging.getLogger(__name__)

# -P: not the current dir's modules first (`-m` puts it on sys.path; the driver may
# run as this user, root, outside the sandbox).
DRIVER_COMMAND = (sys.executable, "-P", "-m", "coordinator.pretraining.driver")
STOP_GRACE_S = 20.0  # within PretrainRunner's 30 s wait for its thread
DRIVER_EXIT_S = 10.0  # a finished driver's `ray.shutdown()`
KILL_AFTER_S = 1.0  # SIGTERM, then SIGKILL
POLL_S = 0.2
# How often what a running driver was told (revoked institutions, node institutions)
# is compared with the coordinator's state now.
REVOKED_CHECK_S = 1.0


class PretrainEngine(Protocol):
    def connect(self) -> None:
        """Be ready to run (idempotent)."""

    def run(
        self,
        spec: PretrainJobSpec,
        checkpoint_dir: Path,
        on_step: Callable[[OuterStepRecord], None],
        stop: threading.Event,
        on_wait: Callable[[str | None], None],
    ) -> PretrainResult:
        """Run (or resume from `checkpoint_dir`) to the last outer step or `stop`."""

    def disconnect(self) -> None:
        """Leave the runtime (the next `connect` joins again)."""


# In a sandboxed driver's private dir: its numba cache, seeded with the aggregation
# kernels the install compiled (consortium/aggregation/kernel_cache.py).
DRIVER_KERNEL_CACHE = "numba"
DRIVER_HOME = "driver"  # in the coordinator's Ray dir


def driver_sandbox(data_dir: Path) -> Callable[[Path], Sandbox | None]:
    """For `coordinator serve` running as root: each run's driver runs as the pool user
    (it unpickles what Ray's workers return, and any member holding the token can run
    a worker), seeing nothing of the data dir but the run's checkpoint dir. Its private
    dir (its own copies of the cluster's credentials, and of the compiled aggregation
    kernels) is ``driver`` in the coordinator's Ray dir, new at every run, which the
    reaper removes with the rest after a `kill -9`."""

    def for_run(checkpoint_dir: Path) -> Sandbox | None:
        if os.geteuid() != 0:
            return None
        ray_home = short_temp_dir(data_dir)
        if not ray_home.is_dir():  # attached to a cluster we did not start: no head made it
            prepare_ray_temp_dir(data_dir)
        # The Ray dir is the pool user's (the head's processes run as it), so the home
        # is made and seeded through descriptors (an earlier run's removed), never by
        # path: a pool process could swap a link in between two steps by path.
        home_fd = new_private_dir(ray_home, DRIVER_HOME)
        try:
            checkpoint_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            sandbox = sandbox_for(ray_home / DRIVER_HOME, hide=(data_dir,), grant=(checkpoint_dir,))
            if sandbox is not None:  # the way to its home: the pool user's, as the head's is
                # By descriptor: the pool user may rename its dir in /tmp and leave
                # another file's hard link under its name.
                ray_home_fd = os.open(ray_home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    os.fchown(ray_home_fd, sandbox.user.uid, sandbox.user.gid)
                finally:
                    os.close(ray_home_fd)
                owner = (sandbox.user.uid, sandbox.user.gid)
                seed_kernel_cache(home_fd, DRIVER_KERNEL_CACHE, owner)
        finally:
            os.close(home_fd)
        return sandbox

    return for_run


class DriverProcessEngine:
    """Runs each pretraining run's Ray driver in a child process (`driver.py`).

    Ray and torch load in that child, not in `coordinator serve`; a driver that crashes
    (Ray's driver threads can segfault when the head goes away) ends only the run, which
    `run` reports as `DriverDiedError`. A stopped run gets `stop_grace_s` to end after its
    current step before its driver is killed (the step is lost; the checkpoint is not).
    `command` is the driver's command line, to which ``--fd N`` is added. `revoked`
    gives the institutions revoked now (the coordinator's state) and `node_institutions`
    the institution each Ray node counts for (`RayNodeClaims.assignments`; None where
    nodes' declarations count): the driver gets both with its request and every change
    while it runs, and its planner uses no other source.
    """

    def __init__(
        self,
        cluster: RayCluster,
        log_path: Path,
        stop_grace_s: float = STOP_GRACE_S,
        command: Sequence[str] = DRIVER_COMMAND,
        revoked: Callable[[], frozenset[str]] = frozenset,
        node_institutions: Callable[[], Mapping[str, str]] | None = None,
        sandbox: Callable[[Path], Sandbox | None] | None = None,
    ) -> None:
        self._sandbox = sandbox
        self._cluster = cluster
        self._revoked = revoked
        self._node_institutions = node_institutions
        self._log_path = log_path
        self._stop_grace_s = stop_grace_s
        self._command = tuple(command)
        self._lock = threading.Lock()
        self._child: ChildProcess | None = None

    def connect(self) -> None:
        """Nothing to do here: every run starts its own driver, which connects."""

    def run(
        self,
        spec: PretrainJobSpec,
        checkpoint_dir: Path,
        on_step: Callable[[OuterStepRecord], None],
        stop: threading.Event,
        on_wait: Callable[[str | None], None],
    ) -> PretrainResult:
        sandbox = self._sandbox(checkpoint_dir) if self._sandbox is not None else None
        cluster, env = self._cluster, {}
        if sandbox is not None:
            sandbox.prepare()
            token, tls = share_ray_credentials(sandbox, cluster.token_path, cluster.tls)
            cluster, env = replace(cluster, token_path=token, tls=tls), sandbox.env()
            env[CACHE_DIR_ENV] = str(sandbox.home / DRIVER_KERNEL_CACHE)
        request = DriverRequest(
            cluster,
            spec,
            checkpoint_dir,
            logging.getLogger().getEffectiveLevel(),
            self._revoked(),
            self._nodes_now(),
        )
        ours, theirs = socket.socketpair()
        with theirs:
            fd = theirs.fileno()
            argv = [*self._command, "--fd", str(fd)]
            if sandbox is not None:
                argv = sandbox.wrap(argv)
            with self._lock:
                child = ChildProcess(
                    "pretrain-driver",
                    argv,
                    self._log_path,
                    env=env,
                    pass_fds=(fd,),
                    cgroup=sandbox.cgroup if sandbox is not None else None,
                )
                self._child = child
        log.info("pretraining driver for %s started (pid %d)", spec.name, child.pid)
        conn = Connection(ours.detach())
        try:
            wire.send_request(conn, request)
            return self._follow(child, conn, on_step, stop, on_wait, request)
        except DriverProtocolError:
            child.stop(KILL_AFTER_S)  # not trusted further: not even to leave on its own
            raise
        finally:
            conn.close()  # a driver still running sees its socket close, and exits
            self._end(child)
            if sandbox is not None:
                remove_private_dir(sandbox.home.parent, sandbox.home.name)

    def _nodes_now(self) -> dict[str, str] | None:
        if self._node_institutions is None:
            return None
        return dict(self._node_institutions())

    def _tell_changes(self, conn: Connection, told: DriverRequest) -> DriverRequest:
        """Send the driver what changed since `told`; returns what it has been told.
        A dead driver (the send fails) is found by the caller."""
        revoked, nodes = self._revoked(), self._nodes_now()
        if revoked != told.revoked:
            with contextlib.suppress(OSError):
                wire.send_revoked(conn, revoked)
        if nodes is not None and nodes != told.node_institutions:
            with contextlib.suppress(OSError):
                wire.send_node_institutions(conn, nodes)
        return replace(told, revoked=revoked, node_institutions=nodes)

    def _follow(
        self,
        child: ChildProcess,
        conn: Connection,
        on_step: Callable[[OuterStepRecord], None],
        stop: threading.Event,
        on_wait: Callable[[str | None], None],
        request: DriverRequest,
    ) -> PretrainResult:
        stop_by: float | None = None  # when a stopped driver is killed if still running
        check_revoked_at = time.monotonic() + REVOKED_CHECK_S
        told = request  # what the driver was told last
        weights_bytes = request.spec.bytelm_config.parameter_bytes()
        while True:
            if time.monotonic() >= check_revoked_at:
                check_revoked_at = time.monotonic() + REVOKED_CHECK_S
                told = self._tell_changes(conn, told)
            if stop.is_set() and stop_by is None:
                with contextlib.suppress(OSError):
                    wire.send_stop(conn)
                stop_by = time.monotonic() + self._stop_grace_s
            if stop_by is not None and time.monotonic() > stop_by:
                child.stop(KILL_AFTER_S)
                raise DriverDiedError(
                    f"the pretraining driver did not stop within {self._stop_grace_s:.0f} s"
                )
            try:
                message = wire.read_message(conn, weights_bytes) if conn.poll(POLL_S) else None
            except (EOFError, OSError):
                message = None
                child.wait_exit(POLL_S)
            if message is None:
                if child.poll() is None:
                    continue
                raise DriverDiedError(f"the pretraining driver {_exit_reason(child)}")
            if isinstance(message, Step):
                on_step(message.record)
            elif isinstance(message, Wait):
                on_wait(message.reason)
            elif isinstance(message, Failed):  # the run failed in the driver, which logged it
                raise PretrainFailedError(message.message)
            else:
                return message

    def _end(self, child: ChildProcess) -> None:
        """Let a finished driver leave the cluster; stop one that is still running."""
        child.wait_exit(DRIVER_EXIT_S)
        child.stop(KILL_AFTER_S)
        with self._lock:
            if self._child is child:
                self._child = None

    def disconnect(self) -> None:
        """Stop a driver still running (its run's thread was given up on)."""
        with self._lock:
            child = self._child
        if child is not None:
            child.stop(KILL_AFTER_S)


def _exit_reason(child: ChildProcess) -> str:
    code = child.poll()
    if code is not None and code < 0:
        return f"died of {signal.Signals(-code).name} (log: {child.log_path})"
    return f"exited with code {code} before the run ended (log: {child.log_path})"
