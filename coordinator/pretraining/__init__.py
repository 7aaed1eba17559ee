"""Shared compute: DiLoCo pretraining on the contributed nodes of a Ray cluster.

The public surface; everything else in this package is an implementation detail::

    import ray
    from coordinator.pretraining import parse_pretrain_spec, run_pretraining

    ray.init(address="auto")
    spec = parse_pretrain_spec(open("job.toml").read())
    result = run_pretraining(spec, data_dir / "checkpoints" / spec.name, on_step=print)

See docs/pretraining.md for the method, the state machine and how nodes join.
"""

from __future__ import annotations

from coordinator.pretraining.accounting import (
    InstitutionContribution,
    JobAccounting,
    account,
    step_compute,
)
from coordinator.pretraining.api import PretrainResult, result_of, run_pretraining
from coordinator.pretraining.cluster import (
    ClusterView,
    RayClusterView,
    ScalingDecision,
    ScalingPolicy,
    WorkerSlot,
    slots_from_nodes,
)
from coordinator.pretraining.diloco import ControllerState, DiLoCoController
from coordinator.pretraining.errors import (
    CheckpointMismatchError,
    ClusterNotConnectedError,
    ControllerFinishedError,
    PretrainFailedError,
)
from coordinator.pretraining.records import OuterStepRecord, WorkerStepResult
from coordinator.pretraining.spec import (
    PretrainJobSpec,
    parse_pretrain_spec,
    validate_pretrain_spec,
)
from coordinator.pretraining.worker import DiLoCoWorker, InnerTrainer

__all__ = [
    "CheckpointMismatchError",
    "ClusterNotConnectedError",
    "ClusterView",
    "ControllerFinishedError",
    "ControllerState",
    "DiLoCoController",
    "DiLoCoWorker",
    "InnerTrainer",
    "InstitutionContribution",
    "JobAccounting",
    "OuterStepRecord",
    "PretrainFailedError",
    "PretrainJobSpec",
    "PretrainResult",
    "RayClusterView",
    "ScalingDecision",
    "ScalingPolicy",
    "WorkerSlot",
    "WorkerStepResult",
    "account",
    "parse_pretrain_spec",
    "result_of",
    "run_pretraining",
    "slots_from_nodes",
    "step_compute",
    "validate_pretrain_spec",
]
