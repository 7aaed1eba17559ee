"""What `coordinator replay` refuses for a pretraining job, and the plan checks it makes
before training, on records built here (the full replay of a real job is in
tests/integration/test_pretrain_replay.py)."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from consortium.errors import NotFoundError
from consortium.inner_loop import corpus_for
from consortium.provenance.environment import describe_environment
from consortium.provenance.records import Record, parse_body, type_name
from coordinator.federated.replay import ReplayMismatchError, job_kind
from coordinator.pretraining import PretrainJobSpec, validate_pretrain_spec
from coordinator.pretraining.replay import (
    NotReplayableError,
    plan_replay,
    replay_pretraining,
)
from coordinator.pretraining.schedule import derive_seed

JOB = "job-1"


def tiny_spec(**overrides: Any) -> PretrainJobSpec:
    fields: dict[str, Any] = {
        "name": "replay-plan",
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "block_size": 32,
        "seq_len": 32,
        "batch_size": 4,
        "inner_steps": 3,
        "outer_steps": 3,
        "num_shards": 2,
        "corpus_bytes": 32768,
        "validation_bytes": 4096,
        "eval_batches": 2,
    }
    fields.update(overrides)
    return validate_pretrain_spec(fields)


def first_step_seed(seed: int) -> int:
    """The controller's first step seed: PCG64 seeded with the job seed."""
    return int(np.random.Generator(np.random.PCG64(seed)).integers(0, 2**63 - 1))


def outer_step(step: int, attempts: int = 1, device: str = "cpu", **extra: Any) -> dict[str, Any]:
    step_seed = first_step_seed(0) if step == 0 else step
    worker = {
        "worker": "aurora/abc/cpu0",
        "institution": "aurora",
        "node_id": "abc",
        "device": device,
        "position": 0,
        "shard_ids": [0, 1],
        "seed": derive_seed(step_seed, 0),
        "pseudo_gradient_digest": "0" * 64,
        "inner_steps": 3,
        "tokens": 384,
        "compute_s": 0.1,
    }
    return {
        "type": "outer_step",
        "job_id": JOB,
        "round": step + 1,
        "step": step,
        "workers": [{**worker, **extra}],
        "workers_lost": {},
        "step_seed": step_seed,
        "aggregate_digest": "1" * 64,
        "model_digest": "2" * 64,
        "val_loss": 3.0,
        "attempts": attempts,
    }


def parse(entry: dict[str, Any]) -> Record:
    """A record written here as {"type": ..., **body}, typed as a log reader gets it."""
    return parse_body(entry["type"], {k: v for k, v in entry.items() if k != "type"})


def job(
    spec: PretrainJobSpec, *steps: dict[str, Any], environment: dict[str, Any] | None = None
) -> list[Record]:
    started = {
        "type": "job_started",
        "job_id": JOB,
        "kind": "pretrain",
        "spec": spec.model_dump(mode="json"),
        "spec_digest": spec.digest(),
        "seed": spec.seed,
        "environment": environment or describe_environment(spec.device, spec.deterministic),
    }
    return [parse(started), *(parse(step) for step in steps)]


def test_job_kind_names_pretraining_and_defaults_to_federated() -> None:
    assert job_kind(job(tiny_spec(), outer_step(0))) == "pretrain"
    with pytest.raises(NotFoundError, match="no outer step"):
        plan_replay(JOB, job(tiny_spec()))
    assert job_kind([parse({"type": "job_started", "job_id": JOB})]) == "federated"
    assert job_kind([parse({"type": "round", "job_id": JOB, "round": 1, "global_digest": ""})]) == (
        "federated"
    )


def test_plan_follows_the_log_and_notes_an_unfinished_job() -> None:
    spec = tiny_spec()
    resumed = {"type": "job_resumed", "job_id": JOB, "after_round": 1, "kind": "pretrain"}
    plan = plan_replay(JOB, job(spec, outer_step(0), resumed, outer_step(1)))
    assert plan.spec == spec and plan.steps == 2
    assert [type_name(e) for e in plan.events] == ["outer_step", "job_resumed", "outer_step"]
    assert plan.corpus_digest == corpus_for(spec).digest
    assert plan.final_model_digest is None
    assert any("has not finished" in note for note in plan.notes)


@pytest.mark.parametrize(
    ("spec", "steps", "reason"),
    [
        (tiny_spec(deterministic=False), [outer_step(0)], "deterministic = false"),
        (tiny_spec(device="gpu"), [outer_step(0)], "it ran on GPUs"),
        (tiny_spec(), [outer_step(0), outer_step(1, device="gpu")], r"GPUs \(from step 1\)"),
        (tiny_spec(), [outer_step(0), outer_step(2)], "step 2 where step 1 was expected"),
        (tiny_spec(), [outer_step(0), outer_step(1, attempts=2)], "step 1 took 2 attempts"),
        (tiny_spec(), [outer_step(0, inner_steps=7)], "logged 7 inner steps"),
    ],
)
def test_plan_refuses_what_cannot_match_bit_for_bit(
    spec: PretrainJobSpec, steps: list[dict[str, Any]], reason: str
) -> None:
    with pytest.raises(NotReplayableError, match=reason) as raised:
        plan_replay(JOB, job(spec, *steps))
    assert str(raised.value).startswith(f"job {JOB} cannot be replayed")
    assert "\n" not in str(raised.value)


def test_several_attempts_replay_when_workers_reset_their_optimizer() -> None:
    spec = tiny_spec(inner_optimizer_state="reset")
    assert plan_replay(JOB, job(spec, outer_step(0), outer_step(1, attempts=3))).steps == 2


def test_plan_compares_the_corpus_digest_and_the_torch_version() -> None:
    spec = tiny_spec()
    finished = {
        "type": "job_finished",  # the old name of a pretraining job's job_completed
        "job_id": JOB,
        "kind": "pretrain",
        "model_digest": "2" * 64,
        "corpus_digest": "f" * 64,
        "val_loss": 3.0,
    }
    with pytest.raises(NotReplayableError, match="stdlib corpus ffffffffffffffff"):
        plan_replay(JOB, [*job(spec, outer_step(0)), parse(finished)])
    environment = describe_environment(spec.device, spec.deterministic)
    other_python = {**environment, "python": "2.7.18"}
    with pytest.raises(NotReplayableError, match=r"replay with Python 2\.7\.18"):
        plan_replay(JOB, job(spec, outer_step(0), environment=other_python))
    other_torch = {**environment, "versions": {**environment["versions"], "torch": "1.0"}}
    with pytest.raises(NotReplayableError, match=r"torch 1\.0"):
        plan_replay(JOB, job(spec, outer_step(0), environment=other_torch))
    assert platform.python_version() == environment["python"]


def test_replay_checks_the_seeds_before_training() -> None:
    spec = tiny_spec()
    step = outer_step(0)
    plan = plan_replay(JOB, job(spec, {**step, "step_seed": 5}))
    with pytest.raises(ReplayMismatchError, match=r"step 0 \(round 1\): step seed"):
        replay_pretraining(plan)
    plan = plan_replay(JOB, job(spec, outer_step(0, seed=5)))
    with pytest.raises(ReplayMismatchError, match=r"worker aurora/abc/cpu0 .* batch seed"):
        replay_pretraining(plan)


@pytest.fixture
def torch_settings() -> Iterator[None]:
    """Replay turns on one thread and deterministic kernels; give the process its own back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark


@pytest.mark.usefixtures("torch_settings")
def test_replay_names_the_worker_whose_pseudo_gradient_differs() -> None:
    # One real (tiny) inner loop; the logged digest is not what it produces.
    plan = plan_replay(JOB, job(tiny_spec(), outer_step(0)))
    with pytest.raises(ReplayMismatchError, match=r"worker aurora/abc/cpu0 .*pseudo-gradient"):
        replay_pretraining(plan)
