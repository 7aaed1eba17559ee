"""Federated jobs as Flower runs: the `JobRunner` for kind "federated", and for
pretraining jobs placed at the sites (``placement = "federated"``), whose ServerApp
runs DiLoCo over the same channel (coordinator/federated/pretrain_run.py).

`start` submits the Flower app through the SuperLink's Control API (`StartRun`, run
config: job-id); the ServerApp it
runs on the SuperLink records rounds and the job's end itself, through `RunningJob`
(`coordinator/jobs/running.py`). This runner stops the Flower run of a cancelled job.

A run that ends without a word from its ServerApp (the ServerApp process died: the
launcher reports its exit at once; or Flower says the run finished, asked every
`status_interval_s`) is re-queued to resume after
the job's last committed round, up to `max_resumes` times per job; after that the job
fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

from consortium.errors import ConflictError, ConsortiumError
from consortium.provenance.log import exclusive
from coordinator.federated.approvals import RunApprovals
from coordinator.federated.flower_app import RunStatus
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.pipeline import JobLookup, StartingModelError, waiting_reason
from coordinator.jobs.runner import JobCannotStartError
from coordinator.jobs.spec import FederatedJobSpec, spec_of
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.state import FINAL_JOB_STATES, JobRecord, JobState

log = logging.getLogger(__name__)

# The ServerApp marks its job done or failed itself; asking Flower only catches runs
# that died without a word, so it can be rare.
FLOWER_STATUS_INTERVAL_S = 30.0
# Resumes of one job after its run died, before the job fails instead.
MAX_RESUMES = 5


def never_exited(run_id: str) -> int | None:
    return None


class FlowerRuns(Protocol):
    """Flower's side of a run: `FlowerControl` (the Control API of our SuperLink);
    tests pass a fake to run the real runner without Flower."""

    def run(self, run_config: dict[str, str]) -> str: ...

    def fab_hash(self, run_id: str) -> str: ...

    def status(self, run_id: str) -> RunStatus: ...

    def stop(self, run_id: str) -> None: ...


class FlowerJobRunner:
    def __init__(
        self,
        lifecycle: JobLifecycle,
        jobs: JobLookup,
        flower: FlowerRuns,
        approvals: RunApprovals,
        metrics: CoordinatorMetrics | None = None,
        status_interval_s: float = FLOWER_STATUS_INTERVAL_S,
        provenance_log: Path | None = None,
        serverapp_exit: Callable[[str], int | None] = never_exited,
        max_resumes: int = MAX_RESUMES,
    ) -> None:
        self._lifecycle = lifecycle
        self._jobs = jobs
        self._flower = flower
        self._approvals = approvals
        self._metrics = metrics or CoordinatorMetrics()
        self._status_interval_s = status_interval_s
        self._run_id: str | None = None  # the Flower run of the job we started
        self._last_status_check = 0.0
        self._provenance_log = provenance_log
        self._serverapp_exit = serverapp_exit  # the launcher's report of a dead ServerApp
        self._max_resumes = max_resumes
        self._resumes: dict[str, int] = {}  # job id -> resumes so far

    def _handover(self) -> AbstractContextManager[None]:
        if self._provenance_log is None:
            return nullcontext()
        return exclusive(self._provenance_log)

    def waiting_reason(self, job: JobRecord) -> str | None:
        spec = spec_of(job)
        if not isinstance(spec, FederatedJobSpec):
            return None  # federated pretraining starts from its spec alone
        try:
            return waiting_reason(self._jobs, spec)
        except StartingModelError as error:
            raise JobCannotStartError(str(error)) from None

    def start(self, job: JobRecord) -> None:
        run_id = self._flower.run({"job-id": job.job_id})
        self._run_id = run_id
        self._last_status_check = time.monotonic()
        try:
            # The job is this run's from here on: under the log's lock, so a commit of
            # an older run (checked under the same lock) lands before or is refused.
            # Before the approval: the ServerApp starts only once approved.
            with self._handover():
                self._lifecycle.attach_run(job.job_id, run_id)
        except ConflictError:  # cancelled while the run was being started
            self.stop(job)
            return
        # Sites execute nothing of a run the coordinator has not signed for; the
        # ServerApp takes seconds to start, so this lands before its first message.
        try:
            self._approvals.approve(run_id, self._flower.fab_hash(run_id), job.job_id)
        except ConsortiumError:
            self.stop(job)  # a run no site would serve
            raise
        try:
            self._lifecycle.note(
                job.job_id,
                f"running on the Flower SuperLink (run {run_id})",
                while_in=frozenset({JobState.RUNNING}),
            )
        except ConflictError:  # cancelled meanwhile
            self.stop(job)

    def is_active(self, job: JobRecord) -> bool:
        if self._run_id is None or job.state in FINAL_JOB_STATES:
            self._end_run()
            return False
        exit_code = self._serverapp_exit(self._run_id)
        if exit_code is not None:
            return self._ended_early(job, f"its ServerApp exited with code {exit_code}")
        if time.monotonic() - self._last_status_check < self._status_interval_s:
            return True
        self._last_status_check = time.monotonic()
        try:
            status = self._flower.status(self._run_id)
        except ConsortiumError as error:
            log.warning("could not read the status of Flower run %s: %s", self._run_id, error)
            return True
        if not status.finished:
            return True
        return self._ended_early(job, f"{status.status}: {status.details}")

    def _ended_early(self, job: JobRecord, why: str) -> bool:
        """The job's run ended without the job: resume it, or fail it once it has been
        resumed `max_resumes` times. Returns False (the run is over)."""
        run_id = self._run_id
        resumes = self._resumes.get(job.job_id, 0)
        try:
            if resumes < self._max_resumes:
                self._lifecycle.requeue(
                    job.job_id,
                    f"Flower run {run_id} ended ({why}) before the job completed; resuming "
                    f"after round {self._lifecycle.get(job.job_id).rounds_completed} "
                    f"(resume {resumes + 1} of at most {self._max_resumes})",
                )
                self._resumes[job.job_id] = resumes + 1
                self._metrics.run_resumed()
            else:
                self._lifecycle.fail(
                    job.job_id,
                    f"Flower run {run_id} ended ({why}) before the job completed, after "
                    f"{resumes} resumes; see logs/superlink.log",
                )
                self._metrics.run_failed("ended_early")
        except ConflictError:
            pass  # the ServerApp completed (or someone cancelled) the job just now
        if run_id is not None:
            try:
                self._flower.stop(run_id)  # what is left of it at the SuperLink
            except ConsortiumError as error:
                log.info("Flower run %s could not be stopped (it ended): %s", run_id, error)
        self._end_run()
        return False

    def stop(self, job: JobRecord) -> None:
        if self._run_id is None:
            return
        log.info("stopping Flower run %s of job %s", self._run_id, job.job_id)
        try:
            self._flower.stop(self._run_id)
        finally:
            self._end_run()

    def shutdown(self) -> None:
        """The SuperLink stops with the coordinator and takes its runs along."""
        self._end_run()

    def _end_run(self) -> None:
        """Sites refuse the run from now on (a late message of an ended run included)."""
        if self._run_id is not None:
            self._approvals.withdraw(self._run_id)
        self._run_id = None
