"""Typed provenance records: one frozen model per record body, and `parse_record`.

A log line of kind "record" is ``{"index", "type", "body", "key_id", "signature"}``
(`log.py`); tree heads are not records (they are not Merkle leaves) and have no type
here. The types, and the body each one carries:

=================  ==========================================================
``job_started``    `JobStarted`: the spec, seed and environment a job ran with
``job_resumed``    `JobResumed`: a restarted coordinator went on after a round
``institution_key``  `InstitutionKey`: a site key, before the first update it signs
``institution_key_changed``  `InstitutionKeyChanged`: the operator replaced the
                   update-signing key pinned for an institution (`coordinator
                   replace-signing-key`)
``round``          `Round`: one federated round's updates and aggregate
``outer_step``     `OuterStep`: one pretraining outer step's workers and digests
``job_completed``  `JobCompleted`: the final model (digest, file name, file sha256)
=================  ==========================================================

Compatibility rules, so every log ever written stays readable:

* Old names: pretraining jobs used to end with ``job_finished`` (its model digest in
  ``model_digest``); it is read as `JobCompleted` (digest in ``final_model_digest``,
  kind "pretrain"). New logs write ``job_completed`` for both kinds.
* Fields an older writer did not write take their defaults (e.g. a federated
  ``job_started`` without ``kind`` is "federated").
* Fields a newer writer adds are kept (``extra="allow"``), so an older reader loses
  nothing it could not read anyway.
* A type this code does not know is read as `UnknownRecord` (its type name and raw
  body): `verify_log` still checks its signature and place in the Merkle tree, and
  readers that look for particular types skip it. A log written by newer code
  therefore verifies with older code.

A body serialises to exactly the fields its writer set (`body()` uses
``exclude_unset``): a writer that sets today's fields signs today's bytes, and
``parse_body(t, b).body() == b`` for every body written with known fields. Signatures
are always checked over the raw logged body, never over a re-serialised one, so a
default filled in on reading can never break a signature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

JobKind = Literal["federated", "pretrain"]


class RecordType(StrEnum):
    JOB_STARTED = "job_started"
    JOB_RESUMED = "job_resumed"
    INSTITUTION_KEY = "institution_key"
    INSTITUTION_KEY_CHANGED = "institution_key_changed"
    ROUND = "round"
    OUTER_STEP = "outer_step"
    JOB_COMPLETED = "job_completed"


# Names older writers used for a type that has a new name since.
LEGACY_NAMES: dict[str, RecordType] = {"job_finished": RecordType.JOB_COMPLETED}


class _Body(BaseModel):
    """A record body: frozen, unknown fields kept, serialised as written."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())
    TYPE: ClassVar[RecordType]

    def body(self) -> dict[str, Any]:
        """The body as signed and logged: the fields that were set, nothing filled in."""
        return self.model_dump(mode="json", exclude_unset=True)


class _Nested(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())


class _JobBody(_Body):
    job_id: str


class JobStarted(_JobBody):
    """Federated jobs write strategy, model, workload, init_from and initial_model_digest;
    pretraining jobs write spec_digest."""

    TYPE: ClassVar[RecordType] = RecordType.JOB_STARTED
    kind: JobKind = "federated"  # the first federated writers did not write it
    spec: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    environment: dict[str, Any] = Field(default_factory=dict)
    spec_digest: str | None = None
    strategy: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    # Where the workload's code came from (consortium.workloads.WorkloadSource); logs
    # written before workloads existed have none.
    workload: dict[str, str] | None = None
    init_from: dict[str, Any] | None = None  # {"job_id", "model_digest"} of the source
    initial_model_digest: str | None = None


class JobResumed(_JobBody):
    TYPE: ClassVar[RecordType] = RecordType.JOB_RESUMED
    after_round: int
    kind: JobKind = "federated"  # federated writers did not write it before
    model_digest: str | None = None  # the model the run resumed from (federated)


class KeyBinding(_Nested):
    """The institution's own proof that an update-signing key is its: a signature by the
    key of its TLS certificate (the CSR's key) over the binding statement
    (`consortium/provenance/binding.py`), with that certificate."""

    certificate: str  # PEM of the institution's TLS certificate, issued by the CA
    signature: str  # base64 of the DER ECDSA (P-256, SHA-256) signature


class InstitutionKey(_Body):
    """Not tied to a job: written when the operator onboards the institution, with the
    institution's binding; older writers logged it, unbound, before the first update
    it signed."""

    TYPE: ClassVar[RecordType] = RecordType.INSTITUTION_KEY
    institution: str
    key_id: str
    public_key: str  # base64 of the raw Ed25519 public key
    binding: KeyBinding | None = None  # None: written before keys were bound


class InstitutionKeyChanged(_Body):
    """An operator action: the institution's pinned update-signing keys were replaced by
    one new key; updates signed with a replaced key are refused from then on."""

    TYPE: ClassVar[RecordType] = RecordType.INSTITUTION_KEY_CHANGED
    institution: str
    key_id: str
    public_key: str  # base64 of the raw Ed25519 public key
    replaced_key_ids: list[str] = Field(default_factory=list)
    reason: str


class UpdateEntry(_Nested):
    """One reply of a round: an accepted, institution-signed update, or a refusal
    (institution, node, reason, detail only)."""

    institution: str = ""
    node_id: str = ""
    accepted: bool
    reason: str = ""
    detail: str | None = None
    key_id: str | None = None
    update_digest: str | None = None
    num_examples: int | None = None
    commitment: str | None = None
    data: dict[str, Any] | None = None
    nonce: str | None = None
    signature: str | None = None


class Aggregation(_Nested):
    """The aggregation rule of a round (`AggregationRule.describe()`)."""

    rule: str = "mean"
    trim_fraction: float = 0.1
    krum_byzantine: int = 0
    max_update_norm: float | None = None


class Round(_JobBody):
    TYPE: ClassVar[RecordType] = RecordType.ROUND
    round: int
    global_digest: str
    participants: list[str] = Field(default_factory=list)
    updates: list[UpdateEntry] = Field(default_factory=list)
    aggregation: Aggregation = Aggregation()
    aggregate_digest: str = ""  # "" when no update was accepted
    metrics: dict[str, Any] = Field(default_factory=dict)


class WorkerEntry(_Nested):
    """One worker's averaged contribution to an outer step."""

    worker: str
    institution: str
    node_id: str
    device: str
    position: int
    shard_ids: list[int]
    seed: int
    pseudo_gradient_digest: str
    inner_steps: int
    tokens: int = 0
    compute_s: float = 0.0


class OuterStep(_JobBody):
    TYPE: ClassVar[RecordType] = RecordType.OUTER_STEP
    round: int  # step + 1: rounds are 1-based
    step: int
    workers: list[WorkerEntry]
    workers_lost: dict[str, str] = Field(default_factory=dict)
    step_seed: int
    aggregate_digest: str
    model_digest: str
    val_loss: float | None = None
    attempts: int = 1
    # Spot checks: workers the coordinator re-executed and matched, and those that did
    # not match (worker -> node id; dropped from the step and barred from the job).
    verified: list[str] = Field(default_factory=list)
    verification_failed: dict[str, str] = Field(default_factory=dict)


class JobCompleted(_JobBody):
    """Both kinds: the final model's digest, file name and file sha256. Pretraining
    adds the corpus digest and validation loss."""

    TYPE: ClassVar[RecordType] = RecordType.JOB_COMPLETED
    kind: JobKind = "federated"  # federated writers did not write it before
    final_model_digest: str
    rounds: int | None = None  # old pretraining records (job_finished) have none
    model_file: str | None = None  # likewise
    model_file_sha256: str | None = None
    corpus_digest: str | None = None
    val_loss: float | None = None


@dataclass(frozen=True)
class UnknownRecord:
    """A record of a type this code does not know (written by newer code)."""

    type: str
    body: Mapping[str, Any]

    @property
    def job_id(self) -> str | None:
        job_id = self.body.get("job_id")
        return job_id if isinstance(job_id, str) else None


KnownRecord = (
    JobStarted
    | JobResumed
    | InstitutionKey
    | InstitutionKeyChanged
    | Round
    | OuterStep
    | JobCompleted
)
Record = KnownRecord | UnknownRecord

_MODELS: dict[RecordType, type[KnownRecord]] = {
    model.TYPE: model
    for model in (
        JobStarted,
        JobResumed,
        InstitutionKey,
        InstitutionKeyChanged,
        Round,
        OuterStep,
        JobCompleted,
    )
}


def record_type(type_: str) -> RecordType | None:
    """The type a logged type name stands for (legacy names included), or None."""
    if type_ in LEGACY_NAMES:
        return LEGACY_NAMES[type_]
    try:
        return RecordType(type_)
    except ValueError:
        return None


def _upgrade(type_: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """An old body in today's field names."""
    if type_ == "job_finished":
        upgraded = {"kind": "pretrain", **body}
        if "model_digest" in upgraded:
            upgraded["final_model_digest"] = upgraded.pop("model_digest")
        return upgraded
    return dict(body)


def parse_body(type_: str, body: Mapping[str, Any]) -> Record:
    """The typed record of one logged (type, body); raises ValueError (pydantic's
    ValidationError is one) when a known type's body is malformed."""
    known = record_type(type_)
    if known is None:
        return UnknownRecord(type_, dict(body))
    if not isinstance(body, Mapping):
        raise ValueError(f"the body of a {type_} record is not an object")
    return _MODELS[known].model_validate(_upgrade(type_, body))


def parse_record(entry: Mapping[str, Any]) -> Record:
    """The typed record of a log line of kind "record" (``{"type", "body", ...}``)."""
    return parse_body(str(entry["type"]), entry["body"])


def type_name(record: Record) -> str:
    """The record's type as logged today (an unknown record keeps its own name)."""
    return record.type if isinstance(record, UnknownRecord) else str(record.TYPE)


def record_job_id(record: Record) -> str | None:
    """The job a record belongs to (institution keys belong to none)."""
    if isinstance(record, InstitutionKey | InstitutionKeyChanged):
        return None
    return record.job_id
