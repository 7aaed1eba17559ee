"""Verify a provenance log with nothing but the log and the coordinator's public key.

Checks, line by line, stopping at the first problem (named by its line number):
canonical form, record numbering, the coordinator's signature on every record
and tree head, every tree head's root against the records before it, the chain of
tree heads (each names its index and its predecessor's line digest, and is signed
whole, so deleting, duplicating or editing a head line breaks it), a consistency
proof between consecutive tree heads, each witness cosignature against the head it
cosigns and the institution key it names, the institution signature on every
accepted update by a key bound to that institution (`Keyring`), each job's
records making one coherent history (`semantics.py`), and that the log ends with a
tree head covering every record.

Each record's body is also parsed into its typed record (`records.py`): a malformed
body of a known type fails verification; a record of a type this code does not know
is checked like any other (signature, index, Merkle leaf) and kept as `UnknownRecord`,
so logs written by newer code still verify.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from consortium.provenance.canonical import canonical_json
from consortium.provenance.checkpoint import checkpoint_body, origin_of, verify_cosignature
from consortium.provenance.keyring import Keyring
from consortium.provenance.log import (
    COSIGNATURE,
    COSIGNATURE_FIELDS,
    LEGACY_HEAD_FIELDS,
    RECORD,
    TREE_HEAD,
    TreeHead,
    WitnessCosignature,
    head_signing_bytes,
    line_digest,
    read_lines,
    record_signing_bytes,
    tree_head_signing_bytes,
)
from consortium.provenance.merkle import (
    MerkleTree,
    ProofError,
    leaf_hash,
    verify_consistency,
)
from consortium.provenance.records import (
    InstitutionKey,
    InstitutionKeyChanged,
    Record,
    Round,
    UpdateEntry,
    parse_body,
    record_job_id,
)
from consortium.provenance.semantics import JobHistory
from consortium.provenance.signing import SignatureError, VerifyingKey, unb64
from consortium.provenance.updates import UpdateStatement


class LogVerificationError(ValueError):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass
class VerifyReport:
    records: int = 0
    tree_heads: int = 0
    last_head: TreeHead | None = None
    signed_updates: int = 0
    jobs: dict[str, list[Record]] = field(default_factory=dict)  # job -> its typed records
    heads: list[TreeHead] = field(default_factory=list)
    # tree size -> the institutions whose cosignature of that head verified
    witnesses: dict[int, set[str]] = field(default_factory=dict)
    cosignatures: dict[int, list[WitnessCosignature]] = field(default_factory=dict)
    keyring: Keyring = field(default_factory=Keyring)

    def witnesses_of(self, head: TreeHead) -> list[str]:
        """The institutions that cosigned this head."""
        return sorted(self.witnesses.get(head.tree_size, set()))

    def vouched_by(self, head: TreeHead) -> list[str]:
        """The institutions that cosigned this head or a later one: a later cosignature
        vouches for it too, since every head of a verified log is consistent with the
        next (the site checked its own last head against the one it cosigned)."""
        return sorted(
            set().union(
                *(names for size, names in self.witnesses.items() if size >= head.tree_size)
            )
        )

    def rounds_of(self, job_id: str) -> int:
        """How many rounds (or outer steps) of the job the log holds."""
        return sum(1 for r in self.jobs.get(job_id, []) if hasattr(r, "round"))


def _signed_update_ok(update: UpdateEntry, record: Round, keyring: Keyring) -> None:
    """Raises ValueError unless the institution's signature on an accepted update
    verifies with the key bound to the institution it names."""
    key = keyring.signer(update.institution, update.key_id or "", "the update")
    if (
        update.update_digest is None
        or update.num_examples is None
        or update.commitment is None
        or update.nonce is None
        or update.signature is None
    ):
        raise ValueError(f"accepted update of {update.institution!r} lacks its signed statement")
    statement = UpdateStatement(
        job_id=record.job_id,
        round=record.round,
        global_digest=record.global_digest,
        update_digest=update.update_digest,
        num_examples=update.num_examples,
        commitment=update.commitment,
        nonce=update.nonce,
        institution=update.institution,
    )
    try:
        key.verify(unb64(update.signature), statement.to_bytes())
    except SignatureError as err:
        raise ValueError(f"institution signature of {update.institution!r}: {err}") from None


@dataclass
class _Verifier:
    coordinator_key: VerifyingKey
    report: VerifyReport
    # The records' leaf hashes, as a tree that answers roots and proofs in O(log n).
    tree: MerkleTree = field(default_factory=MerkleTree)
    head_lines: list[bytes] = field(default_factory=list)
    histories: dict[str, JobHistory] = field(default_factory=dict)
    roots: dict[int, str] = field(default_factory=dict)  # tree size -> root of its head
    chained: bool = False  # a chained head has been seen: no legacy head may follow

    def line(self, raw: bytes, entry: dict[str, Any]) -> None:
        kind = entry.get("kind")
        if kind == RECORD:
            self._record(entry)
            self.tree.append(leaf_hash(raw))
        elif kind == TREE_HEAD:
            self._tree_head(raw, entry)
        elif kind == COSIGNATURE:
            self._cosignature(entry)
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def _record(self, entry: dict[str, Any]) -> None:
        index = self.tree.size
        if entry["index"] != index:
            raise ValueError(f"record index {entry['index']} where {index} was expected")
        type_, body = entry["type"], entry["body"]
        # The signature covers the raw logged body, never a re-serialised typed one.
        self.coordinator_key.verify(
            unb64(entry["signature"]), record_signing_bytes(index, type_, body)
        )
        record = parse_body(str(type_), body)
        if isinstance(record, InstitutionKey | InstitutionKeyChanged):
            self.report.keyring.add(record, index)
        if isinstance(record, Round):
            for update in record.updates:
                if update.accepted:
                    _signed_update_ok(update, record, self.report.keyring)
                    self.report.signed_updates += 1
        job_id = record_job_id(record)
        if job_id is not None:
            self.histories.setdefault(job_id, JobHistory(job_id)).add(record)
            self.report.jobs.setdefault(job_id, []).append(record)

    def _tree_head(self, raw: bytes, entry: dict[str, Any]) -> None:
        head = TreeHead(entry["tree_size"], entry["root_hash"], entry["timestamp_ms"])
        if set(entry) == LEGACY_HEAD_FIELDS:
            if self.chained:
                raise ValueError("an unchained tree head after chained ones")
            signed = tree_head_signing_bytes(head.tree_size, head.root_hash, head.timestamp_ms)
        else:
            self.chained = True
            if entry.get("head_index") != len(self.head_lines):
                raise ValueError(
                    f"tree head number {entry.get('head_index')!r} where {len(self.head_lines)} "
                    "was expected (a head was deleted, duplicated or moved)"
                )
            previous = line_digest(self.head_lines[-1]) if self.head_lines else ""
            if entry.get("previous_head") != previous:
                raise ValueError(
                    "the tree head does not name the head before it (a head was deleted, "
                    "duplicated or moved)"
                )
            signed = head_signing_bytes(entry)
        self.coordinator_key.verify(unb64(entry["signature"]), signed)
        if head.tree_size != self.tree.size:
            raise ValueError(f"tree head covers {head.tree_size} records, log has {self.tree.size}")
        if self.tree.root().hex() != head.root_hash:
            raise ValueError("tree head root does not match the records")
        previous_head = self.report.last_head
        if previous_head is not None and previous_head.tree_size > 0:
            # Prove the earlier head is a prefix of this one, as a monitor would.
            proof = self.tree.consistency_proof(previous_head.tree_size, head.tree_size)
            verify_consistency(
                previous_head.tree_size,
                head.tree_size,
                bytes.fromhex(previous_head.root_hash),
                bytes.fromhex(head.root_hash),
                proof,
            )
        self.head_lines.append(raw)
        self.roots[head.tree_size] = head.root_hash
        self.report.heads.append(head)
        self.report.tree_heads += 1
        self.report.last_head = head

    def _cosignature(self, entry: dict[str, Any]) -> None:
        # Exactly the fields a cosignature has, each of its type: nothing in the line can
        # change without breaking the signature or this check.
        if set(entry) != COSIGNATURE_FIELDS:
            raise ValueError(f"a cosignature line has fields {sorted(entry)}")
        size, root, institution = entry["tree_size"], entry["root_hash"], entry["institution"]
        for name in ("tree_size", "timestamp_s"):
            if type(entry[name]) is not int:
                raise ValueError(f"a cosignature's {name} is not an integer")
        if institution in self.report.witnesses.get(size, set()):
            raise ValueError(f"{institution!r} cosigns the head of size {size} a second time")
        if self.roots.get(size) != root:
            raise ValueError(
                f"{institution!r} cosigns a head of size {size} that the log does not hold "
                "before this line"
            )
        key = self.report.keyring.cosigner(institution, str(entry["key_id"]))
        body = checkpoint_body(origin_of(self.coordinator_key.key_id), size, root)
        try:
            verify_cosignature(key, body, int(entry["timestamp_s"]), unb64(entry["signature"]))
        except SignatureError:
            raise ValueError(f"the cosignature of {institution!r} does not verify") from None
        self.report.witnesses.setdefault(size, set()).add(institution)
        self.report.cosignatures.setdefault(size, []).append(
            WitnessCosignature(
                tree_size=size,
                root_hash=root,
                institution=institution,
                key_id=str(entry["key_id"]),
                timestamp_s=int(entry["timestamp_s"]),
                signature=str(entry["signature"]),
            )
        )


def verify_log(
    path: Path,
    coordinator_key: VerifyingKey,
    expected_head: TreeHead | None = None,
    allow_open_tail: bool = False,
    *,
    allow_unbound_keys: bool = False,
    ca: x509.Certificate | None = None,
) -> VerifyReport:
    """Verify the log at `path`; raises LogVerificationError at the first bad line.

    `allow_unbound_keys` accepts updates signed by keys logged without the
    institution's binding (logs written before bindings); `ca` also checks that each
    binding's certificate was issued by the consortium's CA."""
    report = VerifyReport(keyring=Keyring(allow_unbound=allow_unbound_keys, ca=ca))
    verifier = _Verifier(coordinator_key, report)
    lines = read_lines(path)
    if not lines:
        raise LogVerificationError(0, f"{path} is empty")
    for number, raw in enumerate(lines, start=1):
        entry = _parse_line(number, raw, coordinator_key)
        try:
            verifier.line(raw, entry)
        except (SignatureError, ProofError, KeyError, TypeError, ValueError) as err:
            raise LogVerificationError(number, str(err) or type(err).__name__) from None
    tree = verifier.tree
    report.records = tree.size
    previous = report.last_head
    if previous is None or (previous.tree_size != tree.size and not allow_open_tail):
        covered = previous.tree_size if previous else 0
        raise LogVerificationError(
            len(lines),
            f"records {covered}..{tree.size - 1} are not covered by a signed tree head",
        )
    if expected_head is not None:
        _check_expected_head(expected_head, tree, len(lines))
    return report


def _check_expected_head(expected: TreeHead, tree: MerkleTree, last_line: int) -> None:
    """Truncation at a tree-head boundary is only visible against a published head."""
    if expected.tree_size > tree.size:
        raise LogVerificationError(
            last_line,
            f"log holds {tree.size} records; the expected head covers {expected.tree_size}",
        )
    if tree.root(expected.tree_size).hex() != expected.root_hash:
        raise LogVerificationError(
            last_line, f"log does not match the expected tree head of size {expected.tree_size}"
        )


def _parse_line(number: int, raw: bytes, coordinator_key: VerifyingKey) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LogVerificationError(number, f"not JSON: {err}") from None
    if not isinstance(entry, dict):
        raise LogVerificationError(number, "not a JSON object")
    try:
        canonical = canonical_json(entry)
    except ValueError as err:
        raise LogVerificationError(number, f"not canonical: {err}") from None
    if canonical != raw:
        raise LogVerificationError(number, "not in canonical form (altered)")
    # A cosignature is signed by the institution it names, not by the coordinator.
    if entry.get("kind") != COSIGNATURE and entry.get("key_id") != coordinator_key.key_id:
        raise LogVerificationError(number, "not signed by the coordinator's key")
    return entry
