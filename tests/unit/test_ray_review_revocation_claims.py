"""A revoked institution's Ray node is drained by the claim it carries, not only by
what it declares: its owner types its labels and resources (coordinator/ray/claims.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from consortium.ray_env import CLAIM_LABEL
from coordinator.ray.claims import RayNodeClaims
from coordinator.ray.nodes import ALIVE, RayNodeInfo, RaySnapshot
from coordinator.ray.revocation import RayRevocationSync
from coordinator.state import SqliteStateStore


@dataclass
class FakeGcs:
    listed: list[RayNodeInfo]
    drained: list[tuple[str, str]] = field(default_factory=list)

    def nodes(self) -> Sequence[RayNodeInfo]:
        return self.listed

    def snapshot(self) -> RaySnapshot:
        return RaySnapshot(tuple(self.listed), "", 1)

    def drain(self, node_id: str, message: str, deadline_ms: int) -> tuple[bool, str]:
        self.drained.append((node_id, message))
        return True, ""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStateStore]:
    store = SqliteStateStore(tmp_path / "state.db")
    try:
        for serial, name in (("01", "alpha"), ("02", "beta")):
            store.add_certificate(serial, name, f"fp-{name}", 2**40)
        yield store
    finally:
        store.close()


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
