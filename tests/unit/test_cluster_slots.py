"""The pretraining planner's view of the cluster: revoked institutions and draining
nodes offer no slot."""

from __future__ import annotations

from typing import Any

from coordinator.pretraining.cluster import (
    claimed_institutions,
    slots_from_nodes,
)


def ray_node(node_id: str, institution: str | None, label: str | None = None) -> dict[str, Any]:
    """One entry as ``ray.nodes()`` lists it."""
    resources = {"CPU": 2.0, **({f"institution:{institution}": 1.0} if institution else {})}
    labels = {"ray.io/node-id": node_id, **({"institution": label} if label else {})}
    return {"NodeID": node_id, "Alive": True, "Resources": resources, "Labels": labels}


NODES = [
    ray_node("a" * 56, "alpha", "alpha"),
    ray_node("b" * 56, "beta", "beta"),
    ray_node("c" * 56, "gamma", "beta"),  # announces gamma, labelled beta
    ray_node("d" * 56, None),  # unaffiliated (the head, say)
]


def institutions(slots: list[Any]) -> list[str]:
    return sorted({s.institution for s in slots})


def test_every_live_affiliated_node_offers_slots_by_default() -> None:
    assert institutions(slots_from_nodes(NODES)) == ["alpha", "beta", "gamma"]
    assert len(slots_from_nodes(NODES)) == 6  # two CPUs each


def test_a_node_claiming_a_revoked_institution_by_resource_or_label_offers_nothing() -> None:
    slots = slots_from_nodes(NODES, revoked_institutions={"beta"})
    assert institutions(slots) == ["alpha"]


def test_a_revoked_name_given_to_unaffiliated_nodes_offers_nothing() -> None:
    offered = slots_from_nodes(NODES, unaffiliated_institution="home")
    assert "home" in institutions(offered)
    kept = slots_from_nodes(NODES, unaffiliated_institution="home", revoked_institutions={"home"})
    assert "home" not in institutions(kept)


def test_a_draining_node_offers_nothing() -> None:
    slots = slots_from_nodes(NODES, draining_nodes={"a" * 56})
    assert institutions(slots) == ["beta", "gamma"]


def test_claimed_institutions_counts_resources_and_the_label() -> None:
    assert claimed_institutions({"institution:a": 1, "institution:b": 1, "CPU": 1}, {}) == {
        "a",
        "b",
    }
    assert claimed_institutions({"CPU": 1}, {"institution": "c", "node": "x"}) == {"c"}
    assert claimed_institutions({}, {}) == frozenset()


def test_with_the_coordinators_assignments_only_they_count() -> None:
    """With claims (mutual TLS), a node's institution is the coordinator's word: the
    node announcing gamma counts for the institution its claim names, a node it does
    not name (announcing alpha) offers nothing, and slots are pinned by node alone."""
    assigned = {"c" * 56: "beta", "b" * 56: "beta", "d" * 56: "delta"}
    slots = slots_from_nodes(NODES, node_institutions=assigned)
    assert institutions(slots) == ["beta", "delta"]
    assert {s.node_id for s in slots} == set(assigned)
    assert {s.resource for s in slots} == {None}  # what a node announces places nothing
    assert slots_from_nodes(NODES, node_institutions={}) == []
    revoked = slots_from_nodes(NODES, node_institutions=assigned, revoked_institutions={"beta"})
    assert institutions(revoked) == ["delta"]
