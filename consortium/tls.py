"""gRPC TLS credentials from the consortium PKI files, and a check of the server's
identity that names what is wrong."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from consortium.errors import UnauthenticatedError
from consortium.net import split_host_port


@dataclass(frozen=True)
class ClientTls:
    """What a node or the operator CLI presents to the coordinator."""

    ca_cert: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


@dataclass(frozen=True)
class ServerTls:
    ca_cert: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ServerCredentials:
        # Mutual TLS: every caller must present a certificate from our CA.
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca_cert.read_bytes(),
            require_client_auth=True,
        )


PROBE_TIMEOUT_S = 5.0


def check_server_identity(address: str, tls: ClientTls) -> None:
    """Before the first call: does the server at `address` prove it belongs to the CA in
    `tls`, under the name we dial? gRPC would only fail its handshake with an
    UNAVAILABLE that reads like a network problem (and retry); this says which it is.

    Raises UnauthenticatedError naming what the server presented. Returns quietly when
    the server cannot be reached (the caller's retries report that).
    """
    host, port = split_host_port(address)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_cert))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return
    except ssl.SSLCertVerificationError as error:
        presented = _presented_certificate(host, port, tls)
        raise UnauthenticatedError(_identity_problem(address, tls, error, presented)) from None
    except (OSError, ssl.SSLError):
        return  # unreachable, or refused us: the call that follows reports it


def _presented_certificate(host: str, port: int, tls: ClientTls) -> x509.Certificate | None:
    """The server's certificate, read without checking it (to say what it is). Our own
    certificate goes with it, so the server's operator sees why it refuses us (a
    certificate of another CA) rather than a handshake cut short."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=host) as wrapped,
        ):
            der = wrapped.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Signed by `ca`'s key (CAs of different consortia may share a name)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _identity_problem(
    address: str, tls: ClientTls, error: ssl.SSLCertVerificationError, cert: x509.Certificate | None
) -> str:
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    ours = ca.fingerprint(hashes.SHA256()).hex()
    if cert is not None and not _issued_by(cert, ca):
        return (
            f"the coordinator at {address} presents a certificate issued by "
            f"'{cert.issuer.rfc4514_string()}', not by this bundle's CA (SHA-256 {ours}): "
            "the bundle is for another consortium, or the address points at another "
            "server. Check the address, and compare the bundle's ca.sha256 with the "
            "fingerprint your operator gave you"
        )
    if "hostname" in str(error.verify_message).lower() or "mismatch" in str(error).lower():
        return (
            f"the coordinator's certificate does not name {split_host_port(address)[0]!r}, "
            f"the host this bundle dials ({error.verify_message}): ask the operator which "
            "name to use, or to issue a certificate for it (`coordinator server-certificate`)"
        )
    return (
        f"the coordinator at {address} presents a certificate this bundle's CA "
        f"(SHA-256 {ours}) does not accept: {error.verify_message}"
    )
