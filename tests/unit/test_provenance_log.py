"""The provenance log: written with ProvenanceLog, checked with verify_log; in-toto envelopes."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consortium.provenance.canonical import canonical_json
from consortium.provenance.intoto import (
    STATEMENT_TYPE,
    V1_PREDICATE_TYPE,
    envelope,
    open_envelope,
    statement,
)
from consortium.provenance.log import (
    ProvenanceLog,
    TreeHead,
    head_signing_bytes,
    line_digest,
    read_lines,
    record_signing_bytes,
)
from consortium.provenance.merkle import leaf_hash, root_from_leaves
from consortium.provenance.records import (
    JobCompleted,
    JobStarted,
    Round,
    type_name,
)
from consortium.provenance.signing import SignatureError, SigningKey, b64
from consortium.provenance.updates import UpdateStatement
from consortium.provenance.verify import LogVerificationError, verify_log
from tests.provenance_keys import ScratchCa

JOB = "job-log"
GLOBAL = hashlib.sha256(b"global model").hexdigest()
UPDATE = hashlib.sha256(b"update of uni-a").hexdigest()
AGGREGATE = hashlib.sha256(b"aggregate").hexdigest()
COMMITMENT = hashlib.sha256(b"data commitment").hexdigest()
NONCE = "0f" * 16

# Line numbers (1-based) of the log that `write_log` produces.
JOB_STARTED, HEAD_1, INSTITUTION_KEY, ROUND, HEAD_2, JOB_COMPLETED, HEAD_3 = range(1, 8)


@dataclass
class Log:
    path: Path
    coordinator: SigningKey
    institution: SigningKey
    heads: list[TreeHead]

    def lines(self) -> list[bytes]:
        return read_lines(self.path)

    def write(self, lines: list[bytes]) -> None:
        self.path.write_bytes(b"".join(line + b"\n" for line in lines))


def accepted_update(institution: SigningKey, signer: SigningKey | None = None) -> dict[str, Any]:
    """An accepted update as the strategy logs it, signed over its UpdateStatement."""
    statement_ = UpdateStatement(
        job_id=JOB,
        round=1,
        global_digest=GLOBAL,
        update_digest=UPDATE,
        num_examples=40,
        commitment=COMMITMENT,
        nonce=NONCE,
        institution="uni-a",
    )
    return {
        "institution": "uni-a",
        "node_id": "11",
        "key_id": institution.key_id,
        "update_digest": UPDATE,
        "num_examples": 40,
        "commitment": COMMITMENT,
        "data": {"digest": COMMITMENT},
        "nonce": NONCE,
        "signature": b64((signer or institution).sign(statement_.to_bytes())),
        "accepted": True,
        "reason": "",
    }


def round_body(update: dict[str, Any]) -> dict[str, Any]:
    refused = {"institution": "uni-b", "node_id": "22", "accepted": False, "reason": "stale"}
    return {
        "job_id": JOB,
        "round": 1,
        "global_digest": GLOBAL,
        "participants": ["uni-a"],
        "updates": [update, refused],
        "aggregation": {"rule": "mean", "trim_fraction": 0.1},
        "aggregate_digest": AGGREGATE,
        "metrics": {"eval_loss": 0.5},
    }


def write_log(
    path: Path, coordinator: SigningKey, institution: SigningKey, update: dict[str, Any]
) -> list[TreeHead]:
    log = ProvenanceLog(path, coordinator)
    heads: list[TreeHead] = []
    log.append_record(JobStarted(job_id=JOB, kind="federated", seed=7))
    heads.append(log.publish_tree_head())
    log.append_record(ScratchCa.create().bound_key("uni-a", institution))
    log.append_record(Round.model_validate(round_body(update)))
    heads.append(log.publish_tree_head())
    log.append_record(JobCompleted(job_id=JOB, rounds=1, final_model_digest=AGGREGATE))
    heads.append(log.publish_tree_head())
    return heads


@pytest.fixture
def log(tmp_path: Path) -> Log:
    coordinator, institution = SigningKey.generate(), SigningKey.generate()
    path = tmp_path / "provenance.log"
    heads = write_log(path, coordinator, institution, accepted_update(institution))
    return Log(path, coordinator, institution, heads)


def signed_record_line(key: SigningKey, index: int, type_: str, body: dict[str, Any]) -> bytes:
    signature = key.sign(record_signing_bytes(index, type_, body))
    return canonical_json(
        {
            "kind": "record",
            "index": index,
            "type": type_,
            "body": body,
            "key_id": key.key_id,
            "signature": b64(signature),
        }
    )


def signed_head_line(
    key: SigningKey, size: int, root: str, timestamp_ms: int, previous: list[bytes]
) -> bytes:
    """A chained tree head, correctly signed, following the head lines `previous`."""
    line: dict[str, Any] = {
        "kind": "tree_head",
        "tree_size": size,
        "root_hash": root,
        "timestamp_ms": timestamp_ms,
        "head_index": len(previous),
        "previous_head": line_digest(previous[-1]) if previous else "",
        "key_id": key.key_id,
    }
    line["signature"] = b64(key.sign(head_signing_bytes(line)))
    return canonical_json(line)


def failure(log: Log, **kwargs: Any) -> LogVerificationError:
    with pytest.raises(LogVerificationError) as info:
        verify_log(log.path, log.coordinator.public, **kwargs)
    return info.value


# --- an intact log ---------------------------------------------------------------------


def test_verify_log_intact_log_reports_counts(log: Log) -> None:
    report = verify_log(log.path, log.coordinator.public)

    assert (report.records, report.tree_heads, report.signed_updates) == (4, 3, 1)
    assert report.last_head == log.heads[-1]
    assert [h.tree_size for h in log.heads] == [1, 3, 4]
    assert [type_name(r) for r in report.jobs[JOB]] == ["job_started", "round", "job_completed"]
    assert 1500 < log.path.stat().st_size < 4500  # small enough to flip every byte below


def test_verify_log_intact_log_matches_earlier_published_head(log: Log) -> None:
    for head in log.heads:
        assert verify_log(log.path, log.coordinator.public, expected_head=head).records == 4


def test_verify_log_rejects_every_single_byte_flip(log: Log) -> None:
    original = log.path.read_bytes()
    undetected = []
    for offset in range(len(original)):
        flipped = bytearray(original)
        flipped[offset] ^= 0x01
        log.path.write_bytes(bytes(flipped))
        try:
            verify_log(log.path, log.coordinator.public)
        except LogVerificationError:
            continue
        line = original[:offset].count(b"\n") + 1
        undetected.append((offset, line, chr(original[offset])))
    assert undetected == []


def test_verify_log_rejects_non_canonical_base64_of_tree_head_signature(log: Log) -> None:
    """Canonical JSON promises that changing any byte is detectable; a base64 string has
    aliases (the unused low bits of its last character) that decode to the same signature."""
    lines = log.lines()
    head = json.loads(lines[HEAD_3 - 1])
    text = head["signature"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = len(text.rstrip("=")) - 1
    alias = alphabet[alphabet.index(text[last]) | 0b0001]  # 64-byte value: 4 unused bits
    head["signature"] = text[:last] + alias + text[last + 1 :]
    assert head["signature"] != text
    assert base64.b64decode(head["signature"]) == base64.b64decode(text)
    log.write([*lines[: HEAD_3 - 1], canonical_json(head)])

    assert failure(log).line == HEAD_3


# --- truncation ------------------------------------------------------------------------


def test_verify_log_fails_without_final_tree_head(log: Log) -> None:
    log.write(log.lines()[:-1])

    error = failure(log)

    assert "not covered by a signed tree head" in error.reason
    report = verify_log(log.path, log.coordinator.public, allow_open_tail=True)
    assert (report.records, report.last_head) == (4, log.heads[1])


@pytest.mark.parametrize("cut", [2, 40, 200])  # bytes cut off the end (1 is the newline)
def test_verify_log_fails_when_cut_mid_line(log: Log, cut: int) -> None:
    data = log.path.read_bytes()
    log.path.write_bytes(data[: len(data) - cut])

    assert failure(log).line == HEAD_3


def test_verify_log_cut_at_earlier_tree_head_passes_alone_but_not_against_later_head(
    log: Log,
) -> None:
    log.write(log.lines()[:HEAD_2])

    report = verify_log(log.path, log.coordinator.public)
    assert (report.records, report.last_head) == (3, log.heads[1])
    assert verify_log(log.path, log.coordinator.public, expected_head=log.heads[1]).records == 3
    error = failure(log, expected_head=log.heads[2])
    assert "expected head covers 4" in error.reason


def test_verify_log_fails_against_expected_head_with_other_root(log: Log) -> None:
    head = log.heads[1]
    forged = TreeHead(head.tree_size, hashlib.sha256(b"other").hexdigest(), head.timestamp_ms)

    assert "does not match the expected tree head" in failure(log, expected_head=forged).reason


def test_verify_log_fails_on_record_appended_after_last_tree_head(log: Log) -> None:
    ProvenanceLog(log.path, log.coordinator).append("note", {"text": "late"})

    assert "records 4..4" in failure(log).reason
    assert verify_log(log.path, log.coordinator.public, allow_open_tail=True).records == 5


# --- reordered, duplicated and foreign lines --------------------------------------------


def test_verify_log_fails_when_two_record_lines_are_swapped(log: Log) -> None:
    lines = log.lines()
    lines[INSTITUTION_KEY - 1], lines[ROUND - 1] = lines[ROUND - 1], lines[INSTITUTION_KEY - 1]
    log.write(lines)

    error = failure(log)

    assert error.line == INSTITUTION_KEY
    assert "index" in error.reason


def test_verify_log_fails_on_duplicated_record_line(log: Log) -> None:
    lines = log.lines()
    log.write([*lines[:JOB_COMPLETED], lines[JOB_COMPLETED - 1], *lines[JOB_COMPLETED:]])

    error = failure(log)

    assert error.line == JOB_COMPLETED + 1
    assert "index" in error.reason


def test_verify_log_fails_on_record_signed_by_other_key(log: Log) -> None:
    other = SigningKey.generate()
    body = json.loads(log.lines()[JOB_COMPLETED - 1])["body"]
    lines = log.lines()
    lines[JOB_COMPLETED - 1] = signed_record_line(other, 3, "job_completed", body)
    log.write(lines)

    error = failure(log)

    assert error.line == JOB_COMPLETED
    assert "coordinator's key" in error.reason


def test_verify_log_fails_on_other_keys_signature_under_coordinator_key_id(log: Log) -> None:
    other = SigningKey.generate()
    entry = json.loads(log.lines()[JOB_COMPLETED - 1])
    entry["body"]["rounds"] = 2
    entry["signature"] = b64(other.sign(record_signing_bytes(3, "job_completed", entry["body"])))
    lines = log.lines()
    lines[JOB_COMPLETED - 1] = canonical_json(entry)
    log.write(lines)

    error = failure(log)

    assert error.line == JOB_COMPLETED
    assert "bad signature" in error.reason


def test_verify_log_fails_on_forged_institution_signature(tmp_path: Path) -> None:
    coordinator, institution, forger = (SigningKey.generate() for _ in range(3))
    path = tmp_path / "forged.log"
    write_log(path, coordinator, institution, accepted_update(institution, signer=forger))

    with pytest.raises(LogVerificationError) as info:
        verify_log(path, coordinator.public)

    assert info.value.line == ROUND
    assert "institution signature of 'uni-a'" in info.value.reason


def test_verify_log_fails_on_update_signed_by_unlogged_institution_key(tmp_path: Path) -> None:
    coordinator, institution, unlogged = (SigningKey.generate() for _ in range(3))
    path = tmp_path / "unlogged.log"
    write_log(path, coordinator, institution, accepted_update(unlogged))

    with pytest.raises(LogVerificationError) as info:
        verify_log(path, coordinator.public)

    assert info.value.line == ROUND
    assert "unknown key" in info.value.reason


def test_verify_log_fails_on_resigned_tree_head_covering_wrong_size(log: Log) -> None:
    lines = log.lines()
    records = [lines[JOB_STARTED - 1], lines[INSTITUTION_KEY - 1]]  # 2 of the 3 records
    root = root_from_leaves([leaf_hash(line) for line in records]).hex()
    lines[HEAD_2 - 1] = signed_head_line(
        log.coordinator, 2, root, log.heads[1].timestamp_ms, [lines[HEAD_1 - 1]]
    )
    log.write(lines)

    error = failure(log)

    assert error.line == HEAD_2
    assert "covers 2 records, log has 3" in error.reason


def test_verify_log_fails_on_non_canonical_line(log: Log) -> None:
    lines = log.lines()
    entry = json.loads(lines[JOB_STARTED - 1])
    lines[JOB_STARTED - 1] = json.dumps(entry, sort_keys=True).encode()  # spaces after ":"
    log.write(lines)

    error = failure(log)

    assert (error.line, error.reason) == (JOB_STARTED, "not in canonical form (altered)")


# --- in-toto envelopes and canonical JSON -------------------------------------------------


def _model_statement(log: Log) -> dict[str, Any]:
    head = log.heads[-1]
    predicate = {"job_id": JOB, "tree_head": {"tree_size": head.tree_size, "root": head.root_hash}}
    return statement(
        "model.safetensors", hashlib.sha256(b"model").hexdigest(), V1_PREDICATE_TYPE, predicate
    )


def test_open_envelope_returns_signed_statement(log: Log) -> None:
    body = _model_statement(log)

    document = envelope(body, log.coordinator)

    assert open_envelope(document, log.coordinator.public) == body
    assert body["_type"] == STATEMENT_TYPE
    assert body["predicateType"] == V1_PREDICATE_TYPE
    assert json.loads(json.dumps(document)) == document  # plain JSON


def test_open_envelope_refuses_modified_payload(log: Log) -> None:
    document = envelope(_model_statement(log), log.coordinator)
    changed = _model_statement(log)
    changed["subject"][0]["digest"]["sha256"] = hashlib.sha256(b"other model").hexdigest()
    document["payload"] = b64(canonical_json(changed))

    with pytest.raises(SignatureError):
        open_envelope(document, log.coordinator.public)


def test_open_envelope_refuses_modified_payload_type(log: Log) -> None:
    document = envelope(_model_statement(log), log.coordinator)
    document["payloadType"] = "application/json"

    with pytest.raises(ValueError, match="payloadType"):
        open_envelope(document, log.coordinator.public)


def test_open_envelope_refuses_signature_by_other_key(log: Log) -> None:
    other = SigningKey.generate()
    document = envelope(_model_statement(log), other)

    with pytest.raises(ValueError, match="no signature by the given key"):
        open_envelope(document, log.coordinator.public)
    document["signatures"][0]["keyid"] = log.coordinator.key_id  # relabelled
    with pytest.raises(SignatureError):
        open_envelope(document, log.coordinator.public)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_canonical_json_rejects_non_finite_floats(value: float) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical_json({"loss": [1.0, value]})


def test_canonical_json_sorts_keys_without_whitespace_in_utf8() -> None:
    assert canonical_json({"b": 1, "a": [0.1, "é"]}) == '{"a":[0.1,"é"],"b":1}'.encode()
