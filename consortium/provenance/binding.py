"""An institution's own binding of its update-signing key to its name.

Why: an institution's Ed25519 update-signing key used to be pinned by the operator
alone (`coordinator onboard`), so the provenance log's claim "this key is
institution X's" rested on the coordinator's word. A coordinator that swapped in a key
of its own could then sign "updates" of X that verify. With a binding, X itself
vouches for the key: at `client keygen` the site signs the statement below with the
private key of its TLS certificate request (ECDSA P-256, SHA-256; the key never leaves
the site), and at onboarding the coordinator logs that signature together with the
certificate the CA issued for that key (`KeyBinding` in an `InstitutionKey` record).
Anyone holding the CA certificate can then check, from the log alone, that the
certificate names X, that the CA issued it, and that its key signed exactly this
(institution, key id, public key). The operator holds the CA key too, so it could
still issue a second certificate for X and forge a binding with it; but that
certificate is then in the log for good, and X, which knows its own, can see it is
not X's.

The statement is canonical JSON (`canonical.py`)::

    {"institution": ..., "key_id": ..., "public_key": ..., "version": BINDING_VERSION}

where ``public_key`` is the base64 of the raw 32-byte Ed25519 public key and ``key_id``
its hex sha256 (`signing.py`). The version tag keeps a binding from ever verifying as
a signature over any other payload the same key signs.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from consortium.pki import fingerprint, institution_of
from consortium.provenance.canonical import canonical_json
from consortium.provenance.records import KeyBinding
from consortium.provenance.signing import SignatureError, VerifyingKey, b64, unb64

BINDING_VERSION = "consortium-key-binding-v1"


class BindingError(ValueError):
    """A key binding does not hold; the message says which check failed."""


def binding_statement(institution: str, key_id: str, public_key_b64: str) -> bytes:
    """The bytes an institution signs to bind its update-signing key to its name."""
    return canonical_json(
        {
            "version": BINDING_VERSION,
            "institution": institution,
            "key_id": key_id,
            "public_key": public_key_b64,
        }
    )


def sign_binding(
    tls_key: ec.EllipticCurvePrivateKey, institution: str, signing_key: VerifyingKey
) -> bytes:
    """The DER ECDSA-SHA256 signature of the institution's TLS key over the statement."""
    statement = binding_statement(institution, signing_key.key_id, b64(signing_key.raw))
    return tls_key.sign(statement, ec.ECDSA(hashes.SHA256()))


def _verify(
    public_key: ec.EllipticCurvePublicKey,
    institution: str,
    key_id: str,
    public_key_b64: str,
    signature: bytes,
) -> None:
    try:
        public_key.verify(
            signature,
            binding_statement(institution, key_id, public_key_b64),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature:
        raise BindingError(
            f"the binding signature does not verify: the key of {institution}'s "
            f"certificate did not sign key {key_id[:16]} for {institution}"
        ) from None


def _check_key_id(key_id: str, public_key_b64: str) -> None:
    try:
        raw = unb64(public_key_b64)
    except SignatureError as err:
        raise BindingError(f"the bound public key is not canonical base64: {err}") from None
    if hashlib.sha256(raw).hexdigest() != key_id:
        raise BindingError(
            f"key id {key_id[:16]} is not the sha256 of the bound public key "
            f"({hashlib.sha256(raw).hexdigest()[:16]})"
        )


def check_binding(
    institution: str,
    key_id: str,
    public_key_b64: str,
    binding: KeyBinding,
    ca: x509.Certificate | None = None,
) -> None:
    """Raise BindingError unless `binding` proves that `institution`, holder of the
    certificate in it (issued by `ca`, when given), bound this update-signing key."""
    try:
        cert = x509.load_pem_x509_certificate(binding.certificate.encode())
    except ValueError as err:
        raise BindingError(f"the binding's certificate does not parse: {err}") from None
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise BindingError(
                f"the binding's certificate ({institution_of(cert.subject)!r}) was not "
                f"issued by the CA it is checked against (SHA-256 {fingerprint(ca)[:23]}...)"
            ) from None
    named = institution_of(cert.subject)
    if named != institution:
        raise BindingError(f"the binding's certificate names {named!r}, not {institution!r}")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise BindingError("the binding's certificate does not hold an EC key")
    _check_key_id(key_id, public_key_b64)
    try:
        signature = unb64(binding.signature)
    except SignatureError as err:
        raise BindingError(f"the binding signature: {err}") from None
    _verify(public_key, institution, key_id, public_key_b64, signature)


def check_binding_against_csr(
    csr: x509.CertificateSigningRequest,
    institution: str,
    signing_key: VerifyingKey,
    signature: bytes,
) -> None:
    """Raise BindingError unless `signature` is the binding of `signing_key` to
    `institution` by the key of `csr`: what onboarding checks before it issues."""
    named = institution_of(csr.subject)
    if named != institution:
        raise BindingError(f"the certificate request names {named!r}, not {institution!r}")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise BindingError("the certificate request does not hold an EC key")
    _verify(public_key, institution, signing_key.key_id, b64(signing_key.raw), signature)
