"""The SuperNode entry point that shortens Flower's fixed waits between pulls."""

from __future__ import annotations

import importlib
import inspect
import time
import types

import pytest
from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL
from flwr.supernode import start_client_internal

from client.federated.fast_poll_supernode import (
    HEARTBEAT_BOUNDS_S,
    HEARTBEAT_MODULES,
    PATCHED_SLEEPS,
    Options,
    PollPacing,
    pace_polls,
    set_heartbeat_interval,
    shorten_object_retries,
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


def test_object_pulls_retry_sooner_with_the_rest_of_their_arguments_kept() -> None:
    calls: list[dict[str, object]] = []

    def pull_objects(
        object_ids: list[str],
        pull_object_fn: object,
        initial_backoff: float = 1,
        backoff_cap: float = 10,
    ) -> dict[str, bytes]:
        calls.append({"ids": object_ids, "first": initial_backoff, "cap": backoff_cap})
        return {}

    module = types.ModuleType("fake_supernode_loop")
    module.pull_objects = pull_objects  # type: ignore[attr-defined]
    shorten_object_retries(module, 0.2)
    module.pull_objects(["a"], pull_object_fn=None)
    assert calls == [{"ids": ["a"], "first": 0.05, "cap": 0.2}]
    # Flower's own function still takes both (checked against the installed version).
    shorten_object_retries(types.SimpleNamespace(**vars(start_client_internal)), 0.2)  # type: ignore[arg-type]


def test_a_pull_objects_without_backoff_arguments_is_refused() -> None:
    module = types.ModuleType("renamed_loop")
    module.pull_objects = lambda object_ids: {}  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="no longer takes initial_backoff"):
        shorten_object_retries(module, 0.2)
