"""How the Fleet edge holds a site's connection: every Fleet call behind a WAN link pays
for each round trip the connection adds (coordinator/federated/edge.py)."""

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
from coordinator.federated.edge import EDGE_KEEP_ALIVE_S, FleetEdge
from tests.helpers import wait_for

INSTITUTION = "alpha"


def closed_port() -> int:
    """A loopback port nothing listens on: the edge's SuperLink, absent (a 502)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    ca_key, server_key, site_key = pki.generate_key(), pki.generate_key(), pki.generate_key()
    ca = pki.create_ca(ca_key, "Test CA")
    files = {
        "ca.crt": pki.pem(ca),
        "edge.crt": pki.pem(pki.issue_server_certificate(ca_key, ca, server_key, ["127.0.0.1"], 1)),
        "site.crt": pki.pem(
            pki.issue_node_certificate(ca_key, ca, site_key.public_key(), INSTITUTION, [], 1)
        ),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pki.write_private_key(tmp_path / "edge.key", server_key)
    pki.write_private_key(tmp_path / "site.key", site_key)
    return tmp_path


@pytest.fixture
def edge(tls_dir: Path) -> Iterator[FleetEdge]:
    tls = ServerTls(tls_dir / "ca.crt", tls_dir / "edge.crt", tls_dir / "edge.key")
    started = FleetEdge(
        "127.0.0.1",
        0,
        f"127.0.0.1:{closed_port()}",
        tls,
        is_revoked=lambda _: False,
        current_serial=lambda _: None,
    )
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def served(edge: FleetEdge, tls_dir: Path) -> Iterator[Any]:
    """The edge's side (uvicorn's protocol) of a site's keep-alive connection, after one
    Fleet call answered; the site closes it after the test."""
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    context.load_cert_chain(str(tls_dir / "site.crt"), str(tls_dir / "site.key"))
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
