"""A ClientApp task's input from the SuperNode's Runtime API, in two stages.

Flower's `pull_task_input` pulls the run, its FAB, the context and the message in one
call, and waits up to two hours for every object of the message. The site's task runner
pulls the run, FAB and context first (`pull_task_header`), checks the coordinator's
approval of the run, and only then pulls the message (`pull_task_message`): nothing of
an unapproved run's message is fetched, and a task whose run ended while the SuperNode
was receiving it (its objects never arrive: a coordinator that restarted mid-round)
is refused in seconds instead of blocking every later task. An approved run's message
may stop arriving too (the SuperLink died while the SuperNode received it, and the job
resumed on a new run): while its objects are unavailable, `still_current` is asked
(`RunStillApproved`: the coordinator withdraws a run's approval when the run ends), and
the pull ends when the run has, instead of after Flower's two hours with every later
task of the site waiting behind it. Built on the same Flower functions as
`flwr.supernode.runtime.run_clientapp.pull_task_input`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity

from consortium.errors import TaskRefusedError
from consortium.flower_waits import FIRST_OBJECT_RETRY_S
from consortium.models import MAX_PARAMETERS
from consortium.run_approval import RefusalReason, RunRefusedError

OBJECT_RETRY_CAP_S = 0.25
# The most a task's message may bring: the largest model a job may name, in float32
# (MAX_PARAMETERS), and room for its records. Flower pulls every object of a message
# before anything reads it, with no cap of its own: a coordinator's message of any
# size was held whole in `client join` before its model was checked against its
# options.
MAX_MESSAGE_BYTES = 4 * MAX_PARAMETERS + (64 << 20)


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


class RunStillApproved:
    """Called while a message's objects are unavailable: raises (the check's
    `RunRefusedError`) once the coordinator no longer approves the run, asking it at
    most every `interval_s` (the pull retries each object with its own backoff). A
    coordinator that cannot be asked (restarting) is no answer: the pull goes on."""

    def __init__(self, check: Callable[[], None], interval_s: float = 5.0) -> None:
        self._check = check
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._asked_at: float | None = None

    def __call__(self) -> None:
        with self._lock:
            now = time.monotonic()
            if self._asked_at is not None and now - self._asked_at < self._interval_s:
                return
            self._asked_at = now
            try:
                self._check()
            except RunRefusedError as refusal:
                if refusal.reason is not RefusalReason.UNREACHABLE:
                    raise


def pull_task_message(
    client: RuntimeHttpClient,
    header: TaskHeader,
    max_time_s: float | None,
    still_current: Callable[[], None] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Message:
    """The task's message, waiting at most `max_time_s` for its objects (None: Flower's
    default, two hours), and while they are unavailable, only as long as
    `still_current()` does not raise; raises when they do not all arrive in time."""
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode returned no message for the task")
    run_id = header.context.run_id
    node = Node(node_id=header.context.node_id)
    tree = pulled.message_object_trees[0]
    pull_object = make_pull_object_fn_protobuf(client.PullObject, node, run_id)
    pulled_bytes = 0

    def pull_or_give_up(object_id: str) -> bytes:
        nonlocal pulled_bytes
        try:
            data = pull_object(object_id)
        except ObjectUnavailableError:
            if still_current is not None:
                still_current()  # raises when the run ended: the pull stops
            raise
        pulled_bytes += len(data)
        if pulled_bytes > max_bytes:
            raise TaskRefusedError(
                f"the task's message is over {max_bytes:,} bytes, more than the largest "
                "model a job may name"
            )
        return data

    message = pull_and_inflate_object_from_tree(
        tree,
        pull_or_give_up,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id),
        return_type=Message,
        max_time=PULL_MAX_TIME if max_time_s is None else max_time_s,
        # Objects are unavailable only while the SuperNode is still receiving them from
        # the SuperLink, a fraction of a second on loopback: Flower's default first
        # retry after 1 s, doubling to 10 s, added seconds to every message of a round.
        initial_backoff=FIRST_OBJECT_RETRY_S,
        backoff_cap=OBJECT_RETRY_CAP_S,
    )
    # The deflated message does not carry its own id (its object id).
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message
