"""`coordinator replay --from-attestation --model FILE`: the model file a reviewer holds
is checked against the replay, not only against what the attestation says of it.

The attack: whoever holds the coordinator's key signs an honest, replayable training
history whose `job_completed` names, as the model file, another file (a backdoored
model): its sha256 as the subject, beside the honest final model digest. The
attestation verifies, and the replay matches every logged digest, the final one
included; only comparing the file's weights with the replayed model shows the file is
not what the training produced. The attestation's verification and the training itself
are stood in for here (tests/unit/test_attestation.py and tests/unit/
test_pretrain_replay_plan.py exercise them); what is tested is what the replay does
with the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from consortium.exit_codes import ExitCode
from consortium.provenance.attestation import AttestationReport
from consortium.provenance.records import Record
from consortium.tensor_digest import arrays_digest, file_digest
from coordinator.cli import replay as replay_cli
from coordinator.cli.main import app

JOB = "job-1"
HONEST = {"wte": np.ones((4, 2), np.float32), "head": np.zeros(3, np.float32)}
BACKDOORED = {"wte": np.ones((4, 2), np.float32), "head": np.full(3, 7.0, np.float32)}


def model_file(path: Path, weights: dict[str, np.ndarray]) -> Path:
    save_file(weights, str(path), {"job_id": JOB})
    return path


def attest(monkeypatch: pytest.MonkeyPatch, subject_sha256: str) -> list[str]:
    """The attestation verifies and names `subject_sha256`; the replay reproduces every
    logged step and ends with the honest model. Returns the jobs replayed."""
    report = AttestationReport(
        job_id=JOB,
        kind="pretrain",
        subject=f"{JOB}.safetensors",
        sha256=subject_sha256,
        tree_size=5,
        root_hash="ab" * 32,
        rounds=2,
        witnesses=[],
    )
    replayed: list[str] = []

    def replay_pretraining_job(job_id: str, records: list[Record]) -> str:
        replayed.append(job_id)
        return arrays_digest(HONEST)

    monkeypatch.setattr(replay_cli, "load_attestation", lambda *_: report)
    monkeypatch.setattr(replay_cli, "replay_pretraining_job", replay_pretraining_job)
    return replayed


def replay(tmp_path: Path, model: Path) -> tuple[int, str]:
    args = ["replay", "--from-attestation", str(tmp_path / "job.dsse.json")]
    args += ["--ca", str(tmp_path / "ca.crt"), "--model", str(model)]
    result = CliRunner().invoke(app, args)
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


def test_an_attested_model_file_that_the_training_did_not_produce_fails_the_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backdoored = model_file(tmp_path / f"{JOB}.safetensors", BACKDOORED)
    replayed = attest(monkeypatch, file_digest(str(backdoored)))  # the signer's choice
    status, output = replay(tmp_path, backdoored)
    assert status == ExitCode.REPLAY_MISMATCH, output
    assert replayed == [JOB]
    assert "not the model the replay ended with" in output
    assert "replay OK" not in output


def test_a_model_file_that_is_not_the_subject_is_refused_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = model_file(tmp_path / "honest.safetensors", HONEST)
    other = model_file(tmp_path / f"{JOB}.safetensors", BACKDOORED)
    replayed = attest(monkeypatch, file_digest(str(honest)))
    status, output = replay(tmp_path, other)
    assert status == ExitCode.PROVENANCE_INVALID, output
    assert "is not the attestation's subject" in output
    assert replayed == []


def test_the_attested_model_file_the_training_produced_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = model_file(tmp_path / f"{JOB}.safetensors", HONEST)
    attest(monkeypatch, file_digest(str(honest)))
    status, output = replay(tmp_path, honest)
    assert status == 0, output
    assert f"holds the replayed final model {arrays_digest(HONEST)[:16]}" in output


def test_a_model_file_that_is_not_safetensors_is_read_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pickle (what torch.save writes) whose loading would run code: refused as not
    # safetensors, and nothing runs.
    ran = tmp_path / "ran"
    payload = (
        b"cos\nsystem\n(S'touch " + str(ran).encode() + b"'\ntR."
    )  # pickle protocol 0: os.system("touch ...")
    pickled = tmp_path / f"{JOB}.pt"
    pickled.write_bytes(payload)
    attest(monkeypatch, file_digest(str(pickled)))
    status, output = replay(tmp_path, pickled)
    assert status == ExitCode.REPLAY_MISMATCH, output
    assert "is not a readable safetensors model" in output
    assert not ran.exists()
