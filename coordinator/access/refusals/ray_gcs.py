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

`RayRefusalWatch` follows that file from a thread (`refusal_log.LogRefusalWatch`), turns
each such line into a `RayRefusal`, hands it to ``on_refusal`` (the metric) and logs it:
the first of a burst at once, repeats of the same kind from the same peer as one summary
per `refusal_log.SUMMARY_WINDOW_S`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from coordinator.access.refusals.log import (
    POLL_INTERVAL_S,
    LogFollower,
    LogRefusalWatch,
    Refusal,
    RefusalLog,
)

CHANNEL = "ray"
MISSING_TOKEN = "missing_token"
INVALID_TOKEN = "invalid_token"
REASONS = (MISSING_TOKEN, INVALID_TOKEN)

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

    def logged(self) -> str:
        return f"{self.describe()} (GCS log: {self.line})"

    def summary(self, repeats: int, seconds: float) -> str:
        return (
            f"Ray: refused {repeats} more request(s) from {self.peer} in {seconds:.0f} s: "
            f"{_EXPLAIN[self.reason].split(';')[0]}"
        )


def parse_ray_refusal(line: str) -> RayRefusal | None:
    """The refusal a GCS log line records, or None."""
    for pattern, reason in _PATTERNS:
        found = pattern.search(line)
        if found is not None:
            peer = f"node {found.group(1)}" if found.groups() else UNKNOWN_PEER
            return RayRefusal(reason, peer, line.strip())
    return None


def gcs_log_path(temp_dir: Path, name: str = "gcs_server.out") -> Path | None:
    """The GCS log of the newest session under a Ray temp dir, None before one starts."""
    latest = temp_dir / "session_latest"
    try:
        session = latest.resolve(strict=True)
    except OSError:
        return None
    return session / "logs" / name


class RayRefusalWatch(LogRefusalWatch):
    """Follows the GCS log of the Ray head whose temp dir is `temp_dir`.

    Start it before the head: what an earlier session wrote is skipped, the new
    session is read from its first line.
    """

    def __init__(
        self,
        temp_dir: Path,
        on_refusal: Callable[[RayRefusal], None] | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        super().__init__(
            "ray-auth-watch",
            lambda: gcs_log_path(temp_dir),
            parse_ray_refusal,
            cast(Callable[[Refusal], None] | None, on_refusal),
            poll_interval_s,
        )


__all__ = [
    "CHANNEL",
    "REASONS",
    "LogFollower",
    "RayRefusal",
    "RayRefusalWatch",
    "RefusalLog",
    "gcs_log_path",
    "parse_ray_refusal",
]
