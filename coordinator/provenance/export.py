"""Build a job's self-contained attestation from the coordinator's (verified) log.

What goes in, and why, is `consortium/provenance/attestation.py`'s docstring. The head
the attestation proves into is the latest head covering the job's final record that
sites cosigned (for a federated job: the head its sites cosigned when it ended), or,
when none is cosigned yet (a pretraining job before the next federated round), the
log's latest head. Checkpoints named at export (already read and signature-checked by
the caller) are carried with a consistency proof between each and that head.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consortium.errors import ConflictError, NotFoundError
from consortium.provenance.attestation import summary
from consortium.provenance.checkpoint import Checkpoint, origin_of
from consortium.provenance.environment import (
    PACKAGES,
    installed_packages,
    packages_digest,
    source_digest,
    write_source_archive,
)
from consortium.provenance.log import COSIGNATURE, RECORD, TREE_HEAD, read_lines
from consortium.provenance.merkle import MerkleTree, leaf_hash
from consortium.provenance.records import (
    InstitutionKey,
    InstitutionKeyChanged,
    JobCompleted,
    Record,
    Round,
    parse_record,
    record_job_id,
)


@dataclass(frozen=True)
class Attestation:
    subject_name: str
    subject_sha256: str
    predicate: dict[str, Any]


def reproduction(environment: dict[str, Any]) -> dict[str, Any]:
    """How to get the code and packages the job ran with: the installed source's digest
    and the sha256 of its deterministic archive (`coordinator provenance source JOB`
    writes it), the package lock, and the git commit when the code is a checkout. Only
    when this installation is the job's (same source and package digests as logged)."""
    code = environment.get("code", {})
    packages = installed_packages()
    here = source_digest()
    if here != code.get("source_digest") or packages_digest(packages) != environment.get(
        "installed_packages_digest"
    ):
        return {
            "available": False,
            "reason": "exported where the installed code or packages differ from the "
            "job's: export on the coordinator that ran it",
        }
    with tempfile.TemporaryDirectory() as scratch:
        archive_sha256 = write_source_archive(Path(scratch) / "source.tar")
    return {
        "available": True,
        "source_digest": here,
        "source_archive_sha256": archive_sha256,
        "packages": packages,
        **git_checkout(),
    }


def git_checkout() -> dict[str, Any]:
    """The commit of the checkout the packages are installed from, if any, and whether
    their files differ from it."""
    root = Path(__import__(PACKAGES[0]).__file__ or "").parent.parent
    if not (root / ".git").exists():
        return {}
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", *PACKAGES],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(dirty)}


def build_attestation(
    log_path: Path,
    job_id: str,
    coordinator_key_id: str,
    certificate_pem: str,
    checkpoints: Sequence[tuple[str, Checkpoint]] = (),
) -> Attestation:
    tree = MerkleTree()
    lines: list[bytes] = []  # record lines by index
    records: list[Record] = []
    heads: list[dict[str, Any]] = []
    cosignatures: list[dict[str, Any]] = []
    for raw in read_lines(log_path):
        entry = json.loads(raw)
        if entry.get("kind") == RECORD:
            tree.append(leaf_hash(raw))
            lines.append(raw)
            records.append(parse_record(entry))
        elif entry.get("kind") == TREE_HEAD:
            heads.append(entry)
        elif entry.get("kind") == COSIGNATURE:
            cosignatures.append(entry)
    mine = [i for i, record in enumerate(records) if record_job_id(record) == job_id]
    final = [i for i in mine if isinstance(records[i], JobCompleted)]
    if not final:
        raise NotFoundError(f"job {job_id} has not completed; nothing to attest")
    completed = records[final[-1]]
    assert isinstance(completed, JobCompleted)
    if completed.model_file is None or completed.model_file_sha256 is None:
        raise NotFoundError(
            f"job {job_id}'s final record (written by an older version) names no model "
            "file; nothing to attest"
        )
    head = _head_for(heads, cosignatures, final[-1])
    size = int(head["tree_size"])
    head_cosignatures = [
        c
        for c in cosignatures
        if (c["tree_size"], c["root_hash"]) == (head["tree_size"], head["root_hash"])
    ]
    # Whose keys the entries carry: whoever cosigned the head or a carried checkpoint,
    # or signed an accepted update of the job.
    cosigned = {(c.tree_size, c.root_hash) for _, c in checkpoints} | {
        (head["tree_size"], head["root_hash"])
    }
    signers = {
        c["institution"] for c in cosignatures if (c["tree_size"], c["root_hash"]) in cosigned
    }
    for i in mine:
        record = records[i]
        if isinstance(record, Round):
            signers |= {u.institution for u in record.updates if u.accepted}
    keys = [
        i
        for i, record in enumerate(records[:size])
        if isinstance(record, InstitutionKey | InstitutionKeyChanged)
        and record.institution in signers
    ]
    entries = [
        {
            "index": i,
            "line": lines[i].decode(),
            "inclusion_proof": [node.hex() for node in tree.inclusion_proof(i, size)],
        }
        for i in sorted({*keys, *mine})
    ]
    described = summary([records[i] for i in mine])
    predicate = {
        "job_id": job_id,
        **described,
        "reproduction": reproduction(described["environment"]),
        "log": {
            "origin": origin_of(coordinator_key_id),
            "tree_head": head,
            "cosignatures": head_cosignatures,
            "entries": entries,
            **_carried_checkpoints(tree, size, checkpoints),
        },
        "coordinator": {"key_id": coordinator_key_id, "certificate": certificate_pem},
    }
    return Attestation(completed.model_file, completed.model_file_sha256, predicate)


def _head_for(
    heads: list[dict[str, Any]], cosignatures: list[dict[str, Any]], index: int
) -> dict[str, Any]:
    covering = [h for h in heads if int(h["tree_size"]) > index]
    if not covering:
        raise NotFoundError(f"no signed tree head covers record {index} yet")
    cosigned = {(c["tree_size"], c["root_hash"]) for c in cosignatures}
    witnessed = [h for h in covering if (h["tree_size"], h["root_hash"]) in cosigned]
    return witnessed[-1] if witnessed else covering[-1]


def _carried_checkpoints(
    tree: MerkleTree, head_size: int, checkpoints: Sequence[tuple[str, Checkpoint]]
) -> dict[str, Any]:
    """``log.checkpoints``: each published checkpoint (its signed note as published) with
    the consistency proof between it and the head of size `head_size`."""
    carried = []
    for text, checkpoint in checkpoints:
        size = checkpoint.tree_size
        if size > tree.size or tree.root(size).hex() != checkpoint.root_hash:
            raise ConflictError(
                f"the checkpoint of tree size {size} (root {checkpoint.root_hash[:16]}) is not "
                f"a head of this log ({tree.size} records): it publishes another history"
            )
        if size == 0:
            raise ConflictError("a checkpoint of the empty log proves nothing")
        proof = tree.consistency_proof(*sorted((size, head_size)))
        carried.append({"checkpoint": text, "consistency_proof": [node.hex() for node in proof]})
    return {"checkpoints": carried} if carried else {}
