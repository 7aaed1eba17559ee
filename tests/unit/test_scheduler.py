"""The scheduler, stepped one decision at a time over an in-memory store with fake
runners (the `JobRunner` seam), so no Flower or Ray is needed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from consortium.errors import ChildProcessFailedError
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.runner import (
    ByPlacement,
    JobCannotStartError,
    NeedsRuntime,
    UnavailableRunner,
)
from coordinator.jobs.scheduler import Scheduler
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.state import InMemoryStateStore, JobRecord, JobState


@dataclass
class FakeRunner:
    """A runtime that does what the test says: wait, refuse, run until told."""

    waiting: str | None = None
    never: str | None = None
    start_error: str | None = None
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    shut_down: bool = False

    def waiting_reason(self, job: JobRecord) -> str | None:
        if self.never is not None:
            raise JobCannotStartError(self.never)
        return self.waiting

    def start(self, job: JobRecord) -> None:
        assert job.state is JobState.RUNNING, "started before the lifecycle moved it"
        if self.start_error is not None:
            raise ChildProcessFailedError(self.start_error)
        self.started.append(job.job_id)
        self.active.add(job.job_id)

    def is_active(self, job: JobRecord) -> bool:
        return job.job_id in self.active

    def stop(self, job: JobRecord) -> None:
        self.stopped.append(job.job_id)
        self.active.discard(job.job_id)

    def shutdown(self) -> None:
        self.shut_down = True


@dataclass
class Harness:
    store: InMemoryStateStore
    lifecycle: JobLifecycle
    federated: FakeRunner
    pretrain: FakeRunner
    scheduler: Scheduler
    metrics: CoordinatorMetrics

    def submit(self, kind: str = "federated", name: str = "j") -> str:
        return self.lifecycle.submit(name, kind, f'name = "{name}"', rounds_total=2).job_id

    def state(self, job_id: str) -> JobState:
        return self.store.get_job(job_id).state


def harness() -> Harness:
    store = InMemoryStateStore()
    lifecycle = JobLifecycle(store)
    federated, pretrain = FakeRunner(), FakeRunner()
    metrics = CoordinatorMetrics()
    scheduler = Scheduler(lifecycle, {"federated": federated, "pretrain": pretrain}, 0.01, metrics)
    return Harness(store, lifecycle, federated, pretrain, scheduler, metrics)


def counter(metrics: CoordinatorMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_step_starts_the_oldest_queued_job_on_the_runner_of_its_kind() -> None:
    h = harness()
    first, second = h.submit("pretrain", "a"), h.submit("federated", "b")
    h.scheduler.step()
    assert h.pretrain.started == [first]
    assert h.federated.started == []
    assert h.state(first) is JobState.RUNNING
    assert h.state(second) is JobState.QUEUED
    assert h.scheduler.active_job == first
    assert counter(h.metrics, "consortium_scheduler_runs_started_total") == 1


def test_next_job_waits_until_the_active_run_releases_the_runtime() -> None:
    h = harness()
    first, second = h.submit(name="a"), h.submit(name="b")
    h.scheduler.step()
    h.scheduler.step()
    assert h.federated.started == [first]
    h.lifecycle.succeed(first, "done", "/m")
    h.federated.active.discard(first)
    h.scheduler.step()
    assert h.federated.started == [first, second]
    assert h.scheduler.active_job == second


def test_cancelled_running_job_is_stopped_once_and_frees_the_runtime() -> None:
    h = harness()
    job = h.submit()
    h.scheduler.step()
    h.lifecycle.cancel(job)
    h.scheduler.step()
    h.scheduler.step()
    assert h.federated.stopped == [job]
    assert h.scheduler.active_job is None
    assert h.state(job) is JobState.CANCELLED


def test_waiting_job_keeps_its_place_and_shows_why() -> None:
    h = harness()
    h.federated.waiting = "waiting for job abc (its model is this job's starting point)"
    job = h.submit()
    h.scheduler.step()
    assert h.state(job) is JobState.QUEUED
    assert h.store.get_job(job).message == h.federated.waiting
    events = len(h.store.events_after(job, 0))
    h.scheduler.step()  # same reason: no new event for watchers
    assert len(h.store.events_after(job, 0)) == events
    h.federated.waiting = None
    h.scheduler.step()
    assert h.state(job) is JobState.RUNNING


def test_job_that_can_never_start_fails_with_the_runner_reason() -> None:
    h = harness()
    h.federated.never = "job abc, whose model this job starts from, ended failed"
    job = h.submit()
    h.scheduler.step()
    assert h.state(job) is JobState.FAILED
    assert h.store.get_job(job).message == h.federated.never
    assert h.federated.started == []


def test_start_error_is_retried_with_backoff_then_fails_the_job_and_each_is_counted() -> None:
    """A runtime that died just as a run started (a SuperLink restarting) must not end
    the job: it goes back to the queue, and fails only after the last attempt."""
    now = [0.0]
    h = harness()
    h.scheduler = Scheduler(
        h.lifecycle,
        {"federated": h.federated, "pretrain": h.pretrain},
        0.01,
        h.metrics,
        start_attempts=2,
        clock=lambda: now[0],
    )
    h.federated.start_error = "`flwr run` failed"
    job = h.submit()
    h.scheduler.step()
    assert h.state(job) is JobState.QUEUED
    assert "attempt 1 of 2" in h.store.get_job(job).message
    h.scheduler.step()  # too early: the backoff holds it
    assert h.state(job) is JobState.QUEUED
    now[0] += 10
    h.scheduler.step()
    assert h.state(job) is JobState.FAILED
    assert "flwr run" in h.store.get_job(job).message
    assert h.scheduler.active_job is None
    assert counter(h.metrics, "consortium_scheduler_runs_failed_total", reason="start_error") == 2


def test_a_start_that_succeeds_on_retry_runs_the_job() -> None:
    now = [0.0]
    h = harness()
    h.scheduler = Scheduler(
        h.lifecycle, {"federated": h.federated}, 0.01, h.metrics, clock=lambda: now[0]
    )
    h.federated.start_error = "the SuperLink is restarting"
    job = h.submit()
    h.scheduler.step()
    h.federated.start_error = None
    now[0] += 10
    h.scheduler.step()
    assert h.state(job) is JobState.RUNNING
    assert h.scheduler.active_job == job


def test_kind_without_runner_fails_naming_the_known_kinds() -> None:
    h = harness()
    job = h.submit(kind="quantum")
    h.scheduler.step()
    assert h.state(job) is JobState.FAILED
    assert "no 'quantum' jobs" in h.store.get_job(job).message
    assert "federated, pretrain" in h.store.get_job(job).message


def test_unavailable_runner_fails_its_jobs_and_the_queue_moves_on() -> None:
    store = InMemoryStateStore()
    lifecycle = JobLifecycle(store)
    federated = FakeRunner()
    scheduler = Scheduler(
        lifecycle,
        {"federated": federated, "pretrain": UnavailableRunner("pretraining needs Ray")},
        0.01,
    )
    pretrain = lifecycle.submit("p", "pretrain", "", 2).job_id
    federated_job = lifecycle.submit("f", "federated", "", 2).job_id
    scheduler.step()
    scheduler.step()
    assert store.get_job(pretrain).state is JobState.FAILED
    assert store.get_job(pretrain).message == "pretraining needs Ray"
    assert federated.started == [federated_job]


def test_a_pretraining_job_runs_on_the_runner_of_its_placement() -> None:
    """Federated pretraining shares the Flower runner with fine-tuning; a ray-pool job
    on a coordinator without Ray fails, saying so, and the queue moves on."""
    store = InMemoryStateStore()
    lifecycle = JobLifecycle(store)
    flower = FakeRunner()
    placements = {"p-fed": "federated", "p-ray": "ray-pool", "f": "federated"}
    pretrain = ByPlacement(
        {"federated": flower, "ray-pool": UnavailableRunner("ray-pool needs Ray")},
        lambda job: placements[job.name],
    )
    scheduler = Scheduler(lifecycle, {"federated": flower, "pretrain": pretrain}, 0.01)
    on_ray = lifecycle.submit("p-ray", "pretrain", "", 2).job_id
    at_sites = lifecycle.submit("p-fed", "pretrain", "", 2).job_id
    scheduler.step()
    scheduler.step()
    assert store.get_job(on_ray).state is JobState.FAILED
    assert store.get_job(on_ray).message == "ray-pool needs Ray"
    assert flower.started == [at_sites]
    flower.active.discard(at_sites)
    scheduler.shutdown()
    assert flower.shut_down


def test_recover_requeues_jobs_a_stopped_coordinator_left_running() -> None:
    h = harness()
    job = h.submit()
    h.lifecycle.start(job, "go")
    h.scheduler.recover()
    assert h.state(job) is JobState.QUEUED
    assert "resumes after round 0" in h.store.get_job(job).message
    h.scheduler.step()
    assert h.federated.started == [job]


def test_run_forever_recovers_steps_and_stops_on_the_event() -> None:
    h = harness()
    job = h.submit()
    stopping = threading.Event()
    steps: list[int] = []

    def before_step() -> None:
        steps.append(1)
        if len(steps) == 3:
            stopping.set()

    thread = threading.Thread(target=h.scheduler.run_forever, args=(stopping, before_step))
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert len(steps) == 3
    assert h.federated.started == [job]


def test_a_failing_step_is_logged_and_the_loop_goes_on() -> None:
    h = harness()
    stopping = threading.Event()
    calls: list[int] = []

    def before_step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("transient")
        stopping.set()

    h.scheduler.run_forever(stopping, before_step)
    assert len(calls) == 2


def test_shutdown_reaches_every_runner_and_leaves_jobs_running() -> None:
    h = harness()
    job = h.submit()
    h.scheduler.step()
    h.scheduler.shutdown()
    assert h.federated.shut_down and h.pretrain.shut_down
    assert h.state(job) is JobState.RUNNING


def test_a_job_waits_while_the_runtime_it_needs_is_down_and_starts_once_it_is_back() -> None:
    store = InMemoryStateStore()
    lifecycle = JobLifecycle(store)
    federated = FakeRunner()
    down: list[str | None] = ["waiting: the superlink is restarting: exited with code -9"]
    gated = NeedsRuntime(federated, lambda: down[0])
    scheduler = Scheduler(lifecycle, {"federated": gated}, 0.01, start_attempts=1)
    job_id = lifecycle.submit("j", "federated", 'name = "j"', rounds_total=2).job_id
    for _ in range(5):  # no start attempt is spent while it is down
        scheduler.step()
    job = store.get_job(job_id)
    assert job.state is JobState.QUEUED and "superlink is restarting" in job.message
    assert federated.started == []
    down[0] = None
    scheduler.step()
    assert store.get_job(job_id).state is JobState.RUNNING and federated.started == [job_id]
    assert gated.is_active(store.get_job(job_id))
    gated.stop(store.get_job(job_id))
    gated.shutdown()
    assert federated.stopped == [job_id] and federated.shut_down
