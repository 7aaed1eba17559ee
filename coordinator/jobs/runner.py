"""What the scheduler needs of a job kind: the `JobRunner` protocol.

One implementation per kind: `coordinator.federated.runner.FlowerJobRunner` (a Flower
run on the SuperLink) and `coordinator.pretraining.runner.PretrainRunner` (DiLoCo on
the Ray cluster). The scheduler knows no kind; it asks the runner registered for
`job.kind`. To add a job kind: a spec model in `coordinator/jobs/spec.py`, a runner
here, and one entry in the runners that `coordinator serve` hands its scheduler.

A runner never changes a job's state behind the scheduler's back except through
`JobLifecycle` (its run ends: succeed or fail; it waits: note).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from consortium.errors import ConflictError
from coordinator.state import JobRecord


class JobCannotStartError(ConflictError):
    """The queued job can never start as specified (its source model failed, its kind
    needs a runtime this coordinator does not run); the scheduler fails it."""


class JobRunner(Protocol):
    def waiting_reason(self, job: JobRecord) -> str | None:
        """Why the queued `job` cannot start yet (None: it can start now). Raises
        JobCannotStartError when it never will."""

    def start(self, job: JobRecord) -> None:
        """Run `job`, which the scheduler has just moved to RUNNING. Raises a
        ConsortiumError when the run could not be started (the job then fails)."""

    def is_active(self, job: JobRecord) -> bool:
        """Whether `job`'s run still holds the runtime (the next job waits until it
        does not). Fails the job, through the lifecycle, when its run died without
        a word."""

    def stop(self, job: JobRecord) -> None:
        """Stop `job`'s run (it was cancelled); `is_active` turns false once stopped."""

    def shutdown(self) -> None:
        """The coordinator stops: end runs without changing their jobs' state (they
        are re-queued and resume on the next start)."""


class UnavailableRunner:
    """Stands for a kind whose runtime this coordinator does not run (pretraining with
    Ray off): every such job fails at once, saying what to change."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def waiting_reason(self, job: JobRecord) -> str | None:
        raise JobCannotStartError(self._reason)

    def start(self, job: JobRecord) -> None:
        raise JobCannotStartError(self._reason)

    def is_active(self, job: JobRecord) -> bool:
        return False

    def stop(self, job: JobRecord) -> None:
        return None

    def shutdown(self) -> None:
        return None


class NeedsRuntime:
    """A kind's runner behind the runtime its runs need (the SuperLink, the Ray head):
    while that runtime is down (restarting after it died, or failed), a queued job of
    the kind waits and says why, rather than spending its start attempts on a runtime
    that is not there. `runtime_down` returns that reason, or None while it runs."""

    def __init__(self, runner: JobRunner, runtime_down: Callable[[], str | None]) -> None:
        self._runner = runner
        self._runtime_down = runtime_down

    def waiting_reason(self, job: JobRecord) -> str | None:
        down = self._runtime_down()
        return down if down is not None else self._runner.waiting_reason(job)

    def start(self, job: JobRecord) -> None:
        self._runner.start(job)

    def is_active(self, job: JobRecord) -> bool:
        return self._runner.is_active(job)

    def stop(self, job: JobRecord) -> None:
        self._runner.stop(job)

    def shutdown(self) -> None:
        self._runner.shutdown()


class ByPlacement:
    """One kind's runner per runtime, chosen by each job's placement: a pretraining job
    runs at the sites over Flower (the federated runner, "federated") or on the Ray pool
    ("ray-pool"). A runner shared with another kind is shut down by each; runners'
    `shutdown` is idempotent."""

    def __init__(
        self, runners: Mapping[str, JobRunner], placement_of: Callable[[JobRecord], str]
    ) -> None:
        self._runners = dict(runners)
        self._placement_of = placement_of

    def _runner(self, job: JobRecord) -> JobRunner:
        placement = self._placement_of(job)
        runner = self._runners.get(placement)
        if runner is None:
            known = ", ".join(sorted(self._runners))
            raise JobCannotStartError(f"no runner for placement {placement!r} (known: {known})")
        return runner

    def waiting_reason(self, job: JobRecord) -> str | None:
        return self._runner(job).waiting_reason(job)

    def start(self, job: JobRecord) -> None:
        self._runner(job).start(job)

    def is_active(self, job: JobRecord) -> bool:
        return self._runner(job).is_active(job)

    def stop(self, job: JobRecord) -> None:
        self._runner(job).stop(job)

    def shutdown(self) -> None:
        for runner in self._runners.values():
            runner.shutdown()
