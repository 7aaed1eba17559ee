"""Compute accounting: what each institution gave to and used of a pretraining job."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from prometheus_client import CollectorRegistry

from consortium.provenance.signing import SigningKey
from coordinator.data_dir import DataDir
from coordinator.observability.state_metrics import StateCollector
from coordinator.pretraining.accounting import account, step_compute
from coordinator.pretraining.records import OuterStepRecord, WorkerStepResult
from coordinator.pretraining.runner import outer_step_body
from coordinator.provenance.recorder import JobRecorder
from coordinator.state import InMemoryStateStore, NodeRecord, NodeState


def result(institution: str, device: Literal["cpu", "gpu"], seconds: float) -> WorkerStepResult:
    return WorkerStepResult(
        worker=f"{institution}/n/{device}0",
        institution=institution,
        node_id="n",
        device=device,
        position=0,
        shard_ids=(0,),
        seed=1,
        pseudo_gradient_digest="d",
        bytes_received=100,
        bytes_sent=50,
        compute_s=seconds,
        inner_steps=5,
        tokens=320,
        train_loss=2.0,
    )


def step(index: int, *results: WorkerStepResult) -> OuterStepRecord:
    return OuterStepRecord(
        step=index,
        results=results,
        workers_lost={},
        step_seed=index,
        aggregate_digest="a",
        model_digest="m",
        val_loss=3.0,
        wall_s=1.0,
    )


def test_step_splits_each_devices_total_over_the_institutions_taking_part() -> None:
    record = step(0, result("a", "gpu", 6.0), result("b", "cpu", 2.0), result("b", "gpu", 2.0))
    contributed, consumed = step_compute(record)
    assert contributed == {("a", "gpu"): 6.0, ("b", "cpu"): 2.0, ("b", "gpu"): 2.0}
    assert consumed == {("a", "gpu"): 4.0, ("b", "gpu"): 4.0, ("a", "cpu"): 1.0, ("b", "cpu"): 1.0}


def test_job_accounting_sums_given_and_used_per_institution() -> None:
    records = [
        step(0, result("a", "cpu", 3.0), result("b", "cpu", 1.0)),
        step(1, result("a", "cpu", 2.0)),  # b's worker was lost in this step
    ]
    job = account("j", records)
    a, b = job.institutions["a"], job.institutions["b"]
    assert (a.cpu_s, b.cpu_s) == (5.0, 1.0)
    assert (a.consumed_cpu_s, b.consumed_cpu_s) == (4.0, 2.0)
    assert (a.outer_steps, b.outer_steps) == (2, 1)
    assert a.consumed_cpu_s + b.consumed_cpu_s == pytest.approx(job.cpu_s)
    assert job.shares() == {"a": pytest.approx(5 / 6), "b": pytest.approx(1 / 6)}


def test_metrics_count_compute_by_institution_and_device_from_the_log(tmp_path: Path) -> None:
    """Read from the signed `outer_step` records at scrape time, so a federated run's
    steps (written by its ServerApp, another process) count as the Ray pool's do."""
    data_dir = DataDir(tmp_path)
    SigningKey.load_or_create(data_dir.signing_key)
    recorder = JobRecorder(data_dir, "j")
    for index in range(2):
        record = step(index, result("a", "gpu", 2.5), result("b", "gpu", 0.5))
        recorder.outer_step(outer_step_body("j", record))
    store = InMemoryStateStore()
    store.add_node(NodeRecord("n1", "a", "host", "cpu", NodeState.ONLINE, 0, 0))
    store.add_node(NodeRecord("n2", "c", "host", "cpu", NodeState.ONLINE, 0, 0))
    registry = CollectorRegistry()
    collector = StateCollector(store, 10.0, tmp_path)
    registry.register(collector)
    try:
        sample = registry.get_sample_value
        gpu = {"institution": "a", "device": "gpu"}
        assert sample("consortium_compute_contributed_seconds_total", gpu) == 5.0
        assert sample("consortium_compute_consumed_seconds_total", gpu) == 3.0
        # A joined institution has a series before it computes anything.
        idle = {"institution": "c", "device": "cpu"}
        assert sample("consortium_compute_contributed_seconds_total", idle) == 0.0
    finally:
        collector.close()
