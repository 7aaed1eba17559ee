"""A task's message whose objects stop arriving ends the pull once the coordinator no
longer approves its run, instead of Flower's two hours during which every later task
of the site waits (seen: a SuperLink killed while the SuperNode received round 2; the
job resumed on a new run whose messages then sat behind the stuck task until the job
failed). The Runtime API here answers as a SuperNode does for a message it received
only in part: the object exists and is never available."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.proto.message_pb2 import (  # pylint: disable=E0611  # pylint: disable=E0611
    ConfirmMessageReceivedRequest,
    ConfirmMessageReceivedResponse,
    ObjectTree,
    PullObjectRequest,
    PullObjectResponse,
)
from flwr.proto.message_pb2 import (  # pylint: disable=E0611
    Message as MessageProto,
)
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    PullAppMessagesRequest,
    PullAppMessagesResponse,
)
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity

from client.federated.task_input import RunStillApproved, TaskHeader, pull_task_message
from consortium.errors import TaskRefusedError
from consortium.run_approval import RefusalReason, RunRefusedError


@pytest.fixture(autouse=True)
def in_a_flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built inside a task, whose identity Flower holds here."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 3)


class HalfReceived:
    """The Runtime API of a SuperNode that holds a message's tree but not its objects."""

    def __init__(self) -> None:
        message = Message(
            RecordDict({"config": ConfigRecord({"round": 2})}), dst_node_id=3, message_type="train"
        )
        self.tree: ObjectTree = get_object_tree(message)
        self.object_pulls = 0

    # The RuntimeHttpClient's method names, which the code under test calls.
    def PullMessages(self, request: PullAppMessagesRequest) -> PullAppMessagesResponse:  # noqa: N802
        return PullAppMessagesResponse(
            messages_list=[MessageProto()], message_object_trees=[self.tree]
        )

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
        self.object_pulls += 1
        return PullObjectResponse(object_found=True, object_available=False)

    def ConfirmMessageReceived(  # noqa: N802
        self, request: ConfirmMessageReceivedRequest
    ) -> ConfirmMessageReceivedResponse:
        raise AssertionError("nothing was received to confirm")


def header() -> TaskHeader:
    context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
    return TaskHeader(context=context, run=Run.create_empty(run_id=7), fab=Fab("", b"", {}))


class Coordinator:
    """Answers the site's approval check: approved until `withdrawn`, or unreachable."""

    def __init__(self) -> None:
        self.withdrawn = False
        self.unreachable = False
        self.asked = 0

    def check(self) -> None:
        self.asked += 1
        if self.unreachable:
            raise RunRefusedError(RefusalReason.UNREACHABLE, "could not ask the coordinator")
        if self.withdrawn:
            raise RunRefusedError(RefusalReason.UNAPPROVED, "the coordinator approved no run 7")


def test_the_pull_ends_once_the_run_is_no_longer_approved() -> None:
    site, coordinator = HalfReceived(), Coordinator()
    still = RunStillApproved(coordinator.check, interval_s=0.0)
    client = cast(RuntimeHttpClient, site)
    coordinator.withdrawn = True

    with pytest.raises(RunRefusedError) as ended:
        pull_task_message(client, header(), max_time_s=60.0, still_current=still)

    assert ended.value.reason is RefusalReason.UNAPPROVED
    assert site.object_pulls >= 1 and coordinator.asked >= 1


def test_an_approved_or_unreachable_run_keeps_waiting_until_the_pull_times_out() -> None:
    """A coordinator that cannot be asked (restarting) is no reason to give up."""
    site, coordinator = HalfReceived(), Coordinator()
    still = RunStillApproved(coordinator.check, interval_s=0.0)
    client = cast(RuntimeHttpClient, site)

    with pytest.raises(ObjectPullError):
        pull_task_message(client, header(), max_time_s=0.3, still_current=still)
    coordinator.unreachable = True
    with pytest.raises(ObjectPullError):
        pull_task_message(client, header(), max_time_s=0.3, still_current=still)

    assert coordinator.asked >= 2


def test_the_coordinator_is_asked_at_most_once_per_interval() -> None:
    coordinator = Coordinator()
    still = RunStillApproved(coordinator.check, interval_s=3600.0)

    for _ in range(5):
        still()
    coordinator.withdrawn = True
    still()  # within the interval: not asked again

    assert coordinator.asked == 1


class Received:
    """The Runtime API of a SuperNode that holds a whole message, objects and all."""

    def __init__(self, message: Message) -> None:
        self.tree = get_object_tree(message)
        self.objects = {i: o.deflate() for i, o in get_all_nested_objects(message).items()}

    def PullMessages(self, request: PullAppMessagesRequest) -> PullAppMessagesResponse:  # noqa: N802
        return PullAppMessagesResponse(
            messages_list=[MessageProto()], message_object_trees=[self.tree]
        )

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
        content = self.objects[request.object_id]
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(  # noqa: N802
        self, request: ConfirmMessageReceivedRequest
    ) -> ConfirmMessageReceivedResponse:
        return ConfirmMessageReceivedResponse()


def test_a_message_larger_than_any_job_may_send_is_refused_as_it_arrives() -> None:
    """Flower pulls every object of a message before anything reads it, with no cap: a
    coordinator's message of any size was held whole in `client join` before its model
    was checked against its options."""
    weights = ArrayRecord({"w": Array(np.zeros(1 << 18, dtype=np.float32))})  # 1 MiB
    message = Message(RecordDict({"arrays": weights}), dst_node_id=3, message_type="train")
    client = cast(RuntimeHttpClient, Received(message))

    with pytest.raises(TaskRefusedError, match="more than the largest model a job may name"):
        pull_task_message(client, header(), max_time_s=30.0, max_bytes=512 * 1024)
    arrived = pull_task_message(client, header(), max_time_s=30.0)  # the cap's default
    assert arrived.content.array_records["arrays"]["w"].numpy().nbytes == 1 << 20
