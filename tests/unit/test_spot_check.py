"""Spot checks of contributed compute (coordinator/pretraining/spot_check.py): which
specs allow them, how the sample is drawn, and that a re-execution matches an honest
worker and names a dishonest one. The controller's use of them, with a dishonest Ray
actor, is in tests/integration/test_pretrain.py."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from consortium.errors import JobSpecError
from consortium.inner_loop import InnerTrainer, corpus_for
from consortium.lm import model_weights
from consortium.models.bytelm import ByteLM
from coordinator.pretraining.records import OuterStepRecord
from coordinator.pretraining.spec import PretrainJobSpec, validate_pretrain_spec
from coordinator.pretraining.spot_check import SpotChecker, relative_distance
from coordinator.pretraining.worker_config import worker_config

TINY = {
    "name": "checked",
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "block_size": 16,
    "seq_len": 16,
    "batch_size": 2,
    "inner_steps": 3,
    "outer_steps": 1,
    "num_shards": 2,
    "corpus_bytes": 8192,
    "validation_bytes": 1024,
}
CHECKABLE = {"device": "cpu", "inner_optimizer_state": "reset", "verify_fraction": 1.0}


@pytest.fixture
def own_torch_settings() -> Iterator[None]:
    """A check switches this process's torch to one deterministic thread; put it back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"inner_optimizer_state": "keep"}, "inner_optimizer_state = 'keep'"),
        ({"device": "auto"}, "device = 'auto'"),
        ({"device": "gpu"}, "device = 'gpu'"),
        ({"deterministic": False}, "deterministic = False"),
    ],
)
def test_a_spec_whose_contributions_cannot_be_re_executed_is_refused(
    change: dict[str, Any], named: str
) -> None:
    with pytest.raises(JobSpecError, match=rf"field 'verify_fraction'.*{named}"):
        validate_pretrain_spec({**TINY, **CHECKABLE, **change})
    validate_pretrain_spec({**TINY, **change})  # without spot checks, any of these is fine


@pytest.mark.parametrize(
    "change", [{"device": "gpu"}, {"device": "auto"}, {"deterministic": False}]
)
def test_a_tolerance_lets_gpu_and_nondeterministic_jobs_be_spot_checked(
    change: dict[str, Any],
) -> None:
    spec = validate_pretrain_spec({**TINY, **CHECKABLE, **change, "verify_tolerance": 0.01})
    assert spec.verify_tolerance == 0.01
    # ... but a worker's result must still depend on what it was sent alone.
    with pytest.raises(JobSpecError, match=r"inner_optimizer_state = 'keep'"):
        validate_pretrain_spec(
            {
                **TINY,
                **CHECKABLE,
                **change,
                "verify_tolerance": 0.01,
                "inner_optimizer_state": "keep",
            }
        )


def test_the_fraction_is_operational_so_a_resumed_job_may_change_it() -> None:
    spec = validate_pretrain_spec({**TINY, **CHECKABLE})
    assert "verify_fraction" not in spec.training_identity()


def checker(fraction: float, draws: list[float] | None = None) -> SpotChecker:
    spec = validate_pretrain_spec({**TINY, **CHECKABLE, "verify_fraction": fraction})
    values = itertools.cycle(draws or [0.0])
    return SpotChecker(spec, corpus_for(spec).digest, draw=lambda: next(values))


def test_each_contribution_is_sampled_with_the_fraction_from_the_draw() -> None:
    assert checker(0.0).sample(["a", "b"]) == []
    assert checker(1.0, [0.999]).sample(["b", "a"]) == ["a", "b"]
    assert checker(0.3, [0.5, 0.1, 0.29, 0.3]).sample(["a", "b", "c", "d"]) == ["b", "c"]


def test_the_default_draw_is_the_operating_systems_not_the_public_seed() -> None:
    spec = validate_pretrain_spec({**TINY, **CHECKABLE, "verify_fraction": 0.5})
    samples = {tuple(SpotChecker(spec, "x").sample([str(i) for i in range(40)])) for _ in range(5)}
    assert len(samples) > 1  # two samples of 40 at one half agree with odds of 2**-40


def honest_result(spec: PretrainJobSpec, weights: dict[str, Any]) -> dict[str, Any]:
    config = worker_config(spec, corpus_for(spec).digest, "cpu")
    sent, _ = InnerTrainer(config).run_inner(weights, (1,), spec.inner_steps, 7, 3)
    return sent


@pytest.mark.usefixtures("own_torch_settings")
def test_a_re_execution_matches_an_honest_worker_and_names_a_nudged_one() -> None:
    spot = checker(1.0)
    spec = validate_pretrain_spec({**TINY, **CHECKABLE})
    weights = model_weights(ByteLM(spec.bytelm_config, seed=spec.seed))
    sent = honest_result(spec, weights)
    assert spot.check(weights, (1,), spec.inner_steps, 7, 3, sent) is None
    first = sorted(sent)[0]
    nudged = {**sent, first: sent[first] + np.float32(1e-6)}  # by 1e-6, each value
    failure = spot.check(weights, (1,), spec.inner_steps, 7, 3, nudged)
    assert failure is not None and failure.startswith("verification failed: its pseudo-gradient")
    # Other shards or another seed than assigned are caught the same way.
    assert spot.check(weights, (0,), spec.inner_steps, 7, 3, sent) is not None
    assert spot.check(weights, (1,), spec.inner_steps, 8, 3, sent) is not None


def test_records_from_before_spot_checks_read_as_unchecked() -> None:
    record = OuterStepRecord(
        step=0,
        results=(),
        workers_lost={},
        step_seed=1,
        aggregate_digest="a",
        model_digest="m",
        val_loss=1.0,
        wall_s=1.0,
        verified=("alpha/x/cpu0",),
        verification_failed={"beta/y/cpu0": "y" * 56},
    )
    assert OuterStepRecord.from_dict(record.to_dict()) == record
    old = {k: v for k, v in record.to_dict().items() if not k.startswith("verif")}
    assert OuterStepRecord.from_dict(old).verified == ()
    assert OuterStepRecord.from_dict(old).verification_failed == {}


def tolerant_checker(tolerance: float) -> tuple[SpotChecker, PretrainJobSpec]:
    spec = validate_pretrain_spec({**TINY, **CHECKABLE, "verify_tolerance": tolerance})
    return SpotChecker(spec, corpus_for(spec).digest, draw=lambda: 0.0), spec


@pytest.mark.usefixtures("own_torch_settings")
def test_a_tolerant_check_accepts_kernel_noise_and_names_a_larger_distance() -> None:
    spot, spec = tolerant_checker(1e-3)
    weights = model_weights(ByteLM(spec.bytelm_config, seed=spec.seed))
    sent = honest_result(spec, weights)
    rng = np.random.default_rng(0)
    # Rounding noise, as another GPU's kernels leave (1e-5 of each value): accepted.
    noisy = {
        k: v * (1 + 1e-5 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sent.items()
    }
    assert spot.check(weights, (1,), spec.inner_steps, 7, 3, noisy) is None
    # A pseudo-gradient 1% off (steered, scaled, other data): refused, with its distance.
    steered = {k: (v * 1.01).astype(np.float32) for k, v in sent.items()}
    failure = spot.check(weights, (1,), spec.inner_steps, 7, 3, steered)
    assert failure is not None
    assert "0.01 (relative L2)" in failure and "verify_tolerance = 0.001" in failure
    assert spot.check(weights, (0,), spec.inner_steps, 7, 3, sent) is not None  # other shard


def test_relative_distance_is_infinite_for_other_tensors_or_non_finite_values() -> None:
    ours = {"w": np.ones(4, np.float32)}
    assert relative_distance({"w": np.ones(4, np.float32) * 1.5}, ours) == pytest.approx(0.5)
    assert relative_distance({"v": np.ones(4, np.float32)}, ours) == math.inf
    assert relative_distance({"w": np.ones(5, np.float32)}, ours) == math.inf
    assert relative_distance({"w": np.full(4, np.nan, np.float32)}, ours) == math.inf
    zero = {"w": np.zeros(4, np.float32)}
    assert relative_distance(zero, zero) == 0.0
