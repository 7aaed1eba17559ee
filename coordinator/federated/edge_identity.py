"""Who is on a Fleet edge connection, and what the edge says when it refuses one.

The reasons `consortium_auth_refusals_total{channel="fleet"}` counts, the ASGI scope
keys a connection's identity rides in, and the checks of a client certificate: the
handshake's failure mapped to a reason, the institution and serial read from the peer
certificate, and `Identity`, which asks the state store whether that certificate may
use the Fleet API (after the handshake and on every request). Used by the connection
gate (edge_gate.py) and the proxy (edge.py).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any, NamedTuple

from consortium.tls import ServerTls

log = logging.getLogger("coordinator.federated.edge")

CHANNEL = "fleet"
NO_CERTIFICATE = "no_client_certificate"
UNTRUSTED = "untrusted_certificate"
EXPIRED = "expired_certificate"
NOT_YET_VALID = "not_yet_valid_certificate"
WRONG_PURPOSE = "wrong_certificate_purpose"
NOT_TLS = "not_tls"
TOO_MANY_HANDSHAKES = "too_many_handshakes"
TOO_MANY_CONNECTIONS = "too_many_connections"
REVOKED = "revoked_certificate"
SUPERSEDED = "superseded_certificate"
UNKNOWN_CERTIFICATE = "unknown_certificate"
FORBIDDEN_API = "forbidden_api"
BODY_TOO_LARGE = "body_too_large"
REQUEST_TIMEOUT = "request_timeout"
OTHER = "other"


INSTITUTION_KEY = "consortium.institution"  # ASGI scope keys set per connection
SERIAL_KEY = "consortium.certificate_serial"
REFUSAL_KEY = "consortium.refusal"  # a connection's certificate, refused after its handshake

_VERIFY_MESSAGES = (
    ("certificate has expired", EXPIRED),
    ("certificate is not yet valid", NOT_YET_VALID),
    ("unsupported certificate purpose", WRONG_PURPOSE),
    ("unable to get local issuer certificate", UNTRUSTED),
    ("self-signed certificate", UNTRUSTED),
    ("self signed certificate", UNTRUSTED),
    ("certificate signature failure", UNTRUSTED),
)
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CERTIFICATE,
    "HTTP_REQUEST": NOT_TLS,
    "WRONG_VERSION_NUMBER": NOT_TLS,
    "UNSUPPORTED_PROTOCOL": NOT_TLS,
}


RefusalHook = Callable[[str, str], None]  # (reason, institution or "")


def handshake_refusal_reason(error: BaseException) -> str:
    """The `consortium_auth_refusals_total` reason for a failed TLS handshake."""
    if isinstance(error, ssl.SSLCertVerificationError):
        message = (error.verify_message or "").lower()
        return next((reason for text, reason in _VERIFY_MESSAGES if text in message), UNTRUSTED)
    if isinstance(error, ssl.SSLError):
        return _SSL_REASONS.get(error.reason or "", OTHER)
    return OTHER


def institution_of_peercert(peercert: dict[str, Any] | None) -> str:
    """The common name in `SSLObject.getpeercert()`'s subject, or ""."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def serial_of_peercert(peercert: dict[str, Any] | None) -> str:
    """The certificate's serial as the state store writes it (lower-case hex, no
    leading zeros), or ""."""
    text = str((peercert or {}).get("serialNumber", ""))
    try:
        return format(int(text, 16), "x")
    except ValueError:
        return ""


def server_ssl_context(tls: ServerTls) -> ssl.SSLContext:
    """Mutual TLS: a client certificate from the consortium CA is required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_cert))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Refusals:
    """Logs and counts each refusal, with the institution or "no certificate"."""

    def __init__(self, on_refusal: RefusalHook | None) -> None:
        self._on_refusal = on_refusal

    def refuse(self, reason: str, institution: str, peer: str, detail: str) -> None:
        who = institution or "no certificate"
        log.warning("Fleet edge refused %s (%s) from %s: %s", who, reason, peer, detail)
        if self._on_refusal is not None:
            self._on_refusal(reason, institution)


class Refusal(NamedTuple):
    reason: str
    detail: str  # for the log
    answer: str  # the 403's body, for the site's operator


class Identity:
    """Whether a certificate may use the Fleet API: asked once a connection's handshake
    is done and again on every request. Blocking (the state store): run in a thread."""

    def __init__(
        self, is_revoked: Callable[[str], bool], current_serial: Callable[[str], str | None]
    ) -> None:
        self._is_revoked = is_revoked
        self._current_serial = current_serial

    def refusal(self, institution: str, serial: str) -> Refusal | None:
        if self._is_revoked(institution):
            return Refusal(
                REVOKED,
                "its certificate has been revoked",
                f"the certificate of {institution!r} is revoked\n",
            )
        current = self._current_serial(institution)
        if current is None:
            # Onboarding records the serial of every certificate it issues an
            # institution, and only institutions use the Fleet API. The CA signs others
            # (the coordinator's Ray certificate, whose key the sandboxed Ray head and
            # drivers hold; the operator's): none of them may pass.
            return Refusal(
                UNKNOWN_CERTIFICATE,
                f"no certificate of {institution!r} is on record (serial {serial})",
                f"the certificate of {institution!r} is not an onboarded institution's\n",
            )
        # A renewal supersedes the institution's earlier certificates (as on the
        # control plane: coordinator/api/auth.py), and certificates issued under its
        # name for other uses (its Ray nodes') never pass.
        if serial != current:
            return Refusal(
                SUPERSEDED,
                f"its certificate (serial {serial}) is not its current one (a renewal, or "
                "one issued for another use)",
                f"the certificate of {institution!r} was replaced by a renewal; "
                "use the renewed bundle\n",
            )
        return None
