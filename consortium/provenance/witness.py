"""A site witnesses the coordinator's log: it cosigns a tree head only when the head
extends every head it cosigned before, and keeps its own record of what it cosigned.

With each round's instructions (and once more when a job ends) the coordinator sends
its latest signed tree head line and consistency proofs (RFC 9162) from the heads the
site may have cosigned last, keyed by their tree size. The site:

1. checks the head line: a chained head (`log.py`), signed by the coordinator's key
   from the site's bundle (a site joined without a bundle, on loopback, has no key to
   check it with and checks the rest only);
2. takes the last head it cosigned from its own record, `<state dir>/witness/
   cosigned-heads.jsonl`, and refuses (`LogInconsistentError`) a head smaller than that
   one (the log was truncated or rolled back) unless it cosigned that very head before
   (a late message of an earlier round), of the same size with another root (it
   was rewritten), or larger without a consistency proof from it that verifies (it
   was rewritten, or the coordinator will not prove it was not);
3. appends the head to its record, then cosigns it (C2SP cosignature/v1,
   `checkpoint.py`) with its institution key.

The record is the site's evidence: `client provenance check --log FILE` compares a copy
of the coordinator's log with it (`check_log_copy`), and two heads signed by the
coordinator that do not extend one another prove the coordinator showed two histories.
The check and the append run under a lock on the record, so two of the site's task
processes cannot cosign two inconsistent heads.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from consortium.provenance.checkpoint import checkpoint_body, cosign, origin_of
from consortium.provenance.log import (
    LEGACY_HEAD_FIELDS,
    RECORD,
    TREE_HEAD,
    WitnessCosignature,
    head_signing_bytes,
    read_lines,
)
from consortium.provenance.merkle import MerkleTree, ProofError, leaf_hash, verify_consistency
from consortium.provenance.signing import SignatureError, SigningKey, VerifyingKey, b64, unb64

# The protocol's names: the ConfigRecord a message asks with ("head": the tree head line,
# "proofs": JSON {tree size: [hex nodes]}), the one a reply cosigns with, and the
# message type that asks for a cosignature alone (when a job ends).
WITNESS_RECORD = "consortium.witness"
COSIGNATURE_RECORD = "consortium.cosignature"
WITNESS_QUERY = "query.witness"

WITNESS_DIR = "witness"
COSIGNED_FILE = "cosigned-heads.jsonl"
REFUSALS_FILE = "refusals.jsonl"

# Why a site refuses a head (the label of its metric).
TRUNCATED = "truncated"
REWRITTEN = "rewritten"
NO_PROOF = "no_proof"
BAD_HEAD = "bad_head"
NO_HEAD = "no_head"
REFUSAL_REASONS = (TRUNCATED, REWRITTEN, NO_PROOF, BAD_HEAD, NO_HEAD)


class LogInconsistentError(Exception):
    """The coordinator presented a head this site must not cosign."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CosignedHead:
    """One line of a site's record: a head it cosigned, as the coordinator signed it."""

    tree_size: int
    root_hash: str
    head_line: str  # the coordinator's signed tree head line, verbatim
    cosigned_at_s: int


@dataclass(frozen=True)
class PresentedHead:
    tree_size: int
    root_hash: str
    key_id: str  # the coordinator key that signed it
    line: str


def witness_dir(state_dir: Path) -> Path:
    return state_dir / WITNESS_DIR


def parse_head(line: str, coordinator_key: VerifyingKey | None) -> PresentedHead:
    """A chained tree head line, its signature checked when the coordinator's key is known."""
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict) or entry.get("kind") != TREE_HEAD:
            raise LogInconsistentError(BAD_HEAD, "the witness request carries no tree head")
        if set(entry) == LEGACY_HEAD_FIELDS:
            raise LogInconsistentError(BAD_HEAD, "the tree head is not chained (an old writer)")
        head = PresentedHead(
            int(entry["tree_size"]), str(entry["root_hash"]), str(entry["key_id"]), line
        )
        bytes.fromhex(head.root_hash)
        if coordinator_key is not None:
            if head.key_id != coordinator_key.key_id:
                raise LogInconsistentError(
                    BAD_HEAD, "the tree head is not signed by the coordinator's key"
                )
            coordinator_key.verify(unb64(str(entry["signature"])), head_signing_bytes(entry))
    except (ValueError, KeyError, TypeError) as err:
        raise LogInconsistentError(BAD_HEAD, f"malformed tree head: {err}") from None
    except SignatureError as err:
        raise LogInconsistentError(BAD_HEAD, f"the tree head's signature: {err}") from None
    return head


class WitnessRecord:
    """The site's append-only record of the heads it cosigned."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = witness_dir(state_dir)
        self.path = self.directory / COSIGNED_FILE

    def heads(self) -> list[CosignedHead]:
        if not self.path.exists():
            return []
        return [
            CosignedHead(**json.loads(line))
            for line in self.path.read_text().splitlines()
            if line.strip()
        ]

    @contextmanager
    def locked(self) -> Iterator[list[CosignedHead]]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield self.heads()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, head: CosignedHead) -> None:
        line = json.dumps(asdict(head), sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def check_extends(
    cosigned: Sequence[CosignedHead], head: PresentedHead, proofs: Mapping[str, Sequence[str]]
) -> None:
    """Raises LogInconsistentError unless `head` extends the site's latest cosigned head,
    or is one it cosigned before (a late message of an earlier round)."""
    if not cosigned:
        return  # the first head this site sees: nothing to be consistent with
    last = cosigned[-1]
    if any(h.tree_size == head.tree_size and h.root_hash == head.root_hash for h in cosigned):
        return
    if head.tree_size < last.tree_size:
        raise LogInconsistentError(
            TRUNCATED,
            f"the coordinator presents a log of {head.tree_size} records; this site cosigned "
            f"one of {last.tree_size} at {_when(last.cosigned_at_s)}: the log was truncated "
            "or rolled back",
        )
    if head.tree_size == last.tree_size:
        if head.root_hash != last.root_hash:
            raise LogInconsistentError(
                REWRITTEN,
                f"the coordinator's head of size {head.tree_size} has root "
                f"{head.root_hash[:16]}, but this site cosigned root {last.root_hash[:16]} "
                f"for that size at {_when(last.cosigned_at_s)}: the log was rewritten",
            )
        return
    proof = proofs.get(str(last.tree_size))
    if proof is None:
        raise LogInconsistentError(
            NO_PROOF,
            f"no consistency proof from size {last.tree_size}, the head this site cosigned "
            f"last, to size {head.tree_size}",
        )
    try:
        verify_consistency(
            last.tree_size,
            head.tree_size,
            bytes.fromhex(last.root_hash),
            bytes.fromhex(head.root_hash),
            [bytes.fromhex(node) for node in proof],
        )
    except (ProofError, ValueError) as err:
        raise LogInconsistentError(
            REWRITTEN,
            f"the head of size {head.tree_size} does not extend the head of size "
            f"{last.tree_size} this site cosigned at {_when(last.cosigned_at_s)} ({err}): "
            "the log was rewritten",
        ) from None


def witness_head(
    state_dir: Path,
    institution: str,
    signing_key: SigningKey,
    coordinator_key: VerifyingKey | None,
    head_line: str,
    proofs: Mapping[str, Sequence[str]],
) -> WitnessCosignature:
    """Check the presented head against this site's record, record it, cosign it.
    Raises LogInconsistentError (and records the refusal for the site's metrics)."""
    record = WitnessRecord(state_dir)
    try:
        head = parse_head(head_line, coordinator_key)
        with record.locked() as cosigned:
            check_extends(cosigned, head, proofs)
            now = int(time.time())
            if not any(h.tree_size >= head.tree_size for h in cosigned):
                record.append(CosignedHead(head.tree_size, head.root_hash, head_line, now))
    except LogInconsistentError as refusal:
        record_refusal(state_dir, refusal.reason)
        raise
    body = checkpoint_body(origin_of(head.key_id), head.tree_size, head.root_hash)
    return WitnessCosignature(
        tree_size=head.tree_size,
        root_hash=head.root_hash,
        institution=institution,
        key_id=signing_key.key_id,
        timestamp_s=now,
        signature=b64(cosign(signing_key, body, now)),
    )


def record_refusal(state_dir: Path, reason: str) -> None:
    """One line per refused head, read by `client join`'s metrics."""
    directory = witness_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time_ms": int(time.time() * 1000), "reason": reason}) + "\n"
    fd = os.open(directory / REFUSALS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _when(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def cosignature_fields(cosignature: WitnessCosignature) -> dict[str, Any]:
    """The cosignature as the reply's ConfigRecord carries it."""
    return {
        "tree-size": cosignature.tree_size,
        "root-hash": cosignature.root_hash,
        "key-id": cosignature.key_id,
        "timestamp": cosignature.timestamp_s,
        "signature": cosignature.signature,
    }


@dataclass(frozen=True)
class LogCopyCheck:
    """What `check_log_copy` found: how many cosigned heads the copy extends, and the
    first one it does not (None: it extends them all)."""

    records: int
    heads_checked: int
    divergence: str | None
    latest: CosignedHead | None


def check_log_copy(state_dir: Path, log_path: Path) -> LogCopyCheck:
    """Compare a copy of the coordinator's log with every head this site cosigned, in
    order; the first cosigned head whose tree the copy does not reproduce is the first
    divergence (the copy was truncated there, or rewritten at or before it)."""
    heads = WitnessRecord(state_dir).heads()
    tree = MerkleTree()
    for line in read_lines(log_path):
        if json.loads(line).get("kind") == RECORD:
            tree.append(leaf_hash(line))
    matched: CosignedHead | None = None
    for number, head in enumerate(heads):
        if head.tree_size > tree.size:
            return LogCopyCheck(
                tree.size,
                number,
                f"the log holds {tree.size} records, but this site cosigned a head of "
                f"{head.tree_size} records (root {head.root_hash[:16]}) at "
                f"{_when(head.cosigned_at_s)}: records {tree.size}..{head.tree_size - 1} "
                "were removed",
                head,
            )
        if tree.root(head.tree_size).hex() != head.root_hash:
            since = f"records {matched.tree_size}" if matched else "record 0"
            return LogCopyCheck(
                tree.size,
                number,
                f"the log's first {head.tree_size} records do not hash to root "
                f"{head.root_hash[:16]}, which this site cosigned at "
                f"{_when(head.cosigned_at_s)}: the log was rewritten between {since} "
                f"and record {head.tree_size - 1}",
                head,
            )
        matched = head
    return LogCopyCheck(tree.size, len(heads), None, heads[-1] if heads else None)
