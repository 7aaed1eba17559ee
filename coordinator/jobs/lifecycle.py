"""The one owner of job state transitions: an explicit state machine over the store.

Every change of a job's state, in the coordinator and in the ServerApp process alike,
goes through `JobLifecycle`; nothing else calls `StateStore.update_job`. The allowed
transitions are a table, so a late or stale writer (a ServerApp finishing a job that was
cancelled meanwhile, a runner failing a job that already succeeded) is refused with a
`ConflictError` instead of overwriting a final state::

    QUEUED ──start──> RUNNING ──succeed──> SUCCEEDED
      │ │               │  │ └───fail─────> FAILED
      │ │               │  └────cancel────> CANCELLED
      │ │               └──requeue──> QUEUED   (coordinator restarted mid-run)
      │ └──fail──> FAILED                      (could never start)
      └────cancel────> CANCELLED

SUCCEEDED, FAILED and CANCELLED are terminal. A state change appends a job event,
which `WatchJob` streams; a new message on an unchanged state does too (say, why a
queued job waits), through `note`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from consortium.errors import ConflictError
from coordinator.state import FINAL_JOB_STATES, JobRecord, JobState, RoundRecord, StateStore

log = logging.getLogger(__name__)

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def sources_of(target: JobState) -> frozenset[JobState]:
    """The states from which `target` may be entered."""
    return frozenset(state for state, targets in TRANSITIONS.items() if target in targets)


def is_terminal(state: JobState) -> bool:
    return not TRANSITIONS[state]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# The terminal states of the table are the store's final states; checked at import.
assert frozenset(s for s in JobState if is_terminal(s)) == FINAL_JOB_STATES


class JobLifecycle:
    """Job state transitions, each checked against `TRANSITIONS` atomically in the store."""

    def __init__(self, store: StateStore, clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._store = store
        self._clock_ms = clock_ms

    # --- reads ---------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        return self._store.get_job(job_id)

    def queued(self) -> list[JobRecord]:
        """Oldest first."""
        return self._store.list_jobs(JobState.QUEUED)

    def running(self) -> list[JobRecord]:
        return self._store.list_jobs(JobState.RUNNING)

    # --- transitions -----------------------------------------------------------
    def submit(
        self, name: str, kind: str, spec_toml: str, rounds_total: int, submitted_by: str = ""
    ) -> JobRecord:
        """A new job, QUEUED (the spec was validated by the caller)."""
        job = JobRecord(
            job_id=uuid.uuid4().hex[:12],
            name=name,
            kind=kind,
            spec_toml=spec_toml,
            state=JobState.QUEUED,
            rounds_total=rounds_total,
            message="waiting for the scheduler",
            created_at_ms=self._clock_ms(),
            submitted_by=submitted_by,
        )
        self._store.add_job(job)
        return job

    def start(self, job_id: str, message: str) -> JobRecord:
        """QUEUED -> RUNNING; ConflictError if it was cancelled meanwhile."""
        job = self._store.get_job(job_id)
        return self._move(
            job_id, JobState.RUNNING, message, started_at_ms=job.started_at_ms or self._clock_ms()
        )

    def attach_run(self, job_id: str, flower_run_id: str) -> JobRecord:
        """Remember the runtime's run id of a RUNNING job (to stop or inspect it)."""
        return self._store.update_job(
            job_id, flower_run_id=flower_run_id, expect_states=frozenset({JobState.RUNNING})
        )

    def requeue(self, job_id: str, message: str) -> JobRecord:
        """RUNNING -> QUEUED: its coordinator stopped mid-run; it resumes when scheduled."""
        return self._move(job_id, JobState.QUEUED, message)

    def succeed(self, job_id: str, message: str, model_path: str) -> JobRecord:
        return self._move(
            job_id,
            JobState.SUCCEEDED,
            message,
            model_path=model_path,
            finished_at_ms=self._clock_ms(),
        )

    def fail(self, job_id: str, message: str) -> JobRecord:
        return self._move(job_id, JobState.FAILED, message, finished_at_ms=self._clock_ms())

    def cancel(self, job_id: str, message: str = "cancelled by request") -> JobRecord:
        return self._move(job_id, JobState.CANCELLED, message, finished_at_ms=self._clock_ms())

    def note(self, job_id: str, message: str, *, while_in: frozenset[JobState]) -> JobRecord:
        """A new message on an unchanged state (watchers hear of it); ConflictError when
        the job has left `while_in` meanwhile."""
        return self._store.update_job(job_id, message=message, expect_states=while_in)

    def record_round(self, record: RoundRecord) -> None:
        """A completed round (idempotent per (job, round)), while the job runs."""
        if self._store.get_job(record.job_id).state is not JobState.RUNNING:
            raise ConflictError(f"job {record.job_id} is not running; round {record.round} dropped")
        self._store.record_round(record)

    def _move(
        self,
        job_id: str,
        target: JobState,
        message: str,
        *,
        started_at_ms: int | None = None,
        finished_at_ms: int | None = None,
        model_path: str | None = None,
    ) -> JobRecord:
        job = self._store.update_job(
            job_id,
            state=target,
            message=message,
            started_at_ms=started_at_ms,
            finished_at_ms=finished_at_ms,
            model_path=model_path,
            expect_states=sources_of(target),
        )
        log.info("job %s -> %s: %s", job_id, target.value, message)
        return job
