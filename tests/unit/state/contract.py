"""The contract every `StateStore` backend keeps, as one suite run against each of them.

Flower's `linkstate_test.py` is the model: `StateTest` holds the tests and an abstract
`state_factory()`; each backend's test class (tests/unit/state/test_*_store.py) only
overrides the factory, so a new backend passes the same suite or shows where it differs.
Tests that only make sense for one backend (a SQLite file reopened, two connections on
one file) live in that backend's module, outside this class.
"""

from __future__ import annotations

import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consortium.errors import ConflictError, NotFoundError
from coordinator.state import (
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
    RayNodeClaim,
    RoundRecord,
    StateStore,
)

THREADS = 8
BARRIER_TIMEOUT_S = 30.0


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


def replace_state(node: NodeRecord, state: NodeState) -> NodeRecord:
    return dataclasses.replace(node, state=state)


def run_threads(target: Callable[[], None]) -> None:
    """Run `target` on THREADS threads at once and wait for all; a failure fails the test."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


class StateTest(ABC):
    """Subclass as `Test<Backend>` and override `state_factory`; pytest collects the rest."""

    @abstractmethod
    def state_factory(self, tmp_path: Path) -> StateStore:
        """A new, empty store; `tmp_path` is there for backends that keep files."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[StateStore]:
        state = self.state_factory(tmp_path)
        try:
            yield state
        finally:
            state.close()

    # --- nodes -------------------------------------------------------------------

    def test_add_node_then_get_node_returns_equal_record(self, store: StateStore) -> None:
        node = make_node()
        store.add_node(node)
        assert store.get_node("n1") == node

    def test_get_node_unknown_raises_not_found(self, store: StateStore) -> None:
        with pytest.raises(NotFoundError, match="nope"):
            store.get_node("nope")

    def test_touch_node_updates_heartbeat_and_returns_record(self, store: StateStore) -> None:
        store.add_node(make_node(at_ms=1_000))
        touched = store.touch_node("n1", 5_000)
        assert touched.last_heartbeat_ms == 5_000
        assert touched.state is NodeState.ONLINE
        assert touched.registered_at_ms == 1_000
        assert store.get_node("n1") == touched

    def test_touch_node_stale_node_comes_back_online(self, store: StateStore) -> None:
        store.add_node(make_node(at_ms=1_000))
        store.mark_stale_nodes(2_000)
        assert store.get_node("n1").state is NodeState.STALE
        assert store.touch_node("n1", 3_000).state is NodeState.ONLINE

    def test_touch_node_gone_node_raises_conflict_and_stays_gone(self, store: StateStore) -> None:
        store.add_node(make_node(at_ms=1_000))
        left = store.set_node_state("n1", NodeState.GONE)
        assert left.state is NodeState.GONE
        with pytest.raises(ConflictError, match="n1"):
            store.touch_node("n1", 9_000)
        after = store.get_node("n1")
        assert after.state is NodeState.GONE
        assert after.last_heartbeat_ms == 1_000

    def test_touch_node_unknown_raises_not_found(self, store: StateStore) -> None:
        with pytest.raises(NotFoundError, match="ghost"):
            store.touch_node("ghost", 1_000)

    def test_set_node_state_unknown_raises_not_found(self, store: StateStore) -> None:
        with pytest.raises(NotFoundError):
            store.set_node_state("ghost", NodeState.GONE)

    def test_mark_stale_nodes_marks_only_online_nodes_older_than_bound(
        self, store: StateStore
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

    def test_mark_stale_nodes_already_stale_not_reported_again(self, store: StateStore) -> None:
        store.add_node(make_node("old", at_ms=1_000))
        assert len(store.mark_stale_nodes(3_000)) == 1
        assert store.mark_stale_nodes(3_000) == []

    def test_mark_stale_nodes_heartbeat_exactly_at_bound_stays_online(
        self, store: StateStore
    ) -> None:
        store.add_node(make_node("edge", at_ms=3_000))
        assert store.mark_stale_nodes(3_000) == []
        assert store.get_node("edge").state is NodeState.ONLINE

    def test_forget_gone_nodes_keeps_the_institutions_last_registered_gone_ones(
        self, store: StateStore
    ) -> None:
        for at_ms in range(1, 6):
            store.add_node(make_node(f"gone-{at_ms}", at_ms=at_ms))
            store.set_node_state(f"gone-{at_ms}", NodeState.GONE)
        store.add_node(make_node("online", at_ms=0))
        store.add_node(make_node("other", at_ms=0, institution="uni-b"))
        store.set_node_state("other", NodeState.GONE)

        assert store.forget_gone_nodes("uni-a", keep=2) == 3

        assert [n.node_id for n in store.list_nodes()] == ["online", "other", "gone-4", "gone-5"]
        assert store.forget_gone_nodes("uni-a", keep=2) == 0

    def test_list_nodes_ordered_by_registration_time(self, store: StateStore) -> None:
        store.add_node(make_node("late", at_ms=3_000))
        store.add_node(make_node("early", at_ms=1_000))
        store.add_node(make_node("middle", at_ms=2_000))
        assert [n.node_id for n in store.list_nodes()] == ["early", "middle", "late"]

    # --- jobs --------------------------------------------------------------------

    def test_add_job_then_get_job_returns_equal_record(self, store: StateStore) -> None:
        job = make_job()
        store.add_job(job)
        assert store.get_job("j1") == job

    def test_get_job_unknown_raises_not_found(self, store: StateStore) -> None:
        with pytest.raises(NotFoundError, match="missing"):
            store.get_job("missing")

    def test_list_jobs_oldest_first_regardless_of_insert_order(self, store: StateStore) -> None:
        store.add_job(make_job("c", created_at_ms=3_000))
        store.add_job(make_job("a", created_at_ms=1_000))
        store.add_job(make_job("b", created_at_ms=2_000))
        assert [j.job_id for j in store.list_jobs()] == ["a", "b", "c"]

    def test_list_jobs_same_creation_time_keeps_insert_order(self, store: StateStore) -> None:
        for job_id in ["z", "y", "x"]:
            store.add_job(make_job(job_id, created_at_ms=1_000))
        assert [j.job_id for j in store.list_jobs()] == ["z", "y", "x"]

    def test_list_jobs_filtered_by_state(self, store: StateStore) -> None:
        store.add_job(make_job("a", created_at_ms=1))
        store.add_job(make_job("b", created_at_ms=2))
        store.add_job(make_job("c", created_at_ms=3))
        store.update_job("b", state=JobState.RUNNING)
        assert [j.job_id for j in store.list_jobs(JobState.QUEUED)] == ["a", "c"]
        assert [j.job_id for j in store.list_jobs(JobState.RUNNING)] == ["b"]
        assert store.list_jobs(JobState.FAILED) == []

    def test_update_job_changes_only_given_fields(self, store: StateStore) -> None:
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

    def test_update_job_expected_state_applies_change(self, store: StateStore) -> None:
        store.add_job(make_job())
        updated = store.update_job(
            "j1", state=JobState.RUNNING, expect_states=frozenset({JobState.QUEUED})
        )
        assert updated.state is JobState.RUNNING

    def test_update_job_unexpected_state_raises_conflict_and_changes_nothing(
        self, store: StateStore
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

    def test_update_job_unknown_raises_not_found(self, store: StateStore) -> None:
        with pytest.raises(NotFoundError):
            store.update_job("ghost", state=JobState.RUNNING)

    def test_update_job_new_state_or_message_appends_event_but_same_ones_do_not(
        self, store: StateStore
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

    def test_record_round_bumps_rounds_completed(self, store: StateStore) -> None:
        store.add_job(make_job())
        store.record_round(RoundRecord("j1", 1, participants=2, metrics={"loss": 1.5}))
        store.record_round(RoundRecord("j1", 2, participants=3, metrics={"loss": 0.5}))
        assert store.get_job("j1").rounds_completed == 2
        rounds = store.list_rounds("j1")
        assert [(r.round, r.participants, r.metrics) for r in rounds] == [
            (1, 2, {"loss": 1.5}),
            (2, 3, {"loss": 0.5}),
        ]

    def test_record_round_same_round_twice_keeps_one_row(self, store: StateStore) -> None:
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
        self, store: StateStore
    ) -> None:
        store.add_job(make_job())
        store.record_round(RoundRecord("j1", 3, participants=2))
        store.record_round(RoundRecord("j1", 1, participants=2))
        assert store.get_job("j1").rounds_completed == 3
        assert [r.round for r in store.list_rounds("j1")] == [1, 3]

    def test_list_rounds_other_job_not_mixed_in(self, store: StateStore) -> None:
        store.add_job(make_job("a"))
        store.add_job(make_job("b"))
        store.record_round(RoundRecord("a", 1, participants=1))
        assert store.list_rounds("b") == []
        assert store.get_job("b").rounds_completed == 0

    # --- events ------------------------------------------------------------------

    def test_events_after_zero_returns_job_and_round_events_in_order(
        self, store: StateStore
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

    def test_events_after_sequence_returns_only_later_events(self, store: StateStore) -> None:
        store.add_job(make_job())
        first = store.events_after("j1", 0)
        store.record_round(RoundRecord("j1", 1, participants=2))
        later = store.events_after("j1", first[-1].sequence)
        assert [(e.kind, e.round) for e in later] == [("round", 1)]
        assert store.events_after("j1", later[-1].sequence) == []

    def test_events_after_excludes_other_jobs(self, store: StateStore) -> None:
        store.add_job(make_job("a"))
        store.add_job(make_job("b"))
        store.record_round(RoundRecord("b", 1, participants=1))
        store.update_job("a", state=JobState.RUNNING)
        a_events = store.events_after("a", 0)
        b_events = store.events_after("b", 0)
        assert [e.kind for e in a_events] == ["job", "job"]
        assert [e.kind for e in b_events] == ["job", "round"]
        assert {e.sequence for e in a_events}.isdisjoint({e.sequence for e in b_events})

    def test_events_after_unknown_job_is_empty(self, store: StateStore) -> None:
        assert store.events_after("ghost", 0) == []

    # --- duplicates and unknown ids ----------------------------------------------

    def test_add_node_same_id_twice_raises_conflict_and_keeps_first(
        self, store: StateStore
    ) -> None:
        store.add_node(make_node(at_ms=1_000))
        with pytest.raises(ConflictError, match="n1"):
            store.add_node(make_node(at_ms=2_000, institution="uni-b"))
        assert store.get_node("n1") == make_node(at_ms=1_000)

    def test_add_job_same_id_twice_raises_conflict_and_appends_no_event(
        self, store: StateStore
    ) -> None:
        store.add_job(make_job(created_at_ms=1_000))
        with pytest.raises(ConflictError, match="j1"):
            store.add_job(make_job(created_at_ms=2_000, state=JobState.RUNNING))
        assert store.get_job("j1") == make_job(created_at_ms=1_000)
        assert len(store.events_after("j1", 0)) == 1
        assert len(store.list_jobs()) == 1

    def test_set_node_state_returns_and_stores_new_state(self, store: StateStore) -> None:
        store.add_node(make_node())
        changed = store.set_node_state("n1", NodeState.STALE)
        assert changed == replace_state(make_node(), NodeState.STALE)
        assert store.get_node("n1") == changed

    def test_update_job_unknown_with_expected_states_raises_not_found(
        self, store: StateStore
    ) -> None:
        with pytest.raises(NotFoundError, match="ghost"):
            store.update_job(
                "ghost", state=JobState.RUNNING, expect_states=frozenset({JobState.QUEUED})
            )

    def test_update_job_every_field_given_is_stored(self, store: StateStore) -> None:
        store.add_job(make_job())
        updated = store.update_job(
            "j1",
            state=JobState.SUCCEEDED,
            message="done",
            started_at_ms=10,
            finished_at_ms=20,
            model_path="/models/j1.safetensors",
            flower_run_id="42",
        )
        assert (
            updated.state,
            updated.message,
            updated.started_at_ms,
            updated.finished_at_ms,
            updated.model_path,
            updated.flower_run_id,
        ) == (JobState.SUCCEEDED, "done", 10, 20, "/models/j1.safetensors", "42")
        assert store.get_job("j1") == updated
        assert store.list_jobs() == [updated]

    def test_record_round_unknown_job_raises_not_found_and_stores_nothing(
        self, store: StateStore
    ) -> None:
        with pytest.raises(NotFoundError, match="ghost"):
            store.record_round(RoundRecord("ghost", 1, participants=1))
        assert store.list_rounds("ghost") == []
        assert store.events_after("ghost", 0) == []

    def test_record_round_caller_changing_metrics_afterwards_changes_nothing(
        self, store: StateStore
    ) -> None:
        store.add_job(make_job())
        metrics = {"loss": 1.0}
        store.record_round(RoundRecord("j1", 1, participants=1, metrics=metrics))
        metrics["loss"] = 9.0
        store.list_rounds("j1")[0].metrics["loss"] = 7.0
        assert store.list_rounds("j1")[0].metrics == {"loss": 1.0}

    # --- institution keys and update nonces --------------------------------------

    def test_add_institution_key_then_institution_keys_lists_it(self, store: StateStore) -> None:
        store.add_institution_key("uni-a", "k1", b"\x01" * 32)
        store.add_institution_key("uni-a", "k2", b"\x02" * 32)
        store.add_institution_key("uni-b", "k3", b"\x03" * 32)
        assert store.institution_keys("uni-a") == {"k1": b"\x01" * 32, "k2": b"\x02" * 32}
        assert store.institution_keys("uni-b") == {"k3": b"\x03" * 32}
        assert store.institution_keys("uni-c") == {}

    def test_add_institution_key_same_institution_again_keeps_first_key(
        self, store: StateStore
    ) -> None:
        store.add_institution_key("uni-a", "k1", b"first")
        store.add_institution_key("uni-a", "k1", b"second")
        assert store.institution_keys("uni-a") == {"k1": b"first"}

    def test_add_institution_key_of_another_institution_raises_conflict(
        self, store: StateStore
    ) -> None:
        store.add_institution_key("uni-a", "k1", b"key")
        with pytest.raises(ConflictError, match="another institution"):
            store.add_institution_key("uni-b", "k1", b"key")
        assert store.institution_keys("uni-b") == {}
        assert store.institution_keys("uni-a") == {"k1": b"key"}

    def test_replace_institution_keys_leaves_only_the_new_key(self, store: StateStore) -> None:
        store.add_institution_key("uni-a", "k1", b"one")
        store.add_institution_key("uni-a", "k2", b"two")
        store.add_institution_key("uni-b", "k3", b"three")
        assert store.replace_institution_keys("uni-a", "k4", b"four") == ["k1", "k2"]
        assert store.institution_keys("uni-a") == {"k4": b"four"}
        assert store.institution_keys("uni-b") == {"k3": b"three"}
        assert store.replace_institution_keys("uni-a", "k4", b"four") == []

    def test_replace_with_another_institutions_key_raises_conflict_and_keeps_all(
        self, store: StateStore
    ) -> None:
        store.add_institution_key("uni-a", "k1", b"one")
        store.add_institution_key("uni-b", "k2", b"two")
        with pytest.raises(ConflictError, match="another institution"):
            store.replace_institution_keys("uni-a", "k2", b"two")
        assert store.institution_keys("uni-a") == {"k1": b"one"}

    def test_claim_nonce_first_time_true_replay_false(self, store: StateStore) -> None:
        assert store.claim_nonce("j1", "n-1") is True
        assert store.claim_nonce("j1", "n-1") is False
        assert store.claim_nonce("j1", "n-2") is True

    def test_claim_nonce_same_nonce_other_job_is_fresh(self, store: StateStore) -> None:
        assert store.claim_nonce("a", "n-1") is True
        assert store.claim_nonce("b", "n-1") is True
        assert store.claim_nonce("b", "n-1") is False

    def test_refused_commits_are_counted_by_reason(self, store: StateStore) -> None:
        assert store.refused_commits() == {}
        store.record_refused_commit("j1", 3, "run-1", "stale_run")
        store.record_refused_commit("j1", 4, "run-1", "stale_run")
        store.record_refused_commit("j2", 2, "run-9", "duplicate_round")
        assert store.refused_commits() == {"stale_run": 2, "duplicate_round": 1}

    def test_declared_examples_none_until_declared(self, store: StateStore) -> None:
        assert store.declared_examples("uni-a") is None

    def test_declare_examples_keeps_the_first_declaration_per_institution(
        self, store: StateStore
    ) -> None:
        assert store.declare_examples("uni-a", 899) == 899
        assert store.declare_examples("uni-a", 300) == 899  # a smaller second node
        assert store.declare_examples("uni-b", 40) == 40
        assert store.declare_examples("uni-a", 1200) == 899  # a larger one, later
        assert (store.declared_examples("uni-a"), store.declared_examples("uni-b")) == (899, 40)

    # --- onboarding: certificates, revocations, SuperNode keys -------------------

    def test_institutions_distinct_and_sorted_by_name(self, store: StateStore) -> None:
        assert store.institutions() == []
        store.add_certificate("03", "uni-c", "fp3", 9_000)
        store.add_certificate("01", "uni-a", "fp1", 9_000)
        store.add_certificate("02", "uni-c", "fp2", 9_000)  # renewed
        assert store.institutions() == ["uni-a", "uni-c"]

    def test_current_certificate_serial_is_the_latest_issued(self, store: StateStore) -> None:
        assert store.current_certificate_serial("uni-a") is None
        store.add_certificate("0f", "uni-a", "fp1", 9_000)
        store.add_certificate("03", "uni-b", "fp2", 9_000)
        assert store.current_certificate_serial("uni-a") == "0f"
        store.add_certificate("01", "uni-a", "fp3", 9_000)  # renewed (serials are random)
        assert store.current_certificate_serial("uni-a") == "01"
        assert store.current_certificate_serial("uni-b") == "03"

    def test_add_certificate_same_serial_twice_raises_conflict(self, store: StateStore) -> None:
        store.add_certificate("01", "uni-a", "fp1", 9_000)
        with pytest.raises(ConflictError, match="01"):
            store.add_certificate("01", "uni-b", "fp2", 9_000)
        assert store.institutions() == ["uni-a"]

    def test_revoke_institution_marks_its_nodes_gone_only(self, store: StateStore) -> None:
        store.add_node(make_node("a1", institution="uni-a"))
        store.add_node(make_node("a2", institution="uni-a"))
        store.add_node(make_node("b1", institution="uni-b"))
        assert store.is_revoked("uni-a") is False
        assert store.revoked_institutions() == frozenset()

        store.revoke_institution("uni-a")
        store.revoke_institution("uni-a")  # idempotent

        assert store.is_revoked("uni-a") is True
        assert store.is_revoked("uni-b") is False
        assert store.revoked_institutions() == {"uni-a"}
        states = {n.node_id: n.state for n in store.list_nodes()}
        assert states == {"a1": NodeState.GONE, "a2": NodeState.GONE, "b1": NodeState.ONLINE}
        with pytest.raises(ConflictError, match="a1"):
            store.touch_node("a1", 9_000)

    def test_supernode_keys_added_once_then_node_id_set(self, store: StateStore) -> None:
        assert store.supernode_keys() == []
        store.add_supernode_key("uni-a", "ssh-ed25519 AAAA-a")
        store.add_supernode_key("uni-a", "ssh-ed25519 AAAA-a")  # ignored
        store.add_supernode_key("uni-b", "ssh-ed25519 AAAA-b")
        store.set_supernode_node_id("uni-a", "ssh-ed25519 AAAA-a", "123")
        store.set_supernode_node_id("uni-c", "ssh-ed25519 AAAA-c", "456")  # unknown: no-op
        assert sorted(store.supernode_keys()) == [
            ("uni-a", "ssh-ed25519 AAAA-a", "123"),
            ("uni-b", "ssh-ed25519 AAAA-b", ""),
        ]

    def test_a_ray_node_claim_binds_once_to_the_first_node(self, store: StateStore) -> None:
        assert store.ray_node_claims() == []
        store.add_ray_node_claim(RayNodeClaim("c2", "uni-b", 2_000, "ignored"))
        store.add_ray_node_claim(RayNodeClaim("c1", "uni-a", 1_000))
        with pytest.raises(ConflictError, match="c1"):
            store.add_ray_node_claim(RayNodeClaim("c1", "uni-b", 3_000))
        assert store.bind_ray_node_claim("c1", "node-1")
        assert not store.bind_ray_node_claim("c1", "node-2")  # bound already
        assert not store.bind_ray_node_claim("unknown", "node-3")
        assert store.ray_node_claims() == [
            RayNodeClaim("c1", "uni-a", 1_000, "node-1"),
            RayNodeClaim("c2", "uni-b", 2_000, ""),  # issued unbound
        ]
        assert store.ray_node_claims(["c2", "nope"]) == [RayNodeClaim("c2", "uni-b", 2_000, "")]
        assert store.ray_node_claims([]) == []

    def test_unbound_ray_node_claims_are_dropped_once_old(self, store: StateStore) -> None:
        store.add_ray_node_claim(RayNodeClaim("bound", "uni-a", 1_000))
        store.add_ray_node_claim(RayNodeClaim("old", "uni-a", 1_000))
        store.add_ray_node_claim(RayNodeClaim("new", "uni-a", 5_000))
        store.bind_ray_node_claim("bound", "node-1")
        assert store.drop_unbound_ray_node_claims(issued_before_ms=2_000) == 1
        assert [c.claim for c in store.ray_node_claims()] == ["bound", "new"]

    def test_supernode_keys_same_key_two_institutions_are_two_entries(
        self, store: StateStore
    ) -> None:
        store.add_supernode_key("uni-a", "ssh-ed25519 SAME")
        store.add_supernode_key("uni-b", "ssh-ed25519 SAME")
        store.set_supernode_node_id("uni-b", "ssh-ed25519 SAME", "7")
        assert sorted(store.supernode_keys()) == [
            ("uni-a", "ssh-ed25519 SAME", ""),
            ("uni-b", "ssh-ed25519 SAME", "7"),
        ]

    # --- threads -----------------------------------------------------------------

    def test_store_used_from_another_thread_sees_same_data(self, store: StateStore) -> None:
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

    def test_claim_nonce_raced_by_threads_granted_once(self, store: StateStore) -> None:
        barrier = threading.Barrier(THREADS, timeout=BARRIER_TIMEOUT_S)
        granted: list[bool] = []

        def claim() -> None:
            barrier.wait()
            granted.append(store.claim_nonce("j1", "same-nonce"))

        run_threads(claim)
        assert sorted(granted) == [False] * (THREADS - 1) + [True]

    def test_record_round_from_many_threads_counts_every_round(self, store: StateStore) -> None:
        store.add_job(make_job(rounds_total=THREADS))
        barrier = threading.Barrier(THREADS, timeout=BARRIER_TIMEOUT_S)
        next_round = iter(range(1, THREADS + 1))
        lock = threading.Lock()

        def record() -> None:
            with lock:
                round_ = next(next_round)
            barrier.wait()
            store.record_round(RoundRecord("j1", round_, participants=1))

        run_threads(record)
        assert store.get_job("j1").rounds_completed == THREADS
        assert [r.round for r in store.list_rounds("j1")] == list(range(1, THREADS + 1))
        events = store.events_after("j1", 0)
        assert sorted(e.round for e in events if e.kind == "round") == list(range(1, THREADS + 1))
        assert len({e.sequence for e in events}) == THREADS + 1
