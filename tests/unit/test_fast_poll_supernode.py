"""The SuperNode entry point that shortens Flower's fixed waits between pulls."""

from __future__ import annotations

import importlib
import inspect
import threading
import time
import types

import pytest
from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL
from flwr.supernode import start_client_internal

from client.federated.fast_poll_supernode import (
    HEARTBEAT_BOUNDS_S,
    HEARTBEAT_MODULES,
    HTTP_CLIENT_MODULE,
    KEEP_ALIVE_S,
    LOCAL_WAIT_S,
    OBJECT_TRANSFER_MODULE,
    OBJECT_TRANSFERS,
    PATCHED_SLEEPS,
    Options,
    PollPacing,
    keep_connections,
    overlap_object_transfers,
    pace_polls,
    set_heartbeat_interval,
    split_argv,
)


def test_the_installed_flower_still_has_the_waits_this_caps() -> None:
    # A Flower upgrade that renames or removes them must be looked at again here.
    source = inspect.getsource(start_client_internal)
    for call in PATCHED_SLEEPS:
        assert call in source, call
    assert vars(start_client_internal)["time"] is time


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def loop_module(pushed: list[str]) -> types.ModuleType:
    """A stand-in for Flower's SuperNode loop module: `time` and `_push_messages`."""
    module = types.ModuleType("fake_supernode_loop")
    module.time = time  # type: ignore[attr-defined]
    module._push_messages = lambda: pushed.append("pushed")  # type: ignore[attr-defined]
    return module


def test_a_busy_node_polls_at_the_short_interval_and_an_idle_one_as_flower_does() -> None:
    clock, pushed = Clock(), list[str]()
    pacing = PollPacing(0.01, busy_window_s=30.0, clock=clock)
    module = loop_module(pushed)
    pace_polls(module, pacing)
    assert module.time is pacing and pacing.monotonic is time.monotonic
    started = time.monotonic()
    module.time.sleep(3)  # just started: busy, so 0.01 s
    assert time.monotonic() - started < 1.0
    clock.now += 31.0
    assert not pacing.busy  # idle past the window: the full wait again
    module._push_messages()  # a message handled: busy again, and Flower's call still made
    assert pacing.busy and pushed == ["pushed"]
    clock.now += 29.0
    assert pacing.busy


def test_a_node_stays_busy_through_a_task_longer_than_the_window_and_after_its_reply() -> None:
    # A federated pretraining step's inner loop can outlast the window: the next message
    # comes seconds after the reply, and must be pulled at the short interval, not after
    # Flower's 3 s (it was, every step of a 35 s inner loop: benchmarks/wan.py).
    clock = Clock()
    pacing = PollPacing(0.01, busy_window_s=30.0, clock=clock)
    module = loop_module([])

    def long_task() -> None:
        clock.now += 40.0  # the ClientApp trains past the window, then replies
        assert pacing.busy
        started = time.monotonic()
        module.time.sleep(0.5)  # Flower's wait for the reply: still the short one
        assert time.monotonic() - started < 0.4

    module._push_messages = long_task  # type: ignore[attr-defined]
    pace_polls(module, pacing)
    module._push_messages()
    clock.now += 29.0  # the job's next message is near: pulled at the short interval
    assert pacing.busy
    started = time.monotonic()
    module.time.sleep(3)
    assert time.monotonic() - started < 1.0
    clock.now += 2.0
    assert not pacing.busy  # the window passed with no message: idle, as Flower's


def test_a_module_without_time_or_push_messages_is_refused_rather_than_left_slow() -> None:
    for missing in ("time", "_push_messages"):
        module = loop_module([])
        delattr(module, missing)
        with pytest.raises(RuntimeError, match="check client/federated/fast_poll_supernode"):
            pace_polls(module, PollPacing(0.2))


def test_a_non_positive_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        PollPacing(0)


def test_our_flags_are_taken_off_and_flowers_arguments_pass_unchanged() -> None:
    options, rest = split_argv(
        [
            "--poll-interval-s",
            "0.5",
            "--superlink",
            "127.0.0.1:9092",
            "--heartbeat-interval-s",
            "10",
            "--insecure",
        ]
    )
    assert options == Options(poll_interval_s=0.5, heartbeat_interval_s=10.0)
    assert rest == ["--superlink", "127.0.0.1:9092", "--insecure"]
    assert split_argv([])[0] == Options(0.2, 30.0)  # Flower's heartbeat by default


def test_the_installed_flower_reads_the_heartbeat_interval_this_sets() -> None:
    for name in HEARTBEAT_MODULES:
        assert vars(importlib.import_module(name))["HEARTBEAT_DEFAULT_INTERVAL"] == 30, name
    assert HEARTBEAT_BOUNDS_S == (HEARTBEAT_MIN_INTERVAL, HEARTBEAT_MAX_INTERVAL)


def test_the_heartbeat_interval_is_set_where_flower_reads_it() -> None:
    modules = [types.ModuleType(name) for name in ("connection", "sender")]
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = 30  # type: ignore[attr-defined]
    set_heartbeat_interval(modules, 10.0)
    assert [vars(m)["HEARTBEAT_DEFAULT_INTERVAL"] for m in modules] == [10.0, 10.0]
    with pytest.raises(ValueError, match=r"within \[10, 1800\] s"):
        set_heartbeat_interval(modules, 5.0)
    with pytest.raises(RuntimeError, match="no longer reads HEARTBEAT_DEFAULT_INTERVAL"):
        set_heartbeat_interval([types.ModuleType("renamed")], 10.0)


def test_a_messages_objects_cross_all_at_once_whatever_the_number_of_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Flower's own pushes ran at most as many at a time as the host has cores (2 on CI):
    # each of these waits until all are in flight, so Flower's would break the barrier.
    module = importlib.import_module(OBJECT_TRANSFER_MODULE)
    monkeypatch.setattr(module, "get_num_workers", module.get_num_workers)  # restored after
    overlap_object_transfers(module, OBJECT_TRANSFERS)
    all_in_flight = threading.Barrier(OBJECT_TRANSFERS, timeout=10)
    pushed: list[str] = []

    def push(object_id: str, _content: bytes) -> None:
        all_in_flight.wait()
        pushed.append(object_id)

    objects = [(f"object-{i}", b"x") for i in range(OBJECT_TRANSFERS)]
    module.push_object_contents_from_iterable(objects, push)
    assert sorted(pushed) == sorted(name for name, _ in objects)
    assert module.get_num_workers(16) == 16  # Flower's own higher maximum stays


def test_a_module_without_get_num_workers_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no longer has get_num_workers"):
        overlap_object_transfers(types.ModuleType("renamed"), OBJECT_TRANSFERS)


def test_flowers_http_clients_keep_idle_connections_past_an_inner_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = importlib.import_module(HTTP_CLIENT_MODULE)
    monkeypatch.setattr(module, "httpx", module.httpx)  # restored after
    assert "httpx.Client(" in inspect.getsource(module)  # where Flower makes its clients
    keep_connections(module, KEEP_ALIVE_S)
    client = module.ProtobufClient("https://127.0.0.1:1")
    try:
        pool = client._client._transport._pool  # httpcore's pool behind httpx's Client
        assert pool._keepalive_expiry == KEEP_ALIVE_S  # httpx's default: 5 s
    finally:
        client._client.close()
    with pytest.raises(RuntimeError, match="no longer imports httpx"):
        keep_connections(types.ModuleType("renamed"), KEEP_ALIVE_S)


def test_a_handling_node_looks_for_its_clientapps_reply_at_the_local_interval() -> None:
    # Between the pull and the reply a node only waits for its own ClientApp's reply:
    # Flower's 0.5 s (then the poll interval) delayed every reply by half of it.
    slept: list[float] = []
    clock = Clock()
    pacing = PollPacing(0.2, clock=clock, sleep=slept.append)
    module = loop_module([])

    def task() -> None:
        module.time.sleep(0.5)  # Flower's wait for the ClientApp's reply

    module._push_messages = task  # type: ignore[attr-defined]
    pace_polls(module, pacing)
    module._push_messages()
    module.time.sleep(3)  # after the reply, busy: the poll interval
    clock.now += 31.0
    module.time.sleep(3)  # idle: Flower's own wait
    assert slept == [LOCAL_WAIT_S, 0.2, 3]
    assert PollPacing(0.01).local_wait_s == 0.01  # never longer than the poll interval
