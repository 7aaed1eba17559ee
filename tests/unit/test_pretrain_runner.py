"""PretrainRunner, the JobRunner of pretraining jobs, with an engine that replays outer
steps (the `PretrainEngine` seam): rounds, provenance, accounting, the model file and
the job's end, without a Ray cluster."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consortium.errors import CommitRefusedError, ConflictError
from consortium.provenance.records import OuterStep
from consortium.provenance.signing import SigningKey
from consortium.provenance.verify import verify_log
from consortium.tensor_digest import arrays_digest, file_digest
from coordinator.data_dir import DataDir
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.observability.state_metrics import StateCollector
from coordinator.pretraining import (
    ControllerState,
    OuterStepRecord,
    PretrainFailedError,
    PretrainJobSpec,
    account,
)
from coordinator.pretraining.api import PretrainResult
from coordinator.pretraining.checkpoint import Checkpoint, save_checkpoint
from coordinator.pretraining.errors import DriverDiedError
from coordinator.pretraining.runner import MAX_DRIVER_RESTARTS, PretrainRunner, outer_step_body
from coordinator.provenance.recorder import JobRecorder
from coordinator.state import InMemoryStateStore, JobState
from tests.helpers import TINY_PRETRAIN
from tests.pretrain_drivers import WAIT, step_record

SPEC = 'name = "tiny"\n' + TINY_PRETRAIN + "inner_steps = 2\nouter_steps = 3\n"
WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


@dataclass
class ReplayEngine:
    """Replays `steps` outer steps; fails, or blocks until stopped, when told to."""

    steps: int = 3
    first_step: int = 0  # a resumed run continues after its checkpoint's steps
    failure: Exception | None = None
    block_until_stopped: bool = False
    messages_seen: list[str] = field(default_factory=list)
    connected: bool = False
    disconnected: bool = False
    job_message: Callable[[], str] = lambda: ""
    edit: Callable[[OuterStepRecord], OuterStepRecord] = lambda record: record

    def connect(self) -> None:
        self.connected = True

    def run(
        self,
        spec: PretrainJobSpec,
        checkpoint_dir: Path,
        on_step: Callable[[OuterStepRecord], None],
        stop: threading.Event,
        on_wait: Callable[[str | None], None],
    ) -> PretrainResult:
        on_wait(WAIT)
        self.messages_seen.append(self.job_message())
        on_wait(None)
        self.messages_seen.append(self.job_message())
        records = []
        for step in range(self.first_step, self.first_step + self.steps):
            on_step(self.edit(step_record(step)))
            records.append(step_record(step))
        if self.failure is not None:
            raise self.failure
        if self.block_until_stopped:
            stop.wait(30)
            return self._result(ControllerState.RUNNING, records, spec)
        return self._result(ControllerState.FINISHED, records, spec)

    def _result(
        self, state: ControllerState, records: list[OuterStepRecord], spec: PretrainJobSpec
    ) -> PretrainResult:
        return PretrainResult(
            job=spec.name,
            state=state,
            steps_completed=len(records),
            # The model the last step ended with, as a real run's (provenance checks it).
            model_digest=(
                step_record(self.first_step + len(records) - 1).model_digest
                if self.first_step + len(records) > 0
                else arrays_digest(WEIGHTS)
            ),
            val_loss=records[-1].val_loss if records else None,
            weights=WEIGHTS,
            corpus_digest="corpus",
            records=tuple(records),
            accounting=account(spec.name, records),
        )

    def disconnect(self) -> None:
        self.disconnected = True


@dataclass
class Setup:
    data_dir: DataDir
    store: InMemoryStateStore
    lifecycle: JobLifecycle
    engine: ReplayEngine
    runner: PretrainRunner
    job_id: str

    def run_to_end(self) -> None:
        job = self.lifecycle.start(self.job_id, "go")
        self.runner.start(job)
        assert self.runner.wait_idle(30), "the run did not end"


def setup(tmp_path: Path, engine: ReplayEngine) -> Setup:
    data_dir = DataDir(tmp_path / "data")
    SigningKey.load_or_create(data_dir.signing_key)
    store = InMemoryStateStore()
    lifecycle = JobLifecycle(store)
    job = lifecycle.submit("tiny", "pretrain", SPEC, 3)
    engine.job_message = lambda: store.get_job(job.job_id).message
    runner = PretrainRunner(lifecycle, data_dir.root, engine)
    return Setup(data_dir, store, lifecycle, engine, runner, job.job_id)


def record_types(data_dir: DataDir) -> list[str]:
    lines = data_dir.provenance_log.read_text().splitlines()
    return [entry["type"] for entry in map(json.loads, lines) if "type" in entry]


def test_finished_run_records_rounds_provenance_accounting_model_and_success(
    tmp_path: Path,
) -> None:
    s = setup(tmp_path, ReplayEngine(steps=3))
    s.run_to_end()
    job = s.store.get_job(s.job_id)
    assert job.state is JobState.SUCCEEDED
    assert job.message == "3 outer steps, val loss 2.8000"
    assert [r.round for r in s.store.list_rounds(s.job_id)] == [1, 2, 3]
    assert s.store.list_rounds(s.job_id)[0].metrics["train_loss"] == 2.0
    assert s.engine.connected
    # Why it waited was the job's message while it waited, then the running one.
    assert s.engine.messages_seen == [f"waiting: {WAIT}", "pretraining on the Ray cluster"]
    model = s.data_dir.model_file(s.job_id)
    assert job.model_path == str(model)
    assert record_types(s.data_dir) == ["job_started"] + ["outer_step"] * 3 + ["job_completed"]
    completed = json.loads(s.data_dir.provenance_log.read_text().splitlines()[-2])
    assert completed["body"]["model_file_sha256"] == file_digest(str(model))
    report = verify_log(s.data_dir.provenance_log, SigningKey.load(s.data_dir.signing_key).public)
    assert report.records == 5
    accounting = json.loads(s.data_dir.accounting_file(s.job_id).read_text())
    assert "alpha" in json.dumps(accounting)


def test_engine_failure_fails_the_job_with_its_message(tmp_path: Path) -> None:
    s = setup(tmp_path, ReplayEngine(steps=1, failure=PretrainFailedError("too few workers")))
    s.run_to_end()
    job = s.store.get_job(s.job_id)
    assert job.state is JobState.FAILED
    assert job.message == "pretraining failed: too few workers"
    assert not s.data_dir.model_file(s.job_id).exists()


def test_cancelled_run_stops_and_records_no_success(tmp_path: Path) -> None:
    s = setup(tmp_path, ReplayEngine(steps=1, block_until_stopped=True))
    job = s.lifecycle.start(s.job_id, "go")
    s.runner.start(job)
    assert s.runner.is_active(job)
    cancelled = s.lifecycle.cancel(s.job_id)
    s.runner.stop(cancelled)
    assert s.runner.wait_idle(30)
    assert not s.runner.is_active(cancelled)
    assert s.store.get_job(s.job_id).state is JobState.CANCELLED
    assert "job_completed" not in record_types(s.data_dir)


def test_shutdown_leaves_the_job_running_to_resume_and_leaves_the_cluster(
    tmp_path: Path,
) -> None:
    s = setup(tmp_path, ReplayEngine(steps=2, block_until_stopped=True))
    s.runner.start(s.lifecycle.start(s.job_id, "go"))
    s.runner.shutdown(timeout_s=30)
    assert not s.runner.busy()
    assert s.engine.disconnected
    job = s.store.get_job(s.job_id)
    assert job.state is JobState.RUNNING
    assert job.rounds_completed == 2


def test_resumed_run_logs_job_resumed_instead_of_job_started(tmp_path: Path) -> None:
    s = setup(tmp_path, ReplayEngine(steps=2, block_until_stopped=True))
    s.runner.start(s.lifecycle.start(s.job_id, "go"))
    s.runner.shutdown(timeout_s=30)
    s.lifecycle.requeue(s.job_id, "coordinator restarted")
    resumed = PretrainRunner(s.lifecycle, s.data_dir.root, ReplayEngine(steps=1, first_step=2))
    resumed.start(s.lifecycle.start(s.job_id, "again"))
    assert resumed.wait_idle(30)
    assert record_types(s.data_dir).count("job_resumed") == 1
    assert record_types(s.data_dir).count("job_started") == 1
    assert s.store.get_job(s.job_id).state is JobState.SUCCEEDED


def test_a_step_checkpointed_but_not_logged_is_logged_once_on_resume(tmp_path: Path) -> None:
    """The controller saves its checkpoint before the step is logged; a coordinator that
    died between the two resumes after a step the log lacks. It is logged then, once,
    and a step logged twice is refused."""
    s = setup(tmp_path, ReplayEngine(steps=2, block_until_stopped=True))
    s.runner.start(s.lifecycle.start(s.job_id, "go"))
    s.runner.shutdown(timeout_s=30)  # steps 0 and 1 logged
    save_checkpoint(
        s.data_dir.checkpoints(s.job_id),
        Checkpoint(
            step=3,
            model={"w": torch.zeros(2)},
            outer_optimizer={},
            rng_state={},
            training_identity={},
            model_digest="m",
            corpus_digest="corpus",
            records=tuple(step_record(step) for step in range(3)),
        ),
    )
    s.lifecycle.requeue(s.job_id, "coordinator restarted")
    resumed = PretrainRunner(s.lifecycle, s.data_dir.root, ReplayEngine(steps=0, first_step=3))
    resumed.start(s.lifecycle.start(s.job_id, "again"))
    assert resumed.wait_idle(30)
    steps = [
        entry["body"]["step"]
        for entry in map(json.loads, s.data_dir.provenance_log.read_text().splitlines())
        if entry.get("type") == "outer_step"
    ]
    assert steps == [0, 1, 2]
    assert s.store.get_job(s.job_id).rounds_completed == 3
    verify_log(s.data_dir.provenance_log, SigningKey.load(s.data_dir.signing_key).public)

    recorder = JobRecorder(s.data_dir, s.job_id)
    with pytest.raises(CommitRefusedError, match="already logged"):
        recorder.outer_step(outer_step_body(s.job_id, step_record(1)))


def test_start_refuses_a_second_run_and_a_job_of_another_kind(tmp_path: Path) -> None:
    s = setup(tmp_path, ReplayEngine(steps=1, block_until_stopped=True))
    job = s.lifecycle.start(s.job_id, "go")
    s.runner.start(job)
    try:
        with pytest.raises(ConflictError, match="already running"):
            s.runner.start(job)
    finally:
        s.runner.stop(job)
        assert s.runner.wait_idle(30)
    federated = s.lifecycle.submit(
        "f", "federated", 'name = "f"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = 1\n', 1
    )
    with pytest.raises(ConflictError, match="not pretraining"):
        s.runner.start(federated)


def test_ready_at_once_because_the_run_itself_waits_for_workers(tmp_path: Path) -> None:
    s = setup(tmp_path, ReplayEngine())
    assert s.runner.waiting_reason(s.store.get_job(s.job_id)) is None


def test_a_driver_that_dies_requeues_its_job_until_it_keeps_dying(tmp_path: Path) -> None:
    """Ray's driver threads can crash the driver process (a segfault when the cluster
    changes under it): the job resumes from its checkpoint, a few times, then fails."""
    died = DriverDiedError("the pretraining driver died of SIGSEGV")
    s = setup(tmp_path, ReplayEngine(steps=0, failure=died))
    metrics = CoordinatorMetrics()
    s.runner = PretrainRunner(s.lifecycle, s.data_dir.root, s.engine, metrics)
    for _ in range(MAX_DRIVER_RESTARTS):
        s.run_to_end()
        job = s.store.get_job(s.job_id)
        assert job.state is JobState.QUEUED
        assert "died of SIGSEGV" in job.message
        assert job.message.endswith("resumes after 0 outer steps")
    s.run_to_end()
    job = s.store.get_job(s.job_id)
    assert job.state is JobState.FAILED
    assert job.message == f"pretraining failed: {died}"
    restarts = metrics.registry.get_sample_value(
        "consortium_child_restarts_total", {"child": "pretrain-driver"}
    )
    assert restarts == MAX_DRIVER_RESTARTS + 1


def test_a_contribution_a_spot_check_caught_is_logged_signed_and_counted(tmp_path: Path) -> None:
    caught = {"beta/ffff00001111/cpu0": "ffff00001111aaaa"}
    why = {"beta/ffff00001111/cpu0": "verification failed: its pseudo-gradient differs"}
    engine = ReplayEngine(
        steps=1,
        edit=lambda r: replace(r, verified=r.workers, verification_failed=caught, workers_lost=why),
    )
    s = setup(tmp_path, engine)
    metrics = CoordinatorMetrics()
    s.runner = PretrainRunner(s.lifecycle, s.data_dir.root, s.engine, metrics)
    s.run_to_end()
    key = SigningKey.load(s.data_dir.signing_key).public
    [step] = [
        r
        for r in verify_log(s.data_dir.provenance_log, key).jobs[s.job_id]
        if isinstance(r, OuterStep)
    ]
    assert step.verification_failed == caught and step.workers_lost == why
    assert step.verified == ["alpha/abcd/cpu0"]
    # Counted from the log at scrape time, as a federated run's failures are.
    registry = CollectorRegistry()
    collector = StateCollector(s.store, 10.0, s.data_dir.root)
    registry.register(collector)
    try:
        failures = registry.get_sample_value(
            "consortium_pretrain_verification_failures_total", {"institution": "beta"}
        )
    finally:
        collector.close()
    assert failures == 1
