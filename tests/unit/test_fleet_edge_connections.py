"""How the Fleet edge holds a site's connection: every Fleet call behind a WAN link pays
for each round trip the connection adds; and how many it holds for one party, so that
no one exhausts its sockets and keeps the sites out (coordinator/federated/edge.py)."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.federated.fast_poll_supernode import KEEP_ALIVE_S
from consortium import pki
from consortium.tls import ServerTls
from coordinator.federated.edge import (
    EDGE_KEEP_ALIVE_S,
    MAX_CONNECTIONS_PER_INSTITUTION,
    MAX_HANDSHAKES_PER_ADDRESS,
    FleetEdge,
)
from coordinator.federated.edge_identity import TOO_MANY_CONNECTIONS, TOO_MANY_HANDSHAKES
from tests.helpers import wait_for

INSTITUTION = "alpha"
OTHER_INSTITUTION = "beta"


def closed_port() -> int:
    """A loopback port nothing listens on: the edge's SuperLink, absent (a 502)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    ca_key, server_key = pki.generate_key(), pki.generate_key()
    ca = pki.create_ca(ca_key, "Test CA")
    (tmp_path / "ca.crt").write_bytes(pki.pem(ca))
    edge_cert = pki.issue_server_certificate(ca_key, ca, server_key, ["127.0.0.1"], 1)
    (tmp_path / "edge.crt").write_bytes(pki.pem(edge_cert))
    pki.write_private_key(tmp_path / "edge.key", server_key)
    for site, institution in (("site", INSTITUTION), ("other", OTHER_INSTITUTION)):
        site_key = pki.generate_key()
        cert = pki.issue_node_certificate(ca_key, ca, site_key.public_key(), institution, [], 1)
        (tmp_path / f"{site}.crt").write_bytes(pki.pem(cert))
        pki.write_private_key(tmp_path / f"{site}.key", site_key)
    return tmp_path


def current_serials(tls_dir: Path) -> dict[str, str]:
    """Each institution's certificate serial, as onboarding records it."""
    return {
        institution: format(pki.load_certificate(tls_dir / f"{site}.crt").serial_number, "x")
        for site, institution in (("site", INSTITUTION), ("other", OTHER_INSTITUTION))
    }


@pytest.fixture
def refusals() -> list[tuple[str, str]]:
    """(reason, institution) of each refusal the edge counts."""
    return []


@pytest.fixture
def edge(tls_dir: Path, refusals: list[tuple[str, str]]) -> Iterator[FleetEdge]:
    tls = ServerTls(tls_dir / "ca.crt", tls_dir / "edge.crt", tls_dir / "edge.key")
    started = FleetEdge(
        "127.0.0.1",
        0,
        f"127.0.0.1:{closed_port()}",
        tls,
        is_revoked=lambda _: False,
        current_serial=current_serials(tls_dir).get,
        on_refusal=lambda reason, institution: refusals.append((reason, institution)),
    )
    try:
        yield started
    finally:
        started.stop()


def site_context(tls_dir: Path, site: str = "site") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    context.load_cert_chain(str(tls_dir / f"{site}.crt"), str(tls_dir / f"{site}.key"))
    return context


def connect(edge: FleetEdge, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A site's TLS connection to the edge, its handshake done on the site's side."""
    raw = socket.create_connection((edge.host, edge.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def fleet_call(connection: ssl.SSLSocket) -> int | None:
    """One Fleet call on an open connection: the status the edge answered, or None if
    it closed the connection instead."""
    request = b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: edge\r\nContent-Length: 0\r\n\r\n"
    try:
        connection.sendall(request)
        response = http.client.HTTPResponse(connection)  # type: ignore[arg-type]
        response.begin()
        response.read()
        return response.status
    except (ConnectionError, http.client.HTTPException, ssl.SSLError):
        return None


def answered(status: int | None) -> bool:
    """Past every check of the edge: 502, no SuperLink behind it."""
    return status == 502


@pytest.fixture
def served(edge: FleetEdge, tls_dir: Path) -> Iterator[Any]:
    """The edge's side (uvicorn's protocol) of a site's keep-alive connection, after one
    Fleet call answered; the site closes it after the test."""
    context = site_context(tls_dir)
    connection = http.client.HTTPSConnection(edge.host, edge.port, context=context, timeout=10)
    try:
        connection.request("POST", "/v1/fleet/pull-messages", body=b"", headers={"a": "b"})
        response = connection.getresponse()
        response.read()
        assert response.status == 502  # past the edge's checks; no SuperLink behind it
        # one uvicorn protocol per open connection (handed over after its handshake)
        [protocol] = edge._server.server_state.connections
        yield protocol
    finally:
        connection.close()


def test_the_edge_sends_every_answer_without_waiting_for_the_sites_acknowledgement(
    served: Any,
) -> None:
    # With Nagle on, a response's body waited a round trip for the ACK of its headers.
    sock = served.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_the_edge_keeps_an_idle_site_connection_longer_than_the_site_does(served: Any) -> None:
    # uvicorn closed an idle connection after 5 s: every reply after an inner loop longer
    # than that opened a new one (a TCP and a TLS handshake). The site lets go first, so
    # it never sends on a connection the edge is closing.
    # uvicorn arms the timer once its side of the response is done, which may be just
    # after the site has read it.
    wait_for(
        "the edge's keep-alive timer", lambda: served.timeout_keep_alive_task is not None, 10.0
    )
    left_s = served.timeout_keep_alive_task.when() - served.loop.time()
    assert KEEP_ALIVE_S < left_s <= EDGE_KEEP_ALIVE_S


def test_an_institution_at_its_cap_of_open_connections_gets_no_more_and_others_still_do(
    edge: FleetEdge, tls_dir: Path, refusals: list[tuple[str, str]]
) -> None:
    """A member opening connection after connection (each kept EDGE_KEEP_ALIVE_S when
    idle) would exhaust the edge's sockets: past its cap, a new one is closed after its
    handshake, logged and counted, while its open ones, and other institutions, work."""
    site = site_context(tls_dir)
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(MAX_CONNECTIONS_PER_INSTITUTION):
            connection = connect(edge, site)
            held.append(connection)
            assert answered(fleet_call(connection))
        with connect(edge, site) as one_more:
            assert fleet_call(one_more) is None
        assert refusals == [(TOO_MANY_CONNECTIONS, INSTITUTION)]
        assert answered(fleet_call(held[0]))  # what it holds still works
        with connect(edge, site_context(tls_dir, "other")) as others:
            assert answered(fleet_call(others))
        # A connection it closes makes room for a new one.
        held.pop().close()
        wait_for(
            "the edge to count the closed connection",
            lambda: edge._gate.open[INSTITUTION] < MAX_CONNECTIONS_PER_INSTITUTION,
            10.0,
        )
        with connect(edge, site) as replacement:
            assert answered(fleet_call(replacement))
        assert refusals == [(TOO_MANY_CONNECTIONS, INSTITUTION)]
    finally:
        for connection in held:
            connection.close()
    wait_for("the edge to count every connection closed", lambda: not edge._gate.open, 10.0)


def test_an_address_at_its_cap_of_unfinished_handshakes_gets_no_more_until_they_end(
    edge: FleetEdge, tls_dir: Path, refusals: list[tuple[str, str]]
) -> None:
    """Anyone who reaches the port can open connections and never finish their TLS
    handshake (each held up to HANDSHAKE_TIMEOUT_S). Past the cap for one address, a new
    connection is closed at once, logged and counted; once those end, sites connect."""
    stalled = [
        socket.create_connection((edge.host, edge.port), timeout=10)
        for _ in range(MAX_HANDSHAKES_PER_ADDRESS)
    ]
    try:
        wait_for(
            "the edge to hold every stalled handshake",
            lambda: edge._gate.handshaking["127.0.0.1"] == MAX_HANDSHAKES_PER_ADDRESS,
            10.0,
        )
        with socket.create_connection((edge.host, edge.port), timeout=10) as one_more:
            try:
                closed = one_more.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert closed
        assert refusals == [(TOO_MANY_HANDSHAKES, "")]
    finally:
        for connection in stalled:
            connection.close()
    wait_for("the stalled handshakes to end", lambda: not edge._gate.handshaking, 10.0)
    with connect(edge, site_context(tls_dir)) as site:
        assert answered(fleet_call(site))
