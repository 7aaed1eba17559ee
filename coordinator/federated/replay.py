"""Replay a federated job's aggregation from the log and the retained updates.

(Pretraining jobs are replayed by re-running their training: `pretrain_replay.py`;
`job_kind` tells which a job is.)

For every round record: load each accepted update from retention, check its
digest against the one the institution signed, aggregate again with the rule
the log names, and compare the aggregate's digest bit for bit. Training
itself is not re-run for federated jobs: it happened on private data at the
sites, which is exactly what never leaves them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from consortium.errors import ConflictError, ConsortiumError, NotFoundError
from consortium.exit_codes import ExitCode
from consortium.provenance.environment import source_digest
from consortium.provenance.records import JobStarted, Record, Round
from consortium.tensor_digest import arrays_digest
from coordinator.federated.retention import load_retained, updates_dir
from coordinator.federated.strategy import AggregationRule, aggregate
from coordinator.jobs.spec import FederatedJobSpec


class ReplayMismatchError(ConsortiumError):
    exit_code = ExitCode.REPLAY_MISMATCH


# What `arrays_digest` writes. A logged update digest names its retained file, so only
# this form may become a file name: the log is the input being checked, and a digest
# such as "/elsewhere/x" or "../../x" would have replay open files outside the dir.
_DIGEST = re.compile(r"[0-9a-f]{64}")
# The rules a job can name. `aggregate` takes any other name for the mean, so a round
# logged with a rule this code lacks would otherwise "reproduce" as a mean.
RULES = frozenset(get_args(FederatedJobSpec.model_fields["aggregation"].annotation))


def job_started(records: Sequence[Record]) -> JobStarted | None:
    """The job's `job_started` record, or None when the log holds none."""
    return next((r for r in records if isinstance(r, JobStarted)), None)


def job_kind(records: Sequence[Record]) -> str:
    """The kind the job's `job_started` record names ("federated" when none does)."""
    started = job_started(records)
    return started.kind if started is not None else "federated"


@dataclass(frozen=True)
class RoundReplay:
    round: int
    updates: int
    logged_digest: str
    replayed_digest: str

    @property
    def matches(self) -> bool:
        return self.logged_digest == self.replayed_digest


def replay_rounds(data_dir: Path, job_id: str, records: Sequence[Record]) -> list[RoundReplay]:
    """`records` are the job's verified log records; raises ReplayMismatchError
    naming the first round that does not reproduce."""
    rounds = [r for r in records if isinstance(r, Round) and r.aggregate_digest]
    if not rounds:
        raise NotFoundError(f"the log holds no aggregated round of job {job_id}")
    results = []
    for record in rounds:
        spec = record.aggregation
        if spec.rule not in RULES:
            raise ConflictError(
                f"round {record.round} names aggregation rule {spec.rule[:80]!r}, which this "
                f"code does not have ({', '.join(sorted(RULES))}); it cannot replay it"
            )
        accepted = [u for u in record.updates if u.accepted]
        updates = []
        for update in accepted:
            digest = update.update_digest or ""
            if not _DIGEST.fullmatch(digest):
                raise ReplayMismatchError(
                    f"round {record.round}: the update of {update.institution} names "
                    f"{digest[:80]!r} as its digest, not a sha256 (64 hex digits), so it "
                    "names no retained update"
                )
            path = updates_dir(data_dir, job_id, record.round) / f"{digest}.safetensors"
            if not path.exists():
                raise ReplayMismatchError(
                    f"round {record.round}: retained update {path} is missing"
                )
            arrays = load_retained(path)
            if arrays_digest(arrays) != update.update_digest:
                raise ReplayMismatchError(
                    f"round {record.round}: retained update of {update.institution} "
                    "does not match the digest it signed (tampered or corrupt)"
                )
            updates.append((arrays, int(update.num_examples or 0)))
        rule = AggregationRule(
            name=spec.rule,
            trim_fraction=spec.trim_fraction,
            krum_byzantine=spec.krum_byzantine,
            max_update_norm=spec.max_update_norm,
        )
        reference = updates[0][0]
        replayed = arrays_digest(aggregate(rule, reference, updates))
        result = RoundReplay(record.round, len(updates), record.aggregate_digest, replayed)
        if not result.matches:
            raise ReplayMismatchError(
                f"round {record.round}: aggregate digest {replayed[:16]} differs from the "
                f"logged {record.aggregate_digest[:16]}{_source_note(records)}"
            )
        results.append(result)
    return results


def _source_note(records: Sequence[Record]) -> str:
    """Why a mismatch may not mean tampering: the job ran other Consortium code, whose
    aggregation may round differently (docs/aggregation.md says what changed when)."""
    started = job_started(records)
    environment = started.environment if started is not None else {}
    logged = environment.get("code", {}).get("source_digest")
    if logged is None or logged == source_digest():
        return ""
    version = environment["code"].get("version", "another version")
    return (
        f"; note that the job ran other Consortium code ({version}, source digest "
        f"{logged[:16]}), so replay it with that code to tell tampering from a change in "
        "the aggregation method"
    )
