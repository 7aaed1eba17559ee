"""RunningJob: all a ServerApp may do to the coordinator's state, on the real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from consortium.errors import CommitRefusedError, ConflictError, PermissionDeniedError
from coordinator.data_dir import DataDir
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.running import JobCancelledError, RunningJob
from coordinator.jobs.spec import FederatedJobSpec
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.state import JobState, RoundRecord, SqliteStateStore

RUN = "run-1"
SPEC = 'name = "r"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = 3\nmin_clients = 2\n'


def running_job(tmp_path: Path) -> tuple[DataDir, str, str]:
    """A data dir whose store holds a running job and a second, queued one."""
    data_dir = DataDir(tmp_path / "data")
    data_dir.root.mkdir()
    store = SqliteStateStore(data_dir.state_db)
    try:
        lifecycle = JobLifecycle(store)
        job = lifecycle.submit("r", "federated", SPEC, 3)
        other = lifecycle.submit("o", "federated", SPEC, 3)
        lifecycle.start(job.job_id, "go")
        lifecycle.attach_run(job.job_id, RUN)
    finally:
        store.close()
    return data_dir, job.job_id, other.job_id


def test_running_job_reads_its_typed_spec_and_records_rounds_and_success(tmp_path: Path) -> None:
    data_dir, job_id, _ = running_job(tmp_path)
    with RunningJob.open(data_dir, job_id, RUN) as job:
        assert isinstance(job.spec, FederatedJobSpec)
        assert job.spec.min_clients == 2
        job.record_round(RoundRecord(job_id, round=1, participants=2, metrics={"loss": 0.5}))
        job.succeed("completed 3 rounds", "/models/r.safetensors")
    store = SqliteStateStore(data_dir.state_db)
    try:
        assert store.get_job(job_id).state is JobState.SUCCEEDED
        assert store.list_rounds(job_id)[0].metrics == {"loss": 0.5}
    finally:
        store.close()


def test_running_job_may_claim_nonces_only_for_itself(tmp_path: Path) -> None:
    data_dir, job_id, other = running_job(tmp_path)
    with RunningJob.open(data_dir, job_id, RUN) as job:
        assert job.claim_nonce(job_id, "n1")
        assert not job.claim_nonce(job_id, "n1")  # a replay
        with pytest.raises(PermissionDeniedError):
            job.claim_nonce(other, "n2")


def test_running_job_may_not_record_rounds_of_another_job(tmp_path: Path) -> None:
    data_dir, job_id, other = running_job(tmp_path)
    with RunningJob.open(data_dir, job_id, RUN) as job, pytest.raises(PermissionDeniedError):
        job.record_round(RoundRecord(other, round=1, participants=1))


def test_cancelled_job_refuses_rounds_and_success(tmp_path: Path) -> None:
    data_dir, job_id, _ = running_job(tmp_path)
    with RunningJob.open(data_dir, job_id, RUN) as job:
        operator = SqliteStateStore(data_dir.state_db)  # the coordinator's side
        try:
            JobLifecycle(operator).cancel(job_id)
        finally:
            operator.close()
        assert job.is_cancelled()
        with pytest.raises(JobCancelledError):
            job.record_round(RoundRecord(job_id, round=1, participants=2))
        with pytest.raises(ConflictError):
            job.succeed("completed", "/m")
        with pytest.raises(ConflictError):
            job.fail("late failure")


def test_running_job_reads_other_jobs_for_pipelines(tmp_path: Path) -> None:
    data_dir, job_id, other = running_job(tmp_path)
    with RunningJob.open(data_dir, job_id, RUN) as job:
        assert job.get_job(other).state is JobState.QUEUED
        assert not job.is_revoked("alpha")
        assert job.institution_keys("alpha") == {}


def test_a_stale_run_may_neither_end_the_job_nor_pass_the_fence_and_is_counted(
    tmp_path: Path,
) -> None:
    """After a coordinator restart the job belongs to a new Flower run; the old run's
    ServerApp, still alive, must not succeed or fail it."""
    data_dir, job_id, _ = running_job(tmp_path)
    operator = SqliteStateStore(data_dir.state_db)  # the coordinator's side
    try:
        lifecycle = JobLifecycle(operator)
        lifecycle.requeue(job_id, "coordinator restarted")
        lifecycle.start(job_id, "resumed")
        lifecycle.attach_run(job_id, "run-2")
        with RunningJob.open(data_dir, job_id, RUN) as stale:
            for attempt in (
                stale.ensure_current,
                lambda: stale.succeed("completed 3 rounds", "/m"),
                lambda: stale.fail("late failure"),
                lambda: stale.record_round(RoundRecord(job_id, round=2, participants=2)),
            ):
                with pytest.raises(CommitRefusedError) as refused:
                    attempt()
                assert refused.value.reason == "stale_run"
                assert "run-2" in str(refused.value)
            stale.record_refused_commit("stale_run", 2)
        with RunningJob.open(data_dir, job_id, "run-2") as current:
            current.ensure_current()
        assert operator.get_job(job_id).state is JobState.RUNNING
        assert operator.list_rounds(job_id) == []  # nothing of the stale run's round
        assert operator.refused_commits() == {"stale_run": 1}
    finally:
        operator.close()


PRETRAIN_SPEC = 'name = "p"\nkind = "pretrain"\ninner_steps = 2\nouter_steps = 4\n'


def test_a_federated_pretraining_run_reads_its_spec_and_shows_progress_while_it_owns_the_job(
    tmp_path: Path,
) -> None:
    data_dir = DataDir(tmp_path / "data")
    data_dir.root.mkdir()
    operator = SqliteStateStore(data_dir.state_db)
    try:
        lifecycle = JobLifecycle(operator)
        job_id = lifecycle.submit("p", "pretrain", PRETRAIN_SPEC, 4).job_id
        lifecycle.start(job_id, "go")
        lifecycle.attach_run(job_id, RUN)
        with RunningJob.open(data_dir, job_id, RUN) as job:
            assert isinstance(job.spec, PretrainJobSpec)
            assert job.spec.placement == "federated"
            job.note("waiting: needs 2 workers")
            assert operator.get_job(job_id).message == "waiting: needs 2 workers"
            job.record_round(RoundRecord(job_id, round=1, participants=2))
            assert job.rounds_completed() == 1
            lifecycle.cancel(job_id)
            job.note("pretraining at the sites")  # no longer its job: shows nothing
        assert operator.get_job(job_id).state is JobState.CANCELLED
        assert operator.get_job(job_id).message != "pretraining at the sites"
    finally:
        operator.close()
