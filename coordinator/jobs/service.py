"""Job lifecycle: submit, get, list, cancel. Scheduling lives in the scheduler."""

from __future__ import annotations

import uuid

from coordinator.jobs.spec import FederatedJobSpec, parse_submitted_spec
from coordinator.state import JobRecord, JobState, RoundRecord, StateStore
from coordinator.state.sqlite_store import now_ms

CANCELLABLE = frozenset({JobState.QUEUED, JobState.RUNNING})


class JobService:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    def submit(self, spec_toml: str) -> JobRecord:
        """Validate and queue; an invalid spec raises JobSpecError and creates nothing."""
        spec = parse_submitted_spec(spec_toml)
        # A pretraining job's rounds are its outer steps.
        rounds = spec.rounds if isinstance(spec, FederatedJobSpec) else spec.outer_steps
        job = JobRecord(
            job_id=uuid.uuid4().hex[:12],
            name=spec.name,
            kind=spec.kind,
            spec_toml=spec_toml,
            state=JobState.QUEUED,
            rounds_total=rounds,
            message="waiting for the scheduler",
            created_at_ms=now_ms(),
        )
        self._store.add_job(job)
        return job

    def get(self, job_id: str) -> tuple[JobRecord, list[RoundRecord]]:
        return self._store.get_job(job_id), self._store.list_rounds(job_id)

    def list(self) -> list[JobRecord]:
        return self._store.list_jobs()

    def cancel(self, job_id: str) -> JobRecord:
        """Queued jobs never start; running ones are stopped by the scheduler."""
        return self._store.update_job(
            job_id,
            state=JobState.CANCELLED,
            message="cancelled by request",
            finished_at_ms=now_ms(),
            expect_states=CANCELLABLE,
        )
