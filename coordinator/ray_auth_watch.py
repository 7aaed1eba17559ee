"""Ray's own record of refused connections, turned into a coordinator log line and a metric.

Ray's GCS checks the cluster token itself (C++; no hook for us), so the coordinator
learns of a refusal only from the GCS log of its own head,
``<temp dir>/session_latest/logs/gcs_server.out``. What Ray 2.60 writes there (checked
against a real head, see tests/integration/test_ray_channel.py):

* a request without a token, one WARNING per refused RPC, with no peer address::

      ... W ... (gcs_server) server_call.h:384: Missing authorization header in request!

  (`ray start` and `ray.init` retry about once a second, so one join attempt is
  several refused requests);
* a request with a *wrong* token: nothing at all, at any log level, so it can be
  neither logged nor counted here (the caller still gets ``InvalidAuthToken``);
* the raylet sync stream (only a node that already got past the token check can open
  it): ``Missing authorization header in syncer connection from node <id>`` and
  ``Invalid bearer token in syncer connection from node <id>``.

`RayAuthWatch` follows that file from a thread, turns each such line into a
`RayRefusal`, hands it to ``on_refusal`` (the metric) and logs it: the first of a burst
at once, repeats of the same kind from the same peer as one summary per
`SUMMARY_WINDOW_S`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHANNEL = "ray"
MISSING_TOKEN = "missing_token"
INVALID_TOKEN = "invalid_token"
REASONS = (MISSING_TOKEN, INVALID_TOKEN)

POLL_INTERVAL_S = 0.5
SUMMARY_WINDOW_S = 30.0
MAX_READ_BYTES = 1 << 20  # per poll; the rest is read on the next one
UNKNOWN_PEER = "an unknown peer (Ray does not log its address)"

_EXPLAIN = {
    MISSING_TOKEN: "no token (the request carried no authorization header); every Ray "
    "process must run with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the bundle's "
    "ray-token>",
    INVALID_TOKEN: "wrong token (invalid bearer token); the node's ray-token is not this "
    "cluster's (rotated, or from another consortium)",
}
_PATTERNS = (
    (re.compile(r"Missing authorization header in request!"), MISSING_TOKEN),
    (
        re.compile(r"Missing authorization header in syncer connection from node (\S+)"),
        MISSING_TOKEN,
    ),
    (
        re.compile(r"Invalid bearer token in syncer connection from node (\S+)"),
        INVALID_TOKEN,
    ),
)


@dataclass(frozen=True)
class RayRefusal:
    reason: str  # one of REASONS
    peer: str  # "node <id>", or UNKNOWN_PEER
    line: str  # Ray's own line, for the log

    def describe(self) -> str:
        return f"Ray: refused a connection from {self.peer}: {_EXPLAIN[self.reason]}"


def parse_refusal(line: str) -> RayRefusal | None:
    """The refusal a GCS log line records, or None."""
    for pattern, reason in _PATTERNS:
        found = pattern.search(line)
        if found is not None:
            peer = f"node {found.group(1)}" if found.groups() else UNKNOWN_PEER
            return RayRefusal(reason, peer, line.strip())
    return None


def gcs_log_path(temp_dir: Path) -> Path | None:
    """The GCS log of the newest session under a Ray temp dir, None before one starts."""
    latest = temp_dir / "session_latest"
    try:
        session = latest.resolve(strict=True)
    except OSError:
        return None
    return session / "logs" / "gcs_server.out"


class LogFollower:
    """Lines appended to the file `locate()` names; starts over when it names another
    file (a new Ray session) or the file was replaced or truncated."""

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
    started: float
    repeats: int = 0


class RefusalLog:
    """Logs the first refusal of each (reason, peer) at once and the repeats within
    `window_s` as one summary line, so a node retrying every second is one or two
    lines in the coordinator log, not one per retry."""

    def __init__(
        self, window_s: float = SUMMARY_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window_s = window_s
        self._clock = clock
        self._bursts: dict[tuple[str, str], _Burst] = {}

    def add(self, refusal: RayRefusal) -> None:
        key = (refusal.reason, refusal.peer)
        self.flush()
        burst = self._bursts.get(key)
        if burst is None:
            self._bursts[key] = _Burst(self._clock())
            log.warning("%s (GCS log: %s)", refusal.describe(), refusal.line)
        else:
            burst.repeats += 1

    def flush(self, everything: bool = False) -> None:
        """Summarise the bursts whose window has closed (all of them with `everything`)."""
        now = self._clock()
        for key, burst in list(self._bursts.items()):
            if not everything and now - burst.started < self._window_s:
                continue
            del self._bursts[key]
            if burst.repeats:
                reason, peer = key
                log.warning(
                    "Ray: refused %d more request(s) from %s in %.0f s: %s",
                    burst.repeats,
                    peer,
                    min(now - burst.started, self._window_s),
                    _EXPLAIN[reason].split(";")[0],
                )


class RayAuthWatch:
    """Follows the GCS log of the Ray head whose temp dir is `temp_dir`.

    Start it before the head: what an earlier session wrote is skipped, the new
    session is read from its first line. Never raises into its caller; `stop()` ends
    the thread and writes the pending summaries.
    """

    def __init__(
        self,
        temp_dir: Path,
        on_refusal: Callable[[RayRefusal], None] | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self._follower = LogFollower(lambda: gcs_log_path(temp_dir))
        self._on_refusal = on_refusal
        self._poll_interval_s = poll_interval_s
        self._log = RefusalLog()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-auth-watch", daemon=True)

    def start(self) -> None:
        self._follower.skip_existing()
        self._thread.start()

    def stop(self) -> None:
        if self._stopping.is_set() or not self._thread.is_alive():
            return
        self._stopping.set()
        self._thread.join()
        self._poll()  # the head has stopped: its last lines are all there
        self._log.flush(everything=True)

    def _run(self) -> None:
        while not self._stopping.wait(self._poll_interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            for line in self._follower.read_lines():
                refusal = parse_refusal(line)
                if refusal is None:
                    continue
                if self._on_refusal is not None:
                    self._on_refusal(refusal)
                self._log.add(refusal)
            self._log.flush()
        except Exception:  # a watcher must never take the coordinator down
            log.exception("reading the Ray GCS log for refusals failed; trying again")


__all__ = [
    "CHANNEL",
    "REASONS",
    "LogFollower",
    "RayAuthWatch",
    "RayRefusal",
    "RefusalLog",
    "gcs_log_path",
    "parse_refusal",
]
