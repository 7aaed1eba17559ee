"""A member institution tries to exhaust the control plane with its own valid certificate.

Each test performs the attack against a real mutual-TLS `coordinator serve` (as in
test_member_attacks.py) and asserts that it was refused with a readable message, that
nothing was written, and that the other institutions are still served (docs/security.md
names these tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from consortium.proto.v1 import jobs_pb2, jobs_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from consortium.tls import ClientTls
from coordinator.access.registry import (
    MAX_DEVICE_LENGTH,
    MAX_GONE_NODES_PER_INSTITUTION,
    MAX_HOSTNAME_LENGTH,
    MAX_LIVE_NODES_PER_INSTITUTION,
)
from coordinator.api.servicers import MAX_OPEN_STREAMS, MAX_OPEN_STREAMS_PER_INSTITUTION
from coordinator.data_dir import DataDir
from coordinator.serve import GRPC_WORKERS
from coordinator.state import NodeState, SqliteStateStore
from tests.conftest import Processes
from tests.helpers import metric_value, start_secure_consortium, wait_for, wait_for_log
from tests.security.members import JOB, NAMES, Consortium, rpc_error

# A deadline for calls that must be served (not a timing claim: the old coordinator,
# its threads all held by one member's streams, let them run into it).
SERVED_WITHIN_S = 20
# Streams stay open until the test cancels them; this only bounds a broken run.
STREAM_DEADLINE_S = 120


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("member-limits")
    # Nodes the tests register send no heartbeats: none may go stale (and so make room
    # under the cap) while a test runs.
    config = root / "coordinator.toml"
    config.write_text("node_timeout_s = 3600\n")
    processes = Processes(root / "logs")
    try:
        data_dir, address = start_secure_consortium(
            processes, root, NAMES, flags=["--config", str(config)]
        )
        yield Consortium(root, data_dir, address)
    finally:
        processes.stop_all()


def channel(stack: ExitStack, consortium: Consortium, tls: ClientTls) -> grpc.Channel:
    opened = grpc.secure_channel(consortium.address, tls.credentials())
    stack.callback(opened.close)
    return opened


def open_health_watch(stack: ExitStack, to: grpc.Channel) -> grpc.RpcError | None:
    """Open a Health.Watch and read its first answer: None once it is open (it then
    holds a coordinator thread until cancelled), else the refusal."""
    stream = health_pb2_grpc.HealthStub(to).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=STREAM_DEADLINE_S
    )
    stack.callback(stream.cancel)
    try:
        next(stream)
    except grpc.RpcError as error:
        return error
    return None


def refusals(errors: list[grpc.RpcError | None]) -> list[tuple[grpc.StatusCode, str]]:
    return [(e.code(), e.details() or "") for e in errors if e is not None]


def refused_watches(consortium: Consortium) -> float:
    """Health.Watch calls answered RESOURCE_EXHAUSTED, from the coordinator's /metrics."""
    labels = {"method": "Health/Watch", "code": "RESOURCE_EXHAUSTED"}
    try:
        return metric_value(consortium.data_dir, "consortium_rpc_requests_total", labels)
    except AssertionError:  # none yet: the series appears with its first count
        return 0.0


def beta_is_served(beta: grpc.Channel) -> None:
    """Beta's unary calls get a thread: register, heartbeat, read an approval, list."""
    registry = nodes_pb2_grpc.NodeRegistryStub(beta)
    node = registry.RegisterNode(
        nodes_pb2.RegisterNodeRequest(institution="beta", hostname="b", device="cpu"),
        timeout=SERVED_WITHIN_S,
    ).node
    registry.Heartbeat(nodes_pb2.HeartbeatRequest(node_id=node.node_id), timeout=SERVED_WITHIN_S)
    error = rpc_error(
        lambda: registry.GetRunApproval(
            nodes_pb2.GetRunApprovalRequest(run_id="no-such-run"), timeout=SERVED_WITHIN_S
        )
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND  # answered, not left to time out
    jobs_pb2_grpc.JobsStub(beta).ListJobs(jobs_pb2.ListJobsRequest(), timeout=SERVED_WITHIN_S)
    registry.LeaveNode(nodes_pb2.LeaveNodeRequest(node_id=node.node_id), timeout=SERVED_WITHIN_S)


def test_member_opening_a_stream_per_thread_is_capped_and_others_rpcs_are_still_served(
    consortium: Consortium,
) -> None:
    assert MAX_OPEN_STREAMS < GRPC_WORKERS  # streams can never hold every thread
    with ExitStack() as stack:
        alpha = channel(stack, consortium, consortium.as_institution("alpha"))
        beta = channel(stack, consortium, consortium.as_institution("beta"))
        operator = channel(stack, consortium, consortium.as_operator())
        before = refused_watches(consortium)

        # The attack: one stream per control-plane thread.
        alpha_watches = [open_health_watch(stack, alpha) for _ in range(GRPC_WORKERS)]

        beta_is_served(beta)
        assert alpha_watches.count(None) == MAX_OPEN_STREAMS_PER_INSTITUTION
        refused = refusals(alpha_watches)
        assert len(refused) == GRPC_WORKERS - MAX_OPEN_STREAMS_PER_INSTITUTION
        for code, details in refused:
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"'alpha' has {MAX_OPEN_STREAMS_PER_INSTITUTION} streams open" in details
        wait_for_log(consortium.log, "control plane refused a stream of alpha")
        assert refused_watches(consortium) == before + len(refused)
        # Job watches take from the same slots.
        job = (
            jobs_pb2_grpc.JobsStub(beta)
            .SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=JOB.format(name="w", n=2)))
            .job
        )
        jobs_pb2_grpc.JobsStub(beta).CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id))
        error = rpc_error(
            lambda: list(
                jobs_pb2_grpc.JobsStub(alpha).WatchJob(
                    jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=STREAM_DEADLINE_S
                )
            )
        )
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        # Another member still gets its own streams ...
        assert open_health_watch(stack, beta) is None
        # ... until all streams together reach the total (here the operator's, which
        # only the total bounds), and even then unary calls are served.
        operator_watches: list[grpc.RpcError | None] = []
        while not operator_watches or operator_watches[-1] is None:
            assert len(operator_watches) <= GRPC_WORKERS, "the operator's streams were not capped"
            operator_watches.append(open_health_watch(stack, operator))
        assert operator_watches.count(None) == (
            MAX_OPEN_STREAMS - MAX_OPEN_STREAMS_PER_INSTITUTION - 1
        )
        full = f"the coordinator has {MAX_OPEN_STREAMS} streams open"
        assert full in refusals(operator_watches)[0][1]
        ((code, details),) = refusals([open_health_watch(stack, beta)])
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert full in details
        beta_is_served(beta)


def test_a_members_stream_slots_are_given_back_when_its_streams_end(
    consortium: Consortium,
) -> None:
    """A slot is held while the stream's thread is, and no longer: a member that
    cancels its watches (or goes away) can open as many again."""
    with ExitStack() as stack:
        alpha = channel(stack, consortium, consortium.as_institution("alpha"))

        def fill(streams: ExitStack) -> Callable[[], bool]:
            opened: list[None] = []

            def all_open() -> bool:
                while len(opened) < MAX_OPEN_STREAMS_PER_INSTITUTION:
                    if open_health_watch(streams, alpha) is not None:
                        return False  # one still held: try again later
                    opened.append(None)
                return True

            return all_open

        with ExitStack() as first:
            wait_for("alpha's stream slots free", fill(first))
        # Cancelled: the coordinator gives the slots back as their threads finish.
        wait_for("alpha's stream slots given back", fill(stack))


def registry(
    stack: ExitStack, consortium: Consortium, institution: str
) -> nodes_pb2_grpc.NodeRegistryStub:
    tls = consortium.as_institution(institution)
    return nodes_pb2_grpc.NodeRegistryStub(channel(stack, consortium, tls))


def leave_all(stub: nodes_pb2_grpc.NodeRegistryStub, node_ids: list[str]) -> None:
    for node_id in node_ids:
        stub.LeaveNode(nodes_pb2.LeaveNodeRequest(node_id=node_id), timeout=SERVED_WITHIN_S)


def node_count(consortium: Consortium, institution: str, *states: NodeState) -> int:
    store = SqliteStateStore(DataDir(consortium.data_dir).state_db)
    try:
        return sum(
            n.institution == institution and (not states or n.state in states)
            for n in store.list_nodes()
        )
    finally:
        store.close()


@pytest.mark.parametrize(
    ("hostname", "device", "field"),
    [
        ("h" * 3_000_000, "cpu", "hostname"),
        ("host", "d" * 900_000, "device"),
        ("h" * (MAX_HOSTNAME_LENGTH + 1), "d" * (MAX_DEVICE_LENGTH + 1), "hostname"),
    ],
    ids=["hostname-3MB", "device-0.9MB", "just-over"],
)
def test_member_register_with_oversized_fields_is_invalid_argument_and_creates_nothing(
    consortium: Consortium, hostname: str, device: str, field: str
) -> None:
    with ExitStack() as stack:
        alpha = registry(stack, consortium, "alpha")
        before = node_count(consortium, "alpha")
        error = rpc_error(
            lambda: alpha.RegisterNode(
                nodes_pb2.RegisterNodeRequest(
                    institution="alpha", hostname=hostname, device=device
                ),
                timeout=SERVED_WITHIN_S,
            )
        )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"field '{field}'" in (error.details() or "")
    assert "at most" in (error.details() or "")
    assert node_count(consortium, "alpha") == before


def test_member_cannot_register_nodes_beyond_its_cap(consortium: Consortium) -> None:
    request = nodes_pb2.RegisterNodeRequest(institution="alpha", hostname="h", device="cpu")
    registered: list[str] = []
    with ExitStack() as stack:
        alpha = registry(stack, consortium, "alpha")
        stack.callback(leave_all, alpha, registered)  # the other tests find room again
        room = MAX_LIVE_NODES_PER_INSTITUTION - node_count(
            consortium, "alpha", NodeState.ONLINE, NodeState.STALE
        )
        for _ in range(room):
            registered.append(alpha.RegisterNode(request, timeout=SERVED_WITHIN_S).node.node_id)
        error = rpc_error(lambda: alpha.RegisterNode(request, timeout=SERVED_WITHIN_S))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"has {MAX_LIVE_NODES_PER_INSTITUTION} nodes online" in (error.details() or "")
        assert node_count(consortium, "alpha", NodeState.ONLINE, NodeState.STALE) == (
            MAX_LIVE_NODES_PER_INSTITUTION
        )
        wait_for_log(consortium.log, "alpha registered a node beyond its")
        beta_is_served(channel(stack, consortium, consortium.as_institution("beta")))


def test_member_re_registering_in_a_loop_does_not_grow_list_nodes(
    consortium: Consortium,
) -> None:
    request = nodes_pb2.RegisterNodeRequest(
        institution="alpha", hostname="h" * MAX_HOSTNAME_LENGTH, device="d" * MAX_DEVICE_LENGTH
    )
    with ExitStack() as stack:
        alpha = registry(stack, consortium, "alpha")
        for _ in range(3 * MAX_GONE_NODES_PER_INSTITUTION):
            node = alpha.RegisterNode(request, timeout=SERVED_WITHIN_S).node
            leave_all(alpha, [node.node_id])
        beta = registry(stack, consortium, "beta")
        listed = beta.ListNodes(nodes_pb2.ListNodesRequest(), timeout=SERVED_WITHIN_S).nodes
    assert sum(n.institution == "alpha" for n in listed) <= (
        MAX_LIVE_NODES_PER_INSTITUTION + MAX_GONE_NODES_PER_INSTITUTION
    )
    assert node_count(consortium, "alpha", NodeState.GONE) <= MAX_GONE_NODES_PER_INSTITUTION + 1


def test_member_cannot_raise_its_declared_example_count_by_registering_again(
    consortium: Consortium,
) -> None:
    """Beta joins declaring 100 examples; mid-job it registers another node declaring
    the most it can. The cap update admission checks (`inflated_count`) stays 100."""
    registered: list[str] = []
    with ExitStack() as stack:
        beta = registry(stack, consortium, "beta")
        stack.callback(leave_all, beta, registered)
        for examples in (100, 2**64 - 1):
            request = nodes_pb2.RegisterNodeRequest(
                institution="beta", hostname="b", device="cpu", declared_examples=examples
            )
            registered.append(beta.RegisterNode(request, timeout=SERVED_WITHIN_S).node.node_id)
        store = SqliteStateStore(DataDir(consortium.data_dir).state_db)
        try:
            assert store.declared_examples("beta") == 100
        finally:
            store.close()
        wait_for_log(consortium.log, "above the 100 its institution declared first; not raised")
