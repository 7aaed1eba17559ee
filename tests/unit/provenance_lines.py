"""Log lines as earlier versions wrote them (tests/unit/test_provenance_log.py,
test_provenance_attacks.py)."""

from __future__ import annotations

from consortium.provenance.canonical import canonical_json
from consortium.provenance.log import tree_head_signing_bytes
from consortium.provenance.signing import SigningKey, b64


def legacy_head_line(key: SigningKey, size: int, root: str, timestamp_ms: int) -> bytes:
    """A tree head as written before heads were chained (size, root, time signed)."""
    signature = key.sign(tree_head_signing_bytes(size, root, timestamp_ms))
    return canonical_json(
        {
            "kind": "tree_head",
            "tree_size": size,
            "root_hash": root,
            "timestamp_ms": timestamp_ms,
            "key_id": key.key_id,
            "signature": b64(signature),
        }
    )
