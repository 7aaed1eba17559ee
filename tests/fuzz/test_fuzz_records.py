"""Fuzzed inputs that sites and outsiders control outside the API: model-update replies
(admission), provenance log lines, and startup bundles. Each is refused with its typed
error (`UpdateRefused` with a reason, `LogVerificationError` naming the line,
`BundleError`), never another exception.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.bundle import BundleError, load_bundle
from client.federated.signing_mod import COMMITMENT_RECORD, SIGNATURE_RECORD
from consortium.model_wire import ARRAYS_RECORD, PACKED_ARRAY, PACKED_STYPE, pack_tensors
from consortium.provenance.log import read_lines
from consortium.provenance.records import Round
from consortium.provenance.signing import SigningKey
from consortium.provenance.verify import LogVerificationError, verify_log
from coordinator.data_dir import DataDir
from coordinator.federated.admission import UpdateRefused, admit
from coordinator.provenance.recorder import JobRecorder

KEY = SigningKey.generate()
KEY_ID = KEY.key_id

config_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=30),
    st.binary(max_size=30),
)
metric_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True), max_size=3),
)
signature_fields = st.dictionaries(
    st.sampled_from(
        [
            *("institution", "key-id", "num-examples", "update-digest", "nonce"),
            *("signature", "round", "commitment", "extra"),
        ]
    ),
    config_values,
)


class Admission:
    """An admission state with alpha's key registered and nothing else."""

    def is_revoked(self, institution: str) -> bool:
        return institution == "revoked"

    def institution_keys(self, institution: str) -> dict[str, bytes]:
        return {KEY_ID: KEY.public.raw} if institution == "alpha" else {}

    def claim_nonce(self, job_id: str, nonce: str) -> bool:
        return True

    def declared_examples(self, institution: str) -> int | None:
        return 100


@pytest.fixture(autouse=True, scope="module")
def in_a_server_task() -> Iterator[None]:
    """Flower builds messages for the task that runs: a ServerApp's, as admission's."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id = 1, 1
    TaskIdentity._node_id = SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def packed_bytes(data: bytes) -> ArrayRecord:
    """A model record of this protocol's shape holding `data` (safetensors or not)."""
    return ArrayRecord(
        {PACKED_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)}
    )


def safetensors_header(header: bytes) -> bytes:
    """`header` where safetensors expects its JSON header (length-prefixed), then a few
    bytes of tensor data: the parser's header handling is what is fuzzed."""
    return struct.pack("<Q", len(header)) + header + bytes(16)


model_records = st.one_of(
    st.none(),
    st.builds(lambda: pack_tensors({"w": np.zeros((2, 2), dtype=np.float32)})),
    # Flower's own encoding (one Array per tensor), which this protocol does not use.
    st.builds(lambda: ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})),
    st.binary(max_size=200).map(packed_bytes),
    st.builds(
        lambda value: packed_bytes(safetensors_header(json.dumps(value).encode())),
        st.dictionaries(
            st.text(max_size=10),
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "dtype": st.sampled_from(["F32", "I64", "BOOL", "X", ""]),
                        "shape": st.lists(st.integers(-2, 2**40), max_size=3),
                        "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3),
                    }
                ),
                st.integers(),
                st.text(max_size=5),
            ),
            max_size=3,
        ),
    ),
)


def reply_with(
    signature: dict[str, Any],
    metrics: dict[str, Any],
    arrays: ArrayRecord | None,
    commitment: bool,
) -> Message:
    train = Message(
        RecordDict({"config": ConfigRecord({"x": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict({SIGNATURE_RECORD: ConfigRecord(signature)})
    if arrays is not None:
        content[ARRAYS_RECORD] = arrays
    content["metrics"] = MetricRecord(metrics)
    if commitment:
        content[COMMITMENT_RECORD] = ConfigRecord({"digest": "x"})
    return Message(content, reply_to=train)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    signature=signature_fields,
    institution=st.sampled_from(["alpha", "revoked", "beta", ""]),
    use_key=st.booleans(),
    metrics=st.dictionaries(
        st.one_of(st.sampled_from(["num-examples", "train_loss"]), st.text(max_size=80)),
        metric_values,
        max_size=4,
    ),
    arrays=model_records,
    commitment=st.booleans(),
)
def test_a_forged_or_malformed_update_is_refused_with_a_reason(
    signature: dict[str, Any],
    institution: str,
    use_key: bool,
    metrics: dict[str, Any],
    arrays: ArrayRecord | None,
    commitment: bool,
) -> None:
    signature = {**signature, "institution": institution}
    if use_key:
        signature["key-id"] = KEY_ID
    reply = reply_with(signature, metrics, arrays, commitment)
    with pytest.raises(UpdateRefused) as refused:
        admit(reply, "job", 1, "digest", Admission())
    assert refused.value.reason in {
        "malformed",
        "revoked",
        "unknown_key",
        "bad_signature",
        "stale",
        "digest_mismatch",
        "weight_mismatch",
        "bad_metrics",
        "inflated_count",
    }, refused.value.reason


@pytest.fixture(scope="module")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SigningKey]:
    """A real log: two rounds of a job, each followed by its tree head."""
    data_dir = DataDir(tmp_path_factory.mktemp("log"))
    key = SigningKey.load_or_create(data_dir.signing_key)
    recorder = JobRecorder(data_dir, "job")
    for number in (1, 2):
        recorder.round(Round(job_id="job", round=number, global_digest=f"g{number}"))
    return data_dir.provenance_log, key


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)
line_mutations = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(
        lambda kind, fields: json.dumps({"kind": kind, **fields}).encode(),
        st.sampled_from(["record", "tree_head", "other"]),
        st.dictionaries(
            st.sampled_from(
                ["index", "type", "body", "key_id", "signature", "tree_size", "root_hash"]
            ),
            json_values,
            max_size=5,
        ),
    ),
)


@given(position=st.integers(min_value=0, max_value=3), replacement=line_mutations)
def test_a_log_with_any_line_replaced_verifies_or_names_the_line(
    small_log: tuple[Path, SigningKey], tmp_path_factory: pytest.TempPathFactory, position: int,
    replacement: bytes,
) -> None:  # fmt: skip
    path, key = small_log
    lines = read_lines(path)
    assert len(lines) == 4
    tampered = tmp_path_factory.mktemp("tampered") / "provenance.jsonl"
    lines[position] = replacement.replace(b"\n", b" ")
    tampered.write_bytes(b"\n".join(lines) + b"\n")
    try:
        verify_log(tampered, key.public)
    except LogVerificationError as error:
        assert error.line >= 1
    else:
        assert replacement == read_lines(path)[position]  # only the original verifies


bundle_files = st.dictionaries(
    st.sampled_from(["bundle.toml", "ca.crt", "ca.sha256", "institution.crt", "ray-token"]),
    st.one_of(
        st.binary(max_size=120),
        st.text(max_size=120).map(str.encode),
        st.just(b'institution = "alpha"\ncoordinator_address = "127.0.0.1:1"\n'),
    ),
    max_size=6,
)


@given(files=bundle_files)
def test_any_bundle_dir_loads_or_is_refused_with_a_bundle_error(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes]
) -> None:
    bundle = tmp_path_factory.mktemp("bundle")
    for name, content in files.items():
        (bundle / name).write_bytes(content)
    with pytest.raises(BundleError):
        load_bundle(bundle, tmp_path_factory.mktemp("state"))
