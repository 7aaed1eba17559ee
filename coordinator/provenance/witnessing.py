"""The coordinator's half of witnessing: what it asks each site to cosign, and checking
the cosignature a site returns (the site's half: `consortium/provenance/witness.py`).

A witness request carries the log's latest tree head line and consistency proofs to it
from every head the institution may have cosigned last: the last one its cosignatures
in the log show, and the heads after that one (a site may have cosigned a head whose
reply never reached the coordinator: a crash, a timeout), at most `MAX_PROOFS` of them,
newest first. An institution with no cosignature logged yet gets proofs from the
`MAX_PROOFS_UNKNOWN` newest heads (a site that never cosigned needs none). Normally that
is one or two proofs of O(log n) hashes each (benchmarks/witness.py).

The limit: a site whose cosignature of a head was lost and that then missed more than
`MAX_PROOFS` heads before it trained again gets no proof from its last head, and refuses
(`no_proof`, naming the size) until the operator logs that cosignature or the site's
operator decides what to trust; the refusal is counted, never silent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from consortium.provenance.checkpoint import checkpoint_body, origin_of, verify_cosignature
from consortium.provenance.log import (
    COSIGNATURE,
    RECORD,
    TREE_HEAD,
    WitnessCosignature,
    read_lines,
)
from consortium.provenance.merkle import MerkleTree, leaf_hash
from consortium.provenance.signing import SignatureError, VerifyingKey, unb64

# How many heads a request proves consistency from (see the module docstring).
MAX_PROOFS = 32
MAX_PROOFS_UNKNOWN = 8


@dataclass(frozen=True)
class WitnessRequest:
    """What one site is asked to cosign."""

    head_line: str
    tree_size: int
    root_hash: str
    proofs: dict[str, list[str]]  # from tree size (decimal) -> proof nodes (hex)

    def proofs_json(self) -> str:
        return json.dumps(self.proofs, sort_keys=True)


@dataclass
class LogView:
    """The log as witnessing needs it: its tree, heads, and each institution's last
    logged cosignature."""

    tree: MerkleTree = field(default_factory=MerkleTree)
    head_lines: list[bytes] = field(default_factory=list)
    head_sizes: list[int] = field(default_factory=list)
    last_cosigned: dict[str, int] = field(default_factory=dict)  # institution -> size

    @classmethod
    def read(cls, path: Path) -> LogView:
        view = cls()
        for line in read_lines(path):
            entry = json.loads(line)
            kind = entry.get("kind")
            if kind == RECORD:
                view.tree.append(leaf_hash(line))
            elif kind == TREE_HEAD:
                view.head_lines.append(line)
                view.head_sizes.append(int(entry["tree_size"]))
            elif kind == COSIGNATURE:
                name = str(entry["institution"])
                size = int(entry["tree_size"])
                view.last_cosigned[name] = max(size, view.last_cosigned.get(name, 0))
        return view

    def request_for(self, institution: str) -> WitnessRequest | None:
        """The request for `institution` ("" when not known); None before any head."""
        if not self.head_lines:
            return None
        latest = self.head_lines[-1]
        size = self.head_sizes[-1]
        entry = json.loads(latest)
        if institution in self.last_cosigned:
            since = self.last_cosigned[institution]
            later = [s for s in self.head_sizes if s > since][-MAX_PROOFS:]
            sizes = {since, *later}
        else:
            sizes = set(self.head_sizes[-MAX_PROOFS_UNKNOWN:])
        proofs = {
            str(old): [node.hex() for node in self.tree.consistency_proof(old, size)]
            for old in sorted(sizes)
            if 0 < old < size
        }
        return WitnessRequest(latest.decode(), size, str(entry["root_hash"]), proofs)


class CosignatureRefused(Exception):  # noqa: N818 - reads as what happened to it
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class WitnessedHead:
    """The head a round asked its sites to cosign, in the log of `coordinator_key_id`."""

    tree_size: int
    root_hash: str
    coordinator_key_id: str


def check_cosignature(
    fields: Mapping[str, object] | None,
    institution: str,
    keys: dict[str, bytes],
    request: WitnessedHead,
) -> WitnessCosignature:
    """The site's cosignature of the head it was sent, checked with a key pinned to the
    institution; raises CosignatureRefused("uncosigned" or "bad_cosignature")."""
    if fields is None or not fields:
        raise CosignatureRefused("uncosigned", "the reply carries no cosignature of the log's head")
    key_id = str(fields.get("key-id", ""))
    public_key = keys.get(key_id)
    if public_key is None:
        raise CosignatureRefused(
            "bad_cosignature", f"key {key_id[:16]} is not registered to {institution!r}"
        )
    size, root = fields.get("tree-size"), str(fields.get("root-hash", ""))
    if size != request.tree_size or root != request.root_hash:
        raise CosignatureRefused(
            "bad_cosignature",
            f"cosigns the head of size {size}, not the head of size {request.tree_size} "
            "it was sent",
        )
    timestamp = fields.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 0:
        raise CosignatureRefused("bad_cosignature", "the cosignature's time is not an integer")
    signature = str(fields.get("signature", ""))
    body = checkpoint_body(
        origin_of(request.coordinator_key_id), request.tree_size, request.root_hash
    )
    try:
        verify_cosignature(VerifyingKey.from_raw(public_key), body, timestamp, unb64(signature))
    except SignatureError as err:
        raise CosignatureRefused("bad_cosignature", f"does not verify: {err}") from None
    return WitnessCosignature(
        tree_size=request.tree_size,
        root_hash=request.root_hash,
        institution=institution,
        key_id=key_id,
        timestamp_s=timestamp,
        signature=signature,
    )
