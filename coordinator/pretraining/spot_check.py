"""Spot checks of contributed compute: the coordinator re-executes a sample of an outer
step's contributions on its own CPU and compares them bit for bit (issue 17).

With ``deterministic = true`` on CPU and ``inner_optimizer_state = "reset"``, a worker's
pseudo-gradient depends only on what the coordinator sent it: the global weights, its
shards, its batch seed and the step's place in the learning-rate schedule. So
`SpotChecker.check` runs the same `InnerTrainer` the Ray actors are, from the same
inputs, encodes with the job's codec and compares the digest with that of what the
worker sent. A worker that returned anything else (a perturbed, scaled or made-up
pseudo-gradient, or one trained on other data) is caught whenever it is sampled; the
controller then drops its result before averaging and bars its institution for the rest of the
job (coordinator/pretraining/diloco.py).

Each contribution is sampled with probability ``verify_fraction``, drawn from the
operating system's randomness when its result is in: the step seed is derived from the
spec's public seed, so a sample drawn from it would tell a worker in advance which of
its steps go unchecked. The sample is in the log (``verified``), not replayed.

GPU kernels are not bit-reproducible, so a GPU job is checked within a tolerance
instead (``verify_tolerance`` above 0): the contribution passes when its relative L2
distance from the coordinator's CPU re-execution, ``||theirs - ours|| / ||ours||`` over
all tensors decoded from the job's codec, is at most the tolerance. Honest kernel
differences compound over H inner steps into distances that
`benchmarks/spot_check_tolerance.py` measures on CPU (other thread counts, injected
rounding noise), beside the distances of dishonest contributions, so a tolerance can be
chosen between them; docs/pretraining.md has the figures.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

import numpy as np

from consortium.inner_loop import InnerTrainer
from consortium.lm import Weights
from consortium.pseudo_gradient_codec import Codec, Encoded, decode
from consortium.tensor_digest import arrays_digest
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.pretraining.worker_config import worker_config


class SpotChecker:
    def __init__(
        self,
        spec: PretrainJobSpec,
        corpus_digest: str,
        draw: Callable[[], float] | None = None,
    ) -> None:
        self.fraction = spec.verify_fraction
        self.tolerance = spec.verify_tolerance
        self._codec: Codec = spec.pseudo_gradient_codec
        self._config = worker_config(spec, corpus_digest, "cpu")
        self._draw = draw or random.SystemRandom().random
        self._trainer: InnerTrainer | None = None  # built at the first check

    def sample(self, workers: Iterable[str]) -> list[str]:
        """The workers (of those given) whose results this step re-executes."""
        if self.fraction == 0:
            return []
        return [worker for worker in sorted(workers) if self._draw() < self.fraction]

    def check(
        self,
        global_weights: Weights,
        shard_ids: tuple[int, ...],
        steps: int,
        seed: int,
        first_step: int,
        sent: Encoded,
    ) -> str | None:
        """None when re-executing the worker's inner loop gives exactly what it `sent`;
        otherwise why not, in one line."""
        if self._trainer is None:
            # Switches this process's torch to one deterministic thread, as a worker's.
            self._trainer = InnerTrainer(self._config)
        expected, _ = self._trainer.run_inner(global_weights, shard_ids, steps, seed, first_step)
        ours, theirs = arrays_digest(expected), arrays_digest(sent)
        if ours == theirs:
            return None
        if self.tolerance == 0:
            return (
                f"verification failed: its pseudo-gradient {theirs[:16]} differs from the "
                f"coordinator's re-execution {ours[:16]}"
            )
        distance = relative_distance(decode(sent, self._codec), decode(expected, self._codec))
        if distance <= self.tolerance:
            return None
        return (
            f"verification failed: its pseudo-gradient is {distance:.3g} (relative L2) from "
            f"the coordinator's re-execution, above verify_tolerance = {self.tolerance:g}"
        )


def relative_distance(theirs: Weights, ours: Weights) -> float:
    """``||theirs - ours|| / ||ours||`` over every tensor (float64 sums); infinite when
    the names or shapes differ, or either holds a non-finite value."""
    if theirs.keys() != ours.keys():
        return math.inf
    difference = reference = 0.0
    for name in ours:
        a, b = np.asarray(theirs[name], np.float64), np.asarray(ours[name], np.float64)
        if a.shape != b.shape:
            return math.inf
        difference += float(np.sum((a - b) ** 2))
        reference += float(np.sum(b**2))
    if not (math.isfinite(difference) and math.isfinite(reference)):
        return math.inf
    if reference == 0:
        return 0.0 if difference == 0 else math.inf
    return math.sqrt(difference / reference)
