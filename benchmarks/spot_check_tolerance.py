"""Benchmark: how far honest contributions on other kernels land from the coordinator's
re-execution, and how far dishonest ones do (spot checks within a tolerance, issue 17).

    python benchmarks/spot_check_tolerance.py [--trials 8] [--inner-steps 50]

GPU kernels do not reproduce a CPU's bits: their reductions add in other orders, and
TF32 matrix products round inputs to 10-bit mantissas. A GPU worker's honest
pseudo-gradient therefore differs from the coordinator's CPU re-execution, by an amount
that compounds over the H inner steps. No GPU is needed to measure how much: this
benchmark runs the honest inner loop (`InnerTrainer`) with rounding noise injected into
every gradient of every inner step, at three sizes (float32's own rounding, 2**-24;
1e-5; TF32's, 2**-11), and records the relative L2 distance of each result from the
exact re-execution (`coordinator.pretraining.spot_check.relative_distance`, what the
check compares with ``verify_tolerance``). Beside them, four dishonest contributions
from the same inputs: trained on another shard than assigned, trained for half the
steps, scaled by 1.1, and honest plus Gaussian noise of 1% of its RMS.

It prints, per kind, the distances (median and extreme), then for each tolerance the
share of honest results refused (false positives) and of dishonest ones caught. Run on
the same CPU, one thread, as the coordinator's checks run.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from consortium.inner_loop import InnerTrainer, corpus_for
from consortium.lm import Weights, model_weights
from consortium.models.bytelm import ByteLM
from consortium.pseudo_gradient_codec import decode
from coordinator.pretraining import PretrainJobSpec, validate_pretrain_spec
from coordinator.pretraining.spot_check import relative_distance
from coordinator.pretraining.worker_config import worker_config

TOLERANCES = (1e-4, 1e-3, 1e-2, 5e-2)
HONEST_NOISE = {
    "fp32 rounding (2**-24)": 2.0**-24,
    "1e-5": 1e-5,
    "TF32 rounding (2**-11)": 2.0**-11,
}


def bench_spec(inner_steps: int) -> PretrainJobSpec:
    return validate_pretrain_spec(
        {
            "name": "bench-tolerance",
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 64,
            "block_size": 64,
            "seq_len": 64,
            "batch_size": 8,
            "inner_steps": inner_steps,
            "outer_steps": 1,
            "num_shards": 8,
            "corpus_bytes": 262144,
            "validation_bytes": 8192,
            "device": "cpu",
            "inner_optimizer_state": "reset",
            "verify_fraction": 1.0,
            "verify_tolerance": 1e-2,
        }
    )


class Runner:
    """One trainer (the coordinator's re-execution) and inner loops with injected noise."""

    def __init__(self, spec: PretrainJobSpec) -> None:
        self.spec = spec
        self.trainer = InnerTrainer(worker_config(spec, corpus_for(spec).digest, "cpu"))
        self._noise = 0.0
        self._rng = torch.Generator().manual_seed(0)
        for param in self.trainer.model.parameters():
            param.register_hook(self._perturb)

    def _perturb(self, grad: torch.Tensor) -> torch.Tensor:
        if self._noise == 0:
            return grad
        factor = torch.randn(grad.shape, generator=self._rng, dtype=grad.dtype)
        return grad * (1 + self._noise * factor)

    def run(
        self, weights: Weights, shard: int, seed: int, steps: int, noise: float = 0.0
    ) -> Weights:
        self._noise = noise
        try:
            sent, _ = self.trainer.run_inner(weights, (shard,), steps, seed, 0)
        finally:
            self._noise = 0.0
        return decode(sent, self.spec.pseudo_gradient_codec)


def dishonest(
    runner: Runner, weights: Weights, shard: int, seed: int, honest: Weights
) -> dict[str, Weights]:
    steps = runner.spec.inner_steps
    rng = np.random.default_rng(seed)
    rms = float(np.sqrt(np.mean(np.concatenate([v.ravel() ** 2 for v in honest.values()]))))
    return {
        "another shard": runner.run(weights, (shard + 1) % runner.spec.num_shards, seed, steps),
        "half the steps": runner.run(weights, shard, seed, steps // 2),
        "scaled by 1.1": {k: (v * 1.1).astype(np.float32) for k, v in honest.items()},
        "noise, 1% of RMS": {
            k: (v + 0.01 * rms * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in honest.items()
        },
    }


def table(title: str, distances: dict[str, list[float]], honest: bool) -> None:
    """Per kind: median and worst distance (largest honest, smallest dishonest), and the
    share refused at each tolerance."""
    print(f"\n{title}")
    header = "| kind | median distance | " + ("max" if honest else "min") + " | "
    header += " | ".join(f"refused at {t:g}" for t in TOLERANCES) + " |"
    print(header)
    print("|" + " --- |" * (3 + len(TOLERANCES)))
    for kind, values in distances.items():
        extreme = max(values) if honest else min(values)
        shares = [sum(d > t for d in values) / len(values) for t in TOLERANCES]
        cells = " | ".join(f"{share:.0%}" for share in shares)
        print(f"| {kind} | {statistics.median(values):.2e} | {extreme:.2e} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=8, help="outer steps (inputs) measured")
    parser.add_argument("--inner-steps", type=int, default=50, help="H")
    args = parser.parse_args()
    spec = bench_spec(args.inner_steps)
    runner = Runner(spec)  # one deterministic CPU thread, as the coordinator's checks
    honest: dict[str, list[float]] = {kind: [] for kind in HONEST_NOISE}
    cheats: dict[str, list[float]] = {}
    for trial in range(args.trials):
        weights = model_weights(ByteLM(spec.bytelm_config, seed=trial))
        shard, seed = trial % spec.num_shards, 1000 + trial
        exact = runner.run(weights, shard, seed, spec.inner_steps)
        for kind, noise in HONEST_NOISE.items():
            result = runner.run(weights, shard, seed, spec.inner_steps, noise)
            honest[kind].append(relative_distance(result, exact))
        for kind, result in dishonest(runner, weights, shard, seed, exact).items():
            cheats.setdefault(kind, []).append(relative_distance(result, exact))
        print(f"trial {trial + 1}/{args.trials} done", flush=True)
    print(
        f"\nByteLM {spec.n_layer}x{spec.n_embd}, H = {spec.inner_steps}, {args.trials} trials; "
        "relative L2 distance from the coordinator's exact CPU re-execution"
    )
    table("Honest contributions, noise injected into every gradient", honest, honest=True)
    table("Dishonest contributions", cheats, honest=False)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
