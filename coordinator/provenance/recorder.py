"""`JobRecorder`: the one writer of a job's provenance records, for both job kinds.

Federated jobs (the ServerApp's `JobRun`) and pretraining jobs (`StepRecorder`) both
write through it, so a record type has one shape whoever writes it (`consortium/
provenance/records.py`), and the end of every job is `job_completed` with the model
file's name and sha256.

When tree heads are published: after job_started, job_resumed, each round, each outer
step and job_completed, so a killed coordinator leaves at most the records of the step
in progress uncovered. An institution key is not followed by its own tree head: the
round whose update it verifies comes next and publishes one over both.

Only one process runs a job (and so writes its records) at a time; `ProvenanceLog`
locks the file for each append.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from consortium.provenance.log import ProvenanceLog, TreeHead
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


class JobRecorder:
    """Appends one job's typed records to the data dir's log, signed with its key."""

    def __init__(self, data_dir: DataDir, job_id: str) -> None:
        self.job_id = job_id
        self.log = ProvenanceLog(data_dir.provenance_log, SigningKey.load(data_dir.signing_key))
        self._logged_keys = self.log.logged_key_ids()

    def _append(self, record: KnownRecord, tree_head: bool = True) -> int:
        job_id = getattr(record, "job_id", self.job_id)
        if job_id != self.job_id:
            raise ValueError(f"a record of job {job_id} given to job {self.job_id}'s recorder")
        index = self.log.append_record(record)
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
        when it was already logged. No tree head: the round that follows publishes it."""
        if key_id in self._logged_keys:
            return False
        record = InstitutionKey(institution=institution, key_id=key_id, public_key=b64(public_key))
        self._append(record, tree_head=False)
        self._logged_keys.add(key_id)
        return True

    def round(self, record: Round) -> int:
        return self._append(record)

    def outer_step(self, record: OuterStep) -> int:
        return self._append(record)

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
