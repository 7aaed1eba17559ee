"""Admission of a signed model update: who sent it, for what, and only once (every
reason it gives: `coordinator/federated/reasons.py`).

Every refusal has a reason that goes into the provenance log; none of them
touches the aggregate. The checks, in order: the reply is not an error, it is
signed, the key is registered to the institution it names, the signature covers
this job, round and global model, the weights are the ones signed, the example
count is the one signed, the metrics are finite numbers the ClientApp sends
(`ALLOWED_METRICS`), the example count is at most what the institution declared
when it joined, the site cosigned the log's head it was sent (`witnessing.py`:
"uncosigned", "bad_cosignature"), and the nonce was never used before in this job.

A metric is the one unsigned thing a site sends that the coordinator writes to
state and to the provenance log; a correctly signed update with `train_loss = NaN`
once made the ServerApp fail while logging the round (canonical JSON has no NaN).
One update per institution and round is the strategy's rule (`strategy.py`): it
needs every reply of the round. So is whom an update counts for: admission checks a
reply against the institution it names, which is only the site's word; the caller,
which knows the institution the replying node was onboarded for, refuses a mismatch
("impersonation") and records every outcome against the node's institution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from flwr.app import Message, RecordDict

from consortium.diloco_wire import COMPUTE_S, ON_GPU
from consortium.model_wire import ARRAYS_RECORD, ModelWireError, unpack_tensors
from consortium.provenance.log import WitnessCosignature
from consortium.provenance.signing import SignatureError, VerifyingKey, unb64
from consortium.provenance.updates import UpdateStatement
from consortium.provenance.witness import COSIGNATURE_RECORD
from consortium.tensor_digest import arrays_digest
from coordinator.provenance.witnessing import CosignatureRefused, WitnessedHead, check_cosignature

SIGNATURE_RECORD = "consortium.signature"
COMMITMENT_RECORD = "consortium.data"

# The metrics a training reply may carry: those client/federated/client_app.py sends
# (compute-s, on-gpu: a federated pretraining step's inner-loop seconds and device,
# consortium/diloco_wire.py).
# Each is one finite number; anything else (a list, a string, NaN, an unknown name) is
# refused with reason "bad_metrics".
ALLOWED_METRICS = frozenset({"num-examples", "train_loss", COMPUTE_S, ON_GPU})
MAX_METRIC_NAME_CHARS = 64  # how much of a refused metric's name the log repeats


class UpdateRefused(Exception):  # noqa: N818 - reads as what happened to the update
    """`institution`: the one the reply names ("" if none), unverified; a refusal is
    recorded against the replying node's onboarded institution where it has one."""

    def __init__(self, reason: str, detail: str, institution: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.institution = institution


@dataclass(frozen=True)
class AdmittedUpdate:
    institution: str
    node_id: int
    key_id: str
    public_key: bytes
    arrays: dict[str, npt.NDArray[Any]]
    statement: UpdateStatement
    signature: str
    train_loss: float | None
    commitment: dict[str, Any]
    declared_examples: int | None = None  # the institution's cap, when it declared one
    cosignature: WitnessCosignature | None = None  # of the head the round was sent with

    def log_entry(self) -> dict[str, Any]:
        return {
            "institution": self.institution,
            "node_id": str(self.node_id),
            "key_id": self.key_id,
            "update_digest": self.statement.update_digest,
            "num_examples": self.statement.num_examples,
            "commitment": self.statement.commitment,
            "data": self.commitment,
            "nonce": self.statement.nonce,
            "signature": self.signature,
            **_declared(self.declared_examples),
        }


class AdmissionState(Protocol):
    """What admission reads and claims: the state store, or a ServerApp's `RunningJob`."""

    def is_revoked(self, institution: str) -> bool: ...

    def institution_keys(self, institution: str) -> dict[str, bytes]: ...

    def claim_nonce(self, job_id: str, nonce: str) -> bool: ...

    def declared_examples(self, institution: str) -> int | None: ...


def admit(
    reply: Message,
    job_id: str,
    round_: int,
    global_digest: str,
    store: AdmissionState,
    witnessed: WitnessedHead | None = None,
) -> AdmittedUpdate:
    """Check one reply; raises UpdateRefused with a machine-readable reason. With
    `witnessed`, the reply must carry the institution's cosignature of that head."""
    if reply.has_error():
        raise UpdateRefused("client_error", str(reply.error.reason))
    content = reply.content
    proof = content.config_records.get(SIGNATURE_RECORD)
    if proof is None:
        raise UpdateRefused("unsigned", "the reply carries no consortium.signature record")
    institution = str(proof.get("institution", ""))
    try:
        arrays = unpack_tensors(content.array_records[ARRAYS_RECORD])
        metrics = content.metric_records["metrics"]
        num_examples = metrics["num-examples"]
    except KeyError as err:
        raise UpdateRefused("malformed", f"missing {err}", institution) from None
    except ModelWireError as err:
        raise UpdateRefused("malformed", str(err), institution) from None
    if store.is_revoked(institution):
        raise UpdateRefused("revoked", f"{institution!r} has been revoked", institution)
    key_id = str(proof.get("key-id", ""))
    public_key = store.institution_keys(institution).get(key_id)
    if public_key is None:
        raise UpdateRefused(
            "unknown_key", f"key {key_id[:16]} is not registered to {institution!r}", institution
        )
    signed_count = proof.get("num-examples")
    if not isinstance(signed_count, int) or isinstance(signed_count, bool):
        raise UpdateRefused("malformed", "the signed example count is not an integer", institution)
    statement = UpdateStatement(
        job_id=job_id,
        round=round_,
        global_digest=global_digest,
        update_digest=str(proof.get("update-digest", "")),
        num_examples=signed_count,
        commitment=str(proof.get("commitment", "")),
        nonce=str(proof.get("nonce", "")),
        institution=institution,
    )
    try:
        VerifyingKey.from_raw(public_key).verify(
            unb64(str(proof.get("signature", ""))), statement.to_bytes()
        )
    except SignatureError as err:
        stale = proof.get("round") != round_
        reason = "stale" if stale else "bad_signature"
        raise UpdateRefused(
            reason, f"signature does not cover job {job_id} round {round_}: {err}", institution
        ) from None
    if arrays_digest(arrays) != statement.update_digest:
        raise UpdateRefused("digest_mismatch", "weights differ from the signed digest", institution)
    if num_examples != statement.num_examples or not isinstance(num_examples, int):
        raise UpdateRefused(
            "weight_mismatch", "example count differs from the signed one", institution
        )
    check_metrics(dict(metrics), institution)
    cosignature = _cosignature(content, institution, store, witnessed)
    cap = store.declared_examples(institution)
    if cap is not None and statement.num_examples > cap:
        raise UpdateRefused(
            "inflated_count",
            f"the update claims {statement.num_examples} examples; {institution!r} declared "
            f"{cap} when it joined",
            institution,
        )
    if not store.claim_nonce(job_id, statement.nonce):
        raise UpdateRefused("replayed", f"nonce {statement.nonce} was already used", institution)
    train_loss = metrics.get("train_loss")
    data = content.config_records.get(COMMITMENT_RECORD)
    return AdmittedUpdate(
        institution=institution,
        node_id=reply.metadata.src_node_id,
        key_id=key_id,
        public_key=public_key,
        arrays={k: np.asarray(v) for k, v in arrays.items()},
        statement=statement,
        signature=str(proof.get("signature")),
        train_loss=float(train_loss) if isinstance(train_loss, int | float) else None,
        commitment=dict(data) if data is not None else {},
        declared_examples=cap,
        cosignature=cosignature,
    )


def _cosignature(
    content: RecordDict, institution: str, store: AdmissionState, witnessed: WitnessedHead | None
) -> WitnessCosignature | None:
    """The institution's checked cosignature of the head its round was sent with."""
    if witnessed is None:
        return None
    fields = content.config_records.get(COSIGNATURE_RECORD)
    try:
        return check_cosignature(
            fields,
            institution,
            store.institution_keys(institution),
            witnessed,
        )
    except CosignatureRefused as refused:
        raise UpdateRefused(refused.reason, refused.detail, institution) from None


def check_metrics(metrics: dict[str, Any], institution: str) -> None:
    """Only `ALLOWED_METRICS`, each one finite number; raises UpdateRefused("bad_metrics")
    naming the first offending metric (in name order, so the reason never depends on
    the order the site wrote them in)."""
    for name in sorted(metrics, key=str):
        value = metrics[name]
        shown = repr(str(name)[:MAX_METRIC_NAME_CHARS])
        if name not in ALLOWED_METRICS:
            allowed = ", ".join(sorted(ALLOWED_METRICS))
            raise UpdateRefused(
                "bad_metrics", f"metric {shown} is not one of {allowed}", institution
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UpdateRefused(
                "bad_metrics",
                f"metric {shown} is a {type(value).__name__}, not a number",
                institution,
            )
        if not math.isfinite(value):
            raise UpdateRefused("bad_metrics", f"metric {shown} is {value}", institution)


def _declared(cap: int | None) -> dict[str, int]:
    return {} if cap is None else {"declared_examples": cap}
