"""Plain records the state store reads and writes (no protobuf, no SQL)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class NodeState(StrEnum):
    ONLINE = "online"
    STALE = "stale"
    GONE = "gone"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    institution: str
    hostname: str
    device: str
    state: NodeState
    registered_at_ms: int
    last_heartbeat_ms: int


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    name: str
    kind: str
    spec_toml: str
    state: JobState
    rounds_total: int
    rounds_completed: int = 0
    message: str = ""
    created_at_ms: int = 0
    started_at_ms: int = 0
    finished_at_ms: int = 0
    model_path: str = ""
    flower_run_id: str = ""
    # The institution whose certificate submitted the job ("operator", or "" without TLS).
    submitted_by: str = ""


@dataclass(frozen=True)
class RoundRecord:
    job_id: str
    round: int
    participants: int
    metrics: dict[str, float] = field(default_factory=dict)
    finished_at_ms: int = 0


@dataclass(frozen=True)
class RayNodeClaim:
    """A claim the coordinator issued to an institution for one Ray node it is about to
    start (coordinator/ray/claims.py), and the Ray node it was bound to ('' until the
    coordinator saw a node carrying it)."""

    claim: str
    institution: str
    issued_at_ms: int
    ray_node_id: str = ""


@dataclass(frozen=True)
class JobEventRecord:
    """Something happened to a job: its state changed, or a round completed."""

    sequence: int
    job_id: str
    time_ms: int
    kind: str  # "job" or "round"
    round: int = 0
