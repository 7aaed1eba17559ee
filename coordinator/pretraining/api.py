"""The one call a scheduler needs: run (or resume) a pretraining job to the end."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from consortium.lm import Weights
from coordinator.pretraining.accounting import JobAccounting, account
from coordinator.pretraining.cluster import ClusterView, RayClusterView
from coordinator.pretraining.diloco import DiLoCoController, DispatchHook
from coordinator.pretraining.records import ControllerState, OuterStepRecord
from coordinator.pretraining.spec import PretrainJobSpec


@dataclass(frozen=True)
class PretrainResult:
    job: str
    state: ControllerState  # FINISHED, or RUNNING/WAITING when stopped early
    steps_completed: int
    model_digest: str
    val_loss: float | None  # after the last completed outer step
    weights: Weights  # global model, float32, by parameter name
    corpus_digest: str
    records: tuple[OuterStepRecord, ...]  # every completed outer step, resumed ones included
    accounting: JobAccounting


def run_pretraining(
    spec: PretrainJobSpec,
    checkpoint_dir: Path,
    on_step: Callable[[OuterStepRecord], None] | None = None,
    *,
    cluster_view: ClusterView | None = None,
    stop: threading.Event | None = None,
    on_dispatch: DispatchHook | None = None,
    on_wait: Callable[[str | None], None] | None = None,
) -> PretrainResult:
    """Run ``spec`` on the connected Ray cluster until its last outer step.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same run. Calls
    ``on_step(record)`` after every outer step (the checkpoint is already on disk then).
    Setting ``stop`` ends the run after the current step; the worker actors are always
    killed on return. Raises `PretrainFailedError` after ``max_failed_steps`` attempts
    in a row without ``min_workers`` results; while too few workers are *available* it
    keeps waiting (each attempt waits ``wait_for_workers_s``) until ``stop`` is set;
    ``on_wait(reason)`` hears why when it starts waiting or the reason changes, and
    ``on_wait(None)`` when workers are found.
    """
    view = cluster_view if cluster_view is not None else RayClusterView(device=spec.device)
    with DiLoCoController(
        spec, view, checkpoint_dir, stop=stop, on_dispatch=on_dispatch, on_wait=on_wait
    ) as ctl:
        ctl.run(on_step)
        return result_of(ctl)


def result_of(controller: DiLoCoController) -> PretrainResult:
    records = tuple(controller.records)
    return PretrainResult(
        job=controller.spec.name,
        state=controller.state,
        steps_completed=controller.step_index,
        model_digest=controller.model_digest(),
        val_loss=records[-1].val_loss if records else None,
        weights=controller.global_weights(),
        corpus_digest=controller.corpus.digest,
        records=records,
        accounting=account(controller.spec.name, records),
    )
