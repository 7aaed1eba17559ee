"""FlowerJobRunner against a fake Flower (the `FlowerRuns` seam) and an in-memory store."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from consortium.errors import ChildProcessFailedError, NotFoundError
from consortium.provenance.signing import SigningKey
from consortium.run_approval import check_run
from coordinator.federated.approvals import RunApprovals
from coordinator.federated.flower_app import RunStatus
from coordinator.federated.runner import FlowerJobRunner
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.runner import JobCannotStartError
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.state import InMemoryStateStore, JobState

SPEC = """\
name = "f"
model = "digits-cnn"
dataset = "digits"
rounds = 2
"""


@dataclass
class FakeFlower:
    status_of_run: str = "running"
    runs: list[dict[str, str]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    status_calls: int = 0
    fab_unreadable: bool = False

    def run(self, run_config: dict[str, str]) -> str:
        self.runs.append(run_config)
        return str(100 + len(self.runs))

    def fab_hash(self, run_id: str) -> str:
        if self.fab_unreadable:
            raise ChildProcessFailedError("the SuperLink has no app recorded")
        return "ab" * 32

    def status(self, run_id: str) -> RunStatus:
        self.status_calls += 1
        return RunStatus(run_id, self.status_of_run, "details")

    def stop(self, run_id: str) -> None:
        self.stopped.append(run_id)


KEY = SigningKey.generate()


def setup(
    status_interval_s: float = 0.0,
    approvals: RunApprovals | None = None,
    max_resumes: int = 0,
    exited: dict[str, int] | None = None,
) -> tuple[FlowerJobRunner, FakeFlower, JobLifecycle, InMemoryStateStore, CoordinatorMetrics]:
    store = InMemoryStateStore()
    lifecycle = JobLifecycle(store)
    flower = FakeFlower()
    metrics = CoordinatorMetrics()
    approvals = approvals or RunApprovals(KEY)
    runner = FlowerJobRunner(
        lifecycle,
        store,
        flower,
        approvals,
        metrics,
        status_interval_s,
        serverapp_exit=(exited if exited is not None else {}).get,
        max_resumes=max_resumes,
    )
    return runner, flower, lifecycle, store, metrics


def test_the_started_run_is_approved_for_its_job_and_app_until_it_ends() -> None:
    approvals = RunApprovals(KEY)
    runner, _, lifecycle, store, _ = setup(approvals=approvals)
    job = lifecycle.start(lifecycle.submit("f", "federated", SPEC, 2).job_id, "go")
    runner.start(job)
    approval = check_run(approvals.get("101"), KEY.public, "101", "ab" * 32, job.job_id)
    assert approval.job_id == job.job_id
    lifecycle.cancel(job.job_id)
    runner.stop(store.get_job(job.job_id))
    with pytest.raises(NotFoundError, match="101"):
        approvals.get("101")


def test_a_run_whose_app_cannot_be_read_is_stopped_not_approved() -> None:
    approvals = RunApprovals(KEY)
    runner, flower, lifecycle, _, _ = setup(approvals=approvals)
    flower.fab_unreadable = True
    job = lifecycle.start(lifecycle.submit("f", "federated", SPEC, 2).job_id, "go")
    with pytest.raises(ChildProcessFailedError):
        runner.start(job)
    assert flower.stopped == ["101"]
    with pytest.raises(NotFoundError):
        approvals.get("101")


def test_start_submits_the_app_with_the_job_id_and_remembers_the_run() -> None:
    runner, flower, lifecycle, store, _ = setup()
    job = lifecycle.submit("f", "federated", SPEC, 2)
    job = lifecycle.start(job.job_id, "go")
    runner.start(job)
    assert flower.runs == [{"job-id": job.job_id}]
    stored = store.get_job(job.job_id)
    assert stored.flower_run_id == "101"
    assert "run 101" in stored.message


def test_run_whose_serverapp_died_is_requeued_to_resume_then_fails_past_the_budget() -> None:
    """A killed ServerApp (the launcher reports its exit at once) does not fail the job:
    it resumes from its last committed round, up to `max_resumes` times."""
    exited: dict[str, int] = {}
    runner, flower, lifecycle, store, metrics = setup(
        status_interval_s=3600, max_resumes=1, exited=exited
    )
    job = lifecycle.start(lifecycle.submit("f", "federated", SPEC, 2).job_id, "go")
    runner.start(job)
    assert runner.is_active(store.get_job(job.job_id))
    exited["101"] = -9
    assert not runner.is_active(store.get_job(job.job_id))
    resumed = store.get_job(job.job_id)
    assert resumed.state is JobState.QUEUED
    assert "its ServerApp exited with code -9" in resumed.message
    assert "resume 1 of at most 1" in resumed.message
    assert flower.stopped == ["101"]
    assert metrics.registry.get_sample_value("consortium_scheduler_runs_resumed_total") == 1

    runner.start(lifecycle.start(job.job_id, "again"))  # the scheduler starts it anew
    exited["102"] = -9
    assert not runner.is_active(store.get_job(job.job_id))
    assert store.get_job(job.job_id).state is JobState.FAILED
    assert "after 1 resumes" in store.get_job(job.job_id).message


def test_run_that_ends_without_its_serverapp_fails_the_job_and_is_counted() -> None:
    runner, flower, lifecycle, store, metrics = setup()
    job = lifecycle.start(lifecycle.submit("f", "federated", SPEC, 2).job_id, "go")
    runner.start(job)
    assert runner.is_active(store.get_job(job.job_id))
    flower.status_of_run = "finished:failed"
    assert not runner.is_active(store.get_job(job.job_id))
    failed = store.get_job(job.job_id)
    assert failed.state is JobState.FAILED
    assert "Flower run 101 ended (finished:failed" in failed.message
    sample = metrics.registry.get_sample_value(
        "consortium_scheduler_runs_failed_total", {"reason": "ended_early"}
    )
    assert sample == 1


def test_run_finished_after_success_is_not_failed() -> None:
    runner, flower, lifecycle, store, _metrics = setup()
    job = lifecycle.start(lifecycle.submit("f", "federated", SPEC, 2).job_id, "go")
    runner.start(job)
    lifecycle.succeed(job.job_id, "completed 2 rounds", "/m")
    flower.status_of_run = "finished:completed"
    assert not runner.is_active(store.get_job(job.job_id))
    assert store.get_job(job.job_id).state is JobState.SUCCEEDED
    assert flower.status_calls == 0  # a final job needs no question to Flower


def test_flower_is_asked_at_most_once_per_status_interval() -> None:
    runner, flower, lifecycle, store, _ = setup(status_interval_s=3600)
    job = lifecycle.start(lifecycle.submit("f", "federated", SPEC, 2).job_id, "go")
    runner.start(job)
    for _ in range(5):
        assert runner.is_active(store.get_job(job.job_id))
    assert flower.status_calls == 0


def test_stop_stops_the_flower_run_once() -> None:
    runner, flower, lifecycle, store, _ = setup()
    job = lifecycle.start(lifecycle.submit("f", "federated", SPEC, 2).job_id, "go")
    runner.start(job)
    lifecycle.cancel(job.job_id)
    runner.stop(store.get_job(job.job_id))
    runner.stop(store.get_job(job.job_id))
    assert flower.stopped == ["101"]
    assert not runner.is_active(store.get_job(job.job_id))


def test_job_cancelled_while_its_run_starts_gets_its_run_stopped() -> None:
    runner, flower, lifecycle, store, _ = setup()
    job = lifecycle.start(lifecycle.submit("f", "federated", SPEC, 2).job_id, "go")
    lifecycle.cancel(job.job_id)
    runner.start(job)
    assert flower.stopped == ["101"]
    assert store.get_job(job.job_id).state is JobState.CANCELLED


def test_waits_for_its_source_then_refuses_a_failed_one() -> None:
    runner, _, lifecycle, store, _ = setup()
    source = lifecycle.submit("src", "federated", SPEC, 2)
    fine_tune = lifecycle.submit(
        "ft",
        "federated",
        SPEC.replace('name = "f"', f'name = "ft"\ninit_from = "{source.job_id}"'),
        2,
    )
    reason = runner.waiting_reason(fine_tune)
    assert reason is not None and source.job_id in reason
    lifecycle.fail(source.job_id, "broke")
    with pytest.raises(JobCannotStartError, match="ended failed"):
        runner.waiting_reason(store.get_job(fine_tune.job_id))
