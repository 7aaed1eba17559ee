"""Where a pretraining run executes: the `PretrainEngine` seam of `PretrainRunner`.

`RayEngine` connects this process to the coordinator's Ray cluster as a driver and runs
`run_pretraining` (DiLoCo on the contributed workers). Tests hand the runner an engine
that replays outer steps, so the runner's bookkeeping (rounds, provenance, accounting,
the job's end) is tested without a Ray cluster.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from consortium.ray_env import use_ray_auth_in_this_process
from coordinator.pretraining.records import OuterStepRecord
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.ray.head import RayCluster

if TYPE_CHECKING:
    from coordinator.pretraining.api import PretrainResult


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


class RayEngine:
    """Ray and the training code (torch) are imported when the first pretraining job
    connects, not when `coordinator serve` starts: most runs never pretrain."""

    def __init__(self, cluster: RayCluster) -> None:
        self._cluster = cluster

    def connect(self) -> None:
        import ray
        from ray._private import ray_constants

        if ray.is_initialized():
            return
        # The driver authenticates like every other Ray process of the cluster.
        use_ray_auth_in_this_process(self._cluster.token_path, self._cluster.tls)
        # Ray's C++ failure-signal handler would turn the SIGTERM that stops `coordinator
        # serve` into an abort 3 s later (absl's alarm), before the coordinator has
        # stopped its Ray head and SuperLink: they would be orphaned, and a coordinator
        # restarted on the same data dir could not start its Ray head. `serve` handles
        # SIGTERM itself. (Read when the driver starts; its env var only before import.)
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        ray.init(address=self._cluster.address, logging_level=logging.WARNING)

    def run(
        self,
        spec: PretrainJobSpec,
        checkpoint_dir: Path,
        on_step: Callable[[OuterStepRecord], None],
        stop: threading.Event,
        on_wait: Callable[[str | None], None],
    ) -> PretrainResult:
        from coordinator.pretraining.api import run_pretraining

        return run_pretraining(spec, checkpoint_dir, on_step, stop=stop, on_wait=on_wait)

    def disconnect(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
