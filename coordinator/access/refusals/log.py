"""Refusals that only a component's own log records, turned into coordinator log lines.

Ray's GCS, the Flower SuperLink and gRPC's TLS layer each refuse unauthenticated
callers without telling Python. What they write is the only record, so the coordinator
follows those logs (`LogFollower`, `LogRefusalWatch`) and logs each refusal once per
burst (`RefusalLog`): a client retrying every second is one or two lines, not one per
retry. Counting is the caller's ``on_refusal`` (the metric).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
SUMMARY_WINDOW_S = 30.0
MAX_READ_BYTES = 1 << 20  # per poll; the rest is read on the next one


class Refusal(Protocol):
    @property
    def reason(self) -> str: ...

    @property
    def peer(self) -> str: ...

    def logged(self) -> str:
        """The line to log for the first refusal of a burst."""
        ...

    def summary(self, repeats: int, seconds: float) -> str:
        """The line to log for ``repeats`` more of the same within ``seconds``."""
        ...


class LogFollower:
    """Lines appended to the file `locate()` names; starts over when it names another
    file (a new session) or the file was replaced or truncated."""

    def __init__(self, locate: Callable[[], Path | None]) -> None:
        self._locate = locate
        self._path: Path | None = None
        self._inode = -1
        self._offset = 0
        self._partial = b""

    def skip_existing(self) -> None:
        """Ignore what the current file holds now (an earlier session's lines)."""
        self._path = self._locate()
        if self._path is None:
            return
        try:
            info = self._path.stat()
        except OSError:
            self._path = None
            return
        self._inode, self._offset = info.st_ino, info.st_size

    def read_lines(self) -> list[str]:
        path = self._locate()
        if path is None:
            return []
        try:
            info = path.stat()
        except OSError:
            return []  # the session exists, its log not yet
        if path != self._path or info.st_ino != self._inode or info.st_size < self._offset:
            self._path, self._inode, self._offset, self._partial = path, info.st_ino, 0, b""
        if info.st_size == self._offset:
            return []
        try:
            with path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read(MAX_READ_BYTES)
        except OSError:
            return []
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in complete]


@dataclass
class _Burst:
    first: Refusal
    started: float
    repeats: int = 0


class RefusalLog:
    """Logs the first refusal of each (reason, peer) at once and the repeats within
    `window_s` as one summary line."""

    def __init__(
        self, window_s: float = SUMMARY_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window_s = window_s
        self._clock = clock
        self._bursts: dict[tuple[str, str], _Burst] = {}
        self._lock = threading.Lock()

    def add(self, refusal: Refusal) -> None:
        key = (refusal.reason, refusal.peer)
        self.flush()
        with self._lock:
            burst = self._bursts.get(key)
            if burst is not None:
                burst.repeats += 1
                return
            self._bursts[key] = _Burst(refusal, self._clock())
        log.warning("%s", refusal.logged())

    def flush(self, everything: bool = False) -> None:
        """Summarise the bursts whose window has closed (all of them with `everything`)."""
        now = self._clock()
        with self._lock:
            closed = [
                (key, burst)
                for key, burst in self._bursts.items()
                if everything or now - burst.started >= self._window_s
            ]
            for key, _ in closed:
                del self._bursts[key]
        for _, burst in closed:
            if burst.repeats:
                seconds = min(now - burst.started, self._window_s)
                log.warning("%s", burst.first.summary(burst.repeats, seconds))


class LogRefusalWatch:
    """Follows one component's log from a thread and reports the refusals it records.

    Start it before the component: what an earlier run wrote is skipped. Never raises
    into its caller; `stop()` ends the thread, reads the last lines and writes the
    pending summaries.
    """

    def __init__(
        self,
        name: str,
        locate: Callable[[], Path | None],
        parse: Callable[[str], Refusal | None],
        on_refusal: Callable[[Refusal], None] | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self._name = name
        self._follower = LogFollower(locate)
        self._parse = parse
        self._on_refusal = on_refusal
        self._poll_interval_s = poll_interval_s
        self._log = RefusalLog()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._follower.skip_existing()
        self._thread.start()

    def stop(self) -> None:
        if self._stopping.is_set() or not self._thread.is_alive():
            return
        self._stopping.set()
        self._thread.join()
        self._poll()  # the component has stopped: its last lines are all there
        self._log.flush(everything=True)

    def _run(self) -> None:
        while not self._stopping.wait(self._poll_interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            for line in self._follower.read_lines():
                refusal = self._parse(line)
                if refusal is None:
                    continue
                if self._on_refusal is not None:
                    self._on_refusal(refusal)
                self._log.add(refusal)
            self._log.flush()
        except Exception:  # a watcher must never take the coordinator down
            log.exception("%s: reading the log for refusals failed; trying again", self._name)
