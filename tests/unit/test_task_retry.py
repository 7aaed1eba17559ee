"""How the site's task runner retries its calls to the SuperNode (client/federated/task_runner.py).

The chaos run found that a SuperNode restarted mid-task made `client join` leave the
consortium: Flower's own retry invoker answers the SuperNode's 401 (the task's token is
gone with the old SuperNode) by sending SIGINT to its process, which is `client join`
itself here. If the invoker ever did that again, the SIGINT would interrupt this test.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from types import FrameType

import httpx
import pytest

from client.federated.task_runner import task_retry_invoker


@pytest.fixture
def sigint_seen() -> Iterator[list[int]]:
    seen: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/pull-object")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(code))


@pytest.mark.parametrize("code", [401, 403, 404])
def test_a_refused_task_call_ends_the_task_and_signals_nothing(
    sigint_seen: list[int], code: int
) -> None:
    calls = []

    def call() -> None:
        calls.append(1)
        raise _status(code)

    with pytest.raises(httpx.HTTPStatusError):
        task_retry_invoker().invoke(call)
    assert len(calls) == 1  # not retried: the token or task is gone
    assert sigint_seen == []


def test_an_unavailable_supernode_is_waited_for(sigint_seen: list[int]) -> None:
    answers = [_status(503), httpx.ConnectError("restarting"), None]

    def call() -> str:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return "ok"

    assert task_retry_invoker().invoke(call) == "ok"
    assert sigint_seen == []
