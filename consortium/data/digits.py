"""scikit-learn's `load_digits` (1,797 real 8x8 handwritten digits), split once.

The held-out test split is fixed by `HOLDOUT_SEED`, independent of any job
seed, so every coordinator evaluates on the same images and no site ever
receives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits

HOLDOUT_SEED = 20_231_123
HOLDOUT_FRACTION = 0.2
NUM_CLASSES = 10
IMAGE_SIDE = 8


@dataclass(frozen=True)
class Split:
    x: npt.NDArray[np.float32]  # (n, 1, 8, 8), scaled to [0, 1]
    y: npt.NDArray[np.int64]  # (n,)


def _all_digits() -> Split:
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    return Split(
        x=images.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE),
        y=np.asarray(bunch.target, dtype=np.int64),
    )


def train_test_split() -> tuple[Split, Split]:
    """The shareable training pool and the held-out test split."""
    everything = _all_digits()
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(everything.y))
    n_test = round(len(order) * HOLDOUT_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return (
        Split(everything.x[train], everything.y[train]),
        Split(everything.x[test], everything.y[test]),
    )
