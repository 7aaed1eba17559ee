"""Certificate holders attack the Fleet edge's limits (coordinator/federated/edge.py).

Each test performs the attack against a real edge on 127.0.0.1 (port 0, a test CA, no
SuperLink behind it: a call that passes every check is answered 502) and asserts that it
failed at the edge and was counted with the institution; the edge logs every refusal
it counts. The attackers: a member pushing a body with no end, to run `coordinator
serve` (which holds the signing key) out of memory; someone holding a certificate with
an institution's name that is not its current one (its Ray node certificate, read from
a pool node) or with no institution's name (the coordinator's Ray certificate, whose
key the sandboxed Ray head and drivers hold), opening connections to take the
institution's places; and a holder of an institution's current certificate opening
connections it never uses.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node

from consortium import pki
from consortium.tls import ServerTls
from coordinator.federated.edge import MAX_BODY_BYTES, MAX_CONNECTIONS_PER_INSTITUTION, FleetEdge
from coordinator.federated.edge_identity import (
    BODY_TOO_LARGE,
    REQUEST_TIMEOUT,
    SUPERSEDED,
    UNKNOWN_CERTIFICATE,
)
from tests.helpers import wait_for

INSTITUTION = "alpha"
COORDINATOR = "consortium-coordinator"  # its Ray certificate's name (coordinator/ray/tls.py)
# The sites' certificates: (file name, common name). "ray-node" is alpha's Ray node
# certificate: alpha's name, CA-signed, but not the serial onboarding recorded.
CERTIFICATES = (("site", INSTITUTION), ("ray-node", INSTITUTION), ("coordinator", COORDINATOR))
WAIT_S = 10.0
Refusals = list[tuple[str, str]]


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    ca_key, server_key = pki.generate_key(), pki.generate_key()
    ca = pki.create_ca(ca_key, "Test CA")
    (tmp_path / "ca.crt").write_bytes(pki.pem(ca))
    edge_cert = pki.issue_server_certificate(ca_key, ca, server_key, ["127.0.0.1"], 1)
    (tmp_path / "edge.crt").write_bytes(pki.pem(edge_cert))
    pki.write_private_key(tmp_path / "edge.key", server_key)
    for name, common_name in CERTIFICATES:
        key = pki.generate_key()
        cert = pki.issue_node_certificate(ca_key, ca, key.public_key(), common_name, [], 1)
        (tmp_path / f"{name}.crt").write_bytes(pki.pem(cert))
        pki.write_private_key(tmp_path / f"{name}.key", key)
    return tmp_path


@pytest.fixture
def refusals() -> Refusals:
    """(reason, institution) of each refusal the edge counts."""
    return []


@contextlib.contextmanager
def running_edge(tls_dir: Path, refusals: Refusals, **limits: Any) -> Iterator[FleetEdge]:
    """An edge whose state store knows alpha's "site" certificate, and nothing else."""
    with socket.socket() as probe:  # a port nothing listens on: the absent SuperLink
        probe.bind(("127.0.0.1", 0))
        upstream = f"127.0.0.1:{probe.getsockname()[1]}"
    current = format(pki.load_certificate(tls_dir / "site.crt").serial_number, "x")
    edge = FleetEdge(
        "127.0.0.1",
        0,
        upstream,
        ServerTls(tls_dir / "ca.crt", tls_dir / "edge.crt", tls_dir / "edge.key"),
        is_revoked=lambda _: False,
        current_serial={INSTITUTION: current}.get,
        on_refusal=lambda reason, institution: refusals.append((reason, institution)),
        **limits,
    )
    try:
        yield edge
    finally:
        edge.stop()


@pytest.fixture
def edge(tls_dir: Path, refusals: Refusals) -> Iterator[FleetEdge]:
    with running_edge(tls_dir, refusals) as started:
        yield started


def connect(edge: FleetEdge, tls_dir: Path, certificate: str = "site") -> ssl.SSLSocket:
    """A TLS connection to the edge with one of the test certificates."""
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    context.load_cert_chain(
        str(tls_dir / f"{certificate}.crt"), str(tls_dir / f"{certificate}.key")
    )
    raw = socket.create_connection((edge.host, edge.port), timeout=WAIT_S)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def answer(connection: ssl.SSLSocket) -> tuple[int, bytes, str | None]:
    """The edge's response on a connection: status, body, its Connection header."""
    response = http.client.HTTPResponse(connection)  # type: ignore[arg-type]
    response.begin()
    return response.status, response.read(), response.getheader("connection")


def fleet_call(connection: ssl.SSLSocket) -> int | None:
    """One empty Fleet call: the status, or None if the edge closed the connection."""
    request = b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: edge\r\nContent-Length: 0\r\n\r\n"
    try:
        connection.sendall(request)
        return answer(connection)[0]
    except (ConnectionError, http.client.HTTPException, ssl.SSLError):
        return None


def closed_by_edge(connection: ssl.SSLSocket) -> bool:
    """Whether the edge closes the connection (within the socket's timeout)."""
    try:
        return connection.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


PUSH_HEAD = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: edge\r\n"


def test_a_push_declaring_a_body_over_the_limit_is_refused_before_it_is_read(
    edge: FleetEdge, tls_dir: Path, refusals: Refusals
) -> None:
    with connect(edge, tls_dir) as connection:
        connection.sendall(PUSH_HEAD + b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
        status, _, closing = answer(connection)  # before a byte of the body was sent
        assert (status, closing) == (413, "close")
        assert closed_by_edge(connection)
    assert refusals == [(BODY_TOO_LARGE, INSTITUTION)]


def test_a_chunked_push_that_never_ends_is_cut_off_at_the_limit(
    edge: FleetEdge, tls_dir: Path, refusals: Refusals
) -> None:
    """The edge buffered such a body whole (1 GiB in 5 s) until memory ran out; now it
    answers once the body passes MAX_BODY_BYTES, and closes the connection."""
    with connect(edge, tls_dir) as connection:
        connection.sendall(PUSH_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        data, sent = bytes(64 * 1024), 0
        while sent <= MAX_BODY_BYTES:
            size = min(len(data), MAX_BODY_BYTES + 1 - sent)
            # Each chunk's CRLF comes with the next: the last one's never does, nor a
            # last-chunk, so the body goes on.
            connection.sendall(b"\r\n" * (sent > 0) + b"%x\r\n" % size + data[:size])
            sent += size
        status, body, closing = answer(connection)
        assert (status, closing) == (413, "close")
        assert b"may not exceed" in body
        assert closed_by_edge(connection)
    assert refusals == [(BODY_TOO_LARGE, INSTITUTION)]


def test_the_largest_object_flower_pushes_passes_the_edge(
    edge: FleetEdge, tls_dir: Path, refusals: Refusals
) -> None:
    """MAX_BODY_BYTES leaves room for Flower's largest push: one full ArrayChunk."""
    chunk = ArrayChunk(memoryview(os.urandom(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)))
    request = PushObjectRequest(
        node=Node(node_id=2**63 - 1),
        run_id=2**64 - 1,
        object_id=chunk.object_id,
        object_content=chunk.deflate(),
        session_id="s" * 128,
    ).SerializeToString()
    with connect(edge, tls_dir) as connection:
        connection.sendall(
            PUSH_HEAD
            + b"Content-Type: application/protobuf\r\nContent-Length: %d\r\n\r\n%s"
            % (len(request), request)
        )
        assert answer(connection)[0] == 502  # past every check; no SuperLink behind it
    assert refusals == []


def test_an_institutions_ray_node_certificate_cannot_take_its_places_at_the_edge(
    edge: FleetEdge, tls_dir: Path, refusals: Refusals
) -> None:
    """With alpha's Ray node certificate (its name, signed by the CA, read from a pool
    node), an attacker opened MAX_CONNECTIONS_PER_INSTITUTION idle connections and kept
    alpha's site out (too_many_connections) for good. Now each is refused by serial
    after its handshake, before it counts, and alpha's site still connects."""
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(MAX_CONNECTIONS_PER_INSTITUTION + 1):
            held.append(connect(edge, tls_dir, "ray-node"))
        wait_for(
            "every connection refused after its handshake",
            lambda: len(refusals) == len(held),
            WAIT_S,
        )
        assert set(refusals) == {(SUPERSEDED, INSTITUTION)}
        assert edge._gate.open[INSTITUTION] == 0
        with connect(edge, tls_dir) as site:
            assert fleet_call(site) == 502
        # A request on one of them is answered why (not counted twice) and closed.
        held[0].sendall(PUSH_HEAD + b"Content-Length: 0\r\n\r\n")
        status, body, closing = answer(held[0])
        assert (status, closing) == (403, "close")
        assert b"use the renewed bundle" in body
        assert len(refusals) == len(held)
    finally:
        for connection in held:
            connection.close()
    wait_for("the refused connections to end", lambda: not edge._gate.handshaking, WAIT_S)


def test_a_certificate_with_no_serial_on_record_is_refused(
    edge: FleetEdge, tls_dir: Path, refusals: Refusals
) -> None:
    """The coordinator's Ray certificate is CA-signed but no institution's: it passed the
    edge as if it were one (its key is in the sandboxed Ray head's and drivers' hands)."""
    with connect(edge, tls_dir, "coordinator") as connection:
        assert fleet_call(connection) == 403
    assert refusals == [(UNKNOWN_CERTIFICATE, COORDINATOR)]
    assert edge._gate.open[COORDINATOR] == 0


@pytest.mark.parametrize(
    ("first_call", "sent"),
    [
        (False, b""),  # opened, and held idle
        (False, b"POST /v1/fleet/pull-messages HTTP/1.1\r\n"),  # a head that never ends
        (True, b"P"),  # after a call: one byte stops uvicorn's keep-alive timer
    ],
    ids=["idle", "partial-head", "partial-head-after-a-call"],
)
def test_a_connection_that_sends_no_request_head_in_time_is_closed_and_frees_its_place(
    tls_dir: Path, refusals: Refusals, first_call: bool, sent: bytes
) -> None:
    """An open connection that never sent a request was never closed (uvicorn's idle
    timer starts after a first response): held, they kept an institution at its cap."""
    limits = {"max_connections_per_institution": 1, "request_head_timeout_s": 1.0}
    with running_edge(tls_dir, refusals, **limits) as edge:
        with connect(edge, tls_dir) as connection:
            if first_call:
                assert fleet_call(connection) == 502
            connection.sendall(sent)
            assert closed_by_edge(connection)
        assert refusals == [(REQUEST_TIMEOUT, INSTITUTION)]
        wait_for("the closed connection uncounted", lambda: not edge._gate.open, WAIT_S)
        with connect(edge, tls_dir) as site:
            assert fleet_call(site) == 502
