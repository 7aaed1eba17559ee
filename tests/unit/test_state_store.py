"""SqliteStateStore: nodes, jobs, rounds, events, restarts and two processes on one file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.errors import ConflictError, NotFoundError
from coordinator.state import (
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
    RoundRecord,
    SqliteStateStore,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStateStore]:
    s = SqliteStateStore(db_path)
    try:
        yield s
    finally:
        s.close()


def make_node(node_id: str = "n1", *, at_ms: int = 1_000, institution: str = "uni-a") -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        institution=institution,
        hostname=f"{node_id}.example",
        device="cpu",
        state=NodeState.ONLINE,
        registered_at_ms=at_ms,
        last_heartbeat_ms=at_ms,
    )


def make_job(
    job_id: str = "j1",
    *,
    created_at_ms: int = 1_000,
    state: JobState = JobState.QUEUED,
    rounds_total: int = 3,
) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        name=f"job-{job_id}",
        kind="federated",
        spec_toml='name = "x"\n',
        state=state,
        rounds_total=rounds_total,
        message="waiting",
        created_at_ms=created_at_ms,
    )


# --- nodes -------------------------------------------------------------------


def test_add_node_then_get_node_returns_equal_record(store: SqliteStateStore) -> None:
    node = make_node()
    store.add_node(node)
    assert store.get_node("n1") == node


def test_get_node_unknown_raises_not_found(store: SqliteStateStore) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        store.get_node("nope")


def test_touch_node_updates_heartbeat_and_returns_record(store: SqliteStateStore) -> None:
    store.add_node(make_node(at_ms=1_000))
    touched = store.touch_node("n1", 5_000)
    assert touched.last_heartbeat_ms == 5_000
    assert touched.state is NodeState.ONLINE
    assert touched.registered_at_ms == 1_000
    assert store.get_node("n1") == touched


def test_touch_node_stale_node_comes_back_online(store: SqliteStateStore) -> None:
    store.add_node(make_node(at_ms=1_000))
    store.mark_stale_nodes(2_000)
    assert store.get_node("n1").state is NodeState.STALE
    assert store.touch_node("n1", 3_000).state is NodeState.ONLINE


def test_touch_node_gone_node_raises_conflict_and_stays_gone(store: SqliteStateStore) -> None:
    store.add_node(make_node(at_ms=1_000))
    left = store.set_node_state("n1", NodeState.GONE)
    assert left.state is NodeState.GONE
    with pytest.raises(ConflictError, match="n1"):
        store.touch_node("n1", 9_000)
    after = store.get_node("n1")
    assert after.state is NodeState.GONE
    assert after.last_heartbeat_ms == 1_000


def test_touch_node_unknown_raises_not_found(store: SqliteStateStore) -> None:
    with pytest.raises(NotFoundError, match="ghost"):
        store.touch_node("ghost", 1_000)


def test_set_node_state_unknown_raises_not_found(store: SqliteStateStore) -> None:
    with pytest.raises(NotFoundError):
        store.set_node_state("ghost", NodeState.GONE)


def test_mark_stale_nodes_marks_only_online_nodes_older_than_bound(
    store: SqliteStateStore,
) -> None:
    store.add_node(make_node("old", at_ms=1_000))
    store.add_node(make_node("fresh", at_ms=5_000))
    store.add_node(make_node("left", at_ms=1_000))
    store.set_node_state("left", NodeState.GONE)

    marked = store.mark_stale_nodes(older_than_ms=3_000)

    assert [n.node_id for n in marked] == ["old"]
    assert marked[0].state is NodeState.STALE
    assert store.get_node("old").state is NodeState.STALE
    assert store.get_node("fresh").state is NodeState.ONLINE
    assert store.get_node("left").state is NodeState.GONE


def test_mark_stale_nodes_already_stale_not_reported_again(store: SqliteStateStore) -> None:
    store.add_node(make_node("old", at_ms=1_000))
    assert len(store.mark_stale_nodes(3_000)) == 1
    assert store.mark_stale_nodes(3_000) == []


def test_mark_stale_nodes_heartbeat_exactly_at_bound_stays_online(
    store: SqliteStateStore,
) -> None:
    store.add_node(make_node("edge", at_ms=3_000))
    assert store.mark_stale_nodes(3_000) == []
    assert store.get_node("edge").state is NodeState.ONLINE


def test_list_nodes_ordered_by_registration_time(store: SqliteStateStore) -> None:
    store.add_node(make_node("late", at_ms=3_000))
    store.add_node(make_node("early", at_ms=1_000))
    store.add_node(make_node("middle", at_ms=2_000))
    assert [n.node_id for n in store.list_nodes()] == ["early", "middle", "late"]


# --- jobs --------------------------------------------------------------------


def test_add_job_then_get_job_returns_equal_record(store: SqliteStateStore) -> None:
    job = make_job()
    store.add_job(job)
    assert store.get_job("j1") == job


def test_get_job_unknown_raises_not_found(store: SqliteStateStore) -> None:
    with pytest.raises(NotFoundError, match="missing"):
        store.get_job("missing")


def test_list_jobs_oldest_first_regardless_of_insert_order(store: SqliteStateStore) -> None:
    store.add_job(make_job("c", created_at_ms=3_000))
    store.add_job(make_job("a", created_at_ms=1_000))
    store.add_job(make_job("b", created_at_ms=2_000))
    assert [j.job_id for j in store.list_jobs()] == ["a", "b", "c"]


def test_list_jobs_same_creation_time_keeps_insert_order(store: SqliteStateStore) -> None:
    for job_id in ["z", "y", "x"]:
        store.add_job(make_job(job_id, created_at_ms=1_000))
    assert [j.job_id for j in store.list_jobs()] == ["z", "y", "x"]


def test_list_jobs_filtered_by_state(store: SqliteStateStore) -> None:
    store.add_job(make_job("a", created_at_ms=1))
    store.add_job(make_job("b", created_at_ms=2))
    store.add_job(make_job("c", created_at_ms=3))
    store.update_job("b", state=JobState.RUNNING)
    assert [j.job_id for j in store.list_jobs(JobState.QUEUED)] == ["a", "c"]
    assert [j.job_id for j in store.list_jobs(JobState.RUNNING)] == ["b"]
    assert store.list_jobs(JobState.FAILED) == []


def test_update_job_changes_only_given_fields(store: SqliteStateStore) -> None:
    store.add_job(make_job())
    updated = store.update_job(
        "j1", state=JobState.RUNNING, started_at_ms=2_000, flower_run_id="run-7"
    )
    assert updated.state is JobState.RUNNING
    assert updated.started_at_ms == 2_000
    assert updated.flower_run_id == "run-7"
    assert updated.message == "waiting"  # not given, unchanged
    assert updated.finished_at_ms == 0
    assert store.get_job("j1") == updated


def test_update_job_expected_state_applies_change(store: SqliteStateStore) -> None:
    store.add_job(make_job())
    updated = store.update_job(
        "j1", state=JobState.RUNNING, expect_states=frozenset({JobState.QUEUED})
    )
    assert updated.state is JobState.RUNNING


def test_update_job_unexpected_state_raises_conflict_and_changes_nothing(
    store: SqliteStateStore,
) -> None:
    store.add_job(make_job(state=JobState.SUCCEEDED))
    before = store.get_job("j1")
    events_before = store.events_after("j1", 0)

    with pytest.raises(ConflictError, match="succeeded"):
        store.update_job(
            "j1",
            state=JobState.CANCELLED,
            message="cancelled by request",
            finished_at_ms=99,
            expect_states=frozenset({JobState.QUEUED, JobState.RUNNING}),
        )

    assert store.get_job("j1") == before
    assert store.events_after("j1", 0) == events_before


def test_update_job_unknown_raises_not_found(store: SqliteStateStore) -> None:
    with pytest.raises(NotFoundError):
        store.update_job("ghost", state=JobState.RUNNING)


def test_update_job_new_state_or_message_appends_event_but_same_ones_do_not(
    store: SqliteStateStore,
) -> None:
    store.add_job(make_job())
    assert len(store.events_after("j1", 0)) == 1  # creation
    store.update_job("j1", message=store.get_job("j1").message)
    store.update_job("j1", state=JobState.QUEUED)
    assert len(store.events_after("j1", 0)) == 1
    store.update_job("j1", state=JobState.RUNNING)
    assert [e.kind for e in store.events_after("j1", 0)] == ["job", "job"]
    store.update_job("j1", message="waiting: needs 1 GPU worker")  # watchers show why
    store.update_job("j1", message="waiting: needs 1 GPU worker")
    assert len(store.events_after("j1", 0)) == 3


# --- rounds ------------------------------------------------------------------


def test_record_round_bumps_rounds_completed(store: SqliteStateStore) -> None:
    store.add_job(make_job())
    store.record_round(RoundRecord("j1", 1, participants=2, metrics={"loss": 1.5}))
    store.record_round(RoundRecord("j1", 2, participants=3, metrics={"loss": 0.5}))
    assert store.get_job("j1").rounds_completed == 2
    rounds = store.list_rounds("j1")
    assert [(r.round, r.participants, r.metrics) for r in rounds] == [
        (1, 2, {"loss": 1.5}),
        (2, 3, {"loss": 0.5}),
    ]


def test_record_round_same_round_twice_keeps_one_row(store: SqliteStateStore) -> None:
    store.add_job(make_job())
    store.record_round(RoundRecord("j1", 1, participants=2, metrics={"loss": 1.0}))
    store.record_round(
        RoundRecord("j1", 1, participants=3, metrics={"loss": 0.9}, finished_at_ms=7)
    )
    rounds = store.list_rounds("j1")
    assert len(rounds) == 1
    assert rounds[0] == RoundRecord(
        "j1", 1, participants=3, metrics={"loss": 0.9}, finished_at_ms=7
    )
    assert store.get_job("j1").rounds_completed == 1


def test_record_round_earlier_round_does_not_lower_rounds_completed(
    store: SqliteStateStore,
) -> None:
    store.add_job(make_job())
    store.record_round(RoundRecord("j1", 3, participants=2))
    store.record_round(RoundRecord("j1", 1, participants=2))
    assert store.get_job("j1").rounds_completed == 3
    assert [r.round for r in store.list_rounds("j1")] == [1, 3]


def test_list_rounds_other_job_not_mixed_in(store: SqliteStateStore) -> None:
    store.add_job(make_job("a"))
    store.add_job(make_job("b"))
    store.record_round(RoundRecord("a", 1, participants=1))
    assert store.list_rounds("b") == []
    assert store.get_job("b").rounds_completed == 0


# --- events ------------------------------------------------------------------


def test_events_after_zero_returns_job_and_round_events_in_order(
    store: SqliteStateStore,
) -> None:
    store.add_job(make_job())
    store.update_job("j1", state=JobState.RUNNING)
    store.record_round(RoundRecord("j1", 1, participants=2))
    store.record_round(RoundRecord("j1", 2, participants=2))
    store.update_job("j1", state=JobState.SUCCEEDED)

    events = store.events_after("j1", 0)

    assert [(e.kind, e.round) for e in events] == [
        ("job", 0),
        ("job", 0),
        ("round", 1),
        ("round", 2),
        ("job", 0),
    ]
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == len(sequences)
    assert all(e.job_id == "j1" for e in events)
    times = [e.time_ms for e in events]
    assert times == sorted(times)
    assert times[0] > 0


def test_events_after_sequence_returns_only_later_events(store: SqliteStateStore) -> None:
    store.add_job(make_job())
    first = store.events_after("j1", 0)
    store.record_round(RoundRecord("j1", 1, participants=2))
    later = store.events_after("j1", first[-1].sequence)
    assert [(e.kind, e.round) for e in later] == [("round", 1)]
    assert store.events_after("j1", later[-1].sequence) == []


def test_events_after_excludes_other_jobs(store: SqliteStateStore) -> None:
    store.add_job(make_job("a"))
    store.add_job(make_job("b"))
    store.record_round(RoundRecord("b", 1, participants=1))
    store.update_job("a", state=JobState.RUNNING)
    a_events = store.events_after("a", 0)
    b_events = store.events_after("b", 0)
    assert [e.kind for e in a_events] == ["job", "job"]
    assert [e.kind for e in b_events] == ["job", "round"]
    assert {e.sequence for e in a_events}.isdisjoint({e.sequence for e in b_events})


def test_events_after_unknown_job_is_empty(store: SqliteStateStore) -> None:
    assert store.events_after("ghost", 0) == []


# --- restart and sharing -------------------------------------------------------


def test_reopen_same_file_after_close_keeps_all_data(db_path: Path) -> None:
    first = SqliteStateStore(db_path)
    first.add_node(make_node())
    first.add_job(make_job())
    first.update_job("j1", state=JobState.RUNNING, started_at_ms=5)
    first.record_round(RoundRecord("j1", 1, participants=2, metrics={"acc": 0.5}))
    node, job = first.get_node("n1"), first.get_job("j1")
    rounds, events = first.list_rounds("j1"), first.events_after("j1", 0)
    first.close()

    second = SqliteStateStore(db_path)
    try:
        assert second.get_node("n1") == node
        assert second.get_job("j1") == job
        assert second.list_rounds("j1") == rounds
        assert second.events_after("j1", 0) == events
        # Sequences keep growing after a restart.
        second.update_job("j1", state=JobState.SUCCEEDED)
        new = second.events_after("j1", events[-1].sequence)
        assert len(new) == 1
        assert new[0].sequence > events[-1].sequence
    finally:
        second.close()


def test_two_stores_same_file_see_each_others_writes(db_path: Path) -> None:
    coordinator = SqliteStateStore(db_path)
    server_app = SqliteStateStore(db_path)
    try:
        coordinator.add_job(make_job())
        assert server_app.get_job("j1").state is JobState.QUEUED

        server_app.record_round(RoundRecord("j1", 1, participants=3))
        assert coordinator.get_job("j1").rounds_completed == 1
        assert [r.round for r in coordinator.list_rounds("j1")] == [1]
        assert [e.kind for e in coordinator.events_after("j1", 0)] == ["job", "round"]

        coordinator.update_job("j1", state=JobState.CANCELLED)
        assert server_app.get_job("j1").state is JobState.CANCELLED

        with pytest.raises(ConflictError):
            server_app.update_job(
                "j1", state=JobState.RUNNING, expect_states=frozenset({JobState.QUEUED})
            )
    finally:
        server_app.close()
        coordinator.close()


def test_store_used_from_another_thread_sees_same_data(store: SqliteStateStore) -> None:
    store.add_job(make_job())
    seen: list[JobRecord] = []

    def worker() -> None:
        store.record_round(RoundRecord("j1", 1, participants=1))
        seen.append(store.get_job("j1"))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen[0].rounds_completed == 1
    assert store.get_job("j1").rounds_completed == 1
