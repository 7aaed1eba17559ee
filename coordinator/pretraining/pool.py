"""The live `DiLoCoWorker` actors of one job, one per planned slot.

`reconcile(slots)` makes the pool match a plan: actors whose slot left the plan are
killed; missing ones are placed (pinned to their node, holding one GPU or one CPU and
a sliver of the node's ``institution:<name>`` resource) and awaited until ready, with a
timeout. Actors survive across outer steps, so a worker keeps its inner optimizer state
and its corpus in memory; the controller drops (kills) the ones that fail.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from consortium.inner_loop import WorkerConfig
from coordinator.pretraining.cluster import WorkerSlot
from coordinator.pretraining.inner_loops import (
    Assignment,
    InnerStep,
    Lost,
    Returned,
    StopRequested,
)
from coordinator.pretraining.worker import DiLoCoWorker

log = logging.getLogger(__name__)

# Each worker takes this much of its node's `institution:<name>` resource: enough to tie
# the actor to the institution's nodes, small enough never to be what limits placement.
INSTITUTION_RESOURCE_PER_WORKER = 0.001


def describe_failure(error: BaseException) -> str:
    """One line for records and logs: the error type and the first line of its message."""
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}".strip()


# The longest a wait on workers goes without looking at the stop event: a run stopped
# (its Ray head died, or the job was cancelled) leaves within about this long, rather
# than after worker_start_timeout_s or step_timeout_s.
STOP_POLL_S = 1.0


def wait_one(pending: list[Any], remaining: float, stop: threading.Event | None) -> list[Any]:
    """`ray.wait` for one of `pending` for at most `remaining` seconds, in slices that
    look at `stop` between them; raises StopRequested when it is set."""
    ready, _ = ray.wait(pending, num_returns=1, timeout=min(remaining, STOP_POLL_S))
    if not ready and stop is not None and stop.is_set():
        raise StopRequested
    return list(ready)


class WorkerPool:
    def __init__(
        self,
        config_for: Callable[[WorkerSlot], WorkerConfig],
        start_timeout_s: float,
        stop: threading.Event | None = None,
        actor_class: Callable[[WorkerSlot], Any] | None = None,
    ) -> None:
        self._config_for = config_for
        self._actor_class = actor_class or (lambda _slot: DiLoCoWorker)
        self._start_timeout_s = start_timeout_s
        self._stop = stop
        self._actors: dict[str, Any] = {}  # worker id -> actor handle
        self._slots: dict[str, WorkerSlot] = {}

    @property
    def workers(self) -> list[str]:
        return sorted(self._actors)

    def actor(self, worker_id: str) -> Any:
        return self._actors[worker_id]

    def reconcile(self, slots: tuple[WorkerSlot, ...]) -> dict[str, str]:
        """Match the plan; returns ``{worker id: reason}`` for workers that did not start."""
        wanted = {slot.worker_id: slot for slot in slots}
        for worker_id in [w for w in self._actors if w not in wanted]:
            self.drop(worker_id)
        starting: dict[str, Any] = {}
        failed: dict[str, str] = {}
        for slot in slots:
            if slot.worker_id in self._actors:
                continue
            try:
                starting[slot.worker_id] = self._start(slot)
            except Exception as err:  # any placement error (bad node id, ...) fails one slot
                failed[slot.worker_id] = "failed to start: " + describe_failure(err)
        pending = {actor.ready.remote(): worker_id for worker_id, actor in starting.items()}
        deadline = time.monotonic() + self._start_timeout_s
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for ref in wait_one(list(pending), remaining, self._stop):
                worker_id = pending.pop(ref)
                try:
                    info = ray.get(ref)
                    log.info("worker %s ready: %s", worker_id, info)
                except ray.exceptions.RayError as err:
                    failed[worker_id] = "failed to start: " + describe_failure(err)
        for worker_id in pending.values():
            failed[worker_id] = (
                f"did not start within worker_start_timeout_s={self._start_timeout_s}"
            )
        for worker_id, actor in starting.items():
            self._actors[worker_id] = actor
            self._slots[worker_id] = wanted[worker_id]
            if worker_id in failed:
                self.drop(worker_id)
        return failed

    def drop(self, worker_id: str) -> None:
        actor = self._actors.pop(worker_id, None)
        self._slots.pop(worker_id, None)
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except ray.exceptions.RayError:
                log.debug("worker %s was already gone", worker_id)

    def close(self) -> None:
        for worker_id in list(self._actors):
            self.drop(worker_id)

    def _start(self, slot: WorkerSlot) -> Any:
        options: dict[str, Any] = {
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=slot.node_id, soft=False),
            "num_cpus": 1 if slot.device == "cpu" else 0,
            "num_gpus": 1 if slot.device == "gpu" else 0,
        }
        if slot.resource is not None:
            options["resources"] = {slot.resource: INSTITUTION_RESOURCE_PER_WORKER}
        actor_class = self._actor_class(slot)
        return actor_class.options(**options).remote(self._config_for(slot))


class RayInnerLoops:
    """`InnerLoops` on the Ray pool: the global weights are put in Ray's object store
    once and every worker's actor reads that copy; results come back as they finish."""

    def __init__(self, pool: WorkerPool, stop: threading.Event | None = None) -> None:
        self._pool = pool
        self._stop = stop

    def reconcile(self, slots: tuple[WorkerSlot, ...]) -> Lost:
        return self._pool.reconcile(slots)

    def run(
        self,
        request: InnerStep,
        plan: Mapping[str, Assignment],
        dispatched: Callable[[], None],
    ) -> tuple[Returned, Lost]:
        global_ref = ray.put(request.weights)
        steps, first = request.inner_steps, request.first_inner_step
        pending = {
            self._pool.actor(w).run_inner.remote(global_ref, a.shard_ids, steps, a.seed, first): w
            for w, a in plan.items()
        }
        dispatched()
        returned: Returned = {}
        lost: Lost = {}
        deadline = time.monotonic() + request.timeout_s
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for ref in wait_one(list(pending), remaining, self._stop):
                worker_id = pending.pop(ref)
                try:
                    returned[worker_id] = ray.get(ref)
                except ray.exceptions.RayError as err:
                    lost[worker_id] = "died: " + describe_failure(err)
        for worker_id in pending.values():
            lost[worker_id] = f"timed out after step_timeout_s={request.timeout_s}"
        return returned, lost

    def drop(self, worker_id: str) -> None:
        self._pool.drop(worker_id)

    def close(self) -> None:
        self._pool.close()
