"""Verify a provenance log with nothing but the log and the coordinator's public key.

Checks, line by line, stopping at the first problem (named by its line number):
canonical form, record numbering, the coordinator's signature on every record
and tree head, every tree head's root against the records before it, a
consistency proof between consecutive tree heads, the institution signature on
every accepted update (institution keys are themselves signed records), and
that the log ends with a tree head covering every record.

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

from consortium.provenance.canonical import canonical_json
from consortium.provenance.log import (
    RECORD,
    TREE_HEAD,
    TreeHead,
    read_lines,
    record_signing_bytes,
    tree_head_signing_bytes,
)
from consortium.provenance.merkle import (
    ProofError,
    consistency_proof,
    leaf_hash,
    root_from_leaves,
    verify_consistency,
)
from consortium.provenance.records import (
    InstitutionKey,
    Record,
    Round,
    UpdateEntry,
    parse_body,
    record_job_id,
)
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


def _signed_update_ok(
    update: UpdateEntry, record: Round, keys: dict[str, VerifyingKey]
) -> str | None:
    """None when the institution's signature on an accepted update verifies."""
    key = keys.get(update.key_id or "")
    if key is None:
        return f"update of {update.institution!r} names unknown key"
    if (
        update.update_digest is None
        or update.num_examples is None
        or update.commitment is None
        or update.nonce is None
        or update.signature is None
    ):
        return f"accepted update of {update.institution!r} lacks its signed statement"
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
        return f"institution signature of {update.institution!r}: {err}"
    return None


def verify_log(
    path: Path,
    coordinator_key: VerifyingKey,
    expected_head: TreeHead | None = None,
    allow_open_tail: bool = False,
) -> VerifyReport:
    report = VerifyReport()
    leaves: list[bytes] = []
    institution_keys: dict[str, VerifyingKey] = {}
    previous: TreeHead | None = None
    lines = read_lines(path)
    if not lines:
        raise LogVerificationError(0, f"{path} is empty")
    for number, raw in enumerate(lines, start=1):
        entry = _parse_line(number, raw, coordinator_key)
        try:
            if entry.get("kind") == RECORD:
                _check_record(entry, len(leaves), coordinator_key, institution_keys, report)
                leaves.append(leaf_hash(raw))
            elif entry.get("kind") == TREE_HEAD:
                head = _check_tree_head(entry, leaves, coordinator_key, previous)
                previous = head
                report.tree_heads += 1
                report.last_head = head
            else:
                raise LogVerificationError(number, f"unknown kind {entry.get('kind')!r}")
        except LogVerificationError:
            raise
        except (SignatureError, ProofError, KeyError, TypeError, ValueError) as err:
            raise LogVerificationError(number, str(err) or type(err).__name__) from None
    report.records = len(leaves)
    if previous is None or (previous.tree_size != len(leaves) and not allow_open_tail):
        covered = previous.tree_size if previous else 0
        raise LogVerificationError(
            len(lines),
            f"records {covered}..{len(leaves) - 1} are not covered by a signed tree head",
        )
    if expected_head is not None:
        _check_expected_head(expected_head, leaves, len(lines))
    return report


def _check_expected_head(expected: TreeHead, leaves: list[bytes], last_line: int) -> None:
    """Truncation at a tree-head boundary is only visible against a published head."""
    if expected.tree_size > len(leaves):
        raise LogVerificationError(
            last_line,
            f"log holds {len(leaves)} records; the expected head covers {expected.tree_size}",
        )
    if root_from_leaves(leaves[: expected.tree_size]).hex() != expected.root_hash:
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
    if entry.get("key_id") != coordinator_key.key_id:
        raise LogVerificationError(number, "not signed by the coordinator's key")
    return entry


def _check_record(
    entry: dict[str, Any],
    index: int,
    coordinator_key: VerifyingKey,
    institution_keys: dict[str, VerifyingKey],
    report: VerifyReport,
) -> None:
    if entry["index"] != index:
        raise ValueError(f"record index {entry['index']} where {index} was expected")
    type_, body = entry["type"], entry["body"]
    # The signature covers the raw logged body, never a re-serialised typed one.
    coordinator_key.verify(unb64(entry["signature"]), record_signing_bytes(index, type_, body))
    record = parse_body(str(type_), body)
    if isinstance(record, InstitutionKey):
        key = VerifyingKey.from_b64(record.public_key)
        if key.key_id != record.key_id:
            raise ValueError("institution key id does not match its public key")
        institution_keys[key.key_id] = key
    if isinstance(record, Round):
        for update in record.updates:
            if update.accepted:
                problem = _signed_update_ok(update, record, institution_keys)
                if problem:
                    raise ValueError(problem)
                report.signed_updates += 1
    job_id = record_job_id(record)
    if job_id is not None:
        report.jobs.setdefault(job_id, []).append(record)


def _check_tree_head(
    entry: dict[str, Any],
    leaves: list[bytes],
    coordinator_key: VerifyingKey,
    previous: TreeHead | None,
) -> TreeHead:
    head = TreeHead(entry["tree_size"], entry["root_hash"], entry["timestamp_ms"])
    coordinator_key.verify(
        unb64(entry["signature"]),
        tree_head_signing_bytes(head.tree_size, head.root_hash, head.timestamp_ms),
    )
    if head.tree_size != len(leaves):
        raise ValueError(f"tree head covers {head.tree_size} records, log has {len(leaves)}")
    if root_from_leaves(leaves).hex() != head.root_hash:
        raise ValueError("tree head root does not match the records")
    if previous is not None and previous.tree_size > 0:
        # Prove the earlier head is a prefix of this one, as a monitor would.
        proof = consistency_proof(leaves, previous.tree_size, head.tree_size)
        verify_consistency(
            previous.tree_size,
            head.tree_size,
            bytes.fromhex(previous.root_hash),
            bytes.fromhex(head.root_hash),
            proof,
        )
    return head
