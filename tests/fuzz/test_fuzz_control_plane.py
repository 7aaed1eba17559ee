"""Fuzzed job specs and control-plane requests: never a crash, never INTERNAL.

Invariants (issue 15): a spec is accepted or refused with `JobSpecError` naming the bad
field; over a real gRPC server, every request ends OK or with a typed status
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION), never INTERNAL or UNKNOWN, and a
refused request writes nothing.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consortium.errors import JobSpecError
from consortium.proto.v1 import jobs_pb2, jobs_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from consortium.provenance.signing import SigningKey
from coordinator.access.registry import NodeRegistry
from coordinator.api.servicers import JobsServicer, NodeRegistryServicer
from coordinator.federated.approvals import RunApprovals
from coordinator.jobs.service import JobService
from coordinator.jobs.spec import parse_submitted_spec
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.state import InMemoryStateStore

VALID: dict[str, Any] = {
    "name": "fuzz",
    "model": "digits-cnn",
    "dataset": "digits",
    "rounds": 2,
    "min_clients": 1,
    "local_epochs": 1,
    "learning_rate": 0.05,
    "seed": 1,
    "aggregation": "trimmed-mean",
    "trim_fraction": 0.2,
    "strategy": "fedavg",
}
TYPED_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # an institution's 33rd live node
}

toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=40),
)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, or a TOML error (lone surrogates)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def toml_of(fields: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(key)} = {toml_value(value)}\n" for key, value in fields.items())


@given(st.text(max_size=400))
def test_any_text_is_a_spec_or_a_job_spec_error(text: str) -> None:
    try:
        parse_submitted_spec(text)
    except JobSpecError as error:
        assert "job spec" in str(error), str(error)


@given(field=st.sampled_from(sorted(VALID)), value=toml_values)
def test_a_field_set_to_anything_is_accepted_or_refused_by_name(field: str, value: Any) -> None:
    try:
        parse_submitted_spec(toml_of({**VALID, field: value}))
    except JobSpecError as error:
        # A value TOML itself cannot hold is a syntax error; any other names its field.
        assert f"'{field}'" in str(error) or "TOML" in str(error), str(error)


@given(name=st.text(min_size=1, max_size=20).filter(lambda n: n not in VALID), value=toml_values)
def test_an_unknown_field_is_refused_by_name(name: str, value: Any) -> None:
    with pytest.raises(JobSpecError) as refused:
        parse_submitted_spec(toml_of({**VALID, name: value}))
    assert f"'{name}'" in str(refused.value) or "TOML" in str(refused.value)


@dataclass
class Api:
    jobs: jobs_pb2_grpc.JobsStub
    nodes: nodes_pb2_grpc.NodeRegistryStub
    store: InMemoryStateStore


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    """Both control-plane services over a real server on 127.0.0.1:0, as `coordinator
    serve` wires them (without TLS: the certificate interceptor has its own tests)."""
    store = InMemoryStateStore()
    metrics = CoordinatorMetrics()
    stopping = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    jobs_pb2_grpc.add_JobsServicer_to_server(
        JobsServicer(JobService(store, metrics=metrics), store, stopping, metrics), server
    )
    nodes_pb2_grpc.add_NodeRegistryServicer_to_server(
        NodeRegistryServicer(
            NodeRegistry(store, 30.0, metrics),
            "127.0.0.1:9",
            500,
            approvals=RunApprovals(SigningKey.generate()),
        ),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Api(jobs_pb2_grpc.JobsStub(channel), nodes_pb2_grpc.NodeRegistryStub(channel), store)
    finally:
        stopping.set()
        channel.close()
        server.stop(0).wait()


def call(rpc: Any, request: Any) -> grpc.StatusCode:
    try:
        rpc(request, timeout=10)
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        code: grpc.StatusCode = error.code()
        assert code in TYPED_STATUSES, (code, error.details())
        assert error.details(), code  # a message a person can act on
        return code
    return grpc.StatusCode.OK


spec_texts = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda field, value: toml_of({**VALID, field: value}),
        st.sampled_from(sorted(VALID)),
        toml_values,
    ),
)


@given(spec=spec_texts)
def test_submit_job_accepts_or_refuses_with_invalid_argument_and_writes_nothing(
    api: Api, spec: str
) -> None:
    before = len(api.store.list_jobs())
    code = call(api.jobs.SubmitJob, jobs_pb2.SubmitJobRequest(spec_toml=spec))
    after = len(api.store.list_jobs())
    assert after == before + (1 if code == grpc.StatusCode.OK else 0)
    if code != grpc.StatusCode.OK:
        assert code == grpc.StatusCode.INVALID_ARGUMENT


@given(job_id=st.text(max_size=80))
def test_get_and_cancel_of_any_job_id_are_typed(api: Api, job_id: str) -> None:
    states = [(j.job_id, j.state) for j in api.store.list_jobs()]
    call(api.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id))
    if job_id not in {j for j, _ in states}:
        call(api.jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id))
        assert [(j.job_id, j.state) for j in api.store.list_jobs()] == states


@given(
    institution=st.text(max_size=40),
    hostname=st.text(max_size=40),
    device=st.text(max_size=20),
    key=st.binary(max_size=48),
    declared=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_register_node_accepts_or_refuses_any_fields_and_a_refusal_writes_nothing(
    api: Api, institution: str, hostname: str, device: str, key: bytes, declared: int
) -> None:
    before = len(api.store.list_nodes())
    request = nodes_pb2.RegisterNodeRequest(
        institution=institution,
        hostname=hostname,
        device=device,
        signing_public_key=key,
        declared_examples=declared,
    )
    code = call(api.nodes.RegisterNode, request)
    assert len(api.store.list_nodes()) == before + (1 if code == grpc.StatusCode.OK else 0)


@given(node_id=st.text(max_size=60), run_id=st.text(max_size=30))
def test_node_and_run_lookups_of_any_id_are_typed(api: Api, node_id: str, run_id: str) -> None:
    call(api.nodes.Heartbeat, nodes_pb2.HeartbeatRequest(node_id=node_id))
    call(api.nodes.GetRunApproval, nodes_pb2.GetRunApprovalRequest(run_id=run_id))
