"""`JobRecorder`: the one writer of a job's provenance records, for both job kinds.

Federated jobs (the ServerApp's `JobRun`) and pretraining jobs (`StepRecorder`) both
write through it, so a record type has one shape whoever writes it (`consortium/
provenance/records.py`), and the end of every job is `job_completed` with the model
file's name and sha256.

Sites' cosignatures of tree heads (`coordinator/provenance/witnessing.py`) are written
through it too, as lines that are not leaves.

When tree heads are published: after job_started, job_resumed, each round, each outer
step and job_completed, so a killed coordinator leaves at most the records of the step
in progress uncovered. An institution key is not followed by its own tree head: the
round whose update it verifies comes next and publishes one over both.

Exactly once: the log is where a job's round is committed. Every append runs the
recorder's `fence` under the log's lock (a federated run checks there that the job is
still its own: `RunningJob.ensure_current`), and a round is appended only when it is
the next one of its job, so a stale run's late write and a round written twice are
both refused (`CommitRefusedError`) and nothing of them is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from consortium.errors import CommitRefusedError
from consortium.provenance.log import (
    Precondition,
    ProvenanceLog,
    TreeHead,
    WitnessCosignature,
    records_of,
)
from consortium.provenance.records import (
    InstitutionKey,
    JobCompleted,
    JobKind,
    JobResumed,
    JobStarted,
    KnownRecord,
    OuterStep,
    Round,
)
from consortium.provenance.signing import SigningKey, b64
from consortium.tensor_digest import file_digest
from coordinator.data_dir import DataDir

STALE_RUN = "stale_run"
DUPLICATE_ROUND = "duplicate_round"
COMMIT_REFUSAL_REASONS = (STALE_RUN, DUPLICATE_ROUND)


def rounds_of(records: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    """The bodies of `job_id`'s round records among parsed log records, in order."""
    return [
        entry["body"]
        for entry in records
        if entry.get("type") == Round.TYPE and entry["body"].get("job_id") == job_id
    ]


def logged_steps(records: list[dict[str, Any]], job_id: str) -> set[int]:
    """The outer steps of `job_id` among parsed log records."""
    return {
        int(entry["body"]["step"])
        for entry in records
        if entry.get("type") == OuterStep.TYPE and entry["body"].get("job_id") == job_id
    }


def last_round(records: list[dict[str, Any]], job_id: str) -> int:
    """The highest round of `job_id` among parsed log records (0: none yet)."""
    return max((int(body["round"]) for body in rounds_of(records, job_id)), default=0)


class JobRecorder:
    """Appends one job's typed records to the data dir's log, signed with its key."""

    def __init__(
        self, data_dir: DataDir, job_id: str, fence: Callable[[], None] | None = None
    ) -> None:
        self.job_id = job_id
        self.log = ProvenanceLog(data_dir.provenance_log, SigningKey.load(data_dir.signing_key))
        self._logged_keys = self.log.logged_key_ids()
        self._fence = fence or (lambda: None)  # raises CommitRefusedError to refuse

    def last_round(self) -> int:
        """The job's last committed round (0: none)."""
        return last_round(records_of(self.log.path), self.job_id)

    def logged_rounds(self) -> list[dict[str, Any]]:
        """The bodies of the job's round records, in log order."""
        return rounds_of(records_of(self.log.path), self.job_id)

    def has_started(self) -> bool:
        """Whether the job's `job_started` is in the log (a run before this one began it)."""
        return any(
            entry.get("type") == JobStarted.TYPE and entry["body"].get("job_id") == self.job_id
            for entry in records_of(self.log.path)
        )

    def _append(
        self, record: KnownRecord, tree_head: bool = True, check: Precondition | None = None
    ) -> int:
        job_id = getattr(record, "job_id", self.job_id)
        if job_id != self.job_id:
            raise ValueError(f"a record of job {job_id} given to job {self.job_id}'s recorder")

        def precondition(records: list[dict[str, Any]]) -> None:
            self._fence()
            if check is not None:
                check(records)

        index = self.log.append_record(record, precondition)
        if tree_head:
            self.log.publish_tree_head()
        return index

    def job_started(self, record: JobStarted) -> int:
        """The kinds write different fields (see `JobStarted`), so the caller builds it."""
        return self._append(record)

    def job_resumed(self, kind: JobKind, after_round: int, model_digest: str | None = None) -> int:
        fields: dict[str, Any] = {"job_id": self.job_id, "after_round": after_round, "kind": kind}
        if model_digest is not None:
            fields["model_digest"] = model_digest
        return self._append(JobResumed.model_validate(fields))

    def institution_key(self, institution: str, key_id: str, public_key: bytes) -> bool:
        """Log a site key once per log (before the round it signed an update of); False
        when it was already logged. Onboarding logs every key with the institution's
        binding; this unbound record is for keys that entered another way (a plain-text
        coordinator's nodes register their own). No tree head: the round that follows
        publishes it."""
        if key_id in self._logged_keys or key_id in self.log.logged_key_ids():
            # Onboarding logs a bound key, maybe after this run started.
            self._logged_keys.add(key_id)
            return False
        record = InstitutionKey(institution=institution, key_id=key_id, public_key=b64(public_key))
        self._append(record, tree_head=False)
        self._logged_keys.add(key_id)
        return True

    def round(self, record: Round) -> int:
        """Commit a round: refused unless it is past the job's last logged round."""

        def past_the_last(records: list[dict[str, Any]]) -> None:
            # Past, not next: a round that aggregated nothing logs no record.
            last = last_round(records, self.job_id)
            if record.round <= last:
                raise CommitRefusedError(
                    DUPLICATE_ROUND,
                    f"round {record.round} of job {self.job_id} is already committed "
                    f"(the log's last is round {last})",
                )

        return self._append(record, check=past_the_last)

    def outer_step(self, record: OuterStep) -> int:
        """Commit an outer step: refused when the job's log already holds it."""

        def not_logged_yet(records: list[dict[str, Any]]) -> None:
            if record.step in logged_steps(records, self.job_id):
                raise CommitRefusedError(
                    DUPLICATE_ROUND,
                    f"outer step {record.step} of job {self.job_id} is already logged",
                )

        return self._append(record, check=not_logged_yet)

    def logged_outer_steps(self) -> set[int]:
        return logged_steps(records_of(self.log.path), self.job_id)

    def job_completed(
        self,
        kind: JobKind,
        rounds: int,
        final_model_digest: str,
        model_path: Path,
        corpus_digest: str | None = None,
        val_loss: float | None = None,
    ) -> int:
        """The final record of either kind, naming and hashing the saved model file
        (so call it after saving). Pretraining adds its corpus digest and val loss."""
        fields: dict[str, Any] = {
            "job_id": self.job_id,
            "kind": kind,
            "rounds": rounds,
            "final_model_digest": final_model_digest,
            "model_file": model_path.name,
            "model_file_sha256": file_digest(str(model_path)),
        }
        if kind == "pretrain":
            fields["corpus_digest"] = corpus_digest
            fields["val_loss"] = val_loss
        return self._append(JobCompleted.model_validate(fields))

    def publish_tree_head(self) -> TreeHead:
        return self.log.publish_tree_head()

    @property
    def coordinator_key_id(self) -> str:
        return self.log.key_id

    def cosignatures(self, cosignatures: list[WitnessCosignature]) -> int:
        """Record sites' checked cosignatures of heads in the log (under the fence: a
        stale run records none). Not leaves: the tree, and its heads, stay as they are."""

        def fenced(records: list[dict[str, Any]]) -> None:
            self._fence()

        return self.log.append_cosignatures(cosignatures, fenced)
