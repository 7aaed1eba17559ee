"""Shorter retries where Flower pulls a message's objects.

Flower 1.41 pulls the objects of a message it received with `pull_objects`' default
retry: an object not yet there is asked for again after 1 s, doubling to 10 s. A message
is visible as soon as its sender has pushed it, before the sender has pushed all of its
objects (two at a time, each a request that waits for a round trip), so the receiver
usually finds one missing and waits that second. Both receivers pay it once per
message: the SuperNode for the ServerApp's instructions (client/federated/
fast_poll_supernode.py) and the ServerApp for every site's reply (coordinator/launch.py),
a second or more of every federated round (the site's task runner pulls from its
SuperNode with the same first retry: client/federated/task_input.py).
`shorten_object_retries` makes one module's `pull_objects` retry first after
`FIRST_OBJECT_RETRY_S`, then at most every `cap_s`; Flower's function, its pulls and its
limits are otherwise unchanged.
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType
from typing import Any

FIRST_OBJECT_RETRY_S = 0.05


def shorten_object_retries(module: ModuleType, cap_s: float) -> None:
    """Make `module`'s `pull_objects(...)` retry an unavailable object first after
    FIRST_OBJECT_RETRY_S, then at most every `cap_s`. Raises RuntimeError where the
    installed Flower's function no longer takes the two backoff arguments, so an
    upgrade is looked at rather than left slow."""
    pull_objects: Any = getattr(module, "pull_objects", None)
    parameters = inspect.signature(pull_objects).parameters if callable(pull_objects) else {}
    if not callable(pull_objects) or not {"initial_backoff", "backoff_cap"} <= set(parameters):
        raise RuntimeError(
            f"{module.__name__}.pull_objects no longer takes initial_backoff and "
            "backoff_cap: check consortium/flower_waits.py against this Flower version"
        )
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        pull_objects, initial_backoff=min(FIRST_OBJECT_RETRY_S, cap_s), backoff_cap=cap_s
    )
