"""Thin servicers: protobuf in, domain call, protobuf out; and the cap on open streams.

Two refusals answer RESOURCE_EXHAUSTED, which `coordinator/api/status.py` has no
domain error for: a node beyond the institution's cap (`NodeLimitError`, mapped in
`RegisterNode`) and a server stream beyond the caps of `OpenStreamLimit`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from consortium.errors import ConflictError, InvalidArgumentError, UnauthenticatedError
from consortium.pki import pem
from consortium.proto.v1 import jobs_pb2, jobs_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from coordinator.access.caller import current_caller, require_acting_as
from coordinator.access.pki_files import OPERATOR, CoordinatorPki
from coordinator.access.registry import NodeLimitError, NodeRegistry
from coordinator.api.convert import (
    job_to_proto,
    node_to_proto,
    ray_node_to_proto,
    round_to_proto,
)
from coordinator.api.status import streaming, unary
from coordinator.federated.approvals import RunApprovals
from coordinator.jobs.service import JobService
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.ray.claims import RayNodeClaims
from coordinator.ray.nodes import NoRay, RayNodesSource, match_nodes
from coordinator.ray.tls import peer_ip, sign_node_csr
from coordinator.state import FINAL_JOB_STATES, NodeRecord, StateStore

log = logging.getLogger(__name__)

WATCH_POLL_INTERVAL_S = 0.2

# A server stream (WatchJob, grpc.health.v1 Health.Watch) holds one of the control
# plane's worker threads (`coordinator/serve.py`, GRPC_WORKERS = 32) for as long as it
# is open. Half of them at most: the other 16 always serve unary calls (heartbeats,
# RegisterNode, GetRunApproval), which each take milliseconds.
MAX_OPEN_STREAMS = 16
# A member watches a job or two (`coordinator watch`) and maybe probes health; four is
# room for that, and a quarter of the streams: one member cannot take them all.
MAX_OPEN_STREAMS_PER_INSTITUTION = 4


def _require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgumentError(f"field '{field}': required")
    return value


class OpenStreamLimit(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Refuses a server stream beyond `per_institution` open ones of the calling member
    institution, or beyond `total` open ones of everyone, with RESOURCE_EXHAUSTED.

    Without it 32 open watches of one member took every worker thread, and every other
    institution's heartbeats and registrations waited until their deadline. It must come
    after `CertificateAuthInterceptor` (it reads the CALLER that one sets). The operator
    and a plain-text coordinator's callers (loopback, trusted) count only to the total.
    """

    def __init__(
        self,
        total: int = MAX_OPEN_STREAMS,
        per_institution: int = MAX_OPEN_STREAMS_PER_INSTITUTION,
    ) -> None:
        self._total = total
        self._per_institution = per_institution
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()  # member institution -> its open streams
        self._open_total = 0

    def _take(self, institution: str | None) -> str | None:
        """Count a new stream of the caller; or, without room, why it is refused."""
        with self._lock:
            if institution is not None and self._open[institution] >= self._per_institution:
                return (
                    f"{institution!r} has {self._open[institution]} streams open (WatchJob, "
                    f"Health.Watch), the most one institution may hold at once; end one "
                    "(a `coordinator watch`) and try again"
                )
            if self._open_total >= self._total:
                return (
                    f"the coordinator has {self._open_total} streams open, the most it "
                    "serves at once (the rest of its threads serve heartbeats and "
                    "registrations); try again when a watch ends"
                )
            self._open_total += 1
            if institution is not None:
                self._open[institution] += 1
            return None

    def _give_back(self, institution: str | None) -> None:
        with self._lock:
            self._open_total -= 1
            if institution is not None:
                self._open[institution] -= 1
                if not self._open[institution]:
                    del self._open[institution]

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_stream is None:
            return handler
        inner = handler.unary_stream

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            caller = current_caller()
            institution = None if caller in (None, OPERATOR) else caller
            refusal = self._take(institution)
            if refusal is not None:
                log.warning("control plane refused a stream of %s: %s", caller, refusal)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            try:
                yield from inner(request, context)
            finally:
                # Runs when the stream's generator ends, fails or is closed (gRPC drops
                # it when the caller goes away): when its thread is free again.
                self._give_back(institution)

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )


class NodeRegistryServicer(nodes_pb2_grpc.NodeRegistryServicer):
    def __init__(
        self,
        registry: NodeRegistry,
        superlink_address: str,
        heartbeat_interval_ms: int,
        ray_address: str = "",
        ray_nodes: RayNodesSource | None = None,
        ray_tls_signer: CoordinatorPki | None = None,
        ray_token: Path | None = None,
        approvals: RunApprovals | None = None,
        ray_head_id: Callable[[], str] = lambda: "",
        ray_claims: RayNodeClaims | None = None,
    ) -> None:
        self._registry = registry
        self._ray_head_id = ray_head_id  # the current head's (`RayHead.head_id`)
        self._superlink_address = superlink_address
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._ray_address = ray_address  # "": no Ray cluster to join
        # What ListNodes reports of the Ray cluster beside the registry.
        self._ray_nodes = ray_nodes or NoRay("Ray is off on this coordinator")
        self._ray_tls_signer = ray_tls_signer  # None: the Ray channel has no TLS
        self._ray_token = ray_token  # None: the Ray cluster takes no token
        # Issues each start of a node its claim (None: plain text, nodes declare).
        self._ray_claims = ray_claims
        self._approvals = approvals  # None: this coordinator starts no Flower runs

    @unary
    def RegisterNode(
        self, request: nodes_pb2.RegisterNodeRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.RegisterNodeResponse:
        try:
            node = self._registry.register(
                request.institution,
                request.hostname,
                request.device,
                request.signing_public_key,
                request.declared_examples,
            )
        except NodeLimitError as error:
            # Not raised on to `unary`, which would answer FAILED_PRECONDITION: waiting
            # (for one of its nodes to leave) is what helps, as RESOURCE_EXHAUSTED says.
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(str(error))
            return nodes_pb2.RegisterNodeResponse()
        return nodes_pb2.RegisterNodeResponse(
            node=node_to_proto(node),
            superlink_fleet_address=self._superlink_address,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
            ray_address=self._ray_address,
            ray_tls=self._ray_tls_signer is not None,
        )

    @unary
    def GetRayToken(
        self, request: nodes_pb2.GetRayTokenRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.GetRayTokenResponse:
        if self._ray_token is None:
            raise ConflictError("this coordinator's Ray cluster takes no token")
        # The interceptor has refused a revoked institution's certificate already.
        require_acting_as(request.institution)
        claim = self._ray_claims.issue(request.institution) if self._ray_claims else ""
        return nodes_pb2.GetRayTokenResponse(
            token=self._ray_token.read_bytes().strip(), node_claim=claim
        )

    @unary
    def GetRunApproval(
        self, request: nodes_pb2.GetRunApprovalRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.GetRunApprovalResponse:
        # Any authenticated caller may read an approval: it is a public, signed statement.
        if self._approvals is None:
            raise ConflictError("this coordinator starts no Flower runs")
        signed = self._approvals.get(_require(request.run_id, "run_id"))
        return nodes_pb2.GetRunApprovalResponse(
            statement=signed.statement,
            signature=signed.signature,
            coordinator_public_key=self._approvals.public_key.raw,
        )

    @unary
    def IssueRayCertificate(
        self, request: nodes_pb2.IssueRayCertificateRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.IssueRayCertificateResponse:
        if self._ray_tls_signer is None:
            raise ConflictError("this coordinator's Ray channel does not use TLS (serve --ray-tls)")
        require_acting_as(request.institution)
        cert = sign_node_csr(
            self._ray_tls_signer, request.institution, request.csr_pem, peer_ip(context.peer())
        )
        return nodes_pb2.IssueRayCertificateResponse(
            certificate_pem=pem(cert),
            ca_certificate_pem=self._ray_tls_signer.ca_cert.read_bytes(),
        )

    @unary
    def Heartbeat(
        self, request: nodes_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.HeartbeatResponse:
        node = self._registry.heartbeat(_require(request.node_id, "node_id"))
        return nodes_pb2.HeartbeatResponse(
            node=node_to_proto(node), ray_head_id=self._ray_head_id()
        )

    @unary
    def LeaveNode(
        self, request: nodes_pb2.LeaveNodeRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.LeaveNodeResponse:
        node = self._registry.leave(_require(request.node_id, "node_id"))
        return nodes_pb2.LeaveNodeResponse(node=node_to_proto(node))

    @unary
    def ListNodes(
        self, request: nodes_pb2.ListNodesRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.ListNodesResponse:
        registered = self._registry.list_nodes()
        ray = self._ray_nodes.snapshot()
        match = match_nodes(registered, ray.nodes)
        counted = (
            self._ray_claims.bind(ray.nodes)
            if self._ray_claims is not None
            else {n.ray_node_id: n.institution for n in ray.nodes if n.institution}
        )

        def registry_node(node: NodeRecord) -> nodes_pb2.Node:
            ray_node = match.by_registry_id.get(node.node_id)
            counted_for = counted.get(ray_node.ray_node_id, "") if ray_node else ""
            return node_to_proto(node, ray_node, counted_for)

        return nodes_pb2.ListNodesResponse(
            nodes=[registry_node(n) for n in registered],
            unmatched_ray_nodes=[
                ray_node_to_proto(n, counted.get(n.ray_node_id, "")) for n in match.unmatched
            ],
            ray_unavailable_reason=ray.unavailable_reason,
            ray_read_at_ms=ray.read_at_ms,
        )


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(
        self,
        jobs: JobService,
        store: StateStore,
        stopping: threading.Event,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self._jobs = jobs
        self._store = store
        self._stopping = stopping
        self._metrics = metrics or CoordinatorMetrics()

    def _require_caller_not_revoked(self) -> None:
        """A watch outlives the call's authentication: a revocation ends it."""
        caller = current_caller()
        if caller is not None and caller != OPERATOR and self._store.is_revoked(caller):
            log.warning("control plane: ending %s's job watch, its certificate was revoked", caller)
            self._metrics.auth_refused("control_plane", "revoked_certificate")
            raise UnauthenticatedError(f"the certificate of {caller!r} has been revoked")

    @unary
    def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        return jobs_pb2.SubmitJobResponse(job=job_to_proto(self._jobs.submit(request.spec_toml)))

    @unary
    def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        job, rounds = self._jobs.get(_require(request.job_id, "job_id"))
        return jobs_pb2.GetJobResponse(
            job=job_to_proto(job), rounds=[round_to_proto(r) for r in rounds]
        )

    @unary
    def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in self._jobs.list()])

    @unary
    def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        return jobs_pb2.CancelJobResponse(
            job=job_to_proto(self._jobs.cancel(_require(request.job_id, "job_id")))
        )

    @streaming
    def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.JobEvent]:
        job_id = _require(request.job_id, "job_id")
        job = self._store.get_job(job_id)
        # Events up to now are summarised by one snapshot plus the rounds so far.
        backlog = self._store.events_after(job_id, 0)
        sequence = backlog[-1].sequence if backlog else 0
        for record in self._store.list_rounds(job_id):
            yield jobs_pb2.JobEvent(sequence=sequence, round=round_to_proto(record))
        yield jobs_pb2.JobEvent(sequence=sequence, job=job_to_proto(job))
        while job.state not in FINAL_JOB_STATES and context.is_active():
            if self._stopping.wait(WATCH_POLL_INTERVAL_S):
                return
            self._require_caller_not_revoked()
            for event in self._store.events_after(job_id, sequence):
                sequence = event.sequence
                if event.kind == "round":
                    record = next(
                        r for r in self._store.list_rounds(job_id) if r.round == event.round
                    )
                    yield jobs_pb2.JobEvent(
                        sequence=sequence, time_ms=event.time_ms, round=round_to_proto(record)
                    )
                else:
                    job = self._store.get_job(job_id)
                    yield jobs_pb2.JobEvent(
                        sequence=sequence, time_ms=event.time_ms, job=job_to_proto(job)
                    )
