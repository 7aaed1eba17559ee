"""scikit-learn's digits data set (1,797 real 8x8 handwritten digits), split once.

The held-out test split is fixed by `HOLDOUT_SEED`, independent of any job
seed, so every coordinator evaluates on the same images and no site ever
receives them.

The file is the one scikit-learn ships and `sklearn.datasets.load_digits` reads, read
here as it does (a gzipped CSV: 64 pixel columns, then the label) without importing
scikit-learn: `import sklearn` pulls in scipy and pandas, about 1.4 CPU-s in every
process that trains or evaluates the digits model (each site's ClientApp for each run,
the ServerApp, every replay). tests/unit/test_digits.py compares it with `load_digits`.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from consortium.errors import DataDirError

HOLDOUT_SEED = 20_231_123
HOLDOUT_FRACTION = 0.2
NUM_CLASSES = 10
IMAGE_SIDE = 8


@dataclass(frozen=True)
class Split:
    x: npt.NDArray[np.float32]  # (n, 1, 8, 8), scaled to [0, 1]
    y: npt.NDArray[np.int64]  # (n,)


def digits_file() -> Path:
    """Where scikit-learn keeps the data set (found without importing it)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataDirError("the digits data set ships with scikit-learn, which is not installed")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def _all_digits() -> Split:
    with gzip.open(digits_file(), "rt") as text:
        table = np.loadtxt(text, delimiter=",")
    images = table[:, :-1].astype(np.float32) / 16.0
    return Split(
        x=images.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE),
        y=table[:, -1].astype(np.int64),
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
