"""Pipelines: what `init_from` accepts at submit, when the job may start, and the
signed digest check on the model it starts from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from consortium.errors import JobSpecError
from consortium.models import build_model, parameter_tensors
from consortium.provenance.log import ProvenanceLog
from consortium.provenance.signing import SigningKey
from consortium.tensor_digest import arrays_digest
from coordinator.jobs.pipeline import (
    StartingModelError,
    check_init_from,
    load_starting_model,
    signed_final_digest,
    waiting_reason,
)
from coordinator.jobs.service import JobService
from coordinator.jobs.spec import parse_job_spec
from coordinator.state import JobState, SqliteStateStore

PRETRAIN = """
name = "tiny"
kind = "pretrain"
n_layer = 1
n_head = 2
n_embd = 16
block_size = 32
seq_len = 32
inner_steps = 5
outer_steps = 2
"""

FINE_TUNE = """
name = "tune"
model = "bytelm"
dataset = "docstrings"
rounds = 2
init_from = "{source}"
seq_len = 32
"""
OPTIONS = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}


@pytest.fixture
def store(tmp_path: Path) -> SqliteStateStore:
    return SqliteStateStore(tmp_path / "state.db")


def test_fine_tune_of_a_queued_pretrain_job_is_accepted_and_waits(
    store: SqliteStateStore,
) -> None:
    jobs = JobService(store)
    source = jobs.submit(PRETRAIN)
    spec = parse_job_spec(FINE_TUNE.format(source=source.job_id))
    jobs.submit(FINE_TUNE.format(source=source.job_id))
    assert waiting_reason(store, spec) == (
        f"waiting for job {source.job_id} (its model is this job's starting point)"
    )
    store.update_job(source.job_id, state=JobState.SUCCEEDED)
    assert waiting_reason(store, spec) is None


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.CANCELLED])
def test_a_failed_source_refuses_submit_and_fails_waiting_jobs(
    store: SqliteStateStore, state: JobState
) -> None:
    jobs = JobService(store)
    source = jobs.submit(PRETRAIN)
    text = FINE_TUNE.format(source=source.job_id)
    jobs.submit(text)
    store.update_job(source.job_id, state=state)
    with pytest.raises(StartingModelError, match=f"ended {state.value}"):
        waiting_reason(store, parse_job_spec(text))
    before = len(jobs.list())
    with pytest.raises(JobSpecError, match="field 'init_from'"):
        jobs.submit(text)
    assert len(jobs.list()) == before


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda text, source: text.format(source="nosuchjob"), "field 'init_from'"),
        (
            lambda text, source: (
                text.format(source=source)
                .replace('"bytelm"', '"digits-cnn"')
                .replace('"docstrings"', '"digits"')
            ),
            "field 'workload'",
        ),
        (
            lambda text, source: text.format(source=source).replace("seq_len = 32", "seq_len = 33"),
            "field 'seq_len'",
        ),
    ],
)
def test_init_from_that_cannot_work_is_refused_naming_the_field(
    store: SqliteStateStore, change: object, field: str
) -> None:
    source = JobService(store).submit(PRETRAIN)
    assert callable(change)
    spec = parse_job_spec(change(FINE_TUNE, source.job_id))
    with pytest.raises(JobSpecError, match=field):
        check_init_from(store, spec)


def finished_source(
    tmp_path: Path, store: SqliteStateStore, key: SigningKey
) -> tuple[str, Path, str]:
    """A succeeded pretraining job with a saved model and a signed final record."""
    source = JobService(store).submit(PRETRAIN)
    model = build_model("bytelm", OPTIONS)
    path = tmp_path / "models" / f"{source.job_id}.safetensors"
    path.parent.mkdir()
    save_file(dict(parameter_tensors(model)), str(path))
    digest = arrays_digest({k: v.numpy() for k, v in parameter_tensors(model).items()})
    ProvenanceLog(tmp_path / "provenance.log", key).append(
        "job_finished", {"job_id": source.job_id, "kind": "pretrain", "model_digest": digest}
    )
    store.update_job(source.job_id, state=JobState.SUCCEEDED, model_path=str(path))
    return source.job_id, path, digest


def test_starting_model_is_loaded_when_its_digest_matches_the_signed_log(
    tmp_path: Path, store: SqliteStateStore
) -> None:
    key = SigningKey.generate()
    source, _, digest = finished_source(tmp_path, store, key)
    spec = parse_job_spec(FINE_TUNE.format(source=source))
    model, starting = load_starting_model(store, spec, tmp_path / "provenance.log", key.public)
    assert (starting.job_id, starting.digest) == (source, digest)
    assert starting.family.options == OPTIONS
    loaded = {k: v.numpy() for k, v in parameter_tensors(model).items()}
    assert arrays_digest(loaded) == digest


def test_a_changed_model_file_is_refused_before_training(
    tmp_path: Path, store: SqliteStateStore
) -> None:
    key = SigningKey.generate()
    source, path, _ = finished_source(tmp_path, store, key)
    model = build_model("bytelm", OPTIONS)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_file(dict(parameter_tensors(model)), str(path))
    spec = parse_job_spec(FINE_TUNE.format(source=source))
    with pytest.raises(StartingModelError, match="does not hold the model"):
        load_starting_model(store, spec, tmp_path / "provenance.log", key.public)


def test_final_record_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    ProvenanceLog(tmp_path / "log", SigningKey.generate()).append(
        "job_finished", {"job_id": "j1", "model_digest": "ab"}
    )
    with pytest.raises(StartingModelError, match="bad signature"):
        signed_final_digest(tmp_path / "log", SigningKey.generate().public, "j1")
    with pytest.raises(StartingModelError, match="no final record of job j2"):
        signed_final_digest(tmp_path / "log", SigningKey.generate().public, "j2")


def test_federated_source_final_record_field_is_read(tmp_path: Path) -> None:
    key = SigningKey.generate()
    ProvenanceLog(tmp_path / "log", key).append(
        "job_completed", {"job_id": "j1", "final_model_digest": "cd", "rounds": 2}
    )
    assert signed_final_digest(tmp_path / "log", key.public, "j1") == "cd"
