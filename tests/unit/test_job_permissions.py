"""Who may act on jobs and keys, decided from the caller's certificate (the CALLER that
the API's certificate interceptor sets for each call)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from consortium.errors import JobSpecError, PermissionDeniedError
from consortium.provenance.signing import SigningKey
from coordinator.access.caller import CALLER
from coordinator.access.registry import NodeRegistry
from coordinator.jobs.service import JobService
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.state import InMemoryStateStore, JobState, SqliteStateStore

SPEC = 'name = "p"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = 2\nmin_clients = {n}\n'


@contextmanager
def calling_as(name: str | None) -> Iterator[None]:
    token = CALLER.set(name)
    try:
        yield
    finally:
        CALLER.reset(token)


def refusals(metrics: CoordinatorMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "consortium_auth_refusals_total", {"channel": "control_plane", "reason": reason}
    )
    return value or 0.0


def service_with_institutions(
    *names: str,
) -> tuple[JobService, InMemoryStateStore, CoordinatorMetrics]:
    store = InMemoryStateStore()
    for serial, name in enumerate(names):
        store.add_certificate(str(serial), name, f"fp{serial}", 2**62)
    metrics = CoordinatorMetrics()
    return JobService(store, metrics=metrics), store, metrics


def test_institution_cannot_cancel_the_operators_job_and_is_counted() -> None:
    jobs, store, metrics = service_with_institutions("alpha", "beta")
    with calling_as("operator"):
        job = jobs.submit(SPEC.format(n=2))
    with calling_as("alpha"), pytest.raises(PermissionDeniedError, match="may not cancel"):
        jobs.cancel(job.job_id)
    assert store.get_job(job.job_id).state is JobState.QUEUED
    assert refusals(metrics, "not_job_owner") == 1


def test_institution_cannot_cancel_another_institutions_job() -> None:
    jobs, store, _ = service_with_institutions("alpha", "beta")
    with calling_as("beta"):
        job = jobs.submit(SPEC.format(n=2))
    with calling_as("alpha"), pytest.raises(PermissionDeniedError):
        jobs.cancel(job.job_id)
    assert store.get_job(job.job_id).state is JobState.QUEUED


def test_owner_and_operator_may_cancel() -> None:
    jobs, _, metrics = service_with_institutions("alpha", "beta")
    with calling_as("alpha"):
        own = jobs.submit(SPEC.format(n=2))
        assert own.submitted_by == "alpha"
        assert jobs.cancel(own.job_id).state is JobState.CANCELLED
        other = jobs.submit(SPEC.format(n=2))
    with calling_as("operator"):
        assert jobs.cancel(other.job_id).state is JobState.CANCELLED
    assert refusals(metrics, "not_job_owner") == 0


def test_min_clients_beyond_the_consortium_is_refused_naming_the_field() -> None:
    jobs, store, _ = service_with_institutions("alpha", "beta")
    with pytest.raises(
        JobSpecError, match="'min_clients': 3 institutions needed, the consortium has 2"
    ):
        jobs.submit(SPEC.format(n=3))
    assert store.list_jobs() == []


def test_node_may_not_register_a_signing_key_not_pinned_at_onboarding() -> None:
    store = InMemoryStateStore()
    pinned, other = SigningKey.generate().public, SigningKey.generate().public
    store.add_institution_key("alpha", pinned.key_id, pinned.raw)
    metrics = CoordinatorMetrics()
    registry = NodeRegistry(store, 10.0, metrics)
    with calling_as("alpha"):
        registry.register("alpha", "h", "cpu", pinned.raw)
        with pytest.raises(
            PermissionDeniedError,
            match="only the operator changes it",
        ):
            registry.register("alpha", "h", "cpu", other.raw)
    assert set(store.institution_keys("alpha")) == {pinned.key_id}
    assert refusals(metrics, "unpinned_signing_key") == 1


def test_plain_text_coordinator_registers_keys_from_nodes() -> None:
    store = InMemoryStateStore()
    key = SigningKey.generate().public
    with calling_as(None):
        NodeRegistry(store, 10.0).register("alpha", "h", "cpu", key.raw)
    assert set(store.institution_keys("alpha")) == {key.key_id}


def test_data_dir_from_before_job_owners_opens_and_its_jobs_belong_to_the_operator(
    tmp_path: Path,
) -> None:
    """A jobs table without `submitted_by` gains the column; old jobs have no owner, so
    only the operator may cancel them."""
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT "
            "NULL, spec_toml TEXT NOT NULL, state TEXT NOT NULL, rounds_total INTEGER NOT "
            "NULL, rounds_completed INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT "
            "'', created_at_ms INTEGER NOT NULL, started_at_ms INTEGER NOT NULL DEFAULT 0, "
            "finished_at_ms INTEGER NOT NULL DEFAULT 0, model_path TEXT NOT NULL DEFAULT '', "
            "flower_run_id TEXT NOT NULL DEFAULT '')"
        )
        db.execute(
            "INSERT INTO jobs (job_id, name, kind, spec_toml, state, rounds_total, "
            "created_at_ms) VALUES ('old', 'o', 'federated', '', 'queued', 2, 1)"
        )
    db.close()
    store = SqliteStateStore(path)
    try:
        assert store.get_job("old").submitted_by == ""
        jobs = JobService(store)
        with calling_as("alpha"), pytest.raises(PermissionDeniedError):
            jobs.cancel("old")
        with calling_as("operator"):
            assert jobs.cancel("old").state is JobState.CANCELLED
    finally:
        store.close()
