"""Revocation on the Ray channel without a cluster: which nodes are drained, what the
sync asks of the GCS, and that it never raises into the scheduler; and that a revoked
institution's node is drained by the claim it carries, not only by what it declares
(its owner types its labels and resources: coordinator/ray/claims.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from consortium.ray_env import CLAIM_LABEL
from coordinator.ray.claims import RayNodeClaims
from coordinator.ray.nodes import ALIVE, DEAD, DRAINING, RayNodeInfo, RaySnapshot
from coordinator.ray.revocation import RayRevocationSync, drain_message, nodes_to_drain
from coordinator.state import SqliteStateStore


def node(
    node_id: str,
    institution: str | None,
    state: str = ALIVE,
    label: str | None = None,
    is_head: bool = False,
) -> RayNodeInfo:
    resources = {"CPU": 1.0, **({f"institution:{institution}": 1.0} if institution else {})}
    labels = {"institution": label} if label else {}
    return RayNodeInfo(node_id, state, resources, labels, is_head)


def test_only_alive_non_head_nodes_claiming_a_revoked_institution_are_drained() -> None:
    nodes = [
        node("b1", "beta"),
        node("b2", "beta", state=DRAINING),  # already leaving
        node("b3", "beta", state=DEAD),
        node("a1", "alpha"),
        node("x1", None, label="beta"),  # claims beta by label only
        node("x2", "alpha", label="beta"),  # announces alpha, labelled beta
        node("h", "beta", is_head=True),
    ]
    drained = nodes_to_drain(nodes, {"beta"})
    assert [n.ray_node_id for n in drained] == ["b1", "x1", "x2"]
    assert nodes_to_drain(nodes, set()) == []


def test_drain_message_names_the_revoked_institutions() -> None:
    assert drain_message(node("x2", "alpha", label="beta"), {"beta", "gamma"}) == (
        "institution beta revoked by the consortium operator"
    )


@dataclass
class FakeGcs:
    listed: list[RayNodeInfo] = field(default_factory=list)
    drained: list[tuple[str, str]] = field(default_factory=list)
    accept: bool = True
    fail: Exception | None = None

    def nodes(self) -> Sequence[RayNodeInfo]:
        if self.fail is not None:
            raise self.fail
        return self.listed

    def snapshot(self) -> RaySnapshot:
        return RaySnapshot(tuple(self.listed), "", 1)

    def drain(self, node_id: str, message: str, deadline_ms: int) -> tuple[bool, str]:
        assert deadline_ms > 0
        self.drained.append((node_id, message))
        return self.accept, "" if self.accept else "node is the head"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStateStore]:
    store = SqliteStateStore(tmp_path / "state.db")
    try:
        for serial, name in (("01", "alpha"), ("02", "beta")):
            store.add_certificate(serial, name, f"fp-{name}", 2**40)
        yield store
    finally:
        store.close()


def test_without_revocations_the_gcs_is_not_asked(store: SqliteStateStore) -> None:
    gcs = FakeGcs([node("b1", "beta")])
    RayRevocationSync(store, gcs).sync()
    assert gcs.drained == []


def test_revocation_drains_the_revoked_institutions_nodes(
    store: SqliteStateStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.revoke_institution("beta")
    gcs = FakeGcs([node("b1", "beta"), node("a1", "alpha"), node("b0", "beta", state=DEAD)])
    with caplog.at_level(logging.INFO, logger="coordinator.ray.revocation"):
        RayRevocationSync(store, gcs).sync()
    assert store.revoked_institutions() == {"beta"}
    assert gcs.drained == [("b1", "institution beta revoked by the consortium operator")]
    assert any("Ray: draining node b1" in r.getMessage() for r in caplog.records)


def test_a_refused_drain_is_logged_with_rays_reason(
    store: SqliteStateStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.revoke_institution("beta")
    gcs = FakeGcs([node("b1", "beta")], accept=False)
    with caplog.at_level(logging.WARNING, logger="coordinator.ray.revocation"):
        RayRevocationSync(store, gcs).sync()
    assert "refused to drain node b1" in caplog.text and "node is the head" in caplog.text


def test_an_unreachable_gcs_is_one_warning_not_an_error(
    store: SqliteStateStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.revoke_institution("beta")
    gcs = FakeGcs([node("b1", "beta")], fail=ConnectionRefusedError("GCS down"))
    sync = RayRevocationSync(store, gcs)
    with caplog.at_level(logging.INFO, logger="coordinator.ray.revocation"):
        for _ in range(3):
            sync.sync()  # must not raise into the scheduler
        assert caplog.text.count("could not enforce revocation of ['beta'] yet") == 1
        assert "GCS down" in caplog.text and gcs.drained == []
        gcs.fail = None
        sync.sync()
    assert "enforcing revocation of ['beta'] again" in caplog.text
    assert [node_id for node_id, _ in gcs.drained] == ["b1"]


@pytest.mark.parametrize(
    "declared",
    [
        {"labels": {"institution": "alpha"}, "resources": {"institution:alpha": 1.0}},
        {"labels": {}, "resources": {}},  # declares nothing at all
    ],
)
def test_a_revoked_sites_claimed_node_cannot_dodge_the_drain_by_declaring_another_name(
    store: SqliteStateStore, declared: dict[str, dict[str, str] | dict[str, float]]
) -> None:
    # beta's node carries the claim beta got over mutual TLS, but declares alpha (or
    # nothing): the coordinator counts it for beta, so revoking beta must drain it.
    gcs = FakeGcs([])
    claims = RayNodeClaims(store, gcs)
    claim = claims.issue("beta")
    labels = {CLAIM_LABEL: claim, **{k: str(v) for k, v in declared["labels"].items()}}
    resources = {"CPU": 4.0, **{k: float(v) for k, v in declared["resources"].items()}}
    gcs.listed = [RayNodeInfo("b" * 56, ALIVE, resources, labels)]
    assert claims.assignments() == {"b" * 56: "beta"}

    store.revoke_institution("beta")
    RayRevocationSync(store, gcs).sync()

    assert gcs.drained == [("b" * 56, "institution beta revoked by the consortium operator")]


def test_an_unrevoked_sites_claimed_node_is_left_alone(store: SqliteStateStore) -> None:
    gcs = FakeGcs([])
    claims = RayNodeClaims(store, gcs)
    claim = claims.issue("alpha")
    gcs.listed = [RayNodeInfo("a" * 56, ALIVE, {"CPU": 1.0}, {CLAIM_LABEL: claim})]
    claims.sync()
    store.revoke_institution("beta")
    RayRevocationSync(store, gcs).sync()
    assert gcs.drained == []
