"""in-toto Statement v1 in a DSSE envelope, signed with the coordinator's key.

The statement's subject is the final model file (name and sha256); the predicate
(`attestation.py`) carries the job's log entries with inclusion proofs into a signed,
cosigned tree head and the coordinator key's certificate, so it can be checked
offline with only the consortium's CA certificate.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from consortium.provenance.canonical import canonical_json
from consortium.provenance.signing import SignatureError, SigningKey, VerifyingKey, b64

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# The first exports (federated jobs only, a summary naming the log's head).
V1_PREDICATE_TYPE = "https://consortium.dev/provenance/federated-job/v1"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def statement(
    subject_name: str, sha256: str, predicate_type: str, predicate: dict[str, Any]
) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": sha256}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }


def envelope(body: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    payload = canonical_json(body)
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": b64(payload),
        "signatures": [{"keyid": key.key_id, "sig": b64(key.sign(pae(PAYLOAD_TYPE, payload)))}],
    }


def lenient_b64(text: str) -> bytes:
    """DSSE asks verifiers to accept standard or URL-safe base64, padded or not (signers
    here write standard, padded); ValueError when it is neither."""
    cleaned = text.strip()
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the envelope holds a value that is not base64") from None


def open_envelope(document: dict[str, Any], key: VerifyingKey) -> dict[str, Any]:
    """Verify the envelope's signature and return the statement it carries. As DSSE
    asks of verifiers: any base64 spelling, and a signature without a keyid is tried."""
    if document.get("payloadType") != PAYLOAD_TYPE:
        raise ValueError(f"payloadType is {document.get('payloadType')!r}, not in-toto")
    payload = lenient_b64(str(document.get("payload", "")))
    candidates = [
        s
        for s in document.get("signatures", [])
        if isinstance(s, dict) and s.get("keyid") in (None, "", key.key_id)
    ]
    if not candidates:
        raise ValueError("envelope carries no signature by the given key")
    for signature in candidates:
        try:
            key.verify(lenient_b64(str(signature.get("sig", ""))), pae(PAYLOAD_TYPE, payload))
        except SignatureError:
            continue
        result: dict[str, Any] = json.loads(payload)
        return result
    raise SignatureError(f"no signature of the envelope verifies with key {key.key_id[:16]}")
