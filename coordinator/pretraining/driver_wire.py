"""What the coordinator and its pretraining driver say to each other, without pickle.

The driver unpickles what Ray's workers return (`ray.get`), so a worker that subverts it
could make it send anything. The coordinator holds the signing key: it must never
unpickle what the driver sends. Every message is therefore one JSON frame, validated
field by field into the typed records (pydantic), and the final weights travel as one
safetensors frame, which is parsed as tensors and checked against the model digest the
result names. Anything else is a `DriverProtocolError`.

Frames on the socket (`multiprocessing.connection.Connection.send_bytes`):
coordinator -> driver: ``request`` (once, first; it names the institutions revoked so
far and, with mutual TLS, the institution each Ray node counts for), then ``revoked``
whenever that set changes, ``nodes`` whenever that map changes, and ``stop`` at most
once;
driver -> coordinator: ``step``, ``wait``, then ``done`` followed by the weights frame,
or ``error``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from consortium.ray_env import RayTls
from consortium.tensor_digest import arrays_digest
from coordinator.pretraining.accounting import account
from coordinator.pretraining.errors import DriverProtocolError
from coordinator.pretraining.records import ControllerState, OuterStepRecord
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.ray.head import RayCluster

if TYPE_CHECKING:
    from consortium.lm import Weights  # torch: for its type only
    from coordinator.pretraining.api import PretrainResult

# The largest JSON message the coordinator reads (a run's records, in `done`): a run of
# 10,000 outer steps with 64 workers each is about 40 MB. A frame's length comes first,
# so a longer one is refused before anything is read: a subverted driver cannot fill
# the coordinator's memory (a 4 GiB list of numbers would be about 20 GiB of objects).
MAX_MESSAGE_BYTES = 64 << 20
# The weights frame: the model's float32 weights (known from the spec) and the
# safetensors header naming each tensor.
WEIGHTS_HEADER_BYTES = 8 << 20

_RECORD = TypeAdapter(OuterStepRecord)
_Model = TypeVar("_Model", bound=BaseModel)


@dataclass(frozen=True)
class DriverRequest:
    cluster: RayCluster
    spec: PretrainJobSpec
    checkpoint_dir: Path
    log_level: int = logging.INFO
    # The institutions revoked when the run started; `revoked` frames update them.
    revoked: frozenset[str] = frozenset()
    # Ray node id -> the institution the coordinator counts it for (its claims); None:
    # nodes' own declarations count (a plain-text consortium). `nodes` frames update it.
    node_institutions: Mapping[str, str] | None = None


class _Tls(BaseModel):
    model_config = ConfigDict(extra="forbid")
    certificate: Path
    key: Path
    ca_certificate: Path


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["request"]
    address: str
    token_path: Path | None
    tls: _Tls | None
    spec: dict[str, Any]
    checkpoint_dir: Path
    log_level: int
    revoked: list[str]
    node_institutions: dict[str, str] | None


class _Revoked(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["revoked"]
    institutions: list[str]


class _Nodes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["nodes"]
    institutions: dict[str, str]  # Ray node id -> institution


class _Done(BaseModel):
    """A finished (or stopped) run; its weights follow in the next frame and its
    accounting is computed again from its records."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["done"]
    job: str
    state: ControllerState
    steps_completed: int
    model_digest: str
    val_loss: float | None
    corpus_digest: str
    records: list[dict[str, Any]]


# --- coordinator -> driver -----------------------------------------------------------
def send_request(conn: Connection, request: DriverRequest) -> None:
    cluster = request.cluster
    tls = cluster.tls
    _send(
        conn,
        {
            "kind": "request",
            "address": cluster.address,
            "token_path": str(cluster.token_path) if cluster.token_path else None,
            "tls": {k: str(v) for k, v in asdict(tls).items()} if tls is not None else None,
            "spec": request.spec.model_dump(mode="json"),
            "checkpoint_dir": str(request.checkpoint_dir),
            "log_level": request.log_level,
            "revoked": sorted(request.revoked),
            "node_institutions": (
                dict(sorted(request.node_institutions.items()))
                if request.node_institutions is not None
                else None
            ),
        },
    )


def send_revoked(conn: Connection, institutions: frozenset[str]) -> None:
    _send(conn, {"kind": "revoked", "institutions": sorted(institutions)})


def send_node_institutions(conn: Connection, institutions: Mapping[str, str]) -> None:
    _send(conn, {"kind": "nodes", "institutions": dict(sorted(institutions.items()))})


def send_stop(conn: Connection) -> None:
    _send(conn, {"kind": "stop"})


def read_request(conn: Connection) -> DriverRequest:
    message = _parse(conn.recv_bytes(MAX_MESSAGE_BYTES), _Request)
    tls = message.tls
    return DriverRequest(
        RayCluster(
            message.address,
            message.token_path,
            RayTls(tls.certificate, tls.key, tls.ca_certificate) if tls is not None else None,
        ),
        PretrainJobSpec.model_validate(message.spec),
        message.checkpoint_dir,
        message.log_level,
        frozenset(message.revoked),
        message.node_institutions,
    )


def is_stop(frame: bytes) -> bool:
    try:
        return bool(json.loads(frame) == {"kind": "stop"})
    except ValueError:
        return False


def revoked_in(frame: bytes) -> frozenset[str] | None:
    """The institutions a ``revoked`` frame names; None for any other frame."""
    try:
        return frozenset(_Revoked.model_validate_json(frame).institutions)
    except ValidationError:
        return None


def node_institutions_in(frame: bytes) -> dict[str, str] | None:
    """The node id -> institution map a ``nodes`` frame carries; None for any other."""
    try:
        return _Nodes.model_validate_json(frame).institutions
    except ValidationError:
        return None


# --- driver -> coordinator -----------------------------------------------------------
def send_step(conn: Connection, record: OuterStepRecord) -> None:
    _send(conn, {"kind": "step", "record": record.to_dict()})


def send_wait(conn: Connection, reason: str | None) -> None:
    _send(conn, {"kind": "wait", "reason": reason})


def send_error(conn: Connection, message: str) -> None:
    _send(conn, {"kind": "error", "message": message})


def send_done(conn: Connection, result: PretrainResult) -> None:
    records = [record.to_dict() for record in result.records]
    _send(
        conn,
        {
            "kind": "done",
            "job": result.job,
            "state": result.state.value,
            "steps_completed": result.steps_completed,
            "model_digest": result.model_digest,
            "val_loss": result.val_loss,
            "corpus_digest": result.corpus_digest,
            "records": records,
        },
    )
    weights = {name: np.asarray(array, order="C") for name, array in result.weights.items()}
    conn.send_bytes(save_safetensors(weights))


@dataclass(frozen=True)
class Step:
    record: OuterStepRecord


@dataclass(frozen=True)
class Wait:
    reason: str | None


@dataclass(frozen=True)
class Failed:
    message: str


DriverMessage = Step | Wait | Failed


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["step"]
    record: dict[str, Any]


class _Wait(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["wait"]
    reason: str | None


class _Error(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["error"]
    message: str


def read_message(conn: Connection, weights_bytes: int) -> DriverMessage | PretrainResult:
    """The driver's next message, parsed without pickle (`DriverProtocolError` if it is
    not one, or longer than one can be); a ``done`` reads its weights frame too (at
    most `weights_bytes` of float32 weights) and returns the run's result."""
    frame = _receive(conn, MAX_MESSAGE_BYTES, "a message")
    kind = _kind(frame)
    if kind == "step":
        return Step(_record(_parse(frame, _Step).record))
    if kind == "wait":
        return Wait(_parse(frame, _Wait).reason)
    if kind == "error":
        return Failed(_parse(frame, _Error).message)
    if kind == "done":
        weights = _receive(conn, weights_bytes + WEIGHTS_HEADER_BYTES, "weights")
        return _result(_parse(frame, _Done), weights)
    raise DriverProtocolError(f"the pretraining driver sent an unknown message {kind!r}")


def _result(done: _Done, weights_frame: bytes) -> PretrainResult:
    from coordinator.pretraining.api import PretrainResult

    try:
        loaded = load_safetensors(weights_frame)
    except (SafetensorError, ValueError) as error:
        raise DriverProtocolError(f"the driver's weights are not safetensors: {error}") from None
    weights: Weights = {
        name: array.astype(np.float32, copy=False) for name, array in loaded.items()
    }
    if arrays_digest(weights) != done.model_digest:
        raise DriverProtocolError(
            "the driver's weights do not have the model digest its result names"
        )
    records = tuple(_record(record) for record in done.records)
    return PretrainResult(
        job=done.job,
        state=done.state,
        steps_completed=done.steps_completed,
        model_digest=done.model_digest,
        val_loss=done.val_loss,
        weights=weights,
        corpus_digest=done.corpus_digest,
        records=records,
        accounting=account(done.job, list(records)),
    )


def _record(data: dict[str, Any]) -> OuterStepRecord:
    try:
        return _RECORD.validate_python(data)
    except ValidationError as error:
        raise DriverProtocolError(f"the driver sent a malformed outer step: {error}") from None


def _receive(conn: Connection, limit: int, what: str) -> bytes:
    try:
        return conn.recv_bytes(limit)
    except OSError:
        # multiprocessing refuses a frame longer than `limit` from its length alone and
        # then takes the connection as unreadable; any other failure leaves it readable.
        if conn.closed or conn.readable:
            raise
        raise DriverProtocolError(
            f"the pretraining driver sent {what} longer than the {limit} bytes it can be"
        ) from None


def _send(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message, allow_nan=True).encode())


def _kind(frame: bytes) -> str:
    try:
        message = json.loads(frame)
    except ValueError:
        raise DriverProtocolError("the pretraining driver sent a frame that is not JSON") from None
    kind = message.get("kind") if isinstance(message, dict) else None
    if not isinstance(kind, str):
        raise DriverProtocolError("the pretraining driver sent a message without a kind")
    return kind


def _parse(frame: bytes, model: type[_Model]) -> _Model:
    try:
        return model.model_validate_json(frame)
    except ValidationError as error:
        raise DriverProtocolError(f"malformed {model.__name__[1:].lower()}: {error}") from None
