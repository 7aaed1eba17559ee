"""JobLifecycle: every transition of the table is allowed, every other one refused."""

from __future__ import annotations

import itertools

import pytest

from consortium.errors import ConflictError
from coordinator.jobs.lifecycle import TRANSITIONS, JobLifecycle, is_terminal, sources_of
from coordinator.state import (
    FINAL_JOB_STATES,
    InMemoryStateStore,
    JobRecord,
    JobState,
    RoundRecord,
    StateStore,
)


def lifecycle_at(state: JobState) -> tuple[JobLifecycle, StateStore, str]:
    """A lifecycle over a fresh store holding one job in `state` (reached legally)."""
    store = InMemoryStateStore()
    clock = itertools.count(1000)
    lifecycle = JobLifecycle(store, clock_ms=lambda: next(clock))
    job = lifecycle.submit("j", "federated", 'name = "j"', rounds_total=3)
    path = {
        JobState.QUEUED: [],
        JobState.RUNNING: [lambda: lifecycle.start(job.job_id, "go")],
        JobState.SUCCEEDED: [
            lambda: lifecycle.start(job.job_id, "go"),
            lambda: lifecycle.succeed(job.job_id, "done", "/m.safetensors"),
        ],
        JobState.FAILED: [lambda: lifecycle.fail(job.job_id, "broke")],
        JobState.CANCELLED: [lambda: lifecycle.cancel(job.job_id)],
    }[state]
    for move in path:
        move()
    assert store.get_job(job.job_id).state is state
    return lifecycle, store, job.job_id


def move(lifecycle: JobLifecycle, job_id: str, target: JobState) -> JobRecord:
    if target is JobState.QUEUED:
        return lifecycle.requeue(job_id, "restarted")
    if target is JobState.RUNNING:
        return lifecycle.start(job_id, "go")
    if target is JobState.SUCCEEDED:
        return lifecycle.succeed(job_id, "done", "/m.safetensors")
    if target is JobState.FAILED:
        return lifecycle.fail(job_id, "broke")
    return lifecycle.cancel(job_id)


CELLS = list(itertools.product(JobState, JobState))


@pytest.mark.parametrize(("source", "target"), CELLS, ids=[f"{s}->{t}" for s, t in CELLS])
def test_transition_allowed_exactly_when_the_table_says_so(
    source: JobState, target: JobState
) -> None:
    lifecycle, store, job_id = lifecycle_at(source)
    before = store.events_after(job_id, 0)
    if target in TRANSITIONS[source]:
        job = move(lifecycle, job_id, target)
        assert job.state is target
        assert len(store.events_after(job_id, 0)) == len(before) + 1
    else:
        with pytest.raises(ConflictError):
            move(lifecycle, job_id, target)
        assert store.get_job(job_id).state is source
        assert store.events_after(job_id, 0) == before


def test_terminal_states_are_the_final_states_and_have_no_way_out() -> None:
    assert {s for s in JobState if is_terminal(s)} == FINAL_JOB_STATES
    for state in FINAL_JOB_STATES:
        assert not TRANSITIONS[state]


def test_sources_of_running_is_only_queued() -> None:
    assert sources_of(JobState.RUNNING) == {JobState.QUEUED}
    assert sources_of(JobState.QUEUED) == {JobState.RUNNING}


def test_start_then_succeed_records_times_and_model_path() -> None:
    lifecycle, _store, job_id = lifecycle_at(JobState.QUEUED)
    started = lifecycle.start(job_id, "go")
    assert started.started_at_ms > 0
    done = lifecycle.succeed(job_id, "completed 3 rounds", "/models/x.safetensors")
    assert done.finished_at_ms >= started.started_at_ms
    assert done.model_path == "/models/x.safetensors"
    assert done.message == "completed 3 rounds"


def test_requeued_job_keeps_its_first_start_time() -> None:
    lifecycle, _, job_id = lifecycle_at(JobState.RUNNING)
    first = lifecycle.get(job_id).started_at_ms
    lifecycle.requeue(job_id, "coordinator restarted")
    assert lifecycle.start(job_id, "again").started_at_ms == first


def test_stale_writer_cannot_overwrite_a_cancelled_job() -> None:
    """A ServerApp finishing after a cancel must not turn the job SUCCEEDED."""
    lifecycle, store, job_id = lifecycle_at(JobState.RUNNING)
    lifecycle.cancel(job_id)
    with pytest.raises(ConflictError):
        lifecycle.succeed(job_id, "done", "/m.safetensors")
    assert store.get_job(job_id).state is JobState.CANCELLED
    assert store.get_job(job_id).model_path == ""


def test_note_changes_message_only_in_the_given_states() -> None:
    lifecycle, store, job_id = lifecycle_at(JobState.QUEUED)
    lifecycle.note(job_id, "waiting for workers", while_in=frozenset({JobState.QUEUED}))
    assert store.get_job(job_id).message == "waiting for workers"
    lifecycle.cancel(job_id)
    with pytest.raises(ConflictError):
        lifecycle.note(job_id, "late", while_in=frozenset({JobState.QUEUED}))
    assert store.get_job(job_id).message == "cancelled by request"


def test_round_is_recorded_only_while_the_job_runs() -> None:
    lifecycle, store, job_id = lifecycle_at(JobState.RUNNING)
    lifecycle.record_round(RoundRecord(job_id, round=1, participants=2))
    assert store.get_job(job_id).rounds_completed == 1
    lifecycle.cancel(job_id)
    with pytest.raises(ConflictError):
        lifecycle.record_round(RoundRecord(job_id, round=2, participants=2))
    assert [r.round for r in store.list_rounds(job_id)] == [1]


def test_attach_run_needs_a_running_job() -> None:
    lifecycle, _store, job_id = lifecycle_at(JobState.QUEUED)
    with pytest.raises(ConflictError):
        lifecycle.attach_run(job_id, "42")
    lifecycle.start(job_id, "go")
    assert lifecycle.attach_run(job_id, "42").flower_run_id == "42"
