"""in-toto Statement v1 in a DSSE envelope, signed with the coordinator's key.

The statement's subject is the final model file (name and sha256); the
predicate summarises how it was made and names the provenance log's tree head,
so the statement can be checked against the full log.
"""

from __future__ import annotations

import json
from typing import Any

from consortium.provenance.canonical import canonical_json
from consortium.provenance.signing import SigningKey, VerifyingKey, b64, unb64

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://consortium.dev/provenance/federated-job/v1"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def statement(subject_name: str, sha256: str, predicate: dict[str, Any]) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def envelope(body: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    payload = canonical_json(body)
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": b64(payload),
        "signatures": [{"keyid": key.key_id, "sig": b64(key.sign(pae(PAYLOAD_TYPE, payload)))}],
    }


def open_envelope(document: dict[str, Any], key: VerifyingKey) -> dict[str, Any]:
    """Verify the envelope's signature and return the statement it carries."""
    payload = unb64(document["payload"])
    signatures = [s for s in document["signatures"] if s.get("keyid") == key.key_id]
    if not signatures:
        raise ValueError("envelope carries no signature by the given key")
    key.verify(unb64(signatures[0]["sig"]), pae(document["payloadType"], payload))
    result: dict[str, Any] = json.loads(payload)
    return result
