"""Runs one pretraining job at a time in a background thread of the coordinator.

The scheduler hands a queued job of kind "pretrain" to `PretrainRunner.start`; the
thread connects to the coordinator's Ray cluster (once per process), calls
`coordinator.pretraining.run_pretraining`, shows why it
waits whenever too few workers are usable as the job's message ("waiting: needs 2 GPU
workers, the cluster offers 0; ..."), and records every outer step as the job's round
(so `jobs watch` shows progress), as a signed `outer_step` record in the provenance log
followed by a tree head, and in the job's accounting file. At the end it saves the
global model as safetensors and marks the job SUCCEEDED, or FAILED with the error.
Cancelling sets the run's stop event; a coordinator shutdown stops the run too but
leaves the job RUNNING, so the next start re-queues it and it resumes from its
checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from consortium.errors import ConflictError
from consortium.provenance.environment import describe_environment
from consortium.provenance.records import JobStarted, OuterStep, WorkerEntry
from consortium.startup import imports_without_gc
from coordinator.data_dir import DataDir
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.spec import spec_of
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.pretraining.accounting import account
from coordinator.pretraining.accounting_files import write_accounting
from coordinator.pretraining.engine import PretrainEngine
from coordinator.pretraining.errors import DriverDiedError
from coordinator.pretraining.records import ControllerState, OuterStepRecord
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.provenance.recorder import JobRecorder
from coordinator.state import JobRecord, JobState, RoundRecord

if TYPE_CHECKING:
    from coordinator.pretraining.api import PretrainResult

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30.0
RUNNING = frozenset({JobState.RUNNING})
RUNNING_MESSAGE = "pretraining on the Ray cluster"  # while workers are at it
MAX_DRIVER_RESTARTS = 3  # per job, in this coordinator's life


class PretrainRunner:
    """The `JobRunner` of kind "pretrain": one run at a time, in a thread."""

    def __init__(
        self,
        lifecycle: JobLifecycle,
        data_dir: Path,
        engine: PretrainEngine,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics or CoordinatorMetrics()
        self._data_dir = data_dir
        self._engine = engine
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._shutting_down = threading.Event()
        self._interrupted = ""  # why the current run was interrupted (its cluster died)
        self._driver_deaths: dict[str, int] = {}  # job id -> its driver's crashes

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def waiting_reason(self, job: JobRecord) -> str | None:
        """Ready at once: the run itself waits for workers, and says why."""
        return None

    def start(self, job: JobRecord) -> None:
        """Run `job` (already RUNNING in the store) in a new thread."""
        if self.busy():
            raise ConflictError("a pretraining job is already running")
        spec = spec_of(job)
        if not isinstance(spec, PretrainJobSpec):
            raise ConflictError(f"job {job.job_id} is a {spec.kind} job, not pretraining")
        self._stop = threading.Event()
        self._interrupted = ""
        self._thread = threading.Thread(
            target=self._run, args=(job.job_id, spec, self._stop), name=f"pretrain-{job.job_id}"
        )
        self._thread.start()

    def is_active(self, job: JobRecord) -> bool:
        """The next job waits until this run (and its Ray actors) has ended."""
        return self.busy()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for the current run's thread to end; whether it has."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.busy()

    def stop(self, job: JobRecord) -> None:
        """Stop the current run after its current attempt (the job was cancelled)."""
        self._stop.set()

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop the run, leaving its job RUNNING: the next start re-queues it and it
        resumes from its checkpoint."""
        self._shutting_down.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("pretraining thread still busy after %.0f s; leaving it", timeout_s)
        self._engine.disconnect()

    def interrupt(self, reason: str, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """The cluster under the current run is gone (its Ray head died): stop the run
        and put its job back in the queue, to resume from its checkpoint once the
        cluster is back; then leave the cluster."""
        if self.busy():
            self._interrupted = reason
            self._stop.set()
            assert self._thread is not None
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("pretraining thread still busy after %.0f s; leaving it", timeout_s)
        self._engine.disconnect()

    def disconnect(self) -> None:
        """Leave the cluster while idle (its head is about to restart); the next job
        connects again."""
        if not self.busy():
            self._engine.disconnect()

    def _run(self, job_id: str, spec: PretrainJobSpec, stop: threading.Event) -> None:
        progress = LifecycleProgress(self._lifecycle, job_id)
        recorder = StepRecorder(progress, self._data_dir, job_id, self._metrics)
        try:
            self._engine.connect()
            recorder.log_start(spec)
            result = self._engine.run(
                spec,
                DataDir(self._data_dir).checkpoints(job_id),
                recorder.on_step,
                stop,
                recorder.on_wait,
            )
        except Exception as error:  # any failure ends the job, with its message
            if self._shutting_down.is_set():
                log.warning("pretraining job %s interrupted by shutdown: %s", job_id, error)
                return
            if self._interrupted:
                self._requeue(job_id, error)
                return
            if isinstance(error, DriverDiedError) and self._driver_may_restart(job_id):
                self._interrupted = "its driver process died"
                self._requeue(job_id, error)
                return
            log.exception("pretraining job %s failed", job_id)
            reason = f"pretraining failed: {error}"
            self._end(job_id, lambda: self._lifecycle.fail(job_id, reason))
            return
        if result.state is not ControllerState.FINISHED:
            log.info("pretraining job %s stopped after %d steps", job_id, result.steps_completed)
            if self._interrupted:
                self._requeue(job_id, None)
            return  # cancelled (already final) or shutting down (resumes on restart)
        model_path, message = save_result(self._data_dir, job_id, result, recorder)
        self._end(job_id, lambda: self._lifecycle.succeed(job_id, message, str(model_path)))

    def _driver_may_restart(self, job_id: str) -> bool:
        """A crashed driver (Ray's driver threads can segfault when the cluster changes
        under them) is restarted: the job resumes from its checkpoint. A driver that
        keeps dying fails its job instead of looping."""
        deaths = self._driver_deaths.get(job_id, 0) + 1
        self._driver_deaths[job_id] = deaths
        self._metrics.child_restarted("pretrain-driver")
        return deaths <= MAX_DRIVER_RESTARTS

    def _requeue(self, job_id: str, error: Exception | None) -> None:
        done = self._lifecycle.get(job_id).rounds_completed
        detail = f" ({error})" if error is not None else ""
        message = f"{self._interrupted}{detail}; resumes after {done} outer steps"
        log.warning("pretraining job %s interrupted: %s", job_id, message)
        self._metrics.run_resumed()
        self._end(job_id, lambda: self._lifecycle.requeue(job_id, message))

    @staticmethod
    def _end(job_id: str, transition: Callable[[], JobRecord]) -> None:
        try:
            transition()
        except ConflictError:
            log.info("job %s was no longer running (cancelled?); its end is not recorded", job_id)


def save_result(
    data_dir: Path, job_id: str, result: PretrainResult, recorder: StepRecorder
) -> tuple[Path, str]:
    """A finished run's accounting, model file and `job_completed` record; returns the
    model's path and the job's closing message."""
    write_accounting(data_dir, job_id, result.accounting)
    model_path = DataDir(data_dir).model_file(job_id)
    # Imported here: a coordinator that never runs a pretraining job (or runs without
    # Ray) does not pay for importing torch at start-up. Frozen once loaded
    # (consortium/startup.py), after a full collection: the server's threads run.
    with imports_without_gc(collect_first=True):
        import torch

        from coordinator.federated.checkpoints import save_model

    save_model(
        model_path,
        {name: torch.from_numpy(array) for name, array in result.weights.items()},
        {"job_id": job_id, "model_digest": result.model_digest},
    )
    recorder.log_finish(result.model_digest, result.corpus_digest, result.val_loss)
    message = (
        f"{result.steps_completed} outer steps, val loss {result.val_loss:.4f}"
        if result.val_loss is not None
        else f"{result.steps_completed} outer steps"
    )
    return model_path, message


class JobProgress(Protocol):
    """Where a run shows its job's progress: the lifecycle (`LifecycleProgress`, in
    `coordinator serve`), or a ServerApp's `RunningJob` (federated pretraining)."""

    def rounds_completed(self) -> int: ...

    def note(self, message: str) -> None:
        """Show `message` as the job's while it runs (nothing once it stopped)."""

    def record_round(self, record: RoundRecord) -> None: ...


class LifecycleProgress:
    def __init__(self, lifecycle: JobLifecycle, job_id: str) -> None:
        self._lifecycle = lifecycle
        self._job_id = job_id

    def rounds_completed(self) -> int:
        return self._lifecycle.get(self._job_id).rounds_completed

    def note(self, message: str) -> None:
        try:
            self._lifecycle.note(self._job_id, message, while_in=RUNNING)
        except ConflictError:
            log.info("job %s is no longer running; not showing %r", self._job_id, message)

    def record_round(self, record: RoundRecord) -> None:
        self._lifecycle.record_round(record)


class StepRecorder:
    """What one outer step leaves behind: a round, provenance records, accounting and
    compute metrics. ``fence`` runs before every provenance append (a ServerApp's
    `RunningJob.ensure_current`: a run that no longer owns its job writes nothing)."""

    def __init__(
        self,
        progress: JobProgress,
        data_dir: Path,
        job_id: str,
        metrics: CoordinatorMetrics | None = None,
        fence: Callable[[], None] | None = None,
        running_message: str = RUNNING_MESSAGE,
    ) -> None:
        self._progress = progress
        self._metrics = metrics or CoordinatorMetrics()
        self._data_dir = data_dir
        self._job_id = job_id
        self._records: list[OuterStepRecord] = []
        self._provenance = JobRecorder(DataDir(data_dir), job_id, fence=fence)
        self._running_message = running_message

    @property
    def provenance(self) -> JobRecorder:
        return self._provenance

    def log_start(self, spec: PretrainJobSpec) -> None:
        if self._progress.rounds_completed() or self._provenance.has_started():
            self._log_checkpointed_steps()
            done = self._progress.rounds_completed()
            self._provenance.job_resumed("pretrain", done)
            return
        self._provenance.job_started(
            JobStarted(
                job_id=self._job_id,
                kind="pretrain",
                spec=spec.model_dump(mode="json"),
                spec_digest=spec.digest(),
                seed=spec.seed,
                environment=describe_environment(spec.device, spec.deterministic),
            )
        )

    def _log_checkpointed_steps(self) -> None:
        """Steps the checkpoint holds that the log does not: the controller saves its
        checkpoint before a step is logged, so a coordinator that died between the two
        resumes after a step the log never heard of. Logged (and recorded) here, once."""
        with imports_without_gc(collect_first=True):  # torch, as above
            from coordinator.pretraining.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(DataDir(self._data_dir).checkpoints(self._job_id))
        if checkpoint is None:
            return
        logged = self._provenance.logged_outer_steps()
        for record in checkpoint.records:
            if record.step not in logged:
                log.warning(
                    "job %s: outer step %d was checkpointed but not logged; logging it now",
                    self._job_id,
                    record.step,
                )
                self.on_step(record)

    def on_wait(self, reason: str | None) -> None:
        """Why the run waits for workers (None: it goes on), as the job's message."""
        self._progress.note(f"waiting: {reason}" if reason is not None else self._running_message)

    def on_step(self, record: OuterStepRecord) -> None:
        round_ = record.step + 1  # rounds are 1-based, outer steps 0-based
        train_losses = [r.train_loss for r in record.results]
        metrics = {
            "val_loss": record.val_loss,
            "workers_lost": float(len(record.workers_lost)),
            "wall_s": record.wall_s,
        }
        if train_losses:
            metrics["train_loss"] = sum(train_losses) / len(train_losses)
        self._progress.record_round(
            RoundRecord(
                self._job_id, round=round_, participants=len(record.results), metrics=metrics
            )
        )
        self._provenance.outer_step(outer_step_body(self._job_id, record))
        self._records.append(record)
        write_accounting(self._data_dir, self._job_id, account(self._job_id, self._records))

    def log_finish(self, model_digest: str, corpus_digest: str, val_loss: float | None) -> None:
        """The job's `job_completed` record; call it after the model is saved at
        `DataDir.model_file(job_id)`, whose name and sha256 the record carries."""
        self._provenance.job_completed(
            "pretrain",
            self._progress.rounds_completed(),
            model_digest,
            DataDir(self._data_dir).model_file(self._job_id),
            corpus_digest=corpus_digest,
            val_loss=val_loss,
        )


def outer_step_body(job_id: str, record: OuterStepRecord) -> OuterStep:
    """The provenance record of one outer step: who computed what on which shards."""
    return OuterStep(
        job_id=job_id,
        round=record.step + 1,
        step=record.step,
        workers=[
            WorkerEntry(
                worker=r.worker,
                institution=r.institution,
                node_id=r.node_id,
                device=r.device,
                position=r.position,
                shard_ids=list(r.shard_ids),
                seed=r.seed,
                pseudo_gradient_digest=r.pseudo_gradient_digest,
                inner_steps=r.inner_steps,
                tokens=r.tokens,
                compute_s=r.compute_s,
            )
            for r in record.results
        ],
        workers_lost=dict(record.workers_lost),
        step_seed=record.step_seed,
        aggregate_digest=record.aggregate_digest,
        model_digest=record.model_digest,
        val_loss=record.val_loss,
        attempts=record.attempts,
        verified=list(record.verified),
        verification_failed=dict(record.verification_failed),
    )
