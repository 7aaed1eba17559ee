"""Flower's SuperNode with shorter waits between its pulls: the `consortium-flower-supernode`
console script that `client join` starts instead of `flower-supernode`.

flower-supernode 1.41 (`flwr/supernode/start_client_internal.py`) has three fixed waits
that no option changes:
- it sleeps 3 s after every pull from the SuperLink that found no message;
- it looks for its ClientApp's reply every 0.5 s;
- it pulls a message's objects with `pull_objects`' default retry, first after 1 s
  (doubling to 10 s), and a message is often seen before the ServerApp has pushed all
  its objects.
Every message of a round (train, evaluate, each site) paid them: 2-5 s per message,
longer than training a small model. So this entry point replaces three names in that one
module before running Flower's own `flower_supernode()` unchanged (its argument parsing,
TLS, authentication and connection retries stay Flower's): `time`, by the time module
with `sleep` capped at `--poll-interval-s` while the node is busy (`PollPacing`: within
30 s of its last reply) and at 0.02 s while it handles a message (its waits are then
for its ClientApp's reply, a local look), `_push_messages` (which waits for
the ClientApp's reply and sends it), by the same function marking the message handled,
and `pull_objects`, by the same function retrying first after 0.05 s and at most every
`--poll-interval-s` (consortium/flower_waits.py). A busy site sends a few small
authenticated PullMessages requests per second to the SuperLink; an idle one, one every
3 s as Flower's does.

Two more names make a message's objects cross a WAN link in fewer round trips:
- Flower moves a message's objects at most as many at a time as the host has cores
  (`get_num_workers` in flwr/supercore/inflatable/inflatable_utils.py): two on a
  two-core site, so the 7 to 9 objects of a federated pretraining step crossed in four
  or five round trips each way. Each transfer waits on the network, not on a core:
  `overlap_object_transfers` lets `OBJECT_TRANSFERS` run at once.
- Flower's HTTP client (`httpx.Client` in flwr/supercore/protobuf/client.py) closes a
  connection idle for 5 s, so after every inner loop longer than that the reply opened
  new connections, each a TCP and a TLS handshake (two round trips) through the
  forwarder to the edge. `keep_connections` keeps them `KEEP_ALIVE_S`, less than the
  edge's own keep-alive (coordinator/federated/edge.py), so the site never reuses a
  connection the edge has just closed.

It also takes `--heartbeat-interval-s`: the heartbeat interval the node declares to the
SuperLink and keeps (Flower's SuperNode has a fixed 30 s, `HEARTBEAT_DEFAULT_INTERVAL`,
read by its Fleet connection and its heartbeat sender). The SuperLink takes a node for
gone after 2 intervals without one, and a round that sampled a node that died waits for
that: 60 s with Flower's interval, 20 s with the shortest the SuperLink accepts (10 s).

`PATCHED_SLEEPS` names the waits this was written against; tests/unit/test_fast_poll_
supernode.py fails when the installed Flower's module no longer has them, so a Flower
upgrade is checked here rather than silently left slow.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import httpx

from consortium.flower_waits import shorten_object_retries

DEFAULT_POLL_INTERVAL_S = 0.2
# A handling node's waits are for its own ClientApp's reply (a look at its local state,
# microseconds): the reply goes out at most this long after the ClientApp returns.
LOCAL_WAIT_S = 0.02
# How long after its last reply a node keeps polling at the short interval.
BUSY_WINDOW_S = 30.0
# The waits of flwr.supernode.start_client_internal that this shortens (source text),
# and the call that marks a message handled.
PATCHED_SLEEPS = ("time.sleep(3)", "time.sleep(0.5)", "pull_objects(", "_push_messages(")
# Flower's SuperLink refuses a heartbeat interval outside these bounds
# (flwr.common.constant.HEARTBEAT_MIN_INTERVAL and HEARTBEAT_MAX_INTERVAL).
HEARTBEAT_BOUNDS_S = (10.0, 1800.0)
DEFAULT_HEARTBEAT_INTERVAL_S = 30.0  # Flower's HEARTBEAT_DEFAULT_INTERVAL
# The modules that read the interval: the Fleet connection declares it, the sender
# paces its heartbeats by it.
HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
# A message's objects moved at once (a federated pretraining step's are 7 to 9).
OBJECT_TRANSFERS = 8
OBJECT_TRANSFER_MODULE = "flwr.supercore.inflatable.inflatable_utils"
# How long an idle connection to the coordinator is kept: a few inner loops' worth, and
# below the edge's EDGE_KEEP_ALIVE_S (120 s).
KEEP_ALIVE_S = 100.0
HTTP_CLIENT_MODULE = "flwr.supercore.protobuf.client"


class PollPacing:
    """The `time` module, with `sleep` capped at `cap_s` while the node is busy: while
    it handles a message (`handling`), and within `busy_window_s` of the end of the last
    one (and of its start). The window counts from the reply, not from the message: a
    task that outlasts the window (a federated pretraining step of 35 s) is followed by
    the job's next message within seconds, and a node that took itself for idle then
    slept Flower's 3 s before pulling it, every step. While it handles a message its
    only waits are for its ClientApp's reply, local: those are capped at
    `local_wait_s` (Flower's: 0.5 s, then `cap_s`: on average half of it lost per step).
    A node idle for longer
    waits as Flower's own SuperNode does: an idle consortium of many sites costs the
    SuperLink what Flower's default costs it (measured: a coordinator and two idle
    sites used 21% of a core polling every 0.2 s, 12% every 3 s), while a job's
    messages, which follow each other within seconds, are picked up at once. The first
    message after a long idle time waits at most Flower's 3 s."""

    def __init__(
        self,
        cap_s: float,
        busy_window_s: float = BUSY_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        local_wait_s: float = LOCAL_WAIT_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if cap_s <= 0:
            raise ValueError(f"the poll interval must be positive, not {cap_s}")
        self.cap_s = cap_s
        self.busy_window_s = busy_window_s
        self.local_wait_s = min(local_wait_s, cap_s)
        self._clock = clock
        self._sleep = sleep
        self._last_message = clock()
        self._handling = 0  # messages between their pull and their reply

    def note_message(self) -> None:
        self._last_message = self._clock()

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Busy throughout, and for the window after."""
        self._handling += 1
        try:
            yield
        finally:
            self._handling -= 1
            self.note_message()

    @property
    def busy(self) -> bool:
        return self._handling > 0 or self._clock() - self._last_message <= self.busy_window_s

    def sleep(self, seconds: float) -> None:
        if self._handling > 0:
            self._sleep(min(seconds, self.local_wait_s))
        elif self.busy:
            self._sleep(min(seconds, self.cap_s))
        else:
            self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def pace_polls(module: ModuleType, pacing: PollPacing) -> None:
    """Make `module`'s `time.sleep(...)` calls follow `pacing`, and the node busy while
    it handles each message (`_push_messages` runs once per pulled message, from just
    after the pull until the reply is sent) and for the window after."""
    push_messages: Any = getattr(module, "_push_messages", None)
    if getattr(module, "time", None) is not time or not callable(push_messages):
        raise RuntimeError(
            f"{module.__name__} no longer imports the time module as `time` or has no "
            "_push_messages: check client/federated/fast_poll_supernode.py against this "
            "Flower version"
        )

    @functools.wraps(push_messages)
    def noting_push_messages(*args: Any, **kwargs: Any) -> Any:
        with pacing.handling():
            return push_messages(*args, **kwargs)

    module.time = pacing  # type: ignore[attr-defined]
    module._push_messages = noting_push_messages  # type: ignore[attr-defined]


def set_heartbeat_interval(modules: Iterable[ModuleType], interval_s: float) -> None:
    """Make each of `modules` (Flower's SuperNode side) use `interval_s` as its
    `HEARTBEAT_DEFAULT_INTERVAL`."""
    low, high = HEARTBEAT_BOUNDS_S
    if not low <= interval_s <= high:
        raise ValueError(
            f"the heartbeat interval must be within [{low:g}, {high:g}] s (the SuperLink "
            f"refuses others), not {interval_s:g}"
        )
    for module in modules:
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), int | float):
            raise RuntimeError(
                f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL: check "
                "client/federated/fast_poll_supernode.py against this Flower version"
            )
        module.HEARTBEAT_DEFAULT_INTERVAL = interval_s  # type: ignore[attr-defined]


def overlap_object_transfers(module: ModuleType, transfers: int) -> None:
    """Make `module`'s object pulls and pushes run `transfers` at a time (or Flower's
    own maximum, FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS/PUSHES, where higher), whatever
    the number of cores."""
    if not callable(getattr(module, "get_num_workers", None)):
        raise RuntimeError(
            f"{module.__name__} no longer has get_num_workers: check "
            "client/federated/fast_poll_supernode.py against this Flower version"
        )

    def get_num_workers(max_concurrent: int) -> int:
        return max(max_concurrent, transfers)

    module.get_num_workers = get_num_workers  # type: ignore[attr-defined]


class KeepAliveHttpx:
    """The httpx module, with `Client` keeping idle connections `keep_alive_s`."""

    def __init__(self, keep_alive_s: float) -> None:
        self.limits = httpx.Limits(  # httpx's default pool sizes
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=keep_alive_s
        )

    def Client(self, *args: Any, **kwargs: Any) -> httpx.Client:  # noqa: N802 (httpx's name)
        kwargs.setdefault("limits", self.limits)
        return httpx.Client(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(httpx, name)


def keep_connections(module: ModuleType, keep_alive_s: float) -> None:
    """Make the `httpx.Client`s that `module` creates keep idle connections
    `keep_alive_s` (httpx's default: 5 s)."""
    if getattr(module, "httpx", None) is not httpx:
        raise RuntimeError(
            f"{module.__name__} no longer imports httpx as `httpx`: check "
            "client/federated/fast_poll_supernode.py against this Flower version"
        )
    module.httpx = KeepAliveHttpx(keep_alive_s)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Options:
    poll_interval_s: float
    heartbeat_interval_s: float


def split_argv(argv: list[str]) -> tuple[Options, list[str]]:
    """Our options off the command line; the rest is Flower's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_INTERVAL_S)
    parser.add_argument("--heartbeat-interval-s", type=float, default=DEFAULT_HEARTBEAT_INTERVAL_S)
    ours, flowers = parser.parse_known_args(argv)
    return Options(float(ours.poll_interval_s), float(ours.heartbeat_interval_s)), flowers


def main() -> None:
    options, flower_argv = split_argv(sys.argv[1:])
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    pace_polls(start_client_internal, PollPacing(options.poll_interval_s))
    shorten_object_retries(start_client_internal, options.poll_interval_s)
    overlap_object_transfers(importlib.import_module(OBJECT_TRANSFER_MODULE), OBJECT_TRANSFERS)
    keep_connections(importlib.import_module(HTTP_CLIENT_MODULE), KEEP_ALIVE_S)
    set_heartbeat_interval(
        map(importlib.import_module, HEARTBEAT_MODULES), options.heartbeat_interval_s
    )
    sys.argv = [sys.argv[0], *flower_argv]
    flower_supernode()


if __name__ == "__main__":
    main()
