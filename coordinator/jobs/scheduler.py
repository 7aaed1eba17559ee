"""Runs queued jobs one at a time, oldest first: federated jobs on the SuperLink,
pretraining jobs on the Ray cluster (`coordinator/pretraining/runner.py`).

`step()` is one iteration of the loop, so tests can drive it and assert the
state after each decision. The ServerApp (or the pretraining runner) records
rounds and success itself; the scheduler starts runs, stops cancelled ones, and
fails jobs whose Flower run ended without completing them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from consortium.errors import ConflictError, ConsortiumError
from coordinator.federated.flower_app import FlowerCli
from coordinator.jobs.pipeline import StartingModelError, waiting_reason
from coordinator.jobs.spec import PRETRAIN, parse_job_spec, parse_submitted_spec
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.pretraining.runner import PretrainRunner
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.state import FINAL_JOB_STATES, JobRecord, JobState, StateStore
from coordinator.state.sqlite_store import now_ms

log = logging.getLogger(__name__)

# The ServerApp marks its job done or failed itself; asking Flower (a `flwr ls`
# process) only catches runs that died without a word, so it can be rare.
FLOWER_STATUS_INTERVAL_S = 30.0


class Scheduler:
    def __init__(
        self,
        store: StateStore,
        flower: FlowerCli,
        poll_interval_s: float,
        metrics: CoordinatorMetrics | None = None,
        pretrain: PretrainRunner | None = None,
    ) -> None:
        self._store = store
        self._pretrain = pretrain  # None: Ray is off, pretraining jobs fail
        self._flower = flower
        self._poll_interval_s = poll_interval_s
        self._metrics = metrics or CoordinatorMetrics()
        self._active: str | None = None  # job id of the job we started
        self._last_status_check = 0.0

    def recover(self) -> None:
        """Jobs left RUNNING by a stopped coordinator go back to the queue; they
        resume from their last checkpoint when scheduled again."""
        for job in self._store.list_jobs(JobState.RUNNING):
            self._store.update_job(
                job.job_id,
                state=JobState.QUEUED,
                message=f"coordinator restarted; resumes after round {job.rounds_completed}",
            )
            log.info("job %s re-queued after restart", job.job_id)

    def step(self) -> None:
        if self._active is not None:
            self._check_active(self._active)
        if self._active is None:
            self._start_next()

    def _check_active(self, job_id: str) -> None:
        job = self._store.get_job(job_id)
        if job.kind == PRETRAIN:
            self._check_pretrain(job)
            return
        if job.state is JobState.CANCELLED:
            log.info("stopping Flower run %s of cancelled job %s", job.flower_run_id, job_id)
            try:
                self._flower.stop(job.flower_run_id)
            except ConsortiumError as error:
                log.warning("could not stop Flower run %s: %s", job.flower_run_id, error)
            self._active = None
            return
        if job.state in FINAL_JOB_STATES:
            self._active = None
            return
        if time.monotonic() - self._last_status_check < FLOWER_STATUS_INTERVAL_S:
            return
        self._last_status_check = time.monotonic()
        try:
            status = self._flower.status(job.flower_run_id)
        except ConsortiumError as error:
            log.warning("could not read the status of Flower run %s: %s", job.flower_run_id, error)
            return
        if status.finished:
            # Re-read: the ServerApp may have completed the job just now.
            if self._store.get_job(job_id).state is JobState.RUNNING:
                self._metrics.run_failed("ended_early")
                self._store.update_job(
                    job_id,
                    state=JobState.FAILED,
                    message=f"Flower run {status.run_id} ended ({status.status}: "
                    f"{status.details}) before the job completed; see logs/superlink.log",
                    finished_at_ms=now_ms(),
                    expect_states=frozenset({JobState.RUNNING}),
                )
            self._active = None

    def _check_pretrain(self, job: JobRecord) -> None:
        assert self._pretrain is not None  # only started with a runner
        if job.state is JobState.CANCELLED:
            self._pretrain.cancel()
        # The next job waits until the run (and its Ray actors) has ended.
        if not self._pretrain.busy():
            self._active = None

    def _start_pretrain(self, job: JobRecord) -> None:
        if self._pretrain is None:
            self._store.update_job(
                job.job_id,
                state=JobState.FAILED,
                message="pretraining needs Ray, but this coordinator runs with ray_enabled "
                "= false; start `coordinator serve` with Ray",
                finished_at_ms=now_ms(),
            )
            return
        spec = parse_submitted_spec(job.spec_toml)
        assert isinstance(spec, PretrainJobSpec)
        try:
            self._store.update_job(
                job.job_id,
                state=JobState.RUNNING,
                message="pretraining on the Ray cluster",
                started_at_ms=job.started_at_ms or now_ms(),
                expect_states=frozenset({JobState.QUEUED}),
            )
        except ConflictError:  # cancelled meanwhile
            return
        self._pretrain.start(job, spec)
        self._active = job.job_id
        log.info("job %s started on the Ray cluster", job.job_id)

    def _starting_model_ready(self, job: JobRecord) -> bool:
        """Whether the job's `init_from` model exists; fails the job when it never will."""
        try:
            reason = waiting_reason(self._store, parse_job_spec(job.spec_toml))
        except StartingModelError as error:
            self._store.update_job(
                job.job_id,
                state=JobState.FAILED,
                message=str(error),
                finished_at_ms=now_ms(),
                expect_states=frozenset({JobState.QUEUED}),
            )
            return False
        if reason is not None and job.message != reason:
            self._store.update_job(job.job_id, message=reason)
        return reason is None

    def _start_next(self) -> None:
        queued = self._store.list_jobs(JobState.QUEUED)
        if not queued:
            return
        job = queued[0]
        if job.kind == PRETRAIN:
            self._start_pretrain(job)
            return
        if not self._starting_model_ready(job):
            return
        try:
            run_id = self._flower.run({"job-id": job.job_id})
            self._metrics.run_started()
        except ConsortiumError as error:
            self._metrics.run_failed("start_error")
            self._store.update_job(
                job.job_id,
                state=JobState.FAILED,
                message=f"could not start the Flower run: {error}",
                finished_at_ms=now_ms(),
            )
            return
        try:
            self._store.update_job(
                job.job_id,
                state=JobState.RUNNING,
                message="running on the Flower SuperLink",
                started_at_ms=job.started_at_ms or now_ms(),
                flower_run_id=run_id,
                expect_states=frozenset({JobState.QUEUED}),
            )
        except ConflictError:  # cancelled while the run was being started
            self._flower.stop(run_id)
            return
        self._active = job.job_id
        self._last_status_check = time.monotonic()
        log.info("job %s started as Flower run %s", job.job_id, run_id)

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
