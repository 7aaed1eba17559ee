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
longer than training a small model. So this entry point replaces two names in that one
module before running Flower's own `flower_supernode()` unchanged (its argument parsing,
TLS, authentication and connection retries stay Flower's): `time`, by the time module
with `sleep` capped at `--poll-interval-s`, and `pull_objects`, by the same function
retrying first after 0.05 s and at most every `--poll-interval-s`. An idle site then
sends a few PullMessages requests per second to the SuperLink, each a small
authenticated unary call.

`PATCHED_SLEEPS` names the waits this was written against; tests/unit/test_fast_poll_
supernode.py fails when the installed Flower's module no longer has them, so a Flower
upgrade is checked here rather than silently left slow.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import time
from types import ModuleType
from typing import Any

DEFAULT_POLL_INTERVAL_S = 0.2
FIRST_OBJECT_RETRY_S = 0.05
# The waits of flwr.supernode.start_client_internal that this shortens (source text).
PATCHED_SLEEPS = ("time.sleep(3)", "time.sleep(0.5)", "pull_objects(")


class CappedSleepTime:
    """The `time` module, with `sleep` never longer than `cap_s`."""

    def __init__(self, cap_s: float) -> None:
        if cap_s <= 0:
            raise ValueError(f"the poll interval must be positive, not {cap_s}")
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_sleeps(module: ModuleType, cap_s: float) -> None:
    """Make `module`'s `time.sleep(...)` calls wait at most `cap_s` seconds."""
    if getattr(module, "time", None) is not time:
        raise RuntimeError(
            f"{module.__name__} no longer imports the time module as `time`: check "
            "client/federated/fast_poll_supernode.py against this Flower version"
        )
    module.time = CappedSleepTime(cap_s)  # type: ignore[attr-defined]


def shorten_object_retries(module: ModuleType, cap_s: float) -> None:
    """Make `module`'s `pull_objects(...)` retry an unavailable object first after
    FIRST_OBJECT_RETRY_S, then at most every `cap_s`."""
    pull_objects: Any = getattr(module, "pull_objects", None)
    parameters = inspect.signature(pull_objects).parameters if callable(pull_objects) else {}
    if not callable(pull_objects) or not {"initial_backoff", "backoff_cap"} <= set(parameters):
        raise RuntimeError(
            f"{module.__name__}.pull_objects no longer takes initial_backoff and "
            "backoff_cap: check client/federated/fast_poll_supernode.py against this "
            "Flower version"
        )
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        pull_objects, initial_backoff=min(FIRST_OBJECT_RETRY_S, cap_s), backoff_cap=cap_s
    )


def split_argv(argv: list[str]) -> tuple[float, list[str]]:
    """Our `--poll-interval-s` off the command line; the rest is Flower's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_INTERVAL_S)
    ours, flowers = parser.parse_known_args(argv)
    return float(ours.poll_interval_s), flowers


def main() -> None:
    poll_interval_s, flower_argv = split_argv(sys.argv[1:])
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    cap_sleeps(start_client_internal, poll_interval_s)
    shorten_object_retries(start_client_internal, poll_interval_s)
    sys.argv = [sys.argv[0], *flower_argv]
    flower_supernode()


if __name__ == "__main__":
    main()
