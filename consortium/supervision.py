"""Keeping a role's runtimes alive: restart a dead child with bounded exponential backoff.

`coordinator serve` supervises its Flower SuperLink and its Ray head; `client join` its
SuperNode and its Ray worker node. Each is a `Supervised` child: whether it still runs,
how to start it again (same port, same state), and its last log lines. The owner calls
`Supervisor.check()` once a second; each child moves through::

    RUNNING ──exits──> RESTARTING ──backoff elapsed: restart()──> RUNNING
                          │  ^                       │
                          │  └───restart() raised────┘
                          ├── max_restarts within window_s ──> FAILED (stays; reported)
                          └── max_refusals deaths in a row that were refusals ──> FAILED

The first restart waits `initial_backoff_s`, each further one within `window_s` twice as
long, up to `max_backoff_s`; restarts older than the window are forgotten, so a child
that ran for a while starts again at the shortest wait (a policy without
`max_restarts` never gives up). A FAILED child is left alone:
the owner keeps serving what does not need it and reports it (health, `coordinator
status`). A child may call its death a refusal (a SuperNode whose activation the
SuperLink refused): restarting cannot help, so a few in a row make it FAILED at once.
Each death is logged with the child's last log lines, and `on_restart(name)` is called
for every restart (the metric `consortium_child_restarts_total`).

Kept free of heavy imports: both roles use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

log = logging.getLogger(__name__)

INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
MAX_RESTARTS = 5
MAX_REFUSALS = 3
WINDOW_S = 300.0


class Supervised(Protocol):
    """A child process the owner can start again."""

    @property
    def name(self) -> str: ...

    def exit_code(self) -> int | None:
        """None while it runs."""

    def restart(self) -> None:
        """Stop whatever is left of it and start it again; return once it is ready
        (raise if it is not)."""

    def log_tail(self) -> str:
        """Its last log lines, for the message that says it died."""

    def refusal(self) -> str | None:
        """Why its last exit was a refusal that restarting will not change (a peer
        refused it), or None: worth restarting."""


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = INITIAL_BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S
    # Within window_s, before the child is FAILED; None: never give up (a site's
    # children, whose deaths usually follow the coordinator's, must come back with it).
    max_restarts: int | None = MAX_RESTARTS
    window_s: float = WINDOW_S
    # Deaths in a row that the child calls a refusal (`Supervised.refusal`), before it
    # is FAILED whatever `max_restarts` says: the first may be a peer catching up.
    max_refusals: int = MAX_REFUSALS

    def backoff_s(self, recent_restarts: int) -> float:
        return float(min(self.initial_backoff_s * 2**recent_restarts, self.max_backoff_s))


class ChildState(StrEnum):
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"


@dataclass(frozen=True)
class ChildStatus:
    name: str
    state: ChildState
    restarts: int  # since the owner started
    last_exit_code: int | None
    detail: str  # why it is restarting or failed; "" while it runs


class _Watch:
    def __init__(self, child: Supervised) -> None:
        self.child = child
        self.state = ChildState.RUNNING
        self.restarts = 0
        self.recent: deque[float] = deque()  # when each restart within the window ran
        self.retry_at = 0.0
        self.last_exit_code: int | None = None
        self.detail = ""
        self.refusals = 0  # deaths in a row the child called a refusal


class Supervisor:
    def __init__(
        self,
        children: Sequence[Supervised],
        policy: RestartPolicy | None = None,
        on_restart: Callable[[str], None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._watches = {child.name: _Watch(child) for child in children}
        self._policy = policy or RestartPolicy()
        self._on_restart = on_restart
        self._clock = clock
        self._lock = threading.Lock()  # check() runs on one thread, status() on others

    def check(self) -> None:
        """One look at every child: notice deaths, restart those whose wait is over."""
        for watch in self._watches.values():
            self._check(watch)

    def status(self) -> list[ChildStatus]:
        with self._lock:
            return [
                ChildStatus(w.child.name, w.state, w.restarts, w.last_exit_code, w.detail)
                for w in self._watches.values()
            ]

    def failed(self) -> list[str]:
        return [s.name for s in self.status() if s.state is ChildState.FAILED]

    def down_reason(self, name: str) -> str | None:
        """Why the child `name` is not running ("the superlink is restarting: ..."), or
        None while it runs: what a job that needs it waits for."""
        for status in self.status():
            if status.name == name and status.state is not ChildState.RUNNING:
                return f"waiting: the {name} is {status.state.value}: {status.detail}"
        return None

    def _check(self, watch: _Watch) -> None:
        if watch.state is ChildState.FAILED:
            return
        now = self._clock()
        policy = self._policy
        while watch.recent and now - watch.recent[0] > policy.window_s:
            watch.recent.popleft()
        if watch.state is ChildState.RUNNING:
            code = watch.child.exit_code()
            if code is None:
                return
            self._died(watch, code, now)
            return
        if now < watch.retry_at:
            return
        watch.recent.append(now)
        with self._lock:
            watch.restarts += 1
        self._on_restart(watch.child.name)
        log.warning(
            "restarting the %s (restart %d, %d within %.0f s)",
            watch.child.name,
            watch.restarts,
            len(watch.recent),
            policy.window_s,
        )
        try:
            watch.child.restart()
        except Exception as error:
            self._died(watch, watch.child.exit_code(), self._clock(), f"failed to restart: {error}")
            return
        with self._lock:
            watch.state, watch.detail = ChildState.RUNNING, ""
        log.info("the %s runs again", watch.child.name)

    def _died(self, watch: _Watch, code: int | None, now: float, error: str = "") -> None:
        policy = self._policy
        recent = len(watch.recent)
        why = error or f"exited with code {code}"
        refusal = watch.child.refusal()
        with self._lock:
            watch.last_exit_code = code
            watch.refusals = watch.refusals + 1 if refusal is not None else 0
            if refusal is not None and watch.refusals >= policy.max_refusals:
                watch.state = ChildState.FAILED
                watch.detail = f"{why}: {refusal} ({watch.refusals} times in a row)"
            elif policy.max_restarts is not None and recent >= policy.max_restarts:
                watch.state = ChildState.FAILED
                watch.detail = (
                    f"{why}; gave up after {recent} restarts within {policy.window_s:.0f} s"
                )
            else:
                wait_s = policy.backoff_s(recent)
                watch.state = ChildState.RESTARTING
                watch.retry_at = now + wait_s
                watch.detail = f"{why}; restarting in {wait_s:.0f} s"
        tail = "" if error else f"; its last log lines:\n{watch.child.log_tail()}"
        if watch.state is ChildState.FAILED:
            log.error("the %s %s: serving without it%s", watch.child.name, watch.detail, tail)
        else:
            log.warning("the %s %s%s", watch.child.name, watch.detail, tail)


class _Process(Protocol):
    def poll(self) -> int | None: ...

    def log_tail(self) -> str: ...


@dataclass(frozen=True)
class ProcessChild:
    """A `Supervised` child over whichever process `current()` returns now (a restart
    replaces it), started again by its owner's `restart_with`."""

    name: str
    current: Callable[[], _Process]
    restart_with: Callable[[], None]
    refused: Callable[[], str | None] = lambda: None

    def exit_code(self) -> int | None:
        return self.current().poll()

    def restart(self) -> None:
        self.restart_with()

    def log_tail(self) -> str:
        return self.current().log_tail()

    def refusal(self) -> str | None:
        return self.refused()
