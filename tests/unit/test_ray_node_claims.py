"""Which institution a Ray node counts for is the coordinator's to say (coordinator/ray/
claims.py): each start of a site's node gets a claim over mutual TLS, and the first node
seen carrying it counts for the institution it was issued to. The attacks: a member's
node declaring another institution, a node copying another's claim (its label is public
to every member), two nodes appearing at once with one claim, a made-up claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from consortium.ray_env import CLAIM_LABEL
from coordinator.ray.claims import CLAIM_REUSED, CLAIM_UNKNOWN, RayNodeClaims
from coordinator.ray.nodes import ALIVE, DEAD, RayNodeInfo, RaySnapshot
from coordinator.state import InMemoryStateStore, RayNodeClaim, SqliteStateStore, StateStore


class Cluster:
    """What the coordinator's GCS view shows; the test sets it."""

    def __init__(self) -> None:
        self.nodes: list[RayNodeInfo] = []

    def snapshot(self) -> RaySnapshot:
        return RaySnapshot(tuple(self.nodes))


def node(node_id: str, declares: str, claim: str = "", state: str = ALIVE) -> RayNodeInfo:
    labels = {"institution": declares, **({CLAIM_LABEL: claim} if claim else {})}
    return RayNodeInfo(node_id, state, {f"institution:{declares}": 1.0}, labels)


class Claims:
    def __init__(self, store: StateStore) -> None:
        self.cluster = Cluster()
        self.refusals: list[tuple[str, str]] = []
        self.claims = RayNodeClaims(
            store, self.cluster, lambda channel, reason: self.refusals.append((channel, reason))
        )


@pytest.fixture
def claims() -> Claims:
    return Claims(InMemoryStateStore())


def test_a_node_counts_for_its_claims_institution_whatever_it_declares(claims: Claims) -> None:
    beta = claims.claims.issue("beta")
    claims.cluster.nodes = [
        node("n-beta", declares="alpha", claim=beta),  # beta's node, mislabelled
        node("n-forged", declares="alpha"),  # someone's node in alpha's name, no claim
    ]
    assert claims.claims.assignments() == {"n-beta": "beta"}
    assert claims.refusals == []  # a node without a claim is merely not counted


def test_a_copied_claim_never_counts_and_is_refused_once(claims: Claims) -> None:
    alpha = claims.claims.issue("alpha")
    claims.cluster.nodes = [node("n-alpha", "alpha", alpha)]
    assert claims.claims.assignments() == {"n-alpha": "alpha"}
    # Another member read the label off the cluster and started a node with it.
    claims.cluster.nodes.append(node("n-copy", "alpha", alpha))
    assert claims.claims.assignments() == {"n-alpha": "alpha"}
    assert claims.claims.assignments() == {"n-alpha": "alpha"}  # seen again: not re-counted
    assert claims.refusals == [("ray", CLAIM_REUSED)]
    # alpha's node leaves; the copy still does not inherit the claim.
    claims.cluster.nodes = [node("n-alpha", "alpha", alpha, DEAD), node("n-copy", "alpha", alpha)]
    assert claims.claims.assignments() == {"n-alpha": "alpha"}


def test_two_nodes_first_seen_together_with_one_claim_both_count_for_no_one(
    claims: Claims,
) -> None:
    alpha = claims.claims.issue("alpha")
    claims.cluster.nodes = [node("n-1", "alpha", alpha), node("n-2", "mallory", alpha)]
    assert claims.claims.assignments() == {}
    assert claims.refusals == [("ray", CLAIM_REUSED)] * 2
    # alpha's node leaves (to restart): the copy left behind does not inherit the claim.
    claims.cluster.nodes = [node("n-1", "alpha", alpha, DEAD), node("n-2", "mallory", alpha)]
    assert claims.claims.assignments() == {}
    claims.cluster.nodes = [node("n-2", "mallory", alpha)]
    assert claims.claims.assignments() == {}
    fresh = claims.claims.issue("alpha")  # alpha's next start
    claims.cluster.nodes.append(node("n-3", "alpha", fresh))
    assert claims.claims.assignments() == {"n-3": "alpha"}


def test_a_claim_the_coordinator_never_issued_counts_for_no_one(claims: Claims) -> None:
    claims.cluster.nodes = [node("n-1", "alpha", "f" * 32)]
    assert claims.claims.assignments() == {}
    assert claims.refusals == [("ray", CLAIM_UNKNOWN)]


def test_each_issue_is_a_fresh_claim_for_the_callers_institution(claims: Claims) -> None:
    first, second = claims.claims.issue("alpha"), claims.claims.issue("alpha")
    assert first != second and len(first) == 32
    claims.cluster.nodes = [node("n-1", "alpha", first), node("n-2", "alpha", second)]
    assert claims.claims.assignments() == {"n-1": "alpha", "n-2": "alpha"}


def test_bindings_outlive_the_coordinator(tmp_path: Path) -> None:
    """A restarted coordinator keeps counting a bound node for its institution, and a
    copy made while it was down still does not count."""
    store = SqliteStateStore(tmp_path / "state.db")
    before = Claims(store)
    beta = before.claims.issue("beta")
    before.cluster.nodes = [node("n-beta", "beta", beta)]
    assert before.claims.assignments() == {"n-beta": "beta"}
    store.close()
    after = Claims(SqliteStateStore(tmp_path / "state.db"))
    after.cluster.nodes = [node("n-copy", "beta", beta), node("n-beta", "beta", beta)]
    assert after.claims.assignments() == {"n-beta": "beta"}
    assert after.refusals == [("ray", CLAIM_REUSED)]


def test_sync_binds_in_the_order_nodes_appear_without_anyone_asking(claims: Claims) -> None:
    """The coordinator's loop calls `sync` on every new read of the cluster, so the
    first carrier is bound as it appears, before a copy can be made from its label."""
    alpha = claims.claims.issue("alpha")
    claims.cluster.nodes = [node("n-alpha", "alpha", alpha)]
    claims.claims.sync()
    claims.cluster.nodes.append(node("n-copy", "alpha", alpha))
    claims.claims.sync()  # the same read (the fake's read_at_ms): not gone through again
    assert claims.refusals == []
    assert claims.claims.assignments() == {"n-alpha": "alpha"}
    assert claims.refusals == [("ray", CLAIM_REUSED)]


def test_claims_no_node_carried_for_a_day_are_forgotten_at_the_next_issue() -> None:
    store = InMemoryStateStore()
    store.add_ray_node_claim(RayNodeClaim("unused", "alpha", 0))  # its node never started
    store.add_ray_node_claim(RayNodeClaim("carried", "alpha", 0))
    store.bind_ray_node_claim("carried", "n-1")
    fresh = Claims(store).claims.issue("beta")
    assert [c.claim for c in store.ray_node_claims()] == ["carried", fresh]
