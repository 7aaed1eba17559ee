"""A workload from another package runs as a federated job (issue 16): the example
package examples/tiny_workload, written against docs/workloads.md and installed beside
Consortium (`make` installs it), trains at the site that lists it in its settings; the
site that does not is asked too, and refuses, naming the setting; the job's provenance
records where the workload's code came from, and the log verifies."""

from __future__ import annotations

from pathlib import Path

from consortium.processes import ChildProcess
from consortium.proto.v1 import jobs_pb2
from consortium.provenance.records import JobStarted, Round
from consortium.provenance.signing import SigningKey
from consortium.provenance.verify import verify_log
from consortium.workloads import package_digest
from coordinator.data_dir import DataDir
from tests.conftest import Processes
from tests.helpers import local_consortium, run_to_end, write_partitions

ROUNDS = 3
JOB = f"""\
name = "third-party workload"
workload = "softmax-digits"
dataset = "digits"
rounds = {ROUNDS}
min_clients = 1
local_epochs = 2
learning_rate = 0.5
round_timeout_s = 60.0
"""
ALLOWS_IT = '["digits-cnn", "softmax-digits"]'


def test_a_workload_package_runs_where_allowed_and_is_refused_elsewhere(
    tmp_path: Path, processes: Processes
) -> None:
    consortium = local_consortium(processes, tmp_path, secure=False)
    consortium.serve()
    alpha_data, beta_data = write_partitions(tmp_path, ["alpha", "beta"])
    consortium.join("alpha", alpha_data, env={"CONSORTIUM_CLIENT_WORKLOADS": ALLOWS_IT})
    beta: ChildProcess = consortium.join("beta", beta_data)  # the built-in ones only
    consortium.wait_for_online(2)
    with consortium.connect() as remote:
        job = run_to_end(remote, JOB, processes)
        rounds = list(remote.get(job.job_id).rounds)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.message
    # Every round trained at alpha alone: beta was sent each round and refused it.
    assert [r.participants for r in rounds[1:]] == [1] * ROUNDS
    assert rounds[-1].metrics["eval_accuracy"] > rounds[0].metrics["eval_accuracy"] + 0.2
    beta_log = " ".join(beta.log_path.read_text().split())  # the console wraps lines
    assert "workloads: digits-cnn, bytelm" in beta_log
    assert "refused task" in beta_log and "Traceback" not in beta_log
    superlink_log = DataDir(consortium.data_dir).log_file("superlink").read_text()
    assert "site beta does not run workload 'softmax-digits'" in superlink_log

    paths = DataDir(consortium.data_dir)
    verified = verify_log(
        paths.provenance_log, SigningKey.load(paths.signing_key).public, allow_unbound_keys=True
    )
    records = verified.jobs[job.job_id]
    [started] = [r for r in records if isinstance(r, JobStarted)]
    assert started.workload == {
        "name": "softmax-digits",
        "distribution": "tiny-workload",
        "version": "0.1.0",
        "module": "tiny_workload.workload",
        "source_digest": package_digest("tiny_workload"),
    }
    assert [r.round for r in records if isinstance(r, Round)] == list(range(1, ROUNDS + 1))
