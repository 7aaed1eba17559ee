"""How often the site's task runner asks its SuperNode for a task
(client/federated/task_runner.py): at the SuperNode's poll interval while a job's
messages come, at most once a second once none has for a while, and at once again
after a task."""

from __future__ import annotations

import threading
from typing import Any

from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=E0611

from client.federated.fast_poll_supernode import BUSY_WINDOW_S
from client.federated.task_runner import IDLE_POLL_INTERVAL_S, SiteTaskRunner

POLL_S = 0.2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedSuperNode:
    """Answers each AcquireTask from a script: True offers a task, False none."""

    def __init__(self, offers: list[bool]) -> None:
        self.offers = offers

    def AcquireTask(self, request: Any) -> AcquireTaskResponse:  # noqa: N802 (Flower's name)
        reply = AcquireTaskResponse()
        if self.offers.pop(0):
            reply.task.task_id = 7
            reply.token = "token"
        return reply

    def close(self) -> None:
        pass


class RecordingStop(threading.Event):
    """Records each wait's timeout, advancing the clock by it (and by `idle_after`'s
    seconds after that many waits: the site idles); stops after `waits`."""

    def __init__(self, clock: Clock, waits: int, idle_after: tuple[int, float]) -> None:
        super().__init__()
        self.clock = clock
        self.waits = waits
        self.idle_after = idle_after
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        self.clock.now += timeout or 0.0
        if len(self.timeouts) == self.idle_after[0]:
            self.clock.now += self.idle_after[1]
        if len(self.timeouts) >= self.waits:
            self.set()
        return self.is_set()


class ScriptedRunner(SiteTaskRunner):
    def __init__(
        self, supernode: ScriptedSuperNode, clock: Clock, poll_interval_s: float = POLL_S
    ) -> None:
        super().__init__(
            lambda: "127.0.0.1:1",
            b"secret",
            lambda run_id, fab_hash, job_id: None,
            lambda message, context: message,
            poll_interval_s=poll_interval_s,
            clock=clock,
        )
        self.supernode = supernode
        self.executed: list[float] = []
        self.clock = clock

    def _task_client(self, address: str) -> Any:
        return self.supernode

    def _execute(self, token: str, task_id: int) -> None:
        self.executed.append(self.clock.now)


def test_the_runner_asks_often_while_busy_once_a_second_when_idle_and_often_after_a_task() -> None:
    clock = Clock()
    busy_polls = 3  # the start counts as activity
    idle_polls = 3
    script = [False] * (busy_polls + idle_polls) + [True] + [False] * 2
    runner = ScriptedRunner(ScriptedSuperNode(script), clock)
    # After the busy polls, the site hears nothing for longer than the busy window.
    stop = RecordingStop(clock, busy_polls + idle_polls + 2, (busy_polls, BUSY_WINDOW_S))
    runner.run(stop)
    busy, idle, after_task = (
        stop.timeouts[:busy_polls],
        stop.timeouts[busy_polls : busy_polls + idle_polls],
        stop.timeouts[busy_polls + idle_polls :],
    )
    assert set(busy) == {POLL_S}
    assert idle == [IDLE_POLL_INTERVAL_S] * idle_polls and IDLE_POLL_INTERVAL_S > POLL_S
    assert len(runner.executed) == 1
    assert after_task == [POLL_S, POLL_S]  # the task made the node busy again


def test_a_poll_interval_longer_than_the_idle_one_is_kept_when_idle() -> None:
    clock = Clock()
    runner = ScriptedRunner(ScriptedSuperNode([]), clock, poll_interval_s=2.0)
    assert runner.next_poll_s() == 2.0
    clock.now += BUSY_WINDOW_S + 1
    assert runner.next_poll_s() == 2.0
