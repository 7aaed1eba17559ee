"""Job specs: parse_job_spec names the bad field; JobService creates nothing on error."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.errors import ConflictError, JobSpecError, NotFoundError
from consortium.models import MAX_STEP_TOKENS
from coordinator.jobs.service import JobService
from coordinator.jobs.spec import FederatedJobSpec, parse_job_spec, parse_submitted_spec
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.state import JobState, NodeRecord, NodeState, SqliteStateStore
from coordinator.state.sqlite_store import now_ms

VALID = """
name = "digits-fedavg"
workload = "digits-cnn"
dataset = "digits"
rounds = 5
"""


def spec_with(**overrides: object) -> str:
    """VALID with fields replaced (value None drops the field)."""
    fields: dict[str, object] = {
        "name": "digits-fedavg",
        "workload": "digits-cnn",
        "dataset": "digits",
        "rounds": 5,
    }
    fields.update(overrides)
    lines = []
    for key, value in fields.items():
        if value is None:
            continue
        rendered = f'"{value}"' if isinstance(value, str) else str(value).lower()
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def test_parse_job_spec_minimal_valid_spec_fills_defaults() -> None:
    spec = parse_job_spec(VALID)
    assert isinstance(spec, FederatedJobSpec)
    assert spec.name == "digits-fedavg"
    assert spec.kind == "federated"
    assert spec.workload == "digits-cnn"
    assert spec.dataset == "digits"
    assert spec.rounds == 5
    assert spec.strategy == "fedavg"
    assert spec.min_clients == 2
    assert spec.local_epochs == 1
    assert spec.learning_rate == 0.05
    assert spec.batch_size == 32
    assert spec.proximal_mu == 0.0
    assert spec.seed == 0
    assert spec.round_timeout_s == 600.0


def test_parse_job_spec_all_fields_given_are_kept() -> None:
    text = spec_with(
        strategy="fedprox",
        proximal_mu=0.1,
        min_clients=3,
        local_epochs=2,
        learning_rate=0.01,
        batch_size=16,
        seed=42,
        round_timeout_s=30.0,
        kind="federated",
    )
    spec = parse_job_spec(text)
    assert spec.strategy == "fedprox"
    assert spec.proximal_mu == 0.1
    assert (spec.min_clients, spec.local_epochs, spec.batch_size, spec.seed) == (3, 2, 16, 42)
    assert spec.learning_rate == 0.01
    assert spec.round_timeout_s == 30.0


def test_parse_job_spec_examples_shipped_in_repo_are_valid() -> None:
    examples = sorted(Path(__file__).resolve().parents[2].glob("examples/**/*.toml"))
    job_specs = [p for p in examples if "rounds" in p.read_text() and "workload" in p.read_text()]
    assert job_specs
    for path in job_specs:
        assert parse_job_spec(path.read_text()).rounds > 0, path


def test_parse_job_spec_invalid_toml_raises_job_spec_error() -> None:
    with pytest.raises(JobSpecError, match="not valid TOML"):
        parse_job_spec('name = "unterminated\nrounds = 3\n')


@pytest.mark.parametrize("field", ["name", "workload", "dataset", "rounds"])
def test_parse_job_spec_missing_required_field_names_field(field: str) -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(**{field: None}))
    message = str(excinfo.value)
    assert f"'{field}'" in message
    assert "missing" in message


def test_parse_job_spec_unknown_field_names_field() -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(learnin_rate=0.1))
    assert "'learnin_rate'" in str(excinfo.value)
    assert "unknown" in str(excinfo.value)


def test_parse_job_spec_unknown_strategy_names_field() -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(strategy="fedmedian"))
    assert "'strategy'" in str(excinfo.value)


def test_parse_job_spec_unknown_dataset_names_field_and_value() -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(dataset="imagenet"))
    message = str(excinfo.value)
    assert "'dataset'" in message
    assert "imagenet" in message
    assert "digits" in message  # the known ones are listed


def test_parse_job_spec_unknown_model_names_field_and_value() -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(workload="resnet-9000"))
    message = str(excinfo.value)
    assert "'workload'" in message
    assert "resnet-9000" in message
    assert "digits-cnn" in message


@pytest.mark.parametrize("rounds", [0, -1])
def test_parse_job_spec_rounds_not_positive_names_field(rounds: int) -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(rounds=rounds))
    assert "'rounds'" in str(excinfo.value)


def test_parse_job_spec_rounds_wrong_type_names_field() -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(rounds="many"))
    assert "'rounds'" in str(excinfo.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", 0),
        ("batch_size", 0),
        ("local_epochs", 0),
        ("min_clients", 0),
        ("proximal_mu", -0.5),
        ("seed", -1),
        ("kind", "centralised"),
        ("name", ""),
    ],
)
def test_parse_job_spec_out_of_range_value_names_field(field: str, value: object) -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(**{field: value}))
    assert f"'{field}'" in str(excinfo.value)


def test_parse_job_spec_several_problems_all_named() -> None:
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(rounds=0, dataset="imagenet", extra_thing=1))
    message = str(excinfo.value)
    for field in ("'rounds'", "'dataset'", "'extra_thing'"):
        assert field in message


# --- JobService ----------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStateStore]:
    s = SqliteStateStore(tmp_path / "state.db")
    try:
        yield s
    finally:
        s.close()


def test_submit_valid_spec_queues_job(store: SqliteStateStore) -> None:
    service = JobService(store)
    job = service.submit(VALID)
    assert job.state is JobState.QUEUED
    assert job.rounds_total == 5
    assert job.name == "digits-fedavg"
    assert job.spec_toml == VALID
    assert store.list_jobs() == [job]


@pytest.mark.parametrize(
    "text",
    [
        "not = [valid",
        spec_with(rounds=0),
        spec_with(workload="nope"),
        spec_with(name=None),
    ],
)
def test_submit_invalid_spec_creates_no_job(store: SqliteStateStore, text: str) -> None:
    service = JobService(store)
    with pytest.raises(JobSpecError):
        service.submit(text)
    assert store.list_jobs() == []


def test_cancel_queued_job_becomes_cancelled(store: SqliteStateStore) -> None:
    service = JobService(store)
    job = service.submit(VALID)
    cancelled = service.cancel(job.job_id)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.finished_at_ms > 0
    assert store.get_job(job.job_id).state is JobState.CANCELLED


def test_cancel_running_job_becomes_cancelled(store: SqliteStateStore) -> None:
    service = JobService(store)
    job = service.submit(VALID)
    store.update_job(job.job_id, state=JobState.RUNNING)
    assert service.cancel(job.job_id).state is JobState.CANCELLED


@pytest.mark.parametrize("final", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
def test_cancel_finished_job_raises_conflict(store: SqliteStateStore, final: JobState) -> None:
    service = JobService(store)
    job = service.submit(VALID)
    store.update_job(job.job_id, state=final, message="done")
    with pytest.raises(ConflictError):
        service.cancel(job.job_id)
    after = store.get_job(job.job_id)
    assert after.state is final
    assert after.message == "done"


def test_cancel_unknown_job_raises_not_found(store: SqliteStateStore) -> None:
    with pytest.raises(NotFoundError):
        JobService(store).cancel("does-not-exist")


def test_get_returns_job_and_its_rounds(store: SqliteStateStore) -> None:
    service = JobService(store)
    job = service.submit(VALID)
    record, rounds = service.get(job.job_id)
    assert record == job
    assert rounds == []


PRETRAIN = """
name = "tiny"
kind = "pretrain"
inner_steps = 5
outer_steps = 3
"""


def test_pretrain_kind_is_validated_as_pretrain_spec() -> None:
    spec = parse_submitted_spec(PRETRAIN)
    assert isinstance(spec, PretrainJobSpec)
    assert (spec.inner_steps, spec.outer_steps) == (5, 3)


def test_spec_without_kind_is_federated() -> None:
    assert isinstance(parse_submitted_spec(VALID), FederatedJobSpec)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (PRETRAIN.replace("inner_steps = 5", "inner_steps = 0"), "field 'inner_steps'"),
        (PRETRAIN.replace("outer_steps = 3\n", ""), "field 'outer_steps'"),
        (PRETRAIN + "rounds = 2\n", "field 'rounds'"),
        (PRETRAIN.replace('"pretrain"', '"distill"'), "field 'kind'"),
    ],
)
def test_invalid_submitted_spec_names_the_field(text: str, field: str) -> None:
    with pytest.raises(JobSpecError, match=field):
        parse_submitted_spec(text)


def test_pretrain_job_has_outer_steps_as_rounds(store: SqliteStateStore) -> None:
    job = JobService(store).submit(PRETRAIN)
    assert (job.kind, job.rounds_total, job.state) == ("pretrain", 3, JobState.QUEUED)


# --- per_institution_caps must name institutions the consortium knows ------------


def register_node(store: SqliteStateStore, institution: str, node_id: str) -> None:
    store.add_node(
        NodeRecord(node_id, institution, "host", "cpu", NodeState.ONLINE, now_ms(), now_ms())
    )


def test_pretrain_cap_for_unknown_institution_is_refused_naming_field(
    store: SqliteStateStore,
) -> None:
    register_node(store, "aurora", "a" * 32)
    with pytest.raises(JobSpecError) as refused:
        JobService(store).submit(PRETRAIN + "per_institution_caps = { aurora = 1, aurorra = 2 }\n")
    refused_part, known_part = str(refused.value).split("; known", maxsplit=1)
    assert "field 'per_institution_caps'" in refused_part
    assert "'aurorra'" in refused_part and "'aurora'" not in refused_part
    assert "aurora" in known_part  # says what it does know
    assert store.list_jobs() == []


def test_pretrain_cap_is_refused_when_no_institution_is_known(store: SqliteStateStore) -> None:
    with pytest.raises(JobSpecError, match=r"field 'per_institution_caps'.*'aurora'.*none yet"):
        JobService(store).submit(PRETRAIN + "per_institution_caps = { aurora = 1 }\n")
    assert store.list_jobs() == []


def test_pretrain_cap_for_institution_with_registered_node_is_accepted(
    store: SqliteStateStore,
) -> None:
    # An insecure coordinator has no onboarding: a node that registered makes it known,
    # also after it left.
    register_node(store, "aurora", "a" * 32)
    store.set_node_state("a" * 32, NodeState.GONE)
    job = JobService(store).submit(PRETRAIN + "per_institution_caps = { aurora = 0 }\n")
    assert job.state is JobState.QUEUED


def test_pretrain_cap_for_onboarded_institution_without_nodes_is_accepted(
    store: SqliteStateStore,
) -> None:
    store.add_certificate("01", "borealis", "ff" * 32, now_ms() + 86_400_000)
    job = JobService(store).submit(PRETRAIN + "per_institution_caps = { borealis = 2 }\n")
    assert job.state is JobState.QUEUED
    assert store.list_jobs() == [job]


@pytest.mark.parametrize(
    ("field", "value"),
    [("learning_rate", "0.05"), ("rounds", "5"), ("rounds", 5.0), ("retain_updates", "yes")],
)
def test_a_value_of_the_wrong_type_is_refused_not_converted(field: str, value: object) -> None:
    """Issue 20: `learning_rate = "0.05"` (a string) was accepted and converted."""
    with pytest.raises(JobSpecError) as excinfo:
        parse_job_spec(spec_with(**{field: value}))
    assert f"'{field}'" in str(excinfo.value)


def test_a_whole_number_is_a_valid_float_and_pretraining_is_strict_too() -> None:
    assert parse_job_spec(spec_with(learning_rate=1)).learning_rate == 1.0
    with pytest.raises(JobSpecError, match="'outer_steps'"):
        parse_submitted_spec('name = "p"\nkind = "pretrain"\nouter_steps = "4"\ninner_steps = 2\n')


def test_the_job_spec_reference_is_generated_from_the_models_and_current() -> None:
    """docs/job-spec.md (issue 20: there was no reference for the spec's fields)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_spec_reference.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc = (script.parents[1] / "docs" / "job-spec.md").read_text()
    for model in (FederatedJobSpec, PretrainJobSpec):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{name}` |" in doc


@pytest.mark.parametrize(
    "text",
    [
        spec_with(workload="bytelm", dataset="docstrings", batch_size=65_536, seq_len=128),
        PRETRAIN + "batch_size = 4096\nseq_len = 32\n",
    ],
    ids=["federated", "pretrain"],
)
def test_a_step_of_more_than_max_step_tokens_is_refused_at_submit(text: str) -> None:
    with pytest.raises(JobSpecError, match=f"at most {MAX_STEP_TOKENS:,}"):
        parse_submitted_spec(text)
