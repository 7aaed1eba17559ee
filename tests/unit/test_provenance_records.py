"""Typed provenance records: parsing, round trips, old names, unknown types, an old log
written by the code before typed records (tests/unit/data/make_old_log.py), and
`JobRecorder`, the one writer for both job kinds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from consortium.provenance.log import ProvenanceLog, read_lines
from consortium.provenance.records import (
    InstitutionKey,
    InstitutionKeyChanged,
    JobCompleted,
    JobResumed,
    JobStarted,
    OuterStep,
    RecordType,
    Round,
    UnknownRecord,
    parse_body,
    parse_record,
    record_type,
    type_name,
)
from consortium.provenance.signing import SigningKey, VerifyingKey, b64
from consortium.provenance.verify import LogVerificationError, verify_log
from coordinator.data_dir import DataDir
from coordinator.federated.replay import job_kind
from coordinator.jobs.pipeline import signed_final_digest
from coordinator.provenance.recorder import JobRecorder

DATA = Path(__file__).parent / "data"
OLD_LOG, OLD_KEY = DATA / "old_log.jsonl", DATA / "old_log.pub"
FED_JOB, PRE_JOB = "fed-0001", "pre-0001"  # the jobs in the old log
JOB = "job-rec"
MODEL_BYTES = b"the saved model"

WORKER = {
    "worker": "alpha/0a1b/cpu0",
    "institution": "alpha",
    "node_id": "0a1b",
    "device": "cpu",
    "position": 0,
    "shard_ids": [0, 2],
    "seed": 11,
    "pseudo_gradient_digest": "9" * 64,
    "inner_steps": 5,
    "tokens": 640,
    "compute_s": 0.75,
}
ACCEPTED = {
    "institution": "alpha",
    "node_id": "101",
    "key_id": "k" * 64,
    "update_digest": "c" * 64,
    "num_examples": 17,
    "commitment": "d" * 64,
    "data": {"count": 17},
    "nonce": "n1",
    "signature": "c2ln",
    "accepted": True,
    "reason": "",
}
REFUSED = {"institution": "", "node_id": "7", "accepted": False, "reason": "stale", "detail": "x"}
# One body per type, with the fields today's writers write.
BODIES: dict[str, dict[str, Any]] = {
    "job_started": {
        "job_id": JOB,
        "kind": "federated",
        "spec": {"name": "digits", "init_from": None},
        "seed": 7,
        "strategy": {"sampler": "fedavg", "rule": "mean"},
        "environment": {"python": "3.11.9"},
        "model": {"name": "digits-cnn", "options": {}},
        "init_from": None,
        "initial_model_digest": "a" * 64,
    },
    "job_resumed": {"job_id": JOB, "after_round": 2, "kind": "pretrain"},
    "institution_key": {"institution": "alpha", "key_id": "k" * 64, "public_key": "cHVi"},
    "institution_key_changed": {
        "institution": "alpha",
        "key_id": "m" * 64,
        "public_key": "bmV3",
        "replaced_key_ids": ["k" * 64],
        "reason": "key leaked",
    },
    "round": {
        "job_id": JOB,
        "round": 1,
        "global_digest": "1" * 64,
        "participants": ["alpha"],
        "updates": [REFUSED, ACCEPTED],
        "aggregation": {
            "rule": "trimmed-mean",
            "trim_fraction": 0.2,
            "krum_byzantine": 0,
            "max_update_norm": None,
        },
        "aggregate_digest": "e" * 64,
        "metrics": {"accuracy": 0.5, "count": 3},
    },
    "outer_step": {
        "job_id": JOB,
        "round": 1,
        "step": 0,
        "workers": [WORKER],
        "workers_lost": {"beta/1/cpu0": "timed out"},
        "step_seed": 424242,
        "aggregate_digest": "8" * 64,
        "model_digest": "7" * 64,
        "val_loss": 5.5,
        "attempts": 1,
    },
    "job_completed": {
        "job_id": JOB,
        "kind": "pretrain",
        "rounds": 2,
        "final_model_digest": "f" * 64,
        "model_file": f"{JOB}.safetensors",
        "model_file_sha256": "5" * 64,
        "corpus_digest": "6" * 64,
        "val_loss": None,
    },
}
CLASSES = {
    "job_started": JobStarted,
    "job_resumed": JobResumed,
    "institution_key": InstitutionKey,
    "institution_key_changed": InstitutionKeyChanged,
    "round": Round,
    "outer_step": OuterStep,
    "job_completed": JobCompleted,
}


# --- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize("type_", sorted(BODIES))
def test_parse_body_gives_the_types_model_and_round_trips_exactly(type_: str) -> None:
    record = parse_body(type_, BODIES[type_])

    assert isinstance(record, CLASSES[type_])
    assert type_name(record) == type_ == record_type(type_)
    assert record.body() == BODIES[type_]  # same fields, same values, nothing filled in


def test_every_record_type_has_a_model_and_tree_heads_are_not_records() -> None:
    assert {t.value for t in RecordType} == set(CLASSES)
    assert record_type("tree_head") is None


def test_typed_fields_read_what_was_logged() -> None:
    round_ = parse_body("round", BODIES["round"])
    step = parse_body("outer_step", BODIES["outer_step"])

    assert isinstance(round_, Round) and isinstance(step, OuterStep)
    assert [u.accepted for u in round_.updates] == [False, True]
    assert round_.updates[1].num_examples == 17 and round_.updates[0].detail == "x"
    assert round_.aggregation.rule == "trimmed-mean"
    assert step.workers[0].shard_ids == [0, 2] and step.workers_lost == {"beta/1/cpu0": "timed out"}


def test_missing_fields_of_older_writers_take_defaults() -> None:
    started = parse_body("job_started", {"job_id": JOB, "seed": 7})
    resumed = parse_body("job_resumed", {"job_id": JOB, "after_round": 1, "model_digest": "d"})
    completed = parse_body("job_completed", {"job_id": JOB, "final_model_digest": "f"})

    assert isinstance(started, JobStarted) and started.kind == "federated"
    assert started.environment == {} and started.initial_model_digest is None
    assert isinstance(resumed, JobResumed) and resumed.kind == "federated"
    assert isinstance(completed, JobCompleted)
    assert (completed.kind, completed.model_file, completed.rounds) == ("federated", None, None)


def test_job_finished_is_read_as_job_completed_of_a_pretraining_job() -> None:
    old = {
        "job_id": JOB,
        "kind": "pretrain",
        "model_digest": "7" * 64,
        "corpus_digest": "6" * 64,
        "val_loss": 4.5,
    }

    record = parse_record({"type": "job_finished", "body": old})

    assert isinstance(record, JobCompleted)
    assert record_type("job_finished") is RecordType.JOB_COMPLETED
    assert (record.kind, record.final_model_digest, record.val_loss) == ("pretrain", "7" * 64, 4.5)
    assert record.model_file is None  # old pretraining records named no model file
    assert "model_digest" not in record.body()


def test_unknown_type_is_kept_as_a_generic_record() -> None:
    record = parse_record({"type": "note", "body": {"job_id": JOB, "text": "later"}})

    assert isinstance(record, UnknownRecord)
    assert (type_name(record), record.job_id, record.body["text"]) == ("note", JOB, "later")


def test_fields_added_by_newer_writers_are_kept() -> None:
    record = parse_body("job_resumed", {"job_id": JOB, "after_round": 1, "reason": "restart"})

    assert record.body() == {"job_id": JOB, "after_round": 1, "reason": "restart"}


def test_malformed_body_of_a_known_type_is_refused() -> None:
    with pytest.raises(ValidationError):
        parse_body("round", {"job_id": JOB, "round": "first"})


def test_records_are_frozen() -> None:
    record = parse_body("job_resumed", BODIES["job_resumed"])

    with pytest.raises(ValidationError):
        record.after_round = 3  # type: ignore[misc]


# --- verify with typed records ------------------------------------------------------------


def test_verify_log_accepts_and_reports_a_record_of_unknown_type(tmp_path: Path) -> None:
    key = SigningKey.generate()
    log = ProvenanceLog(tmp_path / "log.jsonl", key)
    log.append_record(JobStarted(job_id=JOB, kind="pretrain", seed=1))
    log.append("note", {"job_id": JOB, "text": "from a newer coordinator"})
    log.publish_tree_head()

    report = verify_log(log.path, key.public)

    assert report.records == 2
    assert [type_name(r) for r in report.jobs[JOB]] == ["job_started", "note"]


def test_verify_log_fails_on_a_malformed_known_record(tmp_path: Path) -> None:
    key = SigningKey.generate()
    log = ProvenanceLog(tmp_path / "log.jsonl", key)
    log.append("outer_step", {"job_id": JOB, "step": "zero"})  # signed, but not a step
    log.publish_tree_head()

    with pytest.raises(LogVerificationError) as raised:
        verify_log(log.path, key.public)

    assert raised.value.line == 1


# --- a log written before typed records ---------------------------------------------------


def test_old_log_verifies_with_the_new_readers() -> None:
    report = verify_log(OLD_LOG, VerifyingKey.load(OLD_KEY), allow_unbound_keys=True)

    assert (report.records, report.tree_heads, report.signed_updates) == (11, 9, 2)
    assert [type_name(r) for r in report.jobs[FED_JOB]] == [
        "job_started",
        "round",
        "job_resumed",
        "round",
        "job_completed",
    ]
    assert [type_name(r) for r in report.jobs[PRE_JOB]] == [
        "job_started",
        "outer_step",
        "job_resumed",
        "outer_step",
        "job_completed",  # logged as job_finished
    ]


def test_old_log_records_parse_into_their_typed_records() -> None:
    entries = [json.loads(line) for line in read_lines(OLD_LOG)]
    logged = [e["type"] for e in entries if e["kind"] == "record"]
    report = verify_log(OLD_LOG, VerifyingKey.load(OLD_KEY), allow_unbound_keys=True)
    federated, pretraining = report.jobs[FED_JOB], report.jobs[PRE_JOB]

    assert "job_finished" in logged and "institution_key" in logged
    assert (job_kind(federated), job_kind(pretraining)) == ("federated", "pretrain")
    resumed = [r for r in federated + pretraining if isinstance(r, JobResumed)]
    assert [(r.kind, r.after_round) for r in resumed] == [("federated", 1), ("pretrain", 1)]
    final = pretraining[-1]
    assert isinstance(final, JobCompleted)
    assert (final.kind, final.final_model_digest, final.val_loss) == ("pretrain", "71" * 32, 4.5)
    completed = federated[-1]
    assert isinstance(completed, JobCompleted) and completed.model_file == f"{FED_JOB}.safetensors"
    steps = [r for r in pretraining if isinstance(r, OuterStep)]
    assert [s.step for s in steps] == [0, 1] and steps[1].workers[0].institution == "alpha"


def test_signed_final_digest_reads_old_job_finished_and_job_completed() -> None:
    key = VerifyingKey.load(OLD_KEY)

    assert signed_final_digest(OLD_LOG, key, PRE_JOB) == "71" * 32
    assert signed_final_digest(OLD_LOG, key, FED_JOB) == "e2" * 32


# --- JobRecorder --------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    data = DataDir(tmp_path / "coordinator")
    SigningKey.load_or_create(data.signing_key)
    data.models_dir.mkdir(parents=True)
    data.model_file(JOB).write_bytes(MODEL_BYTES)
    return data


def test_recorder_writes_a_federated_job_that_verifies(data_dir: DataDir) -> None:
    recorder = JobRecorder(data_dir, JOB)
    site = SigningKey.generate()
    started = JobStarted.model_validate({**BODIES["job_started"], "job_id": JOB})
    recorder.job_started(started)
    assert recorder.institution_key("alpha", site.key_id, site.public.raw)
    assert not recorder.institution_key("alpha", site.key_id, site.public.raw)  # logged once
    initial = str(started.initial_model_digest)
    recorder.round(Round(job_id=JOB, round=1, global_digest=initial, aggregate_digest="2" * 64))
    recorder.job_resumed("federated", 1, model_digest="2" * 64)
    recorder.round(Round(job_id=JOB, round=2, global_digest="2" * 64, aggregate_digest="f" * 64))
    recorder.job_completed("federated", 2, "f" * 64, data_dir.model_file(JOB))

    # The recorder's own key record is unbound (a plain-text coordinator's nodes).
    report = verify_log(
        data_dir.provenance_log,
        VerifyingKey.load(data_dir.signing_public_key),
        allow_unbound_keys=True,
    )
    records = report.jobs[JOB]

    assert report.tree_heads == 5  # started, round (covering the key), resumed, round, completed
    assert records[0].body() == BODIES["job_started"]  # today's bytes, as written before
    completed = records[-1]
    assert isinstance(completed, JobCompleted)
    assert completed.body() == {
        "job_id": JOB,
        "kind": "federated",
        "rounds": 2,
        "final_model_digest": "f" * 64,
        "model_file": f"{JOB}.safetensors",
        "model_file_sha256": hashlib.sha256(MODEL_BYTES).hexdigest(),
    }
    # A later job's recorder knows the key is in the log already.
    assert not JobRecorder(data_dir, "next-job").institution_key("alpha", site.key_id, b"")


def test_recorder_writes_a_pretraining_job_ending_in_job_completed(data_dir: DataDir) -> None:
    recorder = JobRecorder(data_dir, JOB)
    recorder.job_started(JobStarted(job_id=JOB, kind="pretrain", seed=3, spec_digest="s"))
    recorder.outer_step(OuterStep.model_validate(BODIES["outer_step"]))
    recorder.job_resumed("pretrain", 1)
    recorder.job_completed(
        "pretrain", 1, "7" * 64, data_dir.model_file(JOB), corpus_digest="6" * 64, val_loss=None
    )

    report = verify_log(data_dir.provenance_log, VerifyingKey.load(data_dir.signing_public_key))
    final = report.jobs[JOB][-1]

    assert report.tree_heads == 4
    assert [type_name(r) for r in report.jobs[JOB]][-1] == "job_completed"
    assert isinstance(final, JobCompleted)
    assert set(final.body()) == {
        "job_id",
        "kind",
        "rounds",
        "final_model_digest",
        "model_file",
        "model_file_sha256",
        "corpus_digest",
        "val_loss",
    }
    assert final.model_file_sha256 is not None and len(final.model_file_sha256) == 64
    assert signed_final_digest(
        data_dir.provenance_log, VerifyingKey.load(data_dir.signing_public_key), JOB
    ) == ("7" * 64)


def test_recorder_refuses_a_record_of_another_job(data_dir: DataDir) -> None:
    recorder = JobRecorder(data_dir, JOB)

    with pytest.raises(ValueError, match="record of job other"):
        recorder.round(Round(job_id="other", round=1, global_digest="1" * 64))


def test_institution_key_record_holds_the_base64_public_key(data_dir: DataDir) -> None:
    site = SigningKey.generate()
    JobRecorder(data_dir, JOB).institution_key("alpha", site.key_id, site.public.raw)
    JobRecorder(data_dir, JOB).publish_tree_head()

    (entry,) = [json.loads(line) for line in read_lines(data_dir.provenance_log)][:1]
    record = parse_record(entry)

    assert isinstance(record, InstitutionKey) and record.public_key == b64(site.public.raw)
    key = VerifyingKey.load(data_dir.signing_public_key)
    assert verify_log(data_dir.provenance_log, key).records == 1
