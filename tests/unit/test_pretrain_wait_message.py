"""A pretraining run that waits for workers says why in its job's message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.provenance.signing import SigningKey
from coordinator.data_dir import DataDir
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.pretraining.runner import RUNNING_MESSAGE, LifecycleProgress, StepRecorder
from coordinator.state import JobRecord, JobState, SqliteStateStore

REASON = "needs 2 GPU workers, the cluster offers 0; 0 usable of min_workers=2"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStateStore]:
    s = SqliteStateStore(tmp_path / "state.db")
    s.add_job(JobRecord("job1", "tiny", "pretrain", "", JobState.RUNNING, 3, message="started"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def recorder(tmp_path: Path, store: SqliteStateStore) -> StepRecorder:
    SigningKey.load_or_create(DataDir(tmp_path).signing_key)
    return StepRecorder(LifecycleProgress(JobLifecycle(store), "job1"), tmp_path, "job1")


def test_waiting_reason_becomes_the_running_jobs_message(
    store: SqliteStateStore, recorder: StepRecorder
) -> None:
    recorder.on_wait(REASON)
    job = store.get_job("job1")
    assert job.message == f"waiting: {REASON}"
    assert job.state is JobState.RUNNING


def test_message_returns_to_running_once_workers_are_found(
    store: SqliteStateStore, recorder: StepRecorder
) -> None:
    recorder.on_wait(REASON)
    recorder.on_wait(None)
    assert store.get_job("job1").message == RUNNING_MESSAGE


def test_waiting_reason_does_not_overwrite_a_cancelled_jobs_message(
    store: SqliteStateStore, recorder: StepRecorder
) -> None:
    store.update_job("job1", state=JobState.CANCELLED, message="cancelled by request")
    recorder.on_wait(REASON)
    job = store.get_job("job1")
    assert (job.state, job.message) == (JobState.CANCELLED, "cancelled by request")
