"""Runs queued jobs one at a time, oldest first, each on the runner of its kind.

The scheduler knows no job kind: `coordinator serve` hands it one `JobRunner` per kind
(`coordinator/jobs/runner.py`). Each `step()` is one decision, so tests drive it with
fake runners over an in-memory store and assert the state after each::

    idle ──queued job ready──> start: lifecycle QUEUED->RUNNING, runner.start
      ^                                   │
      │                                   v
      └──── runner no longer active <── active: cancelled? runner.stop; is_active?

A queued job whose runner says it waits keeps its place and shows why (its message);
one that can never start fails. Runs end by themselves (the runner records success or
failure through the lifecycle); the scheduler only notices that the runtime is free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from consortium.errors import ConflictError, ConsortiumError
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.runner import JobCannotStartError, JobRunner
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.state import JobRecord, JobState

log = logging.getLogger(__name__)

QUEUED_ONLY = frozenset({JobState.QUEUED})
# A run that fails to start (its runtime died at that moment: a SuperLink restarting)
# is tried again after 2, 4, ... s; the job fails after this many attempts.
START_ATTEMPTS = 3
START_BACKOFF_S = 2.0


class Scheduler:
    def __init__(
        self,
        lifecycle: JobLifecycle,
        runners: Mapping[str, JobRunner],
        poll_interval_s: float,
        metrics: CoordinatorMetrics | None = None,
        start_attempts: int = START_ATTEMPTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lifecycle = lifecycle
        self._runners = dict(runners)
        self._poll_interval_s = poll_interval_s
        self._metrics = metrics or CoordinatorMetrics()
        self._active: str | None = None  # job id of the job we started
        self._stop_sent = False
        self._start_attempts = start_attempts
        self._clock = clock
        self._failed_starts: dict[str, tuple[int, float]] = {}  # job -> (failures, retry at)

    @property
    def active_job(self) -> str | None:
        return self._active

    def recover(self) -> None:
        """Jobs left RUNNING by a stopped coordinator go back to the queue; they
        resume from their last checkpoint when scheduled again."""
        for job in self._lifecycle.running():
            self._lifecycle.requeue(
                job.job_id, f"coordinator restarted; resumes after round {job.rounds_completed}"
            )
            log.info("job %s re-queued after restart", job.job_id)

    def step(self) -> None:
        if self._active is not None:
            self._check_active(self._active)
        if self._active is None:
            self._start_next()

    def shutdown(self) -> None:
        """Stop every runner's runs, leaving their jobs RUNNING (re-queued at next start)."""
        for runner in self._runners.values():
            runner.shutdown()

    def run_forever(
        self, stopping: threading.Event, before_step: Callable[[], None] | None = None
    ) -> None:
        self.recover()
        while not stopping.is_set():
            try:
                if before_step is not None:
                    before_step()
                self.step()
            except Exception:
                log.exception("scheduler step failed; retrying")
            stopping.wait(self._poll_interval_s)

    def _runner(self, job: JobRecord) -> JobRunner:
        runner = self._runners.get(job.kind)
        if runner is None:
            known = ", ".join(sorted(self._runners)) or "none"
            raise JobCannotStartError(
                f"this coordinator runs no {job.kind!r} jobs (runners: {known})"
            )
        return runner

    def _check_active(self, job_id: str) -> None:
        job = self._lifecycle.get(job_id)
        runner = self._runner(job)
        if job.state is JobState.CANCELLED and not self._stop_sent:
            log.info("stopping the run of cancelled job %s", job_id)
            self._stop_sent = True
            try:
                runner.stop(job)
            except ConsortiumError as error:
                log.warning("could not stop the run of job %s: %s", job_id, error)
        if not runner.is_active(job):
            self._active = None

    def _start_next(self) -> None:
        queued = self._lifecycle.queued()
        if not queued:
            return
        job = queued[0]
        try:
            runner = self._runner(job)
            reason = runner.waiting_reason(job)
        except JobCannotStartError as error:
            self._fail_queued(job, str(error))
            return
        if reason is not None:
            if job.message != reason:
                self._note_queued(job, reason)
            return
        failures, retry_at = self._failed_starts.get(job.job_id, (0, 0.0))
        if self._clock() < retry_at:
            return
        try:
            job = self._lifecycle.start(job.job_id, f"starting its {job.kind} run")
        except ConflictError:  # cancelled meanwhile
            return
        try:
            runner.start(job)
        except ConsortiumError as error:
            self._metrics.run_failed("start_error")
            self._start_failed(job, failures + 1, error)
            return
        self._failed_starts.pop(job.job_id, None)
        self._metrics.run_started()
        self._active = job.job_id
        self._stop_sent = False
        log.info("job %s (%s) started", job.job_id, job.kind)

    def _start_failed(self, job: JobRecord, failures: int, error: ConsortiumError) -> None:
        """Back to the queue to try again later, or failed after `start_attempts`."""
        if failures >= self._start_attempts:
            self._failed_starts.pop(job.job_id, None)
            self._lifecycle.fail(job.job_id, f"could not start the run: {error}")
            return
        wait_s = START_BACKOFF_S * 2 ** (failures - 1)
        self._failed_starts[job.job_id] = (failures, self._clock() + wait_s)
        try:
            self._lifecycle.requeue(
                job.job_id,
                f"could not start the run (attempt {failures} of {self._start_attempts}): "
                f"{error}; trying again in {wait_s:.0f} s",
            )
        except ConflictError:
            log.info("job %s was cancelled while its run failed to start", job.job_id)

    def _fail_queued(self, job: JobRecord, message: str) -> None:
        try:
            self._lifecycle.fail(job.job_id, message)
        except ConflictError:
            log.info("job %s left the queue meanwhile; not failing it", job.job_id)

    def _note_queued(self, job: JobRecord, message: str) -> None:
        try:
            self._lifecycle.note(job.job_id, message, while_in=QUEUED_ONLY)
        except ConflictError:
            log.info("job %s left the queue meanwhile", job.job_id)
