"""What a ServerApp may see and do of the coordinator's state: its own running job.

The ServerApp runs in a grandchild process that Flower starts (SuperLink -> SuperExec
-> flwr-serverapp), so it cannot share the coordinator's objects. It reaches the
coordinator's state only through `RunningJob`, opened with `RunningJob.open(data_dir,
job_id, run_id)`: its job's typed spec, other jobs for pipelines (read only), admission's
reads and nonce claims (for this job only), completed rounds, and the job's end, each
through the same `JobLifecycle` that the coordinator uses. It never opens the
database itself (an import-linter contract keeps `coordinator.state` out of it).

A run writes only while the job is its own: the coordinator hands a job to a new Flower
run (`attach_run`, under the provenance log's lock) when it resumes it, and from then
on `ensure_current` refuses the old run's writes (`CommitRefusedError("stale_run")`),
records the refusal and never lets it end the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from consortium.errors import CommitRefusedError, ConflictError, PermissionDeniedError
from coordinator.data_dir import DataDir
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.spec import JobSpec, spec_of
from coordinator.state import JobRecord, JobState, RoundRecord, SqliteStateStore, StateStore

__all__ = ["JobCancelledError", "RoundRecord", "RunningJob"]


class JobCancelledError(ConflictError):
    """The job was cancelled while it ran: its run stops and records nothing more."""


STALE_RUN = "stale_run"


class RunningJob:
    def __init__(self, store: StateStore, job_id: str, run_id: str) -> None:
        self._store = store
        self._lifecycle = JobLifecycle(store)
        self.job_id = job_id
        self.run_id = run_id  # the Flower run this ServerApp serves
        self.spec: JobSpec = spec_of(store.get_job(job_id))

    @classmethod
    @contextmanager
    def open(cls, data_dir: DataDir, job_id: str, run_id: str) -> Iterator[RunningJob]:
        store = SqliteStateStore(data_dir.state_db)
        try:
            yield cls(store, job_id, run_id)
        finally:
            store.close()

    # --- the fence ---------------------------------------------------------------
    def ensure_current(self) -> None:
        """Pass while the job runs on this run; JobCancelledError once it stopped
        running; CommitRefusedError("stale_run") when a newer run owns it."""
        job = self._store.get_job(self.job_id)
        if job.state is not JobState.RUNNING:
            raise JobCancelledError(self.job_id)
        if job.flower_run_id != self.run_id:
            raise CommitRefusedError(
                STALE_RUN,
                f"Flower run {self.run_id} no longer owns job {self.job_id} "
                f"(run {job.flower_run_id or '(none)'} does)",
            )

    def record_refused_commit(self, reason: str, round_: int) -> None:
        self._store.record_refused_commit(self.job_id, round_, self.run_id, reason)

    # --- reads -----------------------------------------------------------------
    def get_job(self, job_id: str) -> JobRecord:
        """Any job, read only (a pipeline's source)."""
        return self._store.get_job(job_id)

    def rounds_completed(self) -> int:
        return self._store.get_job(self.job_id).rounds_completed

    def is_cancelled(self) -> bool:
        return self._store.get_job(self.job_id).state is JobState.CANCELLED

    # --- admission (`coordinator.federated.admission.AdmissionState`) -----------
    def is_revoked(self, institution: str) -> bool:
        return self._store.is_revoked(institution)

    def institution_keys(self, institution: str) -> dict[str, bytes]:
        return self._store.institution_keys(institution)

    def claim_nonce(self, job_id: str, nonce: str) -> bool:
        if job_id != self.job_id:
            raise PermissionDeniedError(
                f"the run of job {self.job_id} may not claim nonces of job {job_id}"
            )
        return self._store.claim_nonce(job_id, nonce)

    def declared_examples(self, institution: str) -> int | None:
        return self._store.declared_examples(institution)

    def institution_of_node(self, flower_node_id: int) -> str:
        """The institution whose onboarded SuperNode key the SuperLink knows as this
        node ("" if none): names a site whose reply carries no signed institution."""
        for institution, _, node_id in self._store.supernode_keys():
            if node_id == str(flower_node_id):
                return institution
        return ""

    # --- writes, through the lifecycle -------------------------------------------
    def record_round(self, record: RoundRecord) -> None:
        """A completed round; JobCancelledError when the job no longer runs,
        CommitRefusedError("stale_run") when a newer run owns it (a pretraining step
        records its round before its fenced log record)."""
        if record.job_id != self.job_id:
            raise PermissionDeniedError(f"round of job {record.job_id} from job {self.job_id}")
        self.ensure_current()
        try:
            self._lifecycle.record_round(record)
        except ConflictError:
            raise JobCancelledError(self.job_id) from None

    def note(self, message: str) -> None:
        """Show `message` as the job's while it runs on this run (else nothing)."""
        try:
            self.ensure_current()
            self._lifecycle.note(self.job_id, message, while_in=frozenset({JobState.RUNNING}))
        except ConflictError:  # JobCancelledError, or CommitRefusedError (stale run)
            pass  # it stopped running here: its message is no longer this run's to set

    def succeed(self, message: str, model_path: str) -> JobRecord:
        self.ensure_current()
        return self._lifecycle.succeed(self.job_id, message, model_path)

    def fail(self, message: str) -> JobRecord:
        """Fails the job only while it is this run's (a stale run's failure is not the
        job's: CommitRefusedError)."""
        self.ensure_current()
        return self._lifecycle.fail(self.job_id, message)
