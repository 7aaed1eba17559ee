"""A typed handle on a running coordinator's control-plane API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from consortium.errors import UnreachableError
from consortium.proto.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)
from consortium.rpc import DEFAULT_RETRY, RetryPolicy, call_with_retry, open_channel, translate
from consortium.tls import ClientTls
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir


def resolve_address(address: str | None, data_dir: Path) -> str:
    """An explicit address, else the one a local `coordinator serve` wrote."""
    if address:
        return address
    recorded = DataDir(data_dir).address_file
    if recorded.exists():
        return recorded.read_text().strip()
    raise UnreachableError(
        f"no coordinator address: pass --coordinator HOST:PORT, or start `coordinator serve` "
        f"with --data-dir {data_dir} (it writes {recorded})"
    )


def connect(address: str | None, data_dir: Path) -> Remote:
    """The coordinator at `address` (or the data dir's), over mutual TLS with the
    operator's certificate when the data dir holds the consortium PKI."""
    files = CoordinatorPki(data_dir)
    tls = files.operator_tls() if files.exists() else None
    return Remote(resolve_address(address, data_dir), tls=tls)


class Remote:
    def __init__(
        self, address: str, policy: RetryPolicy = DEFAULT_RETRY, tls: ClientTls | None = None
    ) -> None:
        self.address = address
        self._policy = policy
        self._channel = open_channel(address, tls)
        self._jobs = jobs_pb2_grpc.JobsStub(self._channel)
        self._nodes = nodes_pb2_grpc.NodeRegistryStub(self._channel)
        self._status = status_pb2_grpc.CoordinatorStatusStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, spec_toml: str) -> jobs_pb2.Job:
        request = jobs_pb2.SubmitJobRequest(spec_toml=spec_toml)
        response: jobs_pb2.SubmitJobResponse = call_with_retry(
            lambda t: self._jobs.SubmitJob(request, timeout=t), self.address, self._policy
        )
        return response.job

    def get(self, job_id: str) -> jobs_pb2.GetJobResponse:
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        response: jobs_pb2.GetJobResponse = call_with_retry(
            lambda t: self._jobs.GetJob(request, timeout=t), self.address, self._policy
        )
        return response

    def list_jobs(self) -> list[jobs_pb2.Job]:
        response: jobs_pb2.ListJobsResponse = call_with_retry(
            lambda t: self._jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=t),
            self.address,
            self._policy,
        )
        return list(response.jobs)

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        response: jobs_pb2.CancelJobResponse = call_with_retry(
            lambda t: self._jobs.CancelJob(request, timeout=t), self.address, self._policy
        )
        return response.job

    def list_nodes(self) -> list[nodes_pb2.Node]:
        return list(self.nodes_overview().nodes)

    def nodes_overview(self) -> nodes_pb2.ListNodesResponse:
        """Registry nodes with their Ray side, the Ray nodes no registry node claims,
        and why the Ray side is missing when it is."""
        response: nodes_pb2.ListNodesResponse = call_with_retry(
            lambda t: self._nodes.ListNodes(nodes_pb2.ListNodesRequest(), timeout=t),
            self.address,
            self._policy,
        )
        return response

    def status(self) -> status_pb2.GetStatusResponse:
        """The coordinator's runtimes (SuperLink, Ray head): state, restarts, why not."""
        response: status_pb2.GetStatusResponse = call_with_retry(
            lambda t: self._status.GetStatus(status_pb2.GetStatusRequest(), timeout=t),
            self.address,
            self._policy,
        )
        return response

    def watch(self, job_id: str) -> Iterator[jobs_pb2.JobEvent]:
        # Check the job exists (with retries) before opening the stream.
        self.get(job_id)
        try:
            yield from self._jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id))
        except grpc.RpcError as error:
            raise translate(error, self.address) from None
