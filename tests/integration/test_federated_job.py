"""A real coordinator and two real institutions complete a federated job on loopback."""

from __future__ import annotations

from pathlib import Path

from consortium.proto.v1 import jobs_pb2, nodes_pb2
from coordinator.cli.remote import connect
from tests.conftest import Processes
from tests.helpers import CompletedRun, start_coordinator


def test_federated_job_succeeds_with_two_institutions(completed_run: CompletedRun) -> None:
    job = completed_run.job
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.message
    assert job.rounds_completed == 3
    assert Path(job.model_path).is_file()
    assert [r.round for r in completed_run.rounds] == [0, 1, 2, 3]
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
    address = start_coordinator(processes, completed_run.data_dir, name="restarted", secure=True)
    with connect(address, completed_run.data_dir) as remote:
        jobs = remote.list_jobs()
        assert [j.job_id for j in jobs] == [completed_run.job.job_id]
        reply = remote.get(completed_run.job.job_id)
    assert reply.job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert list(reply.rounds) == completed_run.rounds
