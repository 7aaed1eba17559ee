"""A ClientApp mod that signs every training reply with the institution's key, and
witnesses the coordinator's provenance log.

Wrap any Flower ClientApp with it (`ClientApp(mods=[signing_mod])`). Before
training it checks that the global model it received is the one the
coordinator announced (`global-digest` in the config), and that the log head the
message asks it to cosign extends every head this site cosigned before
(`consortium/provenance/witness.py`): otherwise it refuses to train, says why in the
error reply and its log, and counts the refusal (`consortium_site_log_refusals_total`).
After training it signs an `UpdateStatement` binding the reply to (job, round,
global-model digest, update digest, example count, data commitment, fresh nonce,
institution) and attaches it as the ConfigRecord `consortium.signature`, with its
cosignature of the head as `consortium.cosignature`. A `query.witness` message (sent
when a job ends) is witnessed the same way, without training.

The node config names the key file (`signing-key`), the institution, the state dir
(where the site's record of cosigned heads lives) and, when the site joined with a
bundle, the coordinator's public key (`coordinator-key`) that signs the heads.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from consortium.model_wire import ARRAYS_RECORD, ModelWireError, unpack_tensors
from consortium.provenance.log import WitnessCosignature
from consortium.provenance.signing import SigningKey, VerifyingKey, b64
from consortium.provenance.updates import UpdateStatement
from consortium.provenance.witness import (
    BAD_HEAD,
    COSIGNATURE_RECORD,
    NO_HEAD,
    WITNESS_QUERY,
    WITNESS_RECORD,
    LogInconsistentError,
    cosignature_fields,
    record_refusal,
    witness_head,
)
from consortium.tensor_digest import arrays_digest

log = logging.getLogger(__name__)

SIGNATURE_RECORD = "consortium.signature"
COMMITMENT_RECORD = "consortium.data"


def record_digest(arrays: ArrayRecord) -> str:
    """The digest of the tensors a packed model record carries (ModelWireError if it is
    not one)."""
    return arrays_digest(unpack_tensors(arrays))


def _refuse(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _witness(msg: Message, context: Context) -> WitnessCosignature:
    """Check and cosign the log head the message carries; LogInconsistentError if not."""
    state_dir = Path(str(context.node_config["state-dir"]))
    request = msg.content.config_records.get(WITNESS_RECORD)
    if request is None:
        record_refusal(state_dir, NO_HEAD)
        raise LogInconsistentError(
            NO_HEAD,
            "the coordinator sent no log head to witness; this site trains only for a "
            "coordinator whose log it can witness",
        )
    key_path = str(context.node_config.get("coordinator-key", ""))
    try:
        proofs = json.loads(str(request.get("proofs", "{}")))
        if not isinstance(proofs, dict):
            raise ValueError("not an object")
    except ValueError as err:
        record_refusal(state_dir, BAD_HEAD)
        raise LogInconsistentError(BAD_HEAD, f"malformed consistency proofs: {err}") from None
    return witness_head(
        state_dir,
        str(context.node_config["institution"]),
        SigningKey.load(Path(str(context.node_config["signing-key"]))),
        VerifyingKey.load(Path(key_path)) if key_path else None,
        str(request.get("head", "")),
        proofs,
    )


def _cosigned(msg: Message, context: Context) -> tuple[WitnessCosignature | None, Message | None]:
    """(the cosignature, None), or (None, the error reply) when the site refuses."""
    try:
        return _witness(msg, context), None
    except LogInconsistentError as refusal:
        log.error("refusing to work for the coordinator: its provenance log %s", refusal)
        return None, _refuse(msg, f"log_inconsistent: {refusal}")


def _cosignature_record(cosignature: WitnessCosignature) -> ConfigRecord:
    return ConfigRecord({**cosignature_fields(cosignature), "institution": cosignature.institution})


def signing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type == WITNESS_QUERY:
        cosignature, refusal = _cosigned(msg, context)
        if cosignature is None:
            assert refusal is not None
            return refusal
        reply = call_next(msg, context)
        if not reply.has_error():
            reply.content[COSIGNATURE_RECORD] = _cosignature_record(cosignature)
        return reply
    # "train" and named training messages ("train.diloco": federated pretraining) alike
    if msg.metadata.message_type.split(".", 1)[0] != MessageType.TRAIN:
        return call_next(msg, context)
    config = msg.content.config_records["config"]
    try:
        received = record_digest(msg.content.array_records[ARRAYS_RECORD])
    except ModelWireError as err:
        return _refuse(msg, f"the global model cannot be read: {err}")
    announced = str(config.get("global-digest", ""))
    if received != announced:
        return _refuse(msg, f"global model digest {received[:16]} != announced {announced[:16]}")
    cosignature, refusal = _cosigned(msg, context)
    if cosignature is None:
        assert refusal is not None
        return refusal
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    arrays = reply.content.array_records[ARRAYS_RECORD]
    metrics = reply.content.metric_records["metrics"]
    data = reply.content.config_records.get(COMMITMENT_RECORD)
    statement = UpdateStatement(
        job_id=str(config["job-id"]),
        round=int(str(config["round-number"])),
        global_digest=received,
        update_digest=record_digest(arrays),
        num_examples=int(str(metrics["num-examples"])),
        commitment=str(data["digest"]) if data is not None else "",
        nonce=secrets.token_hex(16),
        institution=str(context.node_config["institution"]),
    )
    key = SigningKey.load(Path(str(context.node_config["signing-key"])))
    reply.content[SIGNATURE_RECORD] = ConfigRecord(
        {
            "institution": statement.institution,
            "key-id": key.key_id,
            "round": statement.round,
            "update-digest": statement.update_digest,
            "num-examples": statement.num_examples,
            "commitment": statement.commitment,
            "nonce": statement.nonce,
            "signature": b64(key.sign(statement.to_bytes())),
        }
    )
    reply.content[COSIGNATURE_RECORD] = _cosignature_record(cosignature)
    return reply
