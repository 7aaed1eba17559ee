"""A pretraining job survives a coordinator restart, and `coordinator replay` re-runs it.

One real job for the module: `coordinator serve --insecure` and one `client join` whose
Ray worker joins it; the coordinator is stopped (SIGTERM) after round 2 and a new one
starts on the same data dir, resumes the job from its checkpoint and finishes it. Then
`coordinator replay` re-trains every outer step on this CPU and must match the signed log
bit for bit, across the resume (the workers' AdamW state starts fresh there). Logs the
test re-signs with the coordinator's own key show that replay really recomputes: a
changed pseudo-gradient digest is named by step and worker, and a job logged with
another corpus or without determinism is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consortium.exit_codes import ExitCode
from consortium.proto.v1 import jobs_pb2
from consortium.provenance.log import ProvenanceLog, read_lines
from consortium.provenance.signing import SigningKey
from coordinator.cli.remote import Remote
from coordinator.data_dir import DataDir
from tests.conftest import Processes
from tests.helpers import (
    FINAL_STATES,
    TINY_PRETRAIN,
    join_site,
    online_nodes,
    run_cli,
    start_coordinator,
    wait_for,
    write_partitions,
)

INSTITUTION = "aurora"
OUTER_STEPS = 5
STOP_AFTER_ROUND = 2
JOB_TIMEOUT_S = 150.0
COORDINATOR_STOP_TIMEOUT_S = 60.0  # the current outer step ends first, then Ray and Flower

# The tiny model of test_pretrain_job.py, with enough inner and outer steps (about a
# second per outer step here) that the coordinator is surely stopped before the last one.
PRETRAIN_JOB = f"""\
name = "restart-pretrain"
{TINY_PRETRAIN}inner_steps = 100
outer_steps = {OUTER_STEPS}
min_workers = 1
wait_for_workers_s = 120.0
worker_start_timeout_s = 120.0
step_timeout_s = 120.0
"""


@dataclass
class RestartedJob:
    data_dir: Path
    job_id: str
    reply: jobs_pb2.GetJobResponse
    rounds_before_restart: int


@pytest.fixture(scope="module")
def restarted_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartedJob]:
    root = tmp_path_factory.mktemp("pretrain-restart")
    processes = Processes(root / "logs")
    try:
        data_dir = root / "coordinator"
        address = start_coordinator(processes, data_dir, name="coordinator-1", ray=True)
        (data,) = write_partitions(root, [INSTITUTION])
        join_site(
            processes,
            "client",
            data,
            root / "state",
            coordinator=address,
            institution=INSTITUTION,
            ray=True,
        )
        with Remote(address) as remote:
            wait_for(
                "the node online",
                lambda: online_nodes(remote.list_nodes()) > 0,
            )
            job_id = remote.submit(PRETRAIN_JOB).job_id
            wait_for(
                f"round {STOP_AFTER_ROUND}",
                lambda: remote.get(job_id).job.rounds_completed >= STOP_AFTER_ROUND,
                timeout_s=JOB_TIMEOUT_S,
            )
        processes.children[0].stop(timeout_s=COORDINATOR_STOP_TIMEOUT_S)
        with Remote(
            start_coordinator(processes, data_dir, name="coordinator-2", ray=True)
        ) as remote:
            before = remote.get(job_id).job.rounds_completed
            wait_for(
                "the resumed job to end",
                lambda: remote.get(job_id).job.state in FINAL_STATES,
                timeout_s=JOB_TIMEOUT_S,
            )
            reply = remote.get(job_id)
        processes.stop_all()
        yield RestartedJob(data_dir, job_id, reply, before)
    finally:
        processes.stop_all()


def job_entries(data_dir: Path, job_id: str) -> list[dict[str, Any]]:
    lines = DataDir(data_dir).provenance_log.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    return [e for e in entries if e.get("body", {}).get("job_id") == job_id]


def test_restarted_coordinator_resumes_the_job_from_its_checkpoint(
    restarted_job: RestartedJob,
) -> None:
    reply = restarted_job.reply
    assert reply.job.state == jobs_pb2.JOB_STATE_SUCCEEDED, reply.job.message
    # Stopped after round 2 at the earliest, and before the last round.
    assert STOP_AFTER_ROUND <= restarted_job.rounds_before_restart < OUTER_STEPS
    assert [r.round for r in reply.rounds] == list(range(1, OUTER_STEPS + 1))
    entries = job_entries(restarted_job.data_dir, restarted_job.job_id)
    types = [e["type"] for e in entries]
    resumed_at = types.index("job_resumed")
    assert types[0] == "job_started" and types.count("job_started") == 1
    assert types.count("job_resumed") == 1
    steps = [e["body"]["step"] for e in entries if e["type"] == "outer_step"]
    assert steps == list(range(OUTER_STEPS))  # each round once, none lost or repeated
    assert types[:resumed_at].count("outer_step") == restarted_job.rounds_before_restart
    assert entries[resumed_at]["body"]["after_round"] == restarted_job.rounds_before_restart
    assert types[-1] == "job_completed"
    # Before the restart and after it, the worker ran on another Ray node.
    workers = [
        tuple(w["worker"] for w in e["body"]["workers"])
        for e in entries
        if e["type"] == "outer_step"
    ]
    assert workers[0] != workers[-1]
    # The site heard of the new head in a heartbeat reply and rejoined it at once, not
    # when its raylet was refused by the new GCS about a minute later. (On a loaded
    # machine the old raylet can be refused, and restarted by the site's supervisor,
    # before the first heartbeat reply arrives; after that reply it never is.)
    site_log = (restarted_job.data_dir.parent / "logs" / "client.log").read_text()
    rejoined = "the coordinator's Ray head restarted; the Ray worker joins the new one"
    assert rejoined in site_log
    assert "the ray-worker exited" not in site_log.split(rejoined, 1)[1]
    verified = run_cli(
        "coordinator", "provenance", "verify", "--data-dir", str(restarted_job.data_dir)
    )
    assert verified.returncode == 0, verified.stderr


def replay(data_dir: Path, job_id: str) -> subprocess.CompletedProcess[str]:
    return run_cli("coordinator", "replay", job_id, "--data-dir", str(data_dir))


def test_replay_reproduces_every_outer_step_bit_for_bit_across_the_resume(
    restarted_job: RestartedJob,
) -> None:
    replayed = replay(restarted_job.data_dir, restarted_job.job_id)
    assert replayed.returncode == 0, replayed.stderr + replayed.stdout
    out = " ".join(replayed.stdout.split())  # rich wraps long lines
    entries = job_entries(restarted_job.data_dir, restarted_job.job_id)
    logged = [e["body"] for e in entries if e["type"] == "outer_step"]
    for body in logged:
        step, aggregate, model = body["step"], body["aggregate_digest"], body["model_digest"]
        assert re.search(
            rf"step {step} \(round {step + 1}\): 1 worker\(s\)(, 1 fresh)?; pseudo-gradients, "
            rf"aggregate {aggregate[:16]} and model {model[:16]} match the log",
            out,
        ), (step, out)
    # Fresh AdamW state at the first step and again right after the resume.
    fresh = [int(m) for m in re.findall(r"step (\d) \(round \d\): 1 worker\(s\), 1 fresh", out)]
    assert fresh == [0, restarted_job.rounds_before_restart]
    assert f"replay OK: {OUTER_STEPS} outer step(s) reproduced bit for bit" in out


def resigned_copy(
    source: Path, target: Path, job_id: str, edit: Callable[[str, dict[str, Any]], None]
) -> Path:
    """``target``: a data dir whose log holds ``source``'s records, with ``edit(type,
    body)`` applied to the job's records, all signed again with the coordinator's key
    (so the log verifies and only replay can tell)."""
    shutil.copytree(source / "keys", target / "keys")
    key = SigningKey.load(DataDir(source).signing_key)
    log = ProvenanceLog(DataDir(target).provenance_log, key)
    for line in read_lines(DataDir(source).provenance_log):
        entry = json.loads(line)
        if entry["kind"] == "record":
            if entry["body"].get("job_id") == job_id:
                edit(entry["type"], entry["body"])
            log.append(entry["type"], entry["body"])
    log.publish_tree_head()
    assert DataDir(target).signing_public_key.exists()
    return target


def test_replay_names_the_step_and_worker_whose_logged_pseudo_gradient_differs(
    restarted_job: RestartedJob, tmp_path: Path
) -> None:
    tampered_step = 1
    names: list[str] = []

    def alter_digest(type_: str, body: dict[str, Any]) -> None:
        if type_ == "outer_step" and body["step"] == tampered_step:
            worker = body["workers"][0]
            worker["pseudo_gradient_digest"] = "0" * 64
            names.append(worker["worker"])

    data_dir = resigned_copy(restarted_job.data_dir, tmp_path, restarted_job.job_id, alter_digest)
    verified = run_cli("coordinator", "provenance", "verify", "--data-dir", str(data_dir))
    assert verified.returncode == 0, verified.stderr
    replayed = replay(data_dir, restarted_job.job_id)
    assert replayed.returncode == ExitCode.REPLAY_MISMATCH, replayed.stderr
    error = " ".join(replayed.stderr.split())
    assert f"step {tampered_step} (round {tampered_step + 1}), worker {names[0]}" in error
    assert "pseudo-gradient digest" in error and "differs from the logged 0000000000000000" in error
    # The steps before it were replayed and matched.
    assert "step 0 (round 1)" in replayed.stdout


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("corpus", r"it trained on stdlib corpus 0{16} \(Python [0-9.]+\) but this machine builds"),
        ("deterministic", "it ran with deterministic = false"),
    ],
)
def test_replay_refuses_a_job_it_cannot_reproduce_in_one_line(
    restarted_job: RestartedJob, tmp_path: Path, change: str, reason: str
) -> None:
    def alter(type_: str, body: dict[str, Any]) -> None:
        if change == "corpus" and type_ == "job_completed":
            body["corpus_digest"] = "0" * 64
        if change == "deterministic" and type_ == "job_started":
            body["spec"]["deterministic"] = False

    data_dir = resigned_copy(restarted_job.data_dir, tmp_path, restarted_job.job_id, alter)
    replayed = replay(data_dir, restarted_job.job_id)
    assert replayed.returncode == ExitCode.CONFLICT, replayed.stderr
    error = " ".join(replayed.stderr.split())
    assert re.search(rf"job {restarted_job.job_id} cannot be replayed bit for bit: {reason}", error)
    assert "step 0" not in replayed.stdout  # refused before any training
