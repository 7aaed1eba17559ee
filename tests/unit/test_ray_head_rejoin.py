"""A site's Ray worker rejoins a new Ray head at once: the coordinator names its current
head in every heartbeat reply, and `client join` restarts its worker when the name
changes (`HeadWatch`), instead of waiting about a minute for its raylet to be refused
by the new head's GCS (tests/integration/test_pretrain_replay.py sees it happen)."""

from __future__ import annotations

from typing import cast

import grpc
import pytest

from client.join import HeadWatch
from consortium.proto.v1 import nodes_pb2
from coordinator.access.registry import NodeRegistry
from coordinator.api.servicers import NodeRegistryServicer
from coordinator.state import InMemoryStateStore


def test_the_heartbeat_reply_names_the_current_ray_head() -> None:
    registry = NodeRegistry(InMemoryStateStore(), node_timeout_s=30)
    node = registry.register("aurora", "host-a", "cpu")
    head = {"id": "first"}
    servicer = NodeRegistryServicer(
        registry, "127.0.0.1:1", 500, "127.0.0.1:2", ray_head_id=lambda: head["id"]
    )
    context = cast(grpc.ServicerContext, None)
    request = nodes_pb2.HeartbeatRequest(node_id=node.node_id)

    before = servicer.Heartbeat(request, context)
    head["id"] = "second"  # the coordinator started a new head
    after = servicer.Heartbeat(request, context)
    without_ray = NodeRegistryServicer(registry, "127.0.0.1:1", 500).Heartbeat(request, context)

    assert (before.ray_head_id, after.ray_head_id) == ("first", "second")
    assert before.node.node_id == node.node_id
    assert without_ray.ray_head_id == ""


@pytest.mark.parametrize(
    ("replies", "rejoins"),
    [
        (["a", "a", "a"], [False, False, False]),  # the same head: nothing to do
        (["a", "b", "b"], [False, True, False]),  # a new head: once
        (["a", None, None, "b"], [False, False, False, True]),  # across an outage
        (["a", None, "a"], [False, False, False]),  # an outage, the same head after
        (["", "", "a"], [False, False, False]),  # no Ray, then the first head seen
        (["a", "", "a"], [False, False, False]),  # a reply without Ray forgets nothing
    ],
)
def test_head_watch_says_new_only_when_a_named_head_replaces_another(
    replies: list[str | None], rejoins: list[bool]
) -> None:
    watch = HeadWatch()

    assert [watch.is_new(reply) for reply in replies] == rejoins
