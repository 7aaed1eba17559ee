"""Where the inner loops of an outer step run: the `InnerLoops` seam of `DiLoCoController`.

The controller plans, averages, spot-checks, steps and checkpoints; an `InnerLoops` only
runs the planned workers' inner loops and brings back what they sent. Two exist:

- `coordinator.pretraining.pool.RayInnerLoops`: actors of the operator's Ray pool (one
  trust domain: docs/security.md);
- `coordinator.federated.diloco_sites.FlowerSites`: each institution's own site, reached
  through the authenticated federated channel, which returns a signed pseudo-gradient
  (federated pretraining, the default across institutions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from consortium.inner_loop import InnerMetrics
from consortium.lm import Weights
from consortium.pseudo_gradient_codec import Encoded
from coordinator.pretraining.cluster import WorkerSlot


class StopRequested(Exception):  # noqa: N818 - a signal, not an error
    """The run was asked to stop while it waited on its workers."""


@dataclass(frozen=True)
class Assignment:
    """One worker's part of one outer step (decided by `schedule`)."""

    slot: WorkerSlot
    position: int
    shard_ids: tuple[int, ...]
    seed: int


# worker id -> (its pseudo-gradient as sent, in the job's codec; its metrics)
Returned = dict[str, tuple[Encoded, InnerMetrics]]
Lost = dict[str, str]  # worker id -> why it brought nothing back


@dataclass(frozen=True)
class InnerStep:
    """What every worker of one outer step is asked to do."""

    step: int  # the outer step (0-based)
    weights: Weights  # the global model they all start from
    inner_steps: int
    first_inner_step: int  # job-wide index of the first inner step (positions the LR)
    timeout_s: float  # step_timeout_s: a worker later than this is lost for the step


class InnerLoops(Protocol):
    def reconcile(self, slots: tuple[WorkerSlot, ...]) -> Lost:
        """Be ready to run the planned `slots`; returns the ones that cannot start."""

    def run(
        self,
        request: InnerStep,
        plan: Mapping[str, Assignment],
        dispatched: Callable[[], None],
    ) -> tuple[Returned, Lost]:
        """Run every planned worker's inner loop (call `dispatched` once they are all
        sent) and wait up to ``request.timeout_s``; a worker that died, timed out or
        sent something refused is in `Lost` with the reason. Raises
        `StopRequested` when the run was asked to stop."""

    def drop(self, worker_id: str) -> None:
        """Forget `worker_id` (it failed; it is planned again from scratch)."""

    def close(self) -> None:
        """Release every worker of the job."""
