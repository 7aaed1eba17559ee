"""The consortium's X.509 PKI: a root CA, the coordinator's server certificate,
institution client certificates issued from CSRs (keys stay at the sites), and the
certificate of the coordinator's Ed25519 provenance signing key.

ECDSA P-256 everywhere (TLS and Flower SuperNode authentication both accept it), except
the certified provenance key, which is Ed25519 (the CA still signs with ECDSA SHA-256).
Private keys are written with mode 0600 and never overwritten silently.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consortium.errors import InvalidArgumentError

ORGANIZATION = "Consortium"
CA_VALIDITY_DAYS = 3650
SIGNING_KEY_COMMON_NAME = "Consortium provenance signing key"
# The certificate's file name in a site's startup bundle.
SIGNING_KEY_CERTIFICATE_FILE = "coordinator-signing.crt"


class CertificateError(InvalidArgumentError, ValueError):
    """A certificate is not what it is used as: not issued by the expected CA, not
    valid now, or of the wrong key type or key usage."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey, *, openssh: bool = False, force: bool = False
) -> None:
    """PEM (PKCS#8) or OpenSSH encoding, mode 0600; refuses to overwrite unless forced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = serialization.Encoding.PEM
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(encoding, fmt, serialization.NoEncryption())
    if force:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        key = serialization.load_ssh_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgumentError(f"{path} does not hold an EC private key")
    return key


def openssh_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(
    key: ec.EllipticCurvePrivateKey,
    common_name: str = "Consortium Root CA",
    days: int = CA_VALIDITY_DAYS,
) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier | list[x509.ObjectIdentifier],
    days: int,
    sans: list[x509.GeneralName] | None = None,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    start = not_before or _now() - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(usage if isinstance(usage, list) else [usage]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    days: int,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return _leaf(
        ca_key,
        ca_cert,
        _name("consortium-coordinator"),
        key.public_key(),
        ExtendedKeyUsageOID.SERVER_AUTH,
        days,
        sans,
    )


def issue_signing_key_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: Ed25519PublicKey,
    days: int,
) -> x509.Certificate:
    """The CA's X.509 certificate for the coordinator's Ed25519 provenance signing key,
    so anyone holding the CA certificate can check the key with standard tools
    (`openssl verify -CAfile ca.crt coordinator-signing.crt`).

    Key usage digital signature only, not a CA, and no extended key usage: no EKU
    (code signing, e-mail protection) says "signs a transparency log", and one would
    only let a verifier accept the key for something else. It ends no later than the CA.
    """
    start = _now() - dt.timedelta(minutes=5)
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(SIGNING_KEY_COMMON_NAME))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def check_signing_key_certificate(
    cert: x509.Certificate, ca: x509.Certificate, at: dt.datetime | None = None
) -> Ed25519PublicKey:
    """The Ed25519 key `cert` certifies for signing, once `ca` signed it directly, it is
    valid `at` (default: now) and allows digital signatures; CertificateError otherwise.

    Which key it must certify is the caller's check: compare the returned key's raw
    bytes with the key expected.
    """
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        detail = str(err) or "the signature does not verify"
        raise CertificateError(
            f"the certificate {institution_of(cert.subject)!r} was not issued by the CA "
            f"{institution_of(ca.subject)!r} (sha256 {fingerprint(ca)}): {detail}"
        ) from None
    when = at or _now()
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise CertificateError(
            f"the certificate {institution_of(cert.subject)!r} is valid from "
            f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}, "
            f"not at {when.isoformat()}"
        )
    public_key = cert.public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise CertificateError(
            f"the certificate {institution_of(cert.subject)!r} certifies {_key_kind(public_key)}, "
            "not an Ed25519 signing key"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.digital_signature:
        raise CertificateError(
            f"the certificate {institution_of(cert.subject)!r} does not allow digital "
            "signatures (key usage digitalSignature)"
        )
    return public_key


def _key_kind(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"an EC ({public_key.curve.name}) key"
    return f"a {type(public_key).__name__} key"


def make_csr(key: ec.EllipticCurvePrivateKey, institution: str) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(institution))
        .sign(key, hashes.SHA256())
    )


def sign_csr(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    institution: str,
    days: int,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    """An institution's client certificate; the CSR must be self-consistent and name it."""
    if not csr.is_signature_valid:
        raise InvalidArgumentError("the CSR's signature does not verify")
    if institution_of(csr.subject) != institution:
        raise InvalidArgumentError(
            f"the CSR names {institution_of(csr.subject)!r}, not {institution!r}"
        )
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidArgumentError("the CSR's key must be an EC (P-256) key")
    return _leaf(
        ca_key,
        ca_cert,
        _name(institution),
        public_key,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        days,
        not_before=not_before,
    )


def csr_ip_addresses(csr: x509.CertificateSigningRequest) -> list[str]:
    """The IP addresses a CSR asks for (its subjectAltName extension), as strings."""
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]


def make_node_csr(
    key: ec.EllipticCurvePrivateKey, institution: str, ips: list[str]
) -> x509.CertificateSigningRequest:
    """A CSR for one Ray node of `institution` reachable at `ips`."""
    sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(institution))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_node_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    name: str,
    ips: list[str],
    days: int,
) -> x509.Certificate:
    """A Ray node's certificate: server and client use, for `ips`, 127.0.0.1 and localhost.

    Ray uses one certificate for both ends of every connection and checks it against
    the IP address it connects to (Ray replaces 127.0.0.1 with the host's address).
    """
    addresses = list(dict.fromkeys([*ips, "127.0.0.1"]))
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in addresses]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return _leaf(ca_key, ca_cert, _name(name), public_key, usages, days, sans)


def institution_of(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, colon separated, as people compare them out of band."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def pem(cert: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise InvalidArgumentError(f"{path} is not a PEM certificate: {err}") from None


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(path.read_bytes())
    except ValueError as err:
        raise InvalidArgumentError(f"{path} is not a PEM certificate request: {err}") from None


def endorse(ca_key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """The CA's signature over a tagged payload that is not a certificate (the
    coordinator's Ed25519 key, for one: `consortium.run_approval.ca_endorsement_payload`),
    so sites that pinned the CA can trust it too."""
    return ca_key.sign(payload, ec.ECDSA(hashes.SHA256()))


def endorsed_by(ca_cert: x509.Certificate, payload: bytes, signature: bytes) -> bool:
    public = ca_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
