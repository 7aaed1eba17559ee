"""Mutual TLS for the Ray channel from the consortium CA (`coordinator serve --ray-tls`).

Ray uses one certificate per process as both server and client certificate and checks
it against the IP address it connects to; it replaces 127.0.0.1 with the host's own
address (`ray._private.services.get_node_ip_address`). So every Ray process needs a
certificate with both uses and its host's address: the coordinator issues its own (head
and driver share the host) and signs one for each contributed node over the control
plane (`IssueRayCertificate`, mutual TLS), for the address the node connects from.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from consortium import pki
from consortium.errors import InvalidArgumentError, PermissionDeniedError
from consortium.ray_env import RayTls, ray_node_ip
from coordinator.access.pki_files import CoordinatorPki

log = logging.getLogger(__name__)

# Ray reads its certificate once, when the process starts; a node that runs longer than
# this needs a restart (`client join` asks for a fresh certificate every time).
NODE_CERT_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=30)


def host_addresses() -> set[str]:
    """This host's own addresses (loopback included), to recognise a same-host caller."""
    addresses = {"127.0.0.1", "::1", ray_node_ip()}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addresses.add(str(info[4][0]))
    except OSError:
        pass
    return addresses


def coordinator_ray_tls(files: CoordinatorPki) -> RayTls:
    """The coordinator's own Ray certificate (head and driver), issued or renewed now."""
    directory = files.root / "ray"
    directory.mkdir(mode=0o700, exist_ok=True)
    tls = RayTls(directory / "node.crt", directory / "node.key", files.ca_cert)
    ip = ray_node_ip()
    if _still_good(tls.certificate, ip):
        return tls
    key = pki.generate_key()
    ca_key, ca_cert = pki.load_private_key(files.ca_key), pki.load_certificate(files.ca_cert)
    cert = pki.issue_node_certificate(
        ca_key, ca_cert, key.public_key(), "consortium-coordinator", [ip], NODE_CERT_DAYS
    )
    pki.write_private_key(tls.key, key, force=True)  # a renewal replaces the old one
    tls.certificate.write_bytes(pki.pem(cert))
    log.info("issued the coordinator's Ray TLS certificate for %s", ip)
    return tls


def _still_good(path: Path, ip: str) -> bool:
    if not path.exists():
        return False
    cert = pki.load_certificate(path)
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    covers = ip in {str(a) for a in ips.get_values_for_type(x509.IPAddress)}
    fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE
    return covers and fresh


def peer_ip(peer: str) -> str:
    """The IP address in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit("]", 1)[0].lstrip("[")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    raise PermissionDeniedError(f"a Ray certificate needs a TCP caller, not {peer!r}")


def sign_node_csr(
    files: CoordinatorPki, institution: str, csr_pem: bytes, caller_ip: str
) -> x509.Certificate:
    """Sign a Ray node certificate for `institution`, only for addresses it connects from.

    A node may name the address it connects from, or, when it runs on the coordinator's
    own host (loopback caller), one of this host's addresses: a certificate for another
    machine's address would let it impersonate that machine to other Ray nodes.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as error:
        raise InvalidArgumentError(f"field 'csr_pem': not a PEM CSR ({error})") from None
    if not csr.is_signature_valid:
        raise InvalidArgumentError("field 'csr_pem': the CSR's signature does not verify")
    if pki.institution_of(csr.subject) != institution:
        raise InvalidArgumentError(
            f"field 'csr_pem': the CSR names {pki.institution_of(csr.subject)!r}, "
            f"not {institution!r}"
        )
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidArgumentError("field 'csr_pem': the key must be an EC (P-256) key")
    ips = pki.csr_ip_addresses(csr)
    if not ips:
        raise InvalidArgumentError("field 'csr_pem': name the node's IP address(es)")
    allowed = {caller_ip}
    if ipaddress.ip_address(caller_ip).is_loopback:
        allowed |= host_addresses()
    refused = [ip for ip in ips if ip not in allowed]
    if refused:
        raise PermissionDeniedError(
            f"a Ray certificate for {', '.join(refused)} was requested from {caller_ip}; "
            "a node may only name the address it connects from"
        )
    ca_key, ca_cert = pki.load_private_key(files.ca_key), pki.load_certificate(files.ca_cert)
    return pki.issue_node_certificate(ca_key, ca_cert, public_key, institution, ips, NODE_CERT_DAYS)
