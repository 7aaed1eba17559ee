"""A ClientApp task's input from the SuperNode's Runtime API, in two stages.

Flower's `pull_task_input` pulls the run, its FAB, the context and the message in one
call, and waits up to two hours for every object of the message. The site's task runner
pulls the run, FAB and context first (`pull_task_header`), checks the coordinator's
approval of the run, and only then pulls the message (`pull_task_message`): nothing of
an unapproved run's message is fetched, and a task whose run ended while the SuperNode
was receiving it (its objects never arrive: a coordinator that restarted mid-round)
is refused in seconds instead of blocking every later task. Built on the same Flower
functions as `flwr.supernode.runtime.run_clientapp.pull_task_input`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import PULL_MAX_TIME
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity


@dataclass(frozen=True)
class TaskHeader:
    context: Context
    run: Run
    fab: Fab


def pull_task_header(client: RuntimeHttpClient) -> TaskHeader:
    """The task's run, FAB and context (no message content)."""
    response = client.PullTaskInput(PullTaskInputRequest())
    # Flower's tracing and heartbeats read the running task's identity from here.
    TaskIdentity.task_id = response.task_id
    TaskIdentity.run_id = response.run.run_id
    TaskIdentity.node_id = response.context.node_id
    return TaskHeader(
        context=context_from_proto(response.context),
        run=run_from_proto(response.run),
        fab=fab_from_proto(response.fab),
    )


def pull_task_message(
    client: RuntimeHttpClient, header: TaskHeader, max_time_s: float | None
) -> Message:
    """The task's message, waiting at most `max_time_s` for its objects (None: Flower's
    default, two hours); raises when they do not all arrive in time."""
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode returned no message for the task")
    run_id = header.context.run_id
    node = Node(node_id=header.context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id),
        return_type=Message,
        max_time=PULL_MAX_TIME if max_time_s is None else max_time_s,
    )
    # The deflated message does not carry its own id (its object id).
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message
