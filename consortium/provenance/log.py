"""The provenance log: an append-only file of signed records and tree heads.

One JSON object per line, each in canonical form (`canonical.py`):

* ``{"kind": "record", "index": i, "type": ..., "body": {...}, "key_id": k,
  "signature": s}`` — `s` is the coordinator's Ed25519 signature over the
  canonical form of ``{"index", "type", "body"}``. The whole line is leaf `i` of
  a Merkle tree hashed as in RFC 9162 (0x00 leaf / 0x01 node prefixes).
* ``{"kind": "tree_head", "tree_size": n, "root_hash": h, "timestamp_ms": t,
  "head_index": j, "previous_head": p, "key_id": k, "signature": s}`` — a signed
  tree head over the first `n` records, written after every round. `s` covers every
  other field of the line, `j` counts the heads before it and `p` is the sha256 of
  the previous head's line ("" for the first), so a head cannot be deleted,
  duplicated, moved or edited without breaking the chain. Heads written before the
  chain (`LEGACY_HEAD_FIELDS`, `s` over size, root and timestamp only) still verify.
* ``{"kind": "cosignature", "tree_size": n, "root_hash": h, "institution": i,
  "key_id": k, "timestamp_s": t, "signature": s}`` — a site's witness cosignature
  (`checkpoint.py`, cosignature/v1) of an earlier head of this log, signed with its
  institution key. Like heads, cosignatures are not Merkle leaves: recording one does
  not change the tree it cosigns.

Only the process running a job appends (one job at a time), under an
exclusive file lock so a second writer can never interleave lines. An append may
carry a check that runs under that lock, on the records so far (`Precondition`):
a job's run refuses there to write what a newer run owns or what is already logged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from consortium.provenance.canonical import canonical_json
from consortium.provenance.merkle import leaf_hash, root_from_leaves
from consortium.provenance.records import InstitutionKey, KnownRecord, RecordType, parse_record
from consortium.provenance.signing import SigningKey, b64

RECORD = "record"
TREE_HEAD = "tree_head"
COSIGNATURE = "cosignature"
COSIGNATURE_FIELDS = frozenset(
    {"kind", "tree_size", "root_hash", "institution", "key_id", "timestamp_s", "signature"}
)
# The fields of a tree head written before heads were chained and signed whole.
LEGACY_HEAD_FIELDS = frozenset(
    {"kind", "tree_size", "root_hash", "timestamp_ms", "key_id", "signature"}
)

# Called under the log's lock with the records so far (parsed lines of kind "record");
# raising refuses the append.
Precondition = Callable[[list[dict[str, Any]]], None]


@dataclass(frozen=True)
class TreeHead:
    tree_size: int
    root_hash: str
    timestamp_ms: int


def record_signing_bytes(index: int, type_: str, body: dict[str, Any]) -> bytes:
    return canonical_json({"index": index, "type": type_, "body": body})


def tree_head_signing_bytes(tree_size: int, root_hash: str, timestamp_ms: int) -> bytes:
    return canonical_json(
        {"tree_size": tree_size, "root_hash": root_hash, "timestamp_ms": timestamp_ms}
    )


def head_signing_bytes(line: dict[str, Any]) -> bytes:
    """What a chained tree head's signature covers: every field of its line but that."""
    return canonical_json({k: v for k, v in line.items() if k != "signature"})


def line_digest(encoded: bytes) -> str:
    """The sha256 of a log line (without its newline): how a head names its predecessor."""
    return hashlib.sha256(encoded).hexdigest()


@dataclass(frozen=True)
class WitnessCosignature:
    """A site's cosignature of the head of `tree_size` and `root_hash` (`checkpoint.py`)."""

    tree_size: int
    root_hash: str
    institution: str
    key_id: str
    timestamp_s: int
    signature: str  # base64

    def line(self) -> dict[str, Any]:
        return {"kind": COSIGNATURE, **asdict(self)}


def read_lines(path: Path) -> list[bytes]:
    """The log's lines without their newline (an absent log is empty)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if not data:
        return []
    return data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the log's write lock: no record is appended meanwhile (the coordinator
    holds it while it hands a job to a new run, so a check under it sees either run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def records_of(path: Path) -> list[dict[str, Any]]:
    """The log's records (lines of kind "record"), parsed, in order."""
    entries = (json.loads(line) for line in read_lines(path))
    return [entry for entry in entries if entry.get("kind") == RECORD]


class ProvenanceLog:
    """Appends signed records and tree heads to one log file."""

    def __init__(self, path: Path, key: SigningKey) -> None:
        self.path = path
        self._key = key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[list[bytes]]:
        """Exclusive access; yields the leaf hashes of the records so far."""
        with exclusive(self.path):
            yield [
                leaf_hash(line)
                for line in read_lines(self.path)
                if json.loads(line).get("kind") == RECORD
            ]

    def _append_line(self, line: dict[str, Any]) -> bytes:
        encoded = canonical_json(line)
        with self.path.open("ab") as handle:
            handle.write(encoded + b"\n")
        return encoded

    @property
    def key_id(self) -> str:
        """The id of the coordinator key that signs this log."""
        return self._key.key_id

    def append(
        self, type_: str, body: dict[str, Any], precondition: Precondition | None = None
    ) -> int:
        with self._locked() as leaves:
            if precondition is not None:
                precondition(records_of(self.path))
            index = len(leaves)
            signature = self._key.sign(record_signing_bytes(index, type_, body))
            self._append_line(
                {
                    "kind": RECORD,
                    "index": index,
                    "type": type_,
                    "body": body,
                    "key_id": self._key.key_id,
                    "signature": b64(signature),
                }
            )
            return index

    def append_record(self, record: KnownRecord, precondition: Precondition | None = None) -> int:
        """Append a typed record (`records.py`); its body is the fields its writer set."""
        return self.append(record.TYPE, record.body(), precondition)

    def logged_key_ids(self) -> set[str]:
        """Key ids of the institution keys already recorded in this log."""
        found = set()
        for line in read_lines(self.path):
            entry = json.loads(line)
            if entry.get("kind") == RECORD and entry.get("type") == RecordType.INSTITUTION_KEY:
                record = parse_record(entry)
                if isinstance(record, InstitutionKey):
                    found.add(record.key_id)
        return found

    def publish_tree_head(self) -> TreeHead:
        with self._locked() as leaves:
            head = TreeHead(
                tree_size=len(leaves),
                root_hash=root_from_leaves(leaves).hex(),
                timestamp_ms=int(time.time() * 1000),
            )
            heads = [line for line in read_lines(self.path) if _kind(line) == TREE_HEAD]
            line: dict[str, Any] = {
                "kind": TREE_HEAD,
                "tree_size": head.tree_size,
                "root_hash": head.root_hash,
                "timestamp_ms": head.timestamp_ms,
                "head_index": len(heads),
                "previous_head": line_digest(heads[-1]) if heads else "",
                "key_id": self._key.key_id,
            }
            line["signature"] = b64(self._key.sign(head_signing_bytes(line)))
            self._append_line(line)
            return head

    def append_cosignatures(
        self, cosignatures: list[WitnessCosignature], precondition: Precondition | None = None
    ) -> int:
        """Record sites' cosignatures of heads already in this log (a cosignature of a
        head the log does not hold is skipped: it cosigns nothing here; so is a second
        one of an institution for the same head, and one by a key the log has no record
        of, which no verifier could check: a plain-text consortium's site that witnessed
        but never had an update accepted). Returns how many were written."""
        if not cosignatures:
            return 0
        with self._locked():
            if precondition is not None:
                precondition(records_of(self.path))
            entries = [json.loads(line) for line in read_lines(self.path)]
            heads = {
                (entry["tree_size"], entry["root_hash"])
                for entry in entries
                if entry.get("kind") == TREE_HEAD
            }
            # One cosignature per institution and head (a round sent again, a second
            # reply): the first is kept.
            logged = {
                (entry["institution"], entry["tree_size"])
                for entry in entries
                if entry.get("kind") == COSIGNATURE
            }
            keys = {
                str(entry["body"].get("key_id"))
                for entry in entries
                if entry.get("kind") == RECORD and entry.get("type") == RecordType.INSTITUTION_KEY
            }
            written = 0
            for cosignature in cosignatures:
                key = (cosignature.institution, cosignature.tree_size)
                if (
                    (cosignature.tree_size, cosignature.root_hash) in heads
                    and key not in logged
                    and cosignature.key_id in keys
                ):
                    self._append_line(cosignature.line())
                    logged.add(key)
                    written += 1
            return written


def _kind(line: bytes) -> object:
    return json.loads(line).get("kind")
