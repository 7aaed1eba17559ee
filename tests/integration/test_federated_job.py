"""A real coordinator and two real institutions complete a federated job on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consortium.proto.v1 import jobs_pb2, nodes_pb2
from coordinator.cli.remote import Remote
from coordinator.demo import write_partitions
from tests.conftest import Processes, start_coordinator, wait_for

JOB = """\
name = "integration"
model = "digits-cnn"
dataset = "digits"
strategy = "fedprox"
proximal_mu = 0.01
rounds = 2
min_clients = 2
local_epochs = 1
learning_rate = 0.05
seed = 3
"""


@dataclass
class CompletedRun:
    data_dir: Path
    job: jobs_pb2.Job
    rounds: list[jobs_pb2.RoundMetrics]
    nodes_after_leave: list[nodes_pb2.Node]
    leftover_pids: list[int]


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompletedRun]:
    root = tmp_path_factory.mktemp("federated")
    processes = Processes(root / "logs")
    try:
        data_dir = root / "coordinator"
        address = start_coordinator(processes, data_dir)
        names = ["alpha-hospital", "beta-university"]
        for name, site in zip(names, write_partitions(root, names), strict=True):
            processes.start(
                f"client-{name}",
                "client",
                "join",
                "--insecure",
                "--coordinator",
                address,
                "--institution",
                name,
                "--data",
                str(site),
                "--state-dir",
                str(root / name),
            )
        with Remote(address) as remote:
            wait_for(
                "two online nodes",
                lambda: (
                    sum(n.state == nodes_pb2.NODE_STATE_ONLINE for n in remote.list_nodes()) == 2
                ),
            )
            job = remote.submit(JOB)
            final = None
            for event in remote.watch(job.job_id):
                processes.remember_descendants()  # Flower's helpers, to check they end
                if event.HasField("job") and event.job.state in (
                    jobs_pb2.JOB_STATE_SUCCEEDED,
                    jobs_pb2.JOB_STATE_FAILED,
                    jobs_pb2.JOB_STATE_CANCELLED,
                ):
                    final = event.job
            assert final is not None, "the watch stream ended before the job did"
            reply = remote.get(job.job_id)
            # Clients leave first (Ctrl-C equivalent), so the registry shows them gone.
            for child in processes.children[1:]:
                child.stop()
            nodes = remote.list_nodes()
        processes.stop_all()
        yield CompletedRun(data_dir, reply.job, list(reply.rounds), nodes, processes.alive())
    finally:
        processes.stop_all()


def test_federated_job_succeeds_with_two_institutions(completed_run: CompletedRun) -> None:
    job = completed_run.job
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.message
    assert job.rounds_completed == 2
    assert Path(job.model_path).is_file()
    assert [r.round for r in completed_run.rounds] == [0, 1, 2]
    assert all(r.participants == 2 for r in completed_run.rounds[1:])


def test_federated_job_accuracy_rises(completed_run: CompletedRun) -> None:
    initial = completed_run.rounds[0].metrics["eval_accuracy"]
    final = completed_run.rounds[-1].metrics["eval_accuracy"]
    assert final > initial + 0.2, (initial, final)


def test_clients_leaving_are_marked_gone(completed_run: CompletedRun) -> None:
    states = {n.institution: n.state for n in completed_run.nodes_after_leave}
    assert states == {
        "alpha-hospital": nodes_pb2.NODE_STATE_GONE,
        "beta-university": nodes_pb2.NODE_STATE_GONE,
    }


def test_every_child_process_is_gone_after_shutdown(completed_run: CompletedRun) -> None:
    assert completed_run.leftover_pids == []


def test_jobs_and_rounds_survive_a_restart(
    completed_run: CompletedRun, processes: Processes
) -> None:
    address = start_coordinator(processes, completed_run.data_dir, name="restarted")
    with Remote(address) as remote:
        jobs = remote.list_jobs()
        assert [j.job_id for j in jobs] == [completed_run.job.job_id]
        reply = remote.get(completed_run.job.job_id)
    assert reply.job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert list(reply.rounds) == completed_run.rounds
