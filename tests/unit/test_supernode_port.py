"""A site's SuperNode whose Runtime API port another process took starts again on a new
port, and the site's task runner follows it there.

`SuperNode` reserves a free port and closes it before the SuperNode binds it, so a
process started meanwhile can take it: two `client join`s started at once on one host
were both handed the same port, and the second's SuperNode failed to start at every
restart, on the same port, for as long as the site ran. Here the port is taken on
purpose, by a socket this test holds; the real SuperNode (Flower's, through our
fast-poll entry point) fails on it, and its restart picks another one.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client.federated.task_runner import SiteTaskRunner
from client.supernode import SuperNode

START_TIMEOUT_S = 60.0


def wait_until(
    what: str, condition: Callable[[], bool], timeout_s: float = START_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def taken_port() -> Iterator[int]:
    holder = socket.create_server(("127.0.0.1", 0))
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


@pytest.fixture
def supernode(tmp_path: Path, taken_port: int) -> Iterator[SuperNode]:
    closed = socket.create_server(("127.0.0.1", 0))  # a SuperLink that is not there
    superlink = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    node = SuperNode(superlink, tmp_path / "data", "alpha", "cpu", tmp_path, None, port=taken_port)
    try:
        yield node
    finally:
        node.stop()


def test_a_taken_runtime_api_port_is_replaced_at_restart_and_the_task_runner_follows(
    supernode: SuperNode, taken_port: int
) -> None:
    wait_until(
        "the SuperNode to fail on the taken port", lambda: supernode.process.poll() is not None
    )
    assert "address already in use" in supernode.process.log_tail(40)
    runner = SiteTaskRunner(
        lambda: supernode.runtime_api_address,
        supernode.task_secret,
        check_run=lambda *_: None,
        app=None,  # type: ignore[arg-type]  # no task is ever offered here
        poll_interval_s=0.05,
    )
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        supernode.restart()
        assert supernode.port != taken_port
        assert supernode.runtime_api_address == f"127.0.0.1:{supernode.port}"
        wait_until("the restarted SuperNode's Runtime API", lambda: listening(supernode.port))
        assert supernode.process.poll() is None
        wait_until(
            "the task runner to reach it on the new port",
            lambda: runner.connected_to == supernode.runtime_api_address,
        )
    finally:
        stop.set()
        thread.join(timeout=10)
