"""Coordinator state: nodes, jobs, rounds and job events behind one interface."""

from coordinator.state.clock import now_ms
from coordinator.state.memory_store import InMemoryStateStore
from coordinator.state.records import (
    FINAL_JOB_STATES,
    JobEventRecord,
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
    RayNodeClaim,
    RoundRecord,
)
from coordinator.state.sqlite_store import SqliteStateStore
from coordinator.state.store import StateStore

__all__ = [
    "FINAL_JOB_STATES",
    "InMemoryStateStore",
    "JobEventRecord",
    "JobRecord",
    "JobState",
    "NodeRecord",
    "NodeState",
    "RayNodeClaim",
    "RoundRecord",
    "SqliteStateStore",
    "StateStore",
    "now_ms",
]
