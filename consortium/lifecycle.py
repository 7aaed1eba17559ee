"""Start-up that cannot leak: named start steps on one `contextlib.ExitStack`.

A composition root (`coordinator serve`, `client join`) starts its collaborators in
named steps. Each step registers the stop of what it started on the stack the moment
it has started it, so when a later step raises, closing the stack stops exactly what
is running, newest first, and stopping the whole thing is `stack.close()`.
Independent children go into one `ParallelStops` entry so they stop side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack

from consortium.processes import stop_in_parallel

log = logging.getLogger(__name__)

StartStep = tuple[str, Callable[[], None]]


def start_in_order(
    stack: ExitStack,
    steps: Sequence[StartStep],
    on_start_step: Callable[[str], None] | None = None,
) -> None:
    """Run `steps` in order, calling `on_start_step(name)` before each (a test seam:
    raising there fails start-up at that step). On any failure the stack is closed,
    stopping what the earlier steps started, and the error is raised again."""
    try:
        for name, start in steps:
            if on_start_step is not None:
                on_start_step(name)
            log.debug("start step: %s", name)
            start()
    except BaseException:
        stack.close()
        raise


class ParallelStops:
    """One exit-stack entry for children that stop independently of each other:
    `add` each child's stop as soon as it has started; calling the entry stops all
    of them in parallel (once: a second call finds nothing left)."""

    def __init__(self) -> None:
        self._stops: list[Callable[[], None]] = []

    def add(self, stop: Callable[[], None]) -> None:
        self._stops.append(stop)

    def __call__(self) -> None:
        stops, self._stops = self._stops, []
        stop_in_parallel(stops)
