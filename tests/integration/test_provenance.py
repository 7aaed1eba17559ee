"""The real job's provenance log verifies, exports and replays; tampering is caught."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from consortium.exit_codes import ExitCode
from consortium.processes import venv_executable
from consortium.provenance import intoto
from consortium.provenance.records import JobCompleted, JobStarted, Round, type_name
from consortium.provenance.signing import VerifyingKey
from consortium.provenance.verify import LogVerificationError, verify_log
from consortium.tensor_digest import file_digest
from coordinator.data_dir import DataDir
from tests.helpers import CompletedRun


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


def test_every_byte_flip_of_the_real_log_is_detected(completed_run: CompletedRun) -> None:
    key = VerifyingKey.load(DataDir(completed_run.data_dir).signing_public_key)
    original = DataDir(completed_run.data_dir).provenance_log.read_bytes()
    scratch = DataDir(completed_run.data_dir).provenance_log.with_name("flipped.jsonl")
    # Every 7th byte covers each field of every line while keeping the test short;
    # tests/unit/test_provenance_log.py flips every single byte of a smaller log.
    for offset in range(0, len(original), 7):
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
