"""Where a pretraining run executes: the `PretrainEngine` seam of `PretrainRunner`.

`DriverProcessEngine` runs `run_pretraining` (DiLoCo on the contributed workers) in a
child process that joins the coordinator's Ray cluster as its driver. Tests hand the
runner an engine that replays outer steps, so the runner's bookkeeping (rounds,
provenance, accounting, the job's end) is tested without a Ray cluster.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from coordinator.pretraining.driver import STOP, DriverRequest, drive
from coordinator.pretraining.errors import DriverDiedError, PretrainFailedError
from coordinator.pretraining.records import OuterStepRecord
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.ray.head import RayCluster

if TYPE_CHECKING:
    from coordinator.pretraining.api import PretrainResult

DriverTarget = Callable[[Connection, DriverRequest], None]
STOP_GRACE_S = 20.0  # within PretrainRunner's 30 s wait for its thread
DRIVER_EXIT_S = 10.0  # a finished driver's `ray.shutdown()`
POLL_S = 0.2


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


class DriverProcessEngine:
    """Runs each pretraining run's Ray driver in a child process (`driver.py`).

    Ray and torch load in that child, not in `coordinator serve`; a driver that crashes
    (Ray's driver threads can segfault when the head goes away) ends only the run, which
    `run` reports as `DriverDiedError`. A stopped run gets `stop_grace_s` to end after its
    current step before its driver is killed (the step is lost; the checkpoint is not).
    """

    def __init__(
        self,
        cluster: RayCluster,
        stop_grace_s: float = STOP_GRACE_S,
        target: DriverTarget = drive,
    ) -> None:
        self._cluster = cluster
        self._stop_grace_s = stop_grace_s
        self._target = target
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None

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
        request = DriverRequest(
            self._cluster, spec, checkpoint_dir, logging.getLogger().getEffectiveLevel()
        )
        # Spawned, not forked: this process runs gRPC, Flower and supervisor threads.
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=self._target, args=(theirs, request), name=f"pretrain-driver-{spec.name}"
        )
        with self._lock:
            process.start()
            self._process = process
        theirs.close()
        try:
            return self._follow(process, ours, on_step, stop, on_wait)
        finally:
            ours.close()
            self._end(process)

    def _follow(
        self,
        process: BaseProcess,
        conn: Connection,
        on_step: Callable[[OuterStepRecord], None],
        stop: threading.Event,
        on_wait: Callable[[str | None], None],
    ) -> PretrainResult:
        killed_at: float | None = None  # when the driver is killed, if stopped and slow
        while True:
            if stop.is_set() and killed_at is None:
                with contextlib.suppress(OSError):
                    conn.send(STOP)
                killed_at = time.monotonic() + self._stop_grace_s
            if killed_at is not None and time.monotonic() > killed_at:
                process.kill()
                raise DriverDiedError(
                    f"the pretraining driver did not stop within {self._stop_grace_s:.0f} s"
                )
            try:
                ready = conn.poll(POLL_S)
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                message = None
                process.join(POLL_S)
            if message is None:
                if process.is_alive():
                    continue
                raise DriverDiedError(f"the pretraining driver {_exit_reason(process)}")
            kind, payload = message
            if kind == "step":
                on_step(payload)
            elif kind == "wait":
                on_wait(payload)
            elif kind == "done":
                result: PretrainResult = payload
                return result
            else:  # "error": the run failed in the driver, which logged it
                raise PretrainFailedError(payload)

    def _end(self, process: BaseProcess) -> None:
        """Let a finished driver leave the cluster; kill one that is still running."""
        process.join(DRIVER_EXIT_S)
        if process.is_alive():
            process.kill()
            process.join()
        with self._lock:
            if self._process is process:
                self._process = None

    def disconnect(self) -> None:
        """Kill a driver still running (its run's thread was given up on)."""
        with self._lock:
            process = self._process
        if process is not None and process.is_alive():
            process.kill()


def _exit_reason(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"died of {signal.Signals(-code).name}"
    return f"exited with code {code} before the run ended"
