"""The provenance log: an append-only file of signed records and tree heads.

One JSON object per line, each in canonical form (`canonical.py`):

* ``{"kind": "record", "index": i, "type": ..., "body": {...}, "key_id": k,
  "signature": s}`` — `s` is the coordinator's Ed25519 signature over the
  canonical form of ``{"index", "type", "body"}``. The whole line is leaf `i` of
  a Merkle tree hashed as in RFC 9162 (0x00 leaf / 0x01 node prefixes).
* ``{"kind": "tree_head", "tree_size": n, "root_hash": h, "timestamp_ms": t,
  "key_id": k, "signature": s}`` — a signed tree head over the first `n`
  records, written after every round.

Only the process running a job appends (one job at a time), under an
exclusive file lock so a second writer can never interleave lines. An append may
carry a check that runs under that lock, on the records so far (`Precondition`):
a job's run refuses there to write what a newer run owns or what is already logged.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consortium.provenance.canonical import canonical_json
from consortium.provenance.merkle import leaf_hash, root_from_leaves
from consortium.provenance.records import InstitutionKey, KnownRecord, RecordType, parse_record
from consortium.provenance.signing import SigningKey, b64

RECORD = "record"
TREE_HEAD = "tree_head"

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
            signature = self._key.sign(
                tree_head_signing_bytes(head.tree_size, head.root_hash, head.timestamp_ms)
            )
            self._append_line(
                {
                    "kind": TREE_HEAD,
                    "tree_size": head.tree_size,
                    "root_hash": head.root_hash,
                    "timestamp_ms": head.timestamp_ms,
                    "key_id": self._key.key_id,
                    "signature": b64(signature),
                }
            )
            return head
