"""SuperNodes the Flower SuperLink refused, read from the SuperLink's log.

The SuperLink (flwr 1.41, Fleet API over HTTPS) authenticates each SuperNode by the
public key registered at onboarding and signs nothing back to us, so its log,
``<data dir>/logs/superlink.log``, is the only record of a refusal. Two kinds of line
record one (checked against a real SuperLink, see tests/integration/test_onboarding.py):

* a SuperNode activating with a key that was never registered (or was unregistered)::

      ERROR :     [/v1/fleet/activate-node][ApiError:2004] Attempted to register
      SuperNode with public key: b'-----BEGIN PUBLIC KEY-----...', exception: No
      SuperNode found with the given public key.

* any other Fleet call whose signature does not verify against a registered key (a node
  whose key was unregistered at revocation keeps trying), in uvicorn's access log::

      ... INFO [uvicorn.access] 127.0.0.1:36158 - "POST /v1/fleet/pull-messages HTTP/1.1" 401

`FleetRefusalWatch` turns each into a log line and ``consortium_auth_refusals_total
{channel="fleet", reason="unknown_node"}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from coordinator.access.refusals.log import LogRefusalWatch, Refusal

CHANNEL = "fleet"
UNKNOWN_NODE = "unknown_node"
UNKNOWN_PEER = "an unknown peer (the SuperLink does not log its address here)"

_ACTIVATION = re.compile(
    r"\[/v1/fleet/activate-node\]\[ApiError:\d+\] Attempted to register SuperNode with "
    r"public key: .*?, exception: (?P<why>.+)$"
)
_UNAUTHORIZED = re.compile(
    r'(?P<peer>\S+) - "(?:GET|POST|PUT|DELETE) (?P<path>/v1/fleet/\S+) HTTP/[\d.]+" 401\b'
)
_EXPLAIN = (
    "its SuperNode key is not registered with the SuperLink (never onboarded, or "
    "unregistered by `coordinator revoke`); onboard the institution and join with its bundle"
)


@dataclass(frozen=True)
class FleetRefusal:
    peer: str
    detail: str  # what the SuperLink said
    reason: str = UNKNOWN_NODE
    channel: str = CHANNEL

    def describe(self) -> str:
        return f"Flower SuperLink: refused a SuperNode from {self.peer}: {_EXPLAIN}"

    def logged(self) -> str:
        return f"{self.describe()} (SuperLink: {self.detail})"

    def summary(self, repeats: int, seconds: float) -> str:
        return (
            f"Flower SuperLink: refused {repeats} more request(s) from {self.peer} in "
            f"{seconds:.0f} s: its SuperNode key is not registered"
        )


def parse_fleet_refusal(line: str) -> FleetRefusal | None:
    """The refusal a SuperLink log line records, or None."""
    if (found := _ACTIVATION.search(line)) is not None:
        return FleetRefusal(UNKNOWN_PEER, f"activate-node: {found.group('why').strip()}")
    if (found := _UNAUTHORIZED.search(line)) is not None:
        return FleetRefusal(found.group("peer"), f"{found.group('path')}: 401 Unauthorized")
    return None


class FleetRefusalWatch(LogRefusalWatch):
    """Follows the SuperLink's log; start it before the SuperLink."""

    def __init__(
        self, log_path: Path, on_refusal: Callable[[FleetRefusal], None] | None = None
    ) -> None:
        super().__init__(
            "superlink-auth-watch",
            lambda: log_path,
            parse_fleet_refusal,
            cast(Callable[[Refusal], None] | None, on_refusal),
        )
