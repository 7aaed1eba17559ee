"""State records to protobuf messages."""

from __future__ import annotations

from consortium.proto.v1 import jobs_pb2, nodes_pb2
from coordinator.ray.nodes import RayNodeInfo
from coordinator.state import JobRecord, JobState, NodeRecord, NodeState, RoundRecord

NODE_STATES = {
    NodeState.ONLINE: nodes_pb2.NODE_STATE_ONLINE,
    NodeState.STALE: nodes_pb2.NODE_STATE_STALE,
    NodeState.GONE: nodes_pb2.NODE_STATE_GONE,
}

JOB_STATES = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}


def node_to_proto(
    node: NodeRecord, ray: RayNodeInfo | None = None, counted_for: str = ""
) -> nodes_pb2.Node:
    message = nodes_pb2.Node(
        node_id=node.node_id,
        institution=node.institution,
        hostname=node.hostname,
        device=node.device,
        state=NODE_STATES[node.state],
        registered_at_ms=node.registered_at_ms,
        last_heartbeat_ms=node.last_heartbeat_ms,
    )
    if ray is not None:
        message.ray.CopyFrom(ray_node_to_proto(ray, counted_for))
    return message


def ray_node_to_proto(node: RayNodeInfo, counted_for: str = "") -> nodes_pb2.RayNode:
    return nodes_pb2.RayNode(
        counted_for=counted_for,
        ray_node_id=node.ray_node_id,
        state=node.state,
        resources=dict(node.resources),
        labels=dict(node.labels),
        is_head=node.is_head,
        address=node.address,
    )


def job_to_proto(job: JobRecord) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        job_id=job.job_id,
        name=job.name,
        kind=job.kind,
        state=JOB_STATES[job.state],
        spec_toml=job.spec_toml,
        rounds_total=job.rounds_total,
        rounds_completed=job.rounds_completed,
        message=job.message,
        created_at_ms=job.created_at_ms,
        started_at_ms=job.started_at_ms,
        finished_at_ms=job.finished_at_ms,
        model_path=job.model_path,
        flower_run_id=job.flower_run_id,
    )


def round_to_proto(record: RoundRecord) -> jobs_pb2.RoundMetrics:
    return jobs_pb2.RoundMetrics(
        round=record.round,
        participants=record.participants,
        metrics=record.metrics,
        finished_at_ms=record.finished_at_ms,
    )
