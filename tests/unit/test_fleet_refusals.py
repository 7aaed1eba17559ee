"""SuperNodes the SuperLink refused, read from its log."""

from __future__ import annotations

import pytest

from coordinator.access.refusals.fleet import UNKNOWN_PEER, parse_fleet_refusal

# As flwr 1.41's SuperLink wrote them (key shortened): an unregistered key activating,
# and uvicorn's access line for a Fleet call whose signature no registered key verifies.
ACTIVATION = (
    "\x1b[91mERROR \x1b[0m:     [/v1/fleet/activate-node][ApiError:2004] Attempted to "
    "register SuperNode with public key: b'-----BEGIN PUBLIC KEY-----\\nMFkwEwYH\\n-----END "
    "PUBLIC KEY-----\\n', exception: No SuperNode found with the given public key."
)
UNAUTHORIZED = (
    '2026-11-23T14:09:49.510Z INFO [uvicorn.access] 127.0.0.1:36158 - "POST '
    '/v1/fleet/pull-messages HTTP/1.1" 401'
)


def test_unregistered_key_activation_is_a_refusal() -> None:
    refusal = parse_fleet_refusal(ACTIVATION)
    assert refusal is not None
    assert (refusal.channel, refusal.reason, refusal.peer) == (
        "fleet",
        "unknown_node",
        UNKNOWN_PEER,
    )
    assert "No SuperNode found with the given public key" in refusal.logged()


def test_unauthorized_fleet_call_names_the_peer() -> None:
    refusal = parse_fleet_refusal(UNAUTHORIZED)
    assert refusal is not None
    assert (refusal.reason, refusal.peer) == ("unknown_node", "127.0.0.1:36158")
    assert "/v1/fleet/pull-messages" in refusal.logged()


@pytest.mark.parametrize(
    "line",
    [
        '2026-11-23T14:09:44.532Z INFO [uvicorn.access] 127.0.0.1:36140 - "POST '
        '/v1/control/register-node HTTP/1.1" 200',
        '2026-11-23T14:09:49.510Z INFO [uvicorn.access] 127.0.0.1:36158 - "POST '
        '/v1/fleet/activate-node HTTP/1.1" 412',  # the activation above, counted once
        '... 127.0.0.1:1 - "POST /v1/control/start-run HTTP/1.1" 401',  # not the Fleet API
        "",
    ],
)
def test_other_lines_are_not_refusals(line: str) -> None:
    assert parse_fleet_refusal(line) is None
