"""Self-contained attestations: a job's model, checkable offline with only the CA.

`coordinator provenance export JOB` writes an in-toto Statement v1 in a DSSE envelope
signed by the coordinator's provenance key (`intoto.py`). Its subject is the model file
(name, sha256); its predicate (`PREDICATE_TYPE`) carries everything needed to check
it without the log or the coordinator:

* ``coordinator``: the key id and the X.509 certificate of the provenance signing key,
  issued by the consortium CA (so a reviewer who trusts the CA certificate trusts
  the key);
* ``log.tree_head``: a signed, chained tree head of the log, and ``log.cosignatures``:
  the sites' cosignatures of it (C2SP cosignature/v1, `checkpoint.py`);
* ``log.entries``: the job's records, exactly as logged (each line's text), with an
  RFC 9162 inclusion proof into that head: `job_started` (spec, model configuration,
  environment), every round or outer step (participants, update digests, key ids,
  data commitments, institution signatures), `job_completed` (the model file's sha256),
  and the `institution_key` / `institution_key_changed` records of every institution
  that signed an update of the job or cosigned the head (with their bindings);
* ``log.checkpoints`` (when exported with ``--checkpoint``): published checkpoints
  (C2SP signed notes, `coordinator provenance publish`), each with an RFC 9162
  consistency proof between it and the tree head, so a reviewer who holds one of those
  checkpoints (from a site, an archive, another reviewer) learns that the attestation's
  log is the very log it publishes, not a fork shown to them alone;
* a readable summary (``job_id``, ``kind``, ``model``, ``workload``, ``rounds``, ...)
  derived from those entries; a verifier derives it again and refuses a summary that
  differs;
* ``reproduction``: the package lock and the source digest (checked against the job's
  logged environment), the sha256 of the deterministic source archive that
  `coordinator provenance source JOB` writes, and the git commit when there is one.

`verify_attestation` checks all of it: the envelope's signature with the certified
key (DSSE's leniency: standard or URL-safe, padded or not, base64; a signature without
keyid is tried), the certificate against the CA, the head's signature, each entry's
signature and inclusion proof, the job's history (`semantics.py`), each accepted
update's signature with the key bound to its institution, each cosignature, and that
the final record names the subject; then each carried checkpoint (its signatures and
its consistency proof), and that every checkpoint the reviewer holds is the head or a
carried checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from consortium.pki import check_signing_key_certificate
from consortium.provenance import intoto
from consortium.provenance.canonical import canonical_json
from consortium.provenance.checkpoint import (
    CheckpointError,
    ReadNote,
    checkpoint_body,
    note_tree_size,
    origin_of,
    read_signed_note,
    verify_cosignature,
)
from consortium.provenance.environment import packages_digest
from consortium.provenance.intoto import STATEMENT_TYPE, lenient_b64
from consortium.provenance.keyring import Keyring
from consortium.provenance.log import (
    COSIGNATURE_FIELDS,
    LEGACY_HEAD_FIELDS,
    RECORD,
    TREE_HEAD,
    head_signing_bytes,
    record_signing_bytes,
)
from consortium.provenance.merkle import (
    ProofError,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from consortium.provenance.records import (
    InstitutionKey,
    InstitutionKeyChanged,
    JobCompleted,
    JobStarted,
    OuterStep,
    Record,
    Round,
    parse_record,
    record_job_id,
)
from consortium.provenance.semantics import JobHistory
from consortium.provenance.signing import SignatureError, VerifyingKey, unb64
from consortium.provenance.updates import UpdateStatement

PREDICATE_TYPE = "https://consortium.dev/provenance/job/v2"


class AttestationError(ValueError):
    """The attestation does not verify; the message says which part and why."""


@dataclass
class AttestationReport:
    job_id: str
    kind: str
    subject: str
    sha256: str
    tree_size: int
    root_hash: str
    rounds: int
    witnesses: list[str]
    records: list[Record] = field(default_factory=list)  # the job's, in log order
    # Published checkpoints the head is proven consistent with: (tree size, witnesses).
    checkpoints: list[tuple[int, list[str]]] = field(default_factory=list)


def summary(records: list[Record]) -> dict[str, Any]:
    """The readable part of the predicate, derived from the job's records."""
    started = next((r for r in records if isinstance(r, JobStarted)), None)
    completed = next((r for r in records if isinstance(r, JobCompleted)), None)
    rounds: list[dict[str, Any]] = []
    for record in records:
        if isinstance(record, Round):
            rounds.append(
                {
                    "round": record.round,
                    "global_digest": record.global_digest,
                    "aggregate_digest": record.aggregate_digest,
                    "participants": record.participants,
                    "updates": [
                        {
                            "institution": u.institution,
                            "key_id": u.key_id,
                            "update_digest": u.update_digest,
                            "num_examples": u.num_examples,
                            "commitment": u.commitment,
                        }
                        for u in record.updates
                        if u.accepted
                    ],
                    "metrics": record.metrics,
                }
            )
        elif isinstance(record, OuterStep):
            rounds.append(
                {
                    "round": record.round,
                    "aggregate_digest": record.aggregate_digest,
                    "model_digest": record.model_digest,
                    "workers": [
                        {
                            "institution": w.institution,
                            "worker": w.worker,
                            "pseudo_gradient_digest": w.pseudo_gradient_digest,
                            "shard_ids": w.shard_ids,
                            "seed": w.seed,
                        }
                        for w in record.workers
                    ],
                    "val_loss": record.val_loss,
                }
            )
    return {
        "kind": started.kind if started else "",
        "spec": started.spec if started else {},
        "model": (started.model if started and started.model else None),
        # Where a federated job's workload code came from (absent before workloads).
        **({"workload": started.workload} if started and started.workload else {}),
        "environment": started.environment if started else {},
        "initial_model_digest": started.initial_model_digest if started else None,
        "final_model_digest": completed.final_model_digest if completed else None,
        "rounds": rounds,
    }


def open_envelope(document: dict[str, Any], key: VerifyingKey) -> dict[str, Any]:
    """The statement, once a signature by `key` verifies (DSSE-lenient, `intoto.py`)."""
    try:
        return intoto.open_envelope(document, key)
    except (ValueError, SignatureError) as err:
        raise AttestationError(f"the envelope: {err}") from None


def verify_attestation(
    document: dict[str, Any], ca: x509.Certificate, checkpoints: Sequence[str] = ()
) -> AttestationReport:
    """Check an exported attestation with nothing but the consortium's CA certificate;
    with `checkpoints` (signed notes the reviewer obtained elsewhere), also that the
    attestation's log is the one each of them publishes."""
    predicate_hint = _peek(document)
    key = _certified_key(predicate_hint, ca)
    predicate, subject_name, subject_sha = _statement(document, key, predicate_hint)
    log = predicate["log"]
    head = _checked_head(log["tree_head"], key)
    records = _checked_entries(log["entries"], head, key)
    job_id = str(predicate["job_id"])
    job_records = [r for r in records if record_job_id(r) == job_id]
    keyring, history = _checked_history(records, job_id, ca)
    completed = [r for r in job_records if isinstance(r, JobCompleted)]
    if not completed or not history.completed:
        raise AttestationError(f"the attestation holds no job_completed record of job {job_id}")
    final = completed[-1]
    if final.model_file != subject_name or final.model_file_sha256 != subject_sha:
        raise AttestationError(
            f"the subject {subject_name} ({subject_sha[:16]}) is not the model file the log "
            f"names ({final.model_file}, {str(final.model_file_sha256)[:16]})"
        )
    derived = summary(job_records)
    for name, value in derived.items():
        if predicate.get(name) != value:
            raise AttestationError(f"the predicate's {name!r} differs from the logged records")
    _check_reproduction(predicate.get("reproduction", {}), derived["environment"])
    witnesses = _checked_cosignatures(log.get("cosignatures", []), head, keyring, key)
    carried = _checked_checkpoints(log.get("checkpoints", []), head, keyring, key)
    for text in checkpoints:
        _check_held_checkpoint(text, head, carried, keyring, key)
    return AttestationReport(
        job_id=job_id,
        kind=str(derived["kind"]),
        subject=subject_name,
        sha256=subject_sha,
        tree_size=int(head["tree_size"]),
        root_hash=str(head["root_hash"]),
        rounds=history.last_round,
        witnesses=witnesses,
        records=job_records,
        checkpoints=[(n.checkpoint.tree_size, n.witnesses) for n in carried.values()],
    )


def _statement(
    document: dict[str, Any], key: VerifyingKey, predicate_hint: dict[str, Any]
) -> tuple[dict[str, Any], str, str]:
    """The signed predicate and the subject's name and sha256."""
    statement = open_envelope(document, key)
    if statement.get("_type") != STATEMENT_TYPE:
        raise AttestationError(f"_type is {statement.get('_type')!r}, not in-toto Statement v1")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise AttestationError(f"predicateType is {statement.get('predicateType')!r}")
    predicate: dict[str, Any] = statement["predicate"]
    if predicate != predicate_hint:
        raise AttestationError("the signed predicate differs from the one read before")
    subjects = statement.get("subject", [])
    if len(subjects) != 1:
        raise AttestationError("the statement must name exactly one subject, the model file")
    digest = subjects[0].get("digest", {})
    return predicate, str(subjects[0].get("name", "")), str(digest.get("sha256", ""))


def _checked_history(
    records: list[Record], job_id: str, ca: x509.Certificate
) -> tuple[Keyring, JobHistory]:
    """The institution keys (bindings checked against `ca`) and the job's history, with
    every accepted update's signature checked."""
    keyring = Keyring(ca=ca)
    history = JobHistory(job_id)
    for record in records:
        try:
            if isinstance(record, InstitutionKey | InstitutionKeyChanged):
                keyring.add(record)
            elif record_job_id(record) == job_id:
                history.add(record)
                if isinstance(record, Round):
                    _check_updates(record, keyring)
        except ValueError as err:
            raise AttestationError(f"the job's records: {err}") from None
    return keyring, history


def _check_reproduction(reproduction: dict[str, Any], environment: dict[str, Any]) -> None:
    """The package lock and source digest named for reproduction are the job's own."""
    if not reproduction.get("available"):
        return
    if packages_digest(list(reproduction.get("packages", []))) != environment.get(
        "installed_packages_digest"
    ):
        raise AttestationError("the package lock is not the one the job's environment names")
    if reproduction.get("source_digest") != environment.get("code", {}).get("source_digest"):
        raise AttestationError("the source digest is not the one the job ran with")


def _peek(document: dict[str, Any]) -> dict[str, Any]:
    """The predicate, read before the signature is checked, only to find the key."""
    try:
        statement = json.loads(lenient_b64(str(document.get("payload", ""))))
        predicate: dict[str, Any] = statement["predicate"]
        return predicate
    except (ValueError, KeyError, TypeError):
        raise AttestationError("the envelope's payload is not an in-toto statement") from None


def _certified_key(predicate: dict[str, Any], ca: x509.Certificate) -> VerifyingKey:
    try:
        certificate = x509.load_pem_x509_certificate(
            str(predicate["coordinator"]["certificate"]).encode()
        )
        key = VerifyingKey(check_signing_key_certificate(certificate, ca))
    except (ValueError, KeyError, TypeError) as err:
        raise AttestationError(f"the coordinator's key certificate: {err}") from None
    if key.key_id != predicate["coordinator"].get("key_id"):
        raise AttestationError("the certificate is not of the key the attestation names")
    return key


def _checked_head(head: dict[str, Any], key: VerifyingKey) -> dict[str, Any]:
    if not isinstance(head, dict) or head.get("kind") != TREE_HEAD:
        raise AttestationError("log.tree_head is not a tree head")
    if set(head) == LEGACY_HEAD_FIELDS or head.get("key_id") != key.key_id:
        raise AttestationError("the tree head is not a chained head signed by the certified key")
    try:
        key.verify(unb64(str(head["signature"])), head_signing_bytes(head))
    except (SignatureError, KeyError):
        raise AttestationError("the tree head's signature does not verify") from None
    return head


def _checked_entries(
    entries: list[dict[str, Any]], head: dict[str, Any], key: VerifyingKey
) -> list[Record]:
    """Each entry: a canonical record line signed by `key`, included in `head`'s tree."""
    size, root = int(head["tree_size"]), bytes.fromhex(str(head["root_hash"]))
    records: list[Record] = []
    last_index = -1
    for entry in entries:
        line = str(entry["line"]).encode()
        try:
            parsed = json.loads(line)
            if canonical_json(parsed) != line:
                raise ValueError("not in canonical form")
            index = int(parsed["index"])
            if parsed.get("kind") != RECORD or index != entry["index"] or index <= last_index:
                raise ValueError("not a record at its index, in log order")
            if parsed.get("key_id") != key.key_id:
                raise ValueError("not signed by the certified key")
            key.verify(
                unb64(str(parsed["signature"])),
                record_signing_bytes(index, str(parsed["type"]), parsed["body"]),
            )
            proof = [bytes.fromhex(node) for node in entry["inclusion_proof"]]
            verify_inclusion(leaf_hash(line), index, size, proof, root)
            records.append(parse_record(parsed))
        except (ValueError, KeyError, TypeError, SignatureError, ProofError) as err:
            raise AttestationError(f"log entry {entry.get('index')!r}: {err}") from None
        last_index = index
    return records


def _check_updates(record: Round, keyring: Keyring) -> None:
    for update in record.updates:
        if not update.accepted:
            continue
        key = keyring.signer(update.institution, update.key_id or "", "the update")
        statement = UpdateStatement(
            job_id=record.job_id,
            round=record.round,
            global_digest=record.global_digest,
            update_digest=update.update_digest or "",
            num_examples=update.num_examples or 0,
            commitment=update.commitment or "",
            nonce=update.nonce or "",
            institution=update.institution,
        )
        try:
            key.verify(unb64(update.signature or ""), statement.to_bytes())
        except SignatureError as err:
            raise ValueError(f"the update of {update.institution!r}: {err}") from None


def _checked_cosignatures(
    cosignatures: list[dict[str, Any]],
    head: dict[str, Any],
    keyring: Keyring,
    key: VerifyingKey,
) -> list[str]:
    body = checkpoint_body(origin_of(key.key_id), int(head["tree_size"]), str(head["root_hash"]))
    witnesses: set[str] = set()
    for line in cosignatures:
        institution = str(line.get("institution", ""))
        try:
            if set(line) != COSIGNATURE_FIELDS:
                raise ValueError("not a cosignature line")
            if (line["tree_size"], line["root_hash"]) != (head["tree_size"], head["root_hash"]):
                raise ValueError("it cosigns another head")
            signer = keyring.cosigner(institution, str(line["key_id"]))
            verify_cosignature(signer, body, int(line["timestamp_s"]), unb64(line["signature"]))
        except (ValueError, SignatureError) as err:
            raise AttestationError(f"the cosignature of {institution!r}: {err}") from None
        witnesses.add(institution)
    return sorted(witnesses)


def _read_note(text: str, keyring: Keyring, key: VerifyingKey, what: str) -> ReadNote:
    try:
        return read_signed_note(text, key, keyring.witness_keys(note_tree_size(text)))
    except CheckpointError as err:
        raise AttestationError(f"{what}: {err}") from None


def _checked_checkpoints(
    carried: list[dict[str, Any]], head: dict[str, Any], keyring: Keyring, key: VerifyingKey
) -> dict[tuple[int, str], ReadNote]:
    """The carried checkpoints, each signed by `key` and proven consistent with `head`
    (whichever of the two is older must prefix the other), by (tree size, root)."""
    head_size, head_root = int(head["tree_size"]), bytes.fromhex(str(head["root_hash"]))
    found: dict[tuple[int, str], ReadNote] = {}
    for position, entry in enumerate(carried):
        what = f"log.checkpoints[{position}]"
        note = _read_note(str(entry.get("checkpoint", "")), keyring, key, what)
        size, root = note.checkpoint.tree_size, bytes.fromhex(note.checkpoint.root_hash)
        try:
            proof = [bytes.fromhex(node) for node in entry.get("consistency_proof", [])]
            if size <= head_size:
                verify_consistency(size, head_size, root, head_root, proof)
            else:
                verify_consistency(head_size, size, head_root, root, proof)
        except (ValueError, TypeError, ProofError) as err:
            raise AttestationError(
                f"{what} (tree size {size}) is not consistent with the tree head: {err}"
            ) from None
        found[(size, note.checkpoint.root_hash)] = note
    return found


def _check_held_checkpoint(
    text: str,
    head: dict[str, Any],
    carried: dict[tuple[int, str], ReadNote],
    keyring: Keyring,
    key: VerifyingKey,
) -> None:
    """A checkpoint the reviewer holds must be the attested head or a carried checkpoint;
    one of the same size as either with another root is a fork of the log."""
    checkpoint = _read_note(text, keyring, key, "the checkpoint").checkpoint
    proven = {(int(head["tree_size"]), str(head["root_hash"])), *carried}
    if (checkpoint.tree_size, checkpoint.root_hash) in proven:
        return
    if checkpoint.tree_size in {size for size, _ in proven}:
        raise AttestationError(
            f"the checkpoint publishes another log at tree size {checkpoint.tree_size} "
            f"(root {checkpoint.root_hash[:16]}) than the attestation proves into: the "
            "coordinator has shown two different histories (a fork)"
        )
    raise AttestationError(
        f"the attestation carries no consistency proof to the checkpoint (tree size "
        f"{checkpoint.tree_size}); export it again with --checkpoint naming that file"
    )
