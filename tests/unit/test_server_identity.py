"""`check_server_identity`: a site learns at once that the coordinator it dials is not
its consortium's, or not under that name (issue 20), instead of retrying handshakes."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from consortium import pki
from consortium.errors import UnauthenticatedError
from consortium.net import reserve_free_port
from consortium.tls import ClientTls, check_server_identity

CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]


def _ca(tmp_path: Path, name: str) -> CA:
    key = pki.generate_key()
    cert = pki.create_ca(key)  # every consortium's CA has the same default name
    path = tmp_path / f"{name}.crt"
    path.write_bytes(pki.pem(cert))
    return key, cert, path


@contextmanager
def tls_server(tmp_path: Path, ca: CA, hosts: list[str]) -> Iterator[int]:
    """A TLS server on 127.0.0.1 with a certificate for `hosts` from `ca`, asking for a
    client certificate from the same CA (as the coordinator does)."""
    ca_key, ca_cert, ca_path = ca
    key = pki.generate_key()
    cert = pki.issue_server_certificate(ca_key, ca_cert, key, hosts, 1)
    pki.write_private_key(tmp_path / "server.key", key, force=True)
    (tmp_path / "server.crt").write_bytes(pki.pem(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    context.load_verify_locations(ca_path)
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # a refused client: what the coordinator logs

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def _site(tmp_path: Path, ca: CA) -> ClientTls:
    ca_key, ca_cert, ca_path = ca
    key = pki.generate_key()
    cert = pki.sign_csr(ca_key, ca_cert, pki.make_csr(key, "alpha"), "alpha", 1)
    pki.write_private_key(tmp_path / "site.key", key)
    (tmp_path / "site.crt").write_bytes(pki.pem(cert))
    return ClientTls(ca_path, tmp_path / "site.crt", tmp_path / "site.key")


def test_the_right_coordinator_passes(tmp_path: Path) -> None:
    ca = _ca(tmp_path, "ours")
    with tls_server(tmp_path, ca, ["127.0.0.1"]) as port:
        check_server_identity(f"127.0.0.1:{port}", _site(tmp_path, ca))


def test_another_consortiums_coordinator_is_named_as_such(tmp_path: Path) -> None:
    ours, theirs = _ca(tmp_path, "ours"), _ca(tmp_path, "theirs")
    with (
        tls_server(tmp_path, theirs, ["127.0.0.1"]) as port,
        pytest.raises(UnauthenticatedError, match="not by this bundle's CA") as raised,
    ):
        check_server_identity(f"127.0.0.1:{port}", _site(tmp_path, ours))
    fingerprint = pki.fingerprint(pki.load_certificate(ours[2]))
    assert fingerprint.replace(":", "").lower() in str(raised.value).replace(":", "").lower()


def test_a_certificate_for_another_name_is_named_as_such(tmp_path: Path) -> None:
    ca = _ca(tmp_path, "ours")
    with (
        tls_server(tmp_path, ca, ["coordinator.example.org"]) as port,
        pytest.raises(UnauthenticatedError, match=re.escape("does not name '127.0.0.1'")),
    ):
        check_server_identity(f"127.0.0.1:{port}", _site(tmp_path, ca))


def test_an_unreachable_coordinator_is_left_to_the_retries(tmp_path: Path) -> None:
    ca = _ca(tmp_path, "ours")
    check_server_identity(f"127.0.0.1:{reserve_free_port()}", _site(tmp_path, ca))
