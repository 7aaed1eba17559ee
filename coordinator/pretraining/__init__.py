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

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consortium.inner_loop import InnerTrainer
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
    from coordinator.pretraining.diloco import DiLoCoController
    from coordinator.pretraining.errors import (
        CheckpointMismatchError,
        ClusterNotConnectedError,
        ControllerFinishedError,
        PretrainFailedError,
    )
    from coordinator.pretraining.records import (
        ControllerState,
        OuterStepRecord,
        WorkerStepResult,
    )
    from coordinator.pretraining.spec import (
        PretrainJobSpec,
        parse_pretrain_spec,
        validate_pretrain_spec,
    )
    from coordinator.pretraining.worker import DiLoCoWorker

# Importing the package loads nothing heavy: `coordinator accounting` reads a JSON file
# and `coordinator serve` without Ray schedules no pretraining, so neither should pay for
# importing torch and ray. A name of the public surface loads its module on first use.
_SOURCE_MODULE = {
    "CheckpointMismatchError": "coordinator.pretraining.errors",
    "ClusterNotConnectedError": "coordinator.pretraining.errors",
    "ClusterView": "coordinator.pretraining.cluster",
    "ControllerFinishedError": "coordinator.pretraining.errors",
    "ControllerState": "coordinator.pretraining.records",
    "DiLoCoController": "coordinator.pretraining.diloco",
    "DiLoCoWorker": "coordinator.pretraining.worker",
    "InnerTrainer": "consortium.inner_loop",
    "InstitutionContribution": "coordinator.pretraining.accounting",
    "JobAccounting": "coordinator.pretraining.accounting",
    "OuterStepRecord": "coordinator.pretraining.records",
    "PretrainFailedError": "coordinator.pretraining.errors",
    "PretrainJobSpec": "coordinator.pretraining.spec",
    "PretrainResult": "coordinator.pretraining.api",
    "RayClusterView": "coordinator.pretraining.cluster",
    "ScalingDecision": "coordinator.pretraining.cluster",
    "ScalingPolicy": "coordinator.pretraining.cluster",
    "WorkerSlot": "coordinator.pretraining.cluster",
    "WorkerStepResult": "coordinator.pretraining.records",
    "account": "coordinator.pretraining.accounting",
    "parse_pretrain_spec": "coordinator.pretraining.spec",
    "result_of": "coordinator.pretraining.api",
    "run_pretraining": "coordinator.pretraining.api",
    "slots_from_nodes": "coordinator.pretraining.cluster",
    "step_compute": "coordinator.pretraining.accounting",
    "validate_pretrain_spec": "coordinator.pretraining.spec",
}


def __getattr__(name: str) -> Any:
    try:
        module = _SOURCE_MODULE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


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
