"""A ClientApp mod that signs every training reply with the institution's key.

Wrap any Flower ClientApp with it (`ClientApp(mods=[signing_mod])`). Before
training it checks that the global model it received is the one the
coordinator announced (`global-digest` in the config); after training it signs
an `UpdateStatement` binding the reply to (job, round, global-model digest,
update digest, example count, data commitment, fresh nonce, institution) and
attaches it as the ConfigRecord `consortium.signature`.

The node config names the key file (`signing-key`) and the institution.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from consortium.provenance.signing import SigningKey, b64
from consortium.provenance.updates import UpdateStatement
from consortium.tensor_digest import arrays_digest

SIGNATURE_RECORD = "consortium.signature"
COMMITMENT_RECORD = "consortium.data"


def record_digest(arrays: ArrayRecord) -> str:
    return arrays_digest({name: array.numpy() for name, array in arrays.items()})


def _refuse(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def signing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    config = msg.content.config_records["config"]
    received = record_digest(msg.content.array_records["arrays"])
    announced = str(config.get("global-digest", ""))
    if received != announced:
        return _refuse(msg, f"global model digest {received[:16]} != announced {announced[:16]}")
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    arrays = reply.content.array_records["arrays"]
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
    return reply
