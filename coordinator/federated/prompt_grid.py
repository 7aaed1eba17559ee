"""Flower's Grid, with `send_and_receive` returning as soon as the replies are in.

Flower's `send_and_receive` pulls replies and then sleeps 3 s between pulls, so every
message exchange of a round (the training messages, the final witness query) ends on
a 3 s boundary: a site that trains for one second still costs the round three. This
wrapper does the same through the Grid's public `push_messages` and `pull_messages`,
polling soon after the push and backing off to `MAX_POLL_S`, and soon again after each
pull that brought a reply (the others are then near): a pull is one small RPC to the
SuperLink on this host, so a long round costs it a few pulls per second at most.
Everything else is the wrapped Grid's own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

FIRST_POLL_S = 0.05
MAX_POLL_S = 0.5
BACKOFF = 1.5


class PromptGrid(Grid):
    def __init__(
        self,
        grid: Grid,
        first_poll_s: float = FIRST_POLL_S,
        max_poll_s: float = MAX_POLL_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._grid = grid
        self._first_poll_s = first_poll_s
        self._max_poll_s = max_poll_s
        self._sleep = sleep

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> Iterable[Message]:
        """Push `messages`, then pull until every one has its reply or `timeout` seconds
        passed (None: no limit), as Flower's does; return the replies that came. A set
        `stop` ends the wait early too (the caller looks at it)."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = self._first_poll_s
        while waiting:
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or (stop is not None and stop.is_set()):
                break
            # The replies to one broadcast come close together (the sites had the same
            # work), so after one arrives the next pulls start short again: measured on
            # 3 sites with 12 s inner loops, the later replies waited up to a whole
            # MAX_POLL_S pause plus a pull in the SuperLink (benchmarks/wan.py).
            if pulled:
                pause = self._first_poll_s
            self._sleep(pause if left is None else min(pause, left))
            pause = min(pause * BACKOFF, self._max_poll_s)
        return replies
