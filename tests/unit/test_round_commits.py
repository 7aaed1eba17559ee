"""Exactly-once rounds (issue 15 part 2): the provenance log is where a round is
committed; a stale run's late round and a round written twice are refused, counted and
never recorded, and a resumed run starts after the last committed round.

Real files throughout: the coordinator's SQLite state, its signing key and its log.
The two runs are what two ServerApps of one job do after a coordinator restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

from consortium.errors import CommitRefusedError
from consortium.models import build_model, parameter_tensors
from consortium.provenance.log import exclusive, read_lines
from consortium.provenance.records import Round
from consortium.provenance.signing import SigningKey
from consortium.provenance.verify import verify_log
from coordinator.data_dir import DATA_DIR_ENV, DataDir
from coordinator.federated import server_app
from coordinator.federated.checkpoints import CheckpointStore
from coordinator.federated.server_app import JobRun
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.running import RunningJob
from coordinator.jobs.spec import FederatedJobSpec
from coordinator.provenance.recorder import JobRecorder
from coordinator.state import RoundRecord, SqliteStateStore

SPEC = 'name = "r"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = 6\nmin_clients = 1\n'


def round_record(job_id: str, number: int) -> Round:
    return Round(
        job_id=job_id,
        round=number,
        global_digest=f"digest-{number}",
        aggregate_digest=f"digest-{number + 1}",  # the next round starts from it
        participants=["alpha"],
        metrics={"accuracy": 0.5 + number / 100},
    )


class Consortium:
    """A data dir with one running federated job, seen from the coordinator's side."""

    def __init__(self, root: Path) -> None:
        self.data_dir = DataDir(root)
        root.mkdir(parents=True)
        self.key = SigningKey.load_or_create(self.data_dir.signing_key)
        self.store = SqliteStateStore(self.data_dir.state_db)
        self.lifecycle = JobLifecycle(self.store)
        self.job_id = self.lifecycle.submit("r", "federated", SPEC, 6).job_id
        self.lifecycle.start(self.job_id, "go")
        self.hand_over("run-1")

    def hand_over(self, run_id: str) -> None:
        """What `FlowerJobRunner.start` does: the job is the new run's, under the lock."""
        with exclusive(self.data_dir.provenance_log):
            self.lifecycle.attach_run(self.job_id, run_id)

    def restart(self, run_id: str) -> None:
        """A coordinator restart: the job is requeued, started again on a new run."""
        self.lifecycle.requeue(self.job_id, "the coordinator restarted")
        self.lifecycle.start(self.job_id, "resumed")
        self.hand_over(run_id)

    def logged_rounds(self) -> list[int]:
        recorder = JobRecorder(self.data_dir, self.job_id)
        return [int(body["round"]) for body in recorder.logged_rounds()]


class FakeRpcError(grpc.RpcError):
    """What a Grid call raises when the SuperLink is gone."""


@pytest.fixture
def consortium(tmp_path: Path) -> Iterator[Consortium]:
    made = Consortium(tmp_path / "coordinator")
    yield made
    made.store.close()


def test_a_stale_runs_late_round_and_a_round_written_twice_are_refused_and_never_logged(
    consortium: Consortium,
) -> None:
    job_id = consortium.job_id
    with RunningJob.open(consortium.data_dir, job_id, "run-1") as first:
        old = JobRecorder(consortium.data_dir, job_id, fence=first.ensure_current)
        old.round(round_record(job_id, 1))
        old.round(round_record(job_id, 2))
        consortium.restart("run-2")  # the first run's ServerApp is still alive
        lines_before = read_lines(consortium.data_dir.provenance_log)
        with pytest.raises(CommitRefusedError) as stale:
            old.round(round_record(job_id, 3))
        assert stale.value.reason == "stale_run"
        assert read_lines(consortium.data_dir.provenance_log) == lines_before

    with RunningJob.open(consortium.data_dir, job_id, "run-2") as second:
        new = JobRecorder(consortium.data_dir, job_id, fence=second.ensure_current)
        assert new.last_round() == 2
        new.round(round_record(job_id, 3))
        for again in (3, 2):
            with pytest.raises(CommitRefusedError) as duplicate:
                new.round(round_record(job_id, again))
            assert duplicate.value.reason == "duplicate_round"
            assert "already committed" in str(duplicate.value)
    assert consortium.logged_rounds() == [1, 2, 3]
    report = verify_log(consortium.data_dir.provenance_log, consortium.key.public)
    assert report.records == len(consortium.logged_rounds())


def test_a_resumed_run_starts_after_the_last_committed_round_and_fills_the_state_gap(
    consortium: Consortium,
) -> None:
    """The run died after saving round 3's checkpoint but before committing it, and
    after committing round 2 to the log but before the state heard of it."""
    job_id = consortium.job_id
    checkpoints = CheckpointStore(consortium.data_dir.root, job_id)
    models = {}
    for number in (1, 2, 3):
        torch.manual_seed(number)
        models[number] = build_model("digits-cnn", {})
        checkpoints.save(number, dict(parameter_tensors(models[number])))
    with RunningJob.open(consortium.data_dir, job_id, "run-1") as first:
        recorder = JobRecorder(consortium.data_dir, job_id, fence=first.ensure_current)
        recorder.round(round_record(job_id, 1))
        first.record_round(RoundRecord(job_id, round=1, participants=1))
        recorder.round(round_record(job_id, 2))
    consortium.restart("run-2")

    with RunningJob.open(consortium.data_dir, job_id, "run-2") as second:
        assert isinstance(second.spec, FederatedJobSpec)
        run = JobRun(consortium.data_dir.root, second, second.spec)
        model, done = run.initial_model()
    assert done == 2
    for name, tensor in parameter_tensors(model).items():
        assert torch.equal(tensor, parameter_tensors(models[2])[name]), name
    rounds = consortium.store.list_rounds(job_id)
    assert [r.round for r in rounds] == [1, 2]
    assert rounds[1].metrics == {"accuracy": 0.52}  # copied from the log's record


def test_refused_commits_are_exported_as_a_metric(consortium: Consortium) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from coordinator.observability.state_metrics import StateCollector

    consortium.store.record_refused_commit(consortium.job_id, 3, "run-1", "stale_run")
    registry = CollectorRegistry()
    collector = StateCollector(consortium.store, 30.0, consortium.data_dir.root)
    try:
        registry.register(collector)
        text = generate_latest(registry).decode()
    finally:
        collector.close()
    assert 'consortium_round_commits_refused_total{reason="stale_run"} 1.0' in text
    assert 'consortium_round_commits_refused_total{reason="duplicate_round"} 0.0' in text


@pytest.mark.parametrize(
    ("error", "state"),
    [
        # The SuperLink restarted under the run: the run ends, the job stays for a resume.
        (ObjectPushError("object", 7, "session"), "RUNNING"),
        (FakeRpcError(), "RUNNING"),
        # A bug in the run: the job fails, saying what went wrong.
        (ValueError("a bug"), "FAILED"),
    ],
)
def test_a_run_that_loses_its_superlink_leaves_the_job_to_resume(
    consortium: Consortium,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    state: str,
) -> None:
    consortium.hand_over("7")
    monkeypatch.setenv(DATA_DIR_ENV, str(consortium.data_dir.root))

    def lose(self: JobRun, grid: object) -> None:
        raise error

    monkeypatch.setattr(JobRun, "run", lose)
    context = Context(
        run_id=7,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"job-id": consortium.job_id},
    )

    with pytest.raises(type(error)):
        server_app.main(cast(Grid, None), context)

    assert consortium.store.get_job(consortium.job_id).state.name == state
