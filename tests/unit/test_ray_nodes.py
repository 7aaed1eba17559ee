"""The Ray side of `coordinator nodes`: matching Ray nodes to registry nodes, reading
the GCS's node messages, the short cache, and ListNodes over both."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from ray.core.generated import gcs_pb2

from consortium.net import reserve_free_port
from consortium.proto.v1 import nodes_pb2
from coordinator.access.registry import NodeRegistry
from coordinator.api.servicers import NodeRegistryServicer
from coordinator.ray.nodes import (
    ALIVE,
    DEAD,
    DRAINING,
    CachedRayNodes,
    GcsReader,
    RayNodeInfo,
    RaySnapshot,
    match_nodes,
    node_from_gcs,
)
from coordinator.state import NodeRecord, NodeState, SqliteStateStore
from coordinator.state.sqlite_store import now_ms

AURORA_ID = "a1" * 16
BOREALIS_ID = "b2" * 16


def registered(node_id: str, institution: str, state: NodeState = NodeState.ONLINE) -> NodeRecord:
    return NodeRecord(node_id, institution, "host", "cpu", state, 1, 2)


def ray_node(
    ray_id: str,
    state: str = ALIVE,
    *,
    institution: str | None = None,
    registry_id: str | None = None,
    started_at_ms: int = 0,
    is_head: bool = False,
) -> RayNodeInfo:
    """A Ray node as `client join` starts it: labelled unless `registry_id` is None."""
    labels = {}
    resources = {"CPU": 1.0}
    if institution is not None:
        resources[f"institution:{institution}"] = 1.0
        if registry_id is not None:
            labels = {"institution": institution, "node": registry_id[:12]}
    return RayNodeInfo(ray_id, state, resources, labels, is_head, "127.0.0.1", started_at_ms)


def test_labelled_ray_nodes_match_their_registry_node_and_the_head_is_unmatched() -> None:
    head = ray_node("h0", is_head=True)
    aurora = ray_node("r1", institution="aurora", registry_id=AURORA_ID)
    borealis = ray_node("r2", institution="borealis", registry_id=BOREALIS_ID)
    match = match_nodes(
        [registered(AURORA_ID, "aurora"), registered(BOREALIS_ID, "borealis")],
        [borealis, head, aurora],
    )
    assert match.by_registry_id == {AURORA_ID: aurora, BOREALIS_ID: borealis}
    assert match.unmatched == (head,)


def test_registry_node_without_ray_node_has_no_match() -> None:
    match = match_nodes([registered(AURORA_ID, "aurora")], [ray_node("h0", is_head=True)])
    assert AURORA_ID not in match.by_registry_id


def test_restarted_worker_matches_its_live_ray_node_and_the_dead_one_is_dropped() -> None:
    old = ray_node("r1", DEAD, institution="aurora", registry_id=AURORA_ID, started_at_ms=5)
    new = ray_node("r2", ALIVE, institution="aurora", registry_id=AURORA_ID, started_at_ms=9)
    match = match_nodes([registered(AURORA_ID, "aurora")], [new, old])
    assert match.by_registry_id[AURORA_ID] is new
    assert match.unmatched == ()


def test_draining_ray_node_wins_over_a_dead_one_and_latest_dead_over_older() -> None:
    draining = ray_node("r1", DRAINING, institution="aurora", registry_id=AURORA_ID)
    dead = ray_node("r2", DEAD, institution="aurora", registry_id=AURORA_ID, started_at_ms=99)
    assert match_nodes([registered(AURORA_ID, "aurora")], [dead, draining]).by_registry_id == {
        AURORA_ID: draining
    }
    older = ray_node("r3", DEAD, institution="aurora", registry_id=AURORA_ID, started_at_ms=1)
    assert match_nodes([registered(AURORA_ID, "aurora")], [older, dead]).by_registry_id == {
        AURORA_ID: dead
    }


def test_unlabelled_ray_node_matches_the_only_node_of_its_institution() -> None:
    unlabelled = ray_node("r1", institution="aurora")
    match = match_nodes(
        [registered(AURORA_ID, "aurora"), registered(BOREALIS_ID, "borealis")], [unlabelled]
    )
    assert match.by_registry_id == {AURORA_ID: unlabelled}
    assert match.unmatched == ()


def test_unlabelled_ray_node_is_unmatched_when_its_institution_has_two_live_nodes() -> None:
    unlabelled = ray_node("r1", institution="aurora")
    match = match_nodes(
        [registered(AURORA_ID, "aurora"), registered(BOREALIS_ID, "aurora")], [unlabelled]
    )
    assert match.by_registry_id == {}
    assert match.unmatched == (unlabelled,)


def test_unlabelled_ray_node_prefers_the_institutions_node_that_has_not_left() -> None:
    unlabelled = ray_node("r1", institution="aurora")
    match = match_nodes(
        [registered(AURORA_ID, "aurora", NodeState.GONE), registered(BOREALIS_ID, "aurora")],
        [unlabelled],
    )
    assert match.by_registry_id == {BOREALIS_ID: unlabelled}


def test_ray_nodes_of_unknown_registry_ids_are_unmatched_unless_dead() -> None:
    stranger = ray_node("r1", institution="aurora", registry_id="f" * 32)
    ghost = ray_node("r2", DEAD, institution="aurora", registry_id="e" * 32)
    hand_started = ray_node("r3")  # no institution at all
    match = match_nodes([registered(AURORA_ID, "aurora")], [ghost, hand_started, stranger])
    assert match.by_registry_id == {}
    assert match.unmatched == (hand_started, stranger)  # sorted: no institution first


def test_institution_comes_from_the_label_else_the_resource() -> None:
    assert ray_node("r1", institution="aurora", registry_id=AURORA_ID).institution == "aurora"
    assert ray_node("r2", institution="borealis").institution == "borealis"
    assert ray_node("r3").institution is None


def gcs_info(state: int, snapshot: int) -> gcs_pb2.GcsNodeInfo:
    info = gcs_pb2.GcsNodeInfo(
        node_id=bytes.fromhex("0a" * 28),
        state=state,
        node_manager_address="10.0.0.7",
        is_head_node=False,
        start_time_ms=1234,
        resources_total={
            "CPU": 1.0,
            "memory": 2.0 * 2**30,
            "institution:aurora": 1.0,
            "node:10.0.0.7": 1.0,
        },
        labels={"institution": "aurora", "node": AURORA_ID[:12]},
    )
    info.state_snapshot.state = snapshot
    return info


@pytest.mark.parametrize(
    ("state", "snapshot", "expected"),
    [
        (gcs_pb2.GcsNodeInfo.ALIVE, gcs_pb2.NodeSnapshot.ACTIVE, ALIVE),
        (gcs_pb2.GcsNodeInfo.ALIVE, gcs_pb2.NodeSnapshot.IDLE, ALIVE),
        (gcs_pb2.GcsNodeInfo.ALIVE, gcs_pb2.NodeSnapshot.DRAINING, DRAINING),
        (gcs_pb2.GcsNodeInfo.DEAD, gcs_pb2.NodeSnapshot.DRAINING, DEAD),
    ],
)
def test_node_from_gcs_reads_state_resources_and_labels(
    state: int, snapshot: int, expected: str
) -> None:
    node = node_from_gcs(gcs_info(state, snapshot))
    assert node.state == expected
    assert node.ray_node_id == "0a" * 28
    assert dict(node.resources) == {
        "CPU": 1.0,
        "institution:aurora": 1.0,
        "memory": 2.0 * 2**30,
    }  # Ray's internal node:<ip> marker left out
    assert node.registry_prefix == AURORA_ID[:12]
    assert (node.address, node.started_at_ms, node.is_head) == ("10.0.0.7", 1234, False)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingReader:
    def __init__(self, nodes: Sequence[RayNodeInfo]) -> None:
        self.nodes = list(nodes)
        self.calls = 0
        self.error: Exception | None = None

    def __call__(self) -> list[RayNodeInfo]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.nodes


def test_cache_reads_once_per_ttl() -> None:
    reader, clock = CountingReader([ray_node("h0", is_head=True)]), FakeClock()
    view = CachedRayNodes(reader, "the Ray GCS at x", ttl_s=2.0, clock=clock)
    first = view.snapshot()
    clock.now += 1.9
    assert view.snapshot() is first
    assert reader.calls == 1
    clock.now += 0.2
    assert view.snapshot() is not first
    assert reader.calls == 2
    assert first.available and [n.ray_node_id for n in first.nodes] == ["h0"]


def test_cache_turns_a_failed_read_into_a_reason_and_keeps_it_for_the_ttl() -> None:
    reader, clock = CountingReader([]), FakeClock()
    reader.error = ConnectionRefusedError(111, "Connection refused")
    view = CachedRayNodes(reader, "the Ray GCS at 127.0.0.1:1", ttl_s=2.0, clock=clock)
    snapshot = view.snapshot()
    assert not snapshot.available and snapshot.nodes == ()
    assert "the Ray GCS at 127.0.0.1:1" in snapshot.unavailable_reason
    assert "ConnectionRefusedError" in snapshot.unavailable_reason
    view.snapshot()
    assert reader.calls == 1  # not asked again within the TTL
    reader.error = None
    reader.nodes = [ray_node("h0", is_head=True)]
    clock.now += 2.5
    assert view.snapshot().available  # recovers once the GCS answers


def test_gcs_reader_fails_fast_when_nothing_listens() -> None:
    address = f"127.0.0.1:{reserve_free_port('127.0.0.1')}"
    view = CachedRayNodes(GcsReader(address), f"the Ray GCS at {address}")
    started = time.monotonic()
    snapshot = view.snapshot()
    assert time.monotonic() - started < 2.0  # Ray's own client would wait 40 s
    assert not snapshot.available
    assert address in snapshot.unavailable_reason


class FixedSource:
    def __init__(self, snapshot: RaySnapshot) -> None:
        self._snapshot = snapshot

    def snapshot(self) -> RaySnapshot:
        return self._snapshot


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStateStore]:
    s = SqliteStateStore(tmp_path / "state.db")
    try:
        yield s
    finally:
        s.close()


def list_nodes(store: SqliteStateStore, snapshot: RaySnapshot) -> nodes_pb2.ListNodesResponse:
    registry = NodeRegistry(store, node_timeout_s=60)
    servicer = NodeRegistryServicer(registry, "127.0.0.1:1", 1000, "", FixedSource(snapshot))
    return servicer.ListNodes(nodes_pb2.ListNodesRequest(), None)  # type: ignore[arg-type]


def test_list_nodes_carries_each_nodes_ray_side_and_the_unmatched_ray_nodes(
    store: SqliteStateStore,
) -> None:
    now = now_ms()
    for node_id, institution in ((AURORA_ID, "aurora"), (BOREALIS_ID, "borealis")):
        store.add_node(NodeRecord(node_id, institution, "h", "cpu", NodeState.ONLINE, now, now))
    head = ray_node("h0", is_head=True)
    aurora = ray_node("r1", institution="aurora", registry_id=AURORA_ID)
    reply = list_nodes(store, RaySnapshot((head, aurora), "", now))
    by_id = {n.node_id: n for n in reply.nodes}
    assert by_id[AURORA_ID].HasField("ray")
    assert by_id[AURORA_ID].ray.state == ALIVE
    assert dict(by_id[AURORA_ID].ray.resources) == {"CPU": 1.0, "institution:aurora": 1.0}
    assert by_id[AURORA_ID].ray.labels["node"] == AURORA_ID[:12]
    assert not by_id[BOREALIS_ID].HasField("ray")  # not in Ray
    assert [n.ray_node_id for n in reply.unmatched_ray_nodes] == ["h0"]
    assert reply.unmatched_ray_nodes[0].is_head
    assert reply.ray_unavailable_reason == "" and reply.ray_read_at_ms == now


def test_list_nodes_without_ray_still_lists_the_registry_and_says_why(
    store: SqliteStateStore,
) -> None:
    now = now_ms()
    store.add_node(NodeRecord(AURORA_ID, "aurora", "h", "cpu", NodeState.ONLINE, now, now))
    reply = list_nodes(store, RaySnapshot((), "cannot read the Ray GCS at x: RpcError", now))
    assert [(n.institution, n.HasField("ray")) for n in reply.nodes] == [("aurora", False)]
    assert reply.ray_unavailable_reason == "cannot read the Ray GCS at x: RpcError"
    assert list(reply.unmatched_ray_nodes) == []
