"""A real coordinator and two real institutions complete a federated job on loopback;
its provenance log verifies, exports and replays, and tampering is caught.

One module, so the shared run (`completed_run`) starts once: pytest-xdist's
`--dist loadfile` gives each module to one worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from consortium.exit_codes import ExitCode
from consortium.processes import venv_executable
from consortium.proto.v1 import jobs_pb2, nodes_pb2
from consortium.provenance import intoto
from consortium.provenance.log import COSIGNATURE, read_lines
from consortium.provenance.records import (
    JobCompleted,
    JobStarted,
    OuterStep,
    Round,
    type_name,
)
from consortium.provenance.signing import VerifyingKey
from consortium.provenance.verify import LogVerificationError, verify_log
from consortium.tensor_digest import file_digest
from coordinator.cli.remote import connect
from coordinator.data_dir import DataDir
from tests.conftest import Processes
from tests.helpers import CompletedRun, start_coordinator


def test_federated_job_succeeds_with_two_institutions(completed_run: CompletedRun) -> None:
    job = completed_run.job
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.message
    assert job.rounds_completed == 3
    assert Path(job.model_path).is_file()
    assert [r.round for r in completed_run.rounds] == [0, 1, 2, 3]
    assert all(r.participants == 2 for r in completed_run.rounds[1:])


def test_federated_pretraining_job_trains_at_both_sites(completed_run: CompletedRun) -> None:
    job = completed_run.pretrain_job
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.message
    assert job.rounds_completed == 3
    assert Path(job.model_path).is_file()
    assert [r.participants for r in completed_run.pretrain_rounds] == [2, 2, 2]


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
        assert sorted(j.job_id for j in jobs) == sorted(
            [completed_run.job.job_id, completed_run.pretrain_job.job_id]
        )
        reply = remote.get(completed_run.job.job_id)
        pretrain = remote.get(completed_run.pretrain_job.job_id)
    assert reply.job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert list(reply.rounds) == completed_run.rounds
    assert pretrain.job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert list(pretrain.rounds) == completed_run.pretrain_rounds


# --- provenance of the shared run -----------------------------------------------


def coordinator_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_executable("coordinator"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


@pytest.fixture
def copied_data_dir(completed_run: CompletedRun, tmp_path: Path) -> Path:
    """A private copy, so tampering never leaks into other tests."""
    copy = tmp_path / "coordinator"
    shutil.copytree(completed_run.data_dir, copy, ignore=shutil.ignore_patterns("*.db-*"))
    return copy


def test_log_of_real_job_verifies(completed_run: CompletedRun) -> None:
    done = coordinator_cli("provenance", "verify", "--data-dir", str(completed_run.data_dir))
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    assert "6 institution-signed updates" in done.stdout  # 2 institutions x 3 rounds


def test_log_records_rounds_participants_and_final_digest(completed_run: CompletedRun) -> None:
    key = VerifyingKey.load(DataDir(completed_run.data_dir).signing_public_key)
    report = verify_log(DataDir(completed_run.data_dir).provenance_log, key)
    records = report.jobs[completed_run.job.job_id]
    types = [type_name(r) for r in records]
    assert types == ["job_started", "round", "round", "round", "job_completed"]
    started, *rounds, completed = records
    assert isinstance(started, JobStarted)
    assert started.environment["versions"]["flwr"] == "1.41.0"
    for record in rounds:
        assert isinstance(record, Round)
        assert record.participants == ["alpha-hospital", "beta-university"]
        assert all(u.accepted and (u.data or {})["count"] > 0 for u in record.updates)
    model = Path(completed_run.job.model_path)
    assert isinstance(completed, JobCompleted)
    assert completed.model_file_sha256 == file_digest(str(model))


def test_federated_pretraining_logs_each_sites_signed_verified_step(
    completed_run: CompletedRun,
) -> None:
    """Every outer step was computed at both sites (named by the institutions their
    SuperNode keys were onboarded for), re-executed by the coordinator and found equal,
    and cosigned by both sites."""
    key = VerifyingKey.load(DataDir(completed_run.data_dir).signing_public_key)
    report = verify_log(DataDir(completed_run.data_dir).provenance_log, key)
    records = report.jobs[completed_run.pretrain_job.job_id]
    types = [type_name(r) for r in records]
    assert types == ["job_started", "outer_step", "outer_step", "outer_step", "job_completed"]
    steps = [r for r in records if isinstance(r, OuterStep)]
    for step in steps:
        institutions = sorted(w.institution for w in step.workers)
        assert institutions == ["alpha-hospital", "beta-university"]
        assert all(w.worker.startswith(f"{w.institution}/site-") for w in step.workers)
        assert sorted(step.verified) == sorted(w.worker for w in step.workers)
        assert step.workers_lost == {} and step.verification_failed == {}
        assert all(w.inner_steps == 5 and w.compute_s > 0 for w in step.workers)
    assert steps[-1].val_loss is not None and steps[0].val_loss is not None
    assert steps[-1].val_loss < steps[0].val_loss
    completed = records[-1]
    assert isinstance(completed, JobCompleted)
    assert completed.final_model_digest == steps[-1].model_digest
    # Both sites cosigned the heads their steps were sent with: logged between the
    # job's first outer step and its end (the final head's cosignatures come after).
    entries = [
        json.loads(line) for line in read_lines(DataDir(completed_run.data_dir).provenance_log)
    ]
    job_id = completed_run.pretrain_job.job_id
    bodies = [(i, e) for i, e in enumerate(entries) if e.get("body", {}).get("job_id") == job_id]
    first_step = next(i for i, e in bodies if e["type"] == "outer_step")
    end = next(i for i, e in bodies if e["type"] == "job_completed")
    cosigned = [e["institution"] for e in entries[first_step:end] if e["kind"] == COSIGNATURE]
    assert sorted(set(cosigned)) == ["alpha-hospital", "beta-university"]


def test_replay_reproduces_every_outer_step_of_federated_pretraining(
    completed_run: CompletedRun,
) -> None:
    done = coordinator_cli(
        "replay", completed_run.pretrain_job.job_id, "--data-dir", str(completed_run.data_dir)
    )
    assert done.returncode == 0, done.stderr
    assert "replay OK: 3 outer step(s) reproduced bit for bit" in done.stdout


def test_replay_reproduces_every_round(completed_run: CompletedRun) -> None:
    done = coordinator_cli(
        "replay", completed_run.job.job_id, "--data-dir", str(completed_run.data_dir)
    )
    assert done.returncode == 0, done.stderr
    assert "replay OK: 3 rounds reproduced bit for bit" in done.stdout


def test_replay_names_the_round_of_a_tampered_update(
    completed_run: CompletedRun, copied_data_dir: Path
) -> None:
    round_dir = copied_data_dir / "provenance" / "updates" / completed_run.job.job_id / "2"
    victim = sorted(round_dir.glob("*.safetensors"))[0]
    arrays = load_file(str(victim))
    name = sorted(arrays)[0]
    arrays[name] = arrays[name] + np.float32(1e-3)
    save_file(arrays, str(victim))
    done = coordinator_cli("replay", completed_run.job.job_id, "--data-dir", str(copied_data_dir))
    assert done.returncode == ExitCode.REPLAY_MISMATCH
    assert "round 2" in done.stderr


def test_verify_names_the_line_of_an_altered_record(copied_data_dir: Path) -> None:
    log = DataDir(copied_data_dir).provenance_log
    lines = log.read_bytes().split(b"\n")
    target = next(i for i, line in enumerate(lines) if b'"type":"round"' in line)
    altered = lines[target].replace(b'"eval_accuracy":0.', b'"eval_accuracy":1.', 1)
    assert altered != lines[target]
    lines[target] = altered
    log.write_bytes(b"\n".join(lines))
    done = coordinator_cli("provenance", "verify", "--data-dir", str(copied_data_dir))
    assert done.returncode == ExitCode.PROVENANCE_INVALID
    assert f"line {target + 1}:" in done.stderr


# A JSON string (a key or a value) or a number or literal, in a line of the log.
JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|true|false|null')


def field_offsets(log: bytes) -> list[int]:
    """One byte in every key and every value of every line, and each line's first and
    last byte: each field of each record is hit once, with a third of the flips of every
    11th byte (which can miss short fields and keys altogether)."""
    offsets = []
    start = 0
    for line in log.splitlines(keepends=True):
        offsets += [start, start + len(line.rstrip(b"\n")) - 1]
        offsets += [start + (m.start() + m.end()) // 2 for m in JSON_TOKEN.finditer(line)]
        start += len(line)
    return sorted(set(offsets))


def test_every_byte_flip_of_the_real_log_is_detected(completed_run: CompletedRun) -> None:
    key = VerifyingKey.load(DataDir(completed_run.data_dir).signing_public_key)
    original = DataDir(completed_run.data_dir).provenance_log.read_bytes()
    scratch = DataDir(completed_run.data_dir).provenance_log.with_name("flipped.jsonl")
    # A flip in every field of every line, both jobs' (rounds, outer steps, heads,
    # cosignatures); tests/unit/test_provenance_log.py flips every byte of a smaller log.
    offsets = field_offsets(original)
    assert len(offsets) > 2 * original.count(b"\n") * 10  # tens of fields a line
    for offset in offsets:
        flipped = bytearray(original)
        flipped[offset] ^= 0x01
        scratch.write_bytes(bytes(flipped))
        with pytest.raises(LogVerificationError):
            verify_log(scratch, key)
    scratch.unlink()


def test_export_is_a_signed_in_toto_statement_about_the_model(
    completed_run: CompletedRun, tmp_path: Path
) -> None:
    out = tmp_path / "statement.dsse.json"
    done = coordinator_cli(
        "provenance",
        "export",
        completed_run.job.job_id,
        "--data-dir",
        str(completed_run.data_dir),
        "-o",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    key = VerifyingKey.load(DataDir(completed_run.data_dir).signing_public_key)
    statement = intoto.open_envelope(json.loads(out.read_text()), key)
    assert statement["_type"] == intoto.STATEMENT_TYPE
    subject = statement["subject"][0]
    assert subject["digest"]["sha256"] == file_digest(completed_run.job.model_path)
    assert [r["round"] for r in statement["predicate"]["rounds"]] == [1, 2, 3]


def test_sites_load_their_client_app_behind_their_start(completed_run: CompletedRun) -> None:
    """With `preload_client_app` (a real site's default; the test profile turns it off),
    `client join` loads torch and the training code in the background: the first
    pretraining step then does not wait for them at every site."""
    for log in completed_run.site_logs:
        assert "ClientApp preload: " in log, log[-2000:]
        assert "ClientApp preload failed" not in log
