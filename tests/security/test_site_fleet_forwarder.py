"""Another OS user of a site's host against the site's Fleet forwarder on 127.0.0.1: the
forwarder presents the institution's certificate at the edge, so it must not forward
that user's connections (32 of them hold the institution's every place at the edge)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.fleet_forwarder import FleetForwarder, LocalTls
from consortium import pki
from consortium.tls import ClientTls

# A process of another OS user (nobody), connecting to the forwarder the way any local
# program can: TLS without checking the forwarder's throwaway certificate.
ATTACKER = """
import socket, ssl, sys
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as raw:
    with context.wrap_socket(raw) as tls:
        tls.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\\r\\nHost: edge\\r\\n\\r\\n")
        try:
            sys.stdout.write(tls.recv(100).decode())
        except (OSError, ssl.SSLError):
            pass
"""
NOBODY = 65534


@dataclass
class FakeEdge:
    """A TLS listener that requires a consortium certificate, as the edge does, and
    answers each connection with one line naming the certificate it was shown."""

    server: socket.socket
    context: ssl.SSLContext
    callers: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.server.getsockname()[1])

    def serve(self) -> None:
        self.server.settimeout(0.1)  # to see `stop`: a closed socket does not end accept
        while not self.stop.is_set():
            try:
                raw, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(10)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    subject = tls.getpeercert()["subject"]
                    name = dict(item for rdn in subject for item in rdn)["commonName"]
                    self.callers.append(name)
                    # Read the request: a socket closed with unread bytes resets the
                    # connection, and the reply could be lost on its way back.
                    tls.recv(1024)
                    tls.sendall(f"edge saw {name}\n".encode())
            except (OSError, ssl.SSLError):
                continue


@pytest.fixture
def forwarder(tmp_path: Path) -> Iterator[tuple[FleetForwarder, FakeEdge]]:
    ca_key, key, edge_key = pki.generate_key(), pki.generate_key(), pki.generate_key()
    ca = pki.create_ca(ca_key)
    (tmp_path / "ca.crt").write_bytes(pki.pem(ca))
    cert = pki.sign_csr(ca_key, ca, pki.make_csr(key, "site-a"), "site-a", 30)
    (tmp_path / "site.crt").write_bytes(pki.pem(cert))
    pki.write_private_key(tmp_path / "site.key", key)
    edge_cert = pki.issue_server_certificate(ca_key, ca, edge_key, ["127.0.0.1"], 30)
    (tmp_path / "edge.crt").write_bytes(pki.pem(edge_cert))
    pki.write_private_key(tmp_path / "edge.key", edge_key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(tmp_path / "edge.crt"), str(tmp_path / "edge.key"))
    server = socket.create_server(("127.0.0.1", 0))
    edge = FakeEdge(server, context)
    thread = threading.Thread(target=edge.serve, daemon=True)
    thread.start()
    tls = ClientTls(tmp_path / "ca.crt", tmp_path / "site.crt", tmp_path / "site.key")
    local = LocalTls.create(tmp_path / "fleet-forwarder")
    forwarding = FleetForwarder("127.0.0.1", edge.port, tls, local)
    try:
        yield forwarding, edge
    finally:
        forwarding.stop()
        edge.stop.set()
        server.close()
        thread.join(5)


def _as_own_user(forwarder: FleetForwarder) -> str:
    context = ssl.create_default_context(cafile=str(forwarder.local.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", forwarder.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: edge\r\n\r\n")
        return tls.recv(100).decode()


def test_site_forwarder_forwards_no_connection_of_another_local_user(
    forwarder: tuple[FleetForwarder, FakeEdge],
) -> None:
    forwarding, edge = forwarder
    attack = subprocess.run(
        [sys.executable, "-c", ATTACKER, str(forwarding.port)],
        user=NOBODY,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "edge saw" not in attack.stdout, attack.stderr
    assert edge.callers == []  # nothing reached the edge in the institution's name
    # The site's own SuperNode (this process's user) is still forwarded.
    assert _as_own_user(forwarding) == "edge saw site-a\n"
    assert edge.callers == ["site-a"]
