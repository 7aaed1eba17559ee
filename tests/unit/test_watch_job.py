"""WatchJob over a real gRPC server on 127.0.0.1:0, backed by an in-memory store: the
backlog as one snapshot, then every round and state change in order, until the end."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest

from consortium.proto.v1 import jobs_pb2, jobs_pb2_grpc
from coordinator.api.servicers import JobsServicer
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.service import JobService
from coordinator.state import InMemoryStateStore, JobState, RoundRecord

SPEC = 'name = "w"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = 2\n'


@dataclass
class Api:
    stub: jobs_pb2_grpc.JobsStub
    store: InMemoryStateStore
    lifecycle: JobLifecycle
    stopping: threading.Event


@pytest.fixture
def api() -> Iterator[Api]:
    store = InMemoryStateStore()
    lifecycle = JobLifecycle(store)
    stopping = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    jobs_pb2_grpc.add_JobsServicer_to_server(
        JobsServicer(JobService(store, lifecycle), store, stopping), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Api(jobs_pb2_grpc.JobsStub(channel), store, lifecycle, stopping)
    finally:
        stopping.set()
        channel.close()
        server.stop(0).wait()


def describe(event: jobs_pb2.JobEvent) -> str:
    if event.HasField("round"):
        return f"round {event.round.round}"
    return jobs_pb2.JobState.Name(event.job.state)


def test_watch_streams_backlog_then_live_rounds_and_states_until_final(api: Api) -> None:
    job = api.stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=SPEC)).job
    api.lifecycle.start(job.job_id, "go")
    api.lifecycle.record_round(RoundRecord(job.job_id, round=0, participants=0))
    stream = api.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=30)
    seen = [describe(next(stream)), describe(next(stream))]
    assert seen == ["round 0", "JOB_STATE_RUNNING"]  # backlog: rounds so far, one snapshot
    api.lifecycle.record_round(RoundRecord(job.job_id, round=1, participants=2))
    api.lifecycle.record_round(RoundRecord(job.job_id, round=2, participants=2))
    api.lifecycle.succeed(job.job_id, "completed 2 rounds", "/m")
    rest = [describe(event) for event in stream]  # ends by itself at the final state
    assert rest == ["round 1", "round 2", "JOB_STATE_SUCCEEDED"]


def test_watch_of_a_finished_job_returns_its_snapshot_and_ends(api: Api) -> None:
    job = api.stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=SPEC)).job
    api.stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id))
    events = list(api.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=30))
    assert [describe(e) for e in events] == ["JOB_STATE_CANCELLED"]
    assert events[0].job.message == "cancelled by request"


def test_watch_shows_a_new_message_on_an_unchanged_state(api: Api) -> None:
    job = api.stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=SPEC)).job
    stream = api.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=30)
    assert next(stream).job.message == "waiting for the scheduler"
    api.lifecycle.note(job.job_id, "waiting for job x", while_in=frozenset({JobState.QUEUED}))
    assert next(stream).job.message == "waiting for job x"
    api.lifecycle.cancel(job.job_id)
    assert [describe(e) for e in stream] == ["JOB_STATE_CANCELLED"]


def test_watch_ends_when_the_coordinator_stops(api: Api) -> None:
    job = api.stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=SPEC)).job
    stream = api.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=30)
    assert describe(next(stream)) == "JOB_STATE_QUEUED"
    api.stopping.set()
    assert list(stream) == []


def test_watch_of_an_unknown_job_is_not_found(api: Api) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(api.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="nope"), timeout=30))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


def test_watch_without_a_job_id_is_invalid_argument(api: Api) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(api.stub.WatchJob(jobs_pb2.WatchJobRequest(), timeout=30))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id" in (caught.value.details() or "")
