"""`PromptGrid.send_and_receive`: every reply, as soon as the last one is in, polling
with a growing pause; partial replies at the time-out; the rest delegated unchanged.

The wrapped Grid is a `Grid` whose replies become available after a given number of
pulls (the SuperLink is not under test here: every federated integration test runs the
ServerApp through this wrapper against a real one)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from coordinator.federated.prompt_grid import BACKOFF, FIRST_POLL_S, MAX_POLL_S, PromptGrid


@pytest.fixture(autouse=True)
def in_a_flower_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are created inside a ServerApp's run, whose identity Flower holds here."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def message(node_id: int) -> Message:
    return Message(
        content=RecordDict({"config": ConfigRecord({"n": node_id})}),
        dst_node_id=node_id,
        message_type="train",
    )


class SlowLink(Grid):
    """Replies to message i on pull number `ready_after[i]` or later (never if None)."""

    def __init__(self, ready_after: list[int | None]) -> None:
        self.ready_after = ready_after
        self.pulls = 0
        self.pushed: list[Message] = []
        self.delivered: set[str] = set()
        self.run_set: Run | None = None

    def set_run(self, run: Run) -> None:
        self.run_set = run

    @property
    def run(self) -> Run:
        assert self.run_set is not None
        return self.run_set

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = list(messages)
        for sent in self.pushed:  # as Flower's own Grid names a message it pushes
            sent.metadata.__dict__["_message_id"] = sent.object_id
        return [sent.object_id for sent in self.pushed]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        message_ids = set(message_ids)
        replies = []
        for index, sent in enumerate(self.pushed):
            wanted, ready = sent.object_id, self.ready_after[index]
            if wanted not in message_ids or wanted in self.delivered:
                continue
            if ready is not None and self.pulls >= ready:
                self.delivered.add(wanted)
                replies.append(Message(RecordDict(), reply_to=sent))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("PromptGrid must not fall back to Flower's 3 s loop")


class Clock:
    """Sleeps that only add up (the wrapper's pauses, without waiting)."""

    def __init__(self) -> None:
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)


def test_returns_every_reply_once_the_last_arrives_pausing_less_than_flower_does() -> None:
    link, clock = SlowLink([1, 4, 9]), Clock()

    replies = list(
        PromptGrid(link, sleep=clock.sleep).send_and_receive(
            [message(1), message(2), message(3)], timeout=60
        )
    )

    assert {r.metadata.reply_to_message_id for r in replies} == {m.object_id for m in link.pushed}
    assert len(replies) == 3
    assert link.pulls == 9  # not one pull more than the last reply needed
    # A pause after each pull: short after the push and after a pull that brought a
    # reply (pulls 1 and 4: the other replies are near), growing to MAX_POLL_S between.
    expected = [FIRST_POLL_S]  # after pull 1
    for pull in range(2, 9):
        grown = min(expected[-1] * BACKOFF, MAX_POLL_S)
        expected.append(FIRST_POLL_S if pull == 4 else grown)
    assert clock.pauses == pytest.approx(expected)
    assert clock.pauses[3] == FIRST_POLL_S < clock.pauses[2]  # after pull 4's reply
    assert max(clock.pauses) <= MAX_POLL_S < 3.0


def test_after_a_reply_the_next_pull_comes_soon_even_late_in_a_long_round() -> None:
    link, clock = SlowLink([30, 31]), Clock()

    PromptGrid(link, sleep=clock.sleep).send_and_receive([message(1), message(2)], timeout=60)

    assert clock.pauses[-2] == pytest.approx(MAX_POLL_S)  # backed off while none came
    assert clock.pauses[-1] == FIRST_POLL_S  # the first reply: the second is near
    assert link.pulls == 31


def test_a_missing_reply_ends_the_wait_at_the_timeout_with_the_replies_that_came() -> None:
    link = SlowLink([2, None])

    replies = list(
        PromptGrid(link, first_poll_s=0.01, max_poll_s=0.02).send_and_receive(
            [message(1), message(2)], timeout=0.2
        )
    )

    assert [r.metadata.reply_to_message_id for r in replies] == [link.pushed[0].object_id]
    assert link.pulls >= 2


def test_everything_else_is_the_wrapped_grids() -> None:
    link = SlowLink([])
    grid = PromptGrid(link)
    run = Run.create_empty(run_id=7)

    grid.set_run(run)

    assert grid.run is run
    assert list(grid.get_node_ids()) == [1, 2, 3]
    assert [n.node_id for n in grid.get_nodes()] == [1, 2, 3]
    created = grid.create_message(RecordDict(), "train", 2, "1")
    assert created.metadata.dst_node_id == 2
