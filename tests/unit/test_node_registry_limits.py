"""What one institution can put into the node registry is bounded: field lengths, its
live nodes, its gone nodes (so ListNodes stays small) and its declared example count
(fixed by its first declaration). Against the registry and a real store of each kind."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.errors import InvalidArgumentError
from coordinator.access.registry import (
    MAX_DEVICE_LENGTH,
    MAX_GONE_NODES_PER_INSTITUTION,
    MAX_HOSTNAME_LENGTH,
    MAX_LIVE_NODES_PER_INSTITUTION,
    MAX_NAME_LENGTH,
    NodeLimitError,
    NodeRegistry,
)
from coordinator.state import InMemoryStateStore, NodeState, SqliteStateStore, StateStore

# Long enough that no node of a test goes stale unless the test makes it.
NODE_TIMEOUT_S = 3600.0


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    state: StateStore = (
        InMemoryStateStore() if request.param == "memory" else SqliteStateStore(tmp_path / "s.db")
    )
    try:
        yield state
    finally:
        state.close()


@pytest.fixture
def registry(store: StateStore) -> NodeRegistry:
    return NodeRegistry(store, NODE_TIMEOUT_S)


def nodes_of(store: StateStore, institution: str, *states: NodeState) -> list[str]:
    return [
        n.node_id
        for n in store.list_nodes()
        if n.institution == institution and (not states or n.state in states)
    ]


@pytest.mark.parametrize(
    ("field", "hostname", "device", "institution"),
    [
        ("hostname", "h" * (MAX_HOSTNAME_LENGTH + 1), "cpu", "uni-a"),
        ("hostname", "h" * 3_000_000, "cpu", "uni-a"),
        ("device", "host", "d" * (MAX_DEVICE_LENGTH + 1), "uni-a"),
        ("device", "host", "d" * 900_000, "uni-a"),
        ("institution", "host", "cpu", "i" * (MAX_NAME_LENGTH + 1)),
    ],
    ids=["hostname-just-over", "hostname-3MB", "device-just-over", "device-0.9MB", "institution"],
)
def test_register_with_an_overlong_field_is_invalid_argument_and_creates_nothing(
    registry: NodeRegistry,
    store: StateStore,
    field: str,
    hostname: str,
    device: str,
    institution: str,
) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        registry.register(institution, hostname, device, declared_examples=10)
    assert f"field '{field}'" in str(refused.value)
    assert "at most" in str(refused.value)
    assert store.list_nodes() == []
    assert store.declared_examples(institution) is None


def test_register_at_the_longest_allowed_fields_is_accepted(
    registry: NodeRegistry, store: StateStore
) -> None:
    node = registry.register("uni-a", "h" * MAX_HOSTNAME_LENGTH, "d" * MAX_DEVICE_LENGTH)
    assert store.get_node(node.node_id).hostname == "h" * MAX_HOSTNAME_LENGTH


def test_register_beyond_the_institutions_online_nodes_is_refused_and_creates_nothing(
    registry: NodeRegistry, store: StateStore
) -> None:
    for _ in range(MAX_LIVE_NODES_PER_INSTITUTION):
        registry.register("uni-a", "host", "cpu")
    with pytest.raises(NodeLimitError) as refused:
        registry.register("uni-a", "host", "cpu")
    assert f"has {MAX_LIVE_NODES_PER_INSTITUTION} nodes online" in str(refused.value)
    assert len(nodes_of(store, "uni-a")) == MAX_LIVE_NODES_PER_INSTITUTION
    # Another institution is not affected, and one node leaving makes room again.
    registry.register("uni-b", "host", "cpu")
    registry.leave(nodes_of(store, "uni-a")[0])
    registry.register("uni-a", "host", "cpu")


def test_register_at_the_cap_retires_the_longest_silent_stale_node(
    registry: NodeRegistry, store: StateStore
) -> None:
    """A site that crashes and restarts leaves a stale node per start: it gets back in."""
    ids = [registry.register("uni-a", "host", "cpu").node_id for _ in range(3)]
    ids += [
        registry.register("uni-a", "host", "cpu").node_id
        for _ in range(MAX_LIVE_NODES_PER_INSTITUTION - 3)
    ]
    store.mark_stale_nodes(older_than_ms=2**62)  # all silent: stale
    for node_id in ids[2:]:
        store.touch_node(node_id, now_ms=2**61)  # all but the first two heard from again
    store.touch_node(ids[1], now_ms=1)  # ... and the second long ago: still stale
    store.mark_stale_nodes(older_than_ms=2)

    registry.register("uni-a", "host", "cpu")

    assert store.get_node(ids[1]).state is NodeState.GONE  # the longest silent one
    assert store.get_node(ids[0]).state is NodeState.STALE
    assert len(nodes_of(store, "uni-a", NodeState.ONLINE, NodeState.STALE)) == (
        MAX_LIVE_NODES_PER_INSTITUTION
    )


def test_register_and_leave_churn_keeps_the_institutions_nodes_bounded(
    registry: NodeRegistry, store: StateStore
) -> None:
    """Nodes that left are listed by ListNodes too: re-registering in a loop must not
    grow it past what a client can receive."""
    for _ in range(3 * MAX_GONE_NODES_PER_INSTITUTION):
        registry.leave(registry.register("uni-a", "h" * MAX_HOSTNAME_LENGTH, "cpu").node_id)
    assert len(nodes_of(store, "uni-a")) <= MAX_GONE_NODES_PER_INSTITUTION + 1
    assert len(registry.list_nodes()) <= MAX_GONE_NODES_PER_INSTITUTION + 1


def test_concurrent_registrations_never_exceed_the_institutions_cap(
    registry: NodeRegistry, store: StateStore
) -> None:
    start = threading.Barrier(8)
    refused: list[NodeLimitError] = []

    def register_many() -> None:
        start.wait(timeout=30)
        for _ in range(MAX_LIVE_NODES_PER_INSTITUTION // 2):
            try:
                registry.register("uni-a", "host", "cpu")
            except NodeLimitError as error:
                refused.append(error)

    threads = [threading.Thread(target=register_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(nodes_of(store, "uni-a")) == MAX_LIVE_NODES_PER_INSTITUTION
    assert len(refused) == 8 * (MAX_LIVE_NODES_PER_INSTITUTION // 2) - (
        MAX_LIVE_NODES_PER_INSTITUTION
    )


def test_declared_examples_are_fixed_by_the_institutions_first_declaration(
    registry: NodeRegistry, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Mid-job, a member registers another node declaring the most it can: the cap the
    update admission checks (`inflated_count`) stays what it declared when it joined."""
    registry.register("uni-a", "host", "cpu", declared_examples=100)
    with caplog.at_level(logging.WARNING, logger="coordinator.access.registry"):
        node = registry.register("uni-a", "host", "cpu", declared_examples=2**64 - 1)
    assert store.declared_examples("uni-a") == 100
    assert store.get_node(node.node_id).state is NodeState.ONLINE  # registered, not raised
    assert "above the 100 its institution declared first; not raised" in caplog.text
    # A smaller node does not lower it (its larger sibling's updates stay admissible).
    registry.register("uni-a", "host", "cpu", declared_examples=10)
    assert store.declared_examples("uni-a") == 100
