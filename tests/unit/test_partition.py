"""Dirichlet partitioning on the real digits labels, and the fixed train/test split."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from consortium.data.digits import HOLDOUT_FRACTION, NUM_CLASSES, Split, train_test_split
from consortium.data.partition import dirichlet_partition

TOTAL_DIGITS = 1797


@pytest.fixture(scope="module")
def split() -> tuple[Split, Split]:
    return train_test_split()


@pytest.fixture(scope="module")
def labels(split: tuple[Split, Split]) -> npt.NDArray[np.int64]:
    return split[0].y


def label_skew(labels: npt.NDArray[np.int64], parts: list[npt.NDArray[np.int64]]) -> float:
    """Mean total-variation distance of each partition's label mix to the global mix."""
    global_hist = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    distances = []
    for part in parts:
        hist = np.bincount(labels[part], minlength=NUM_CLASSES) / len(part)
        distances.append(0.5 * np.abs(hist - global_hist).sum())
    return float(np.mean(distances))


# --- dirichlet_partition -------------------------------------------------------------


@pytest.mark.parametrize(("num_partitions", "alpha"), [(2, 1.0), (5, 0.1), (7, 100.0)])
def test_dirichlet_partition_covers_every_index_exactly_once(
    labels: npt.NDArray[np.int64], num_partitions: int, alpha: float
) -> None:
    parts = dirichlet_partition(labels, num_partitions, alpha, seed=3)
    assert len(parts) == num_partitions
    combined = np.concatenate(parts)
    assert len(combined) == len(labels)
    assert np.array_equal(np.sort(combined), np.arange(len(labels)))


def test_dirichlet_partition_partitions_are_disjoint(labels: npt.NDArray[np.int64]) -> None:
    parts = dirichlet_partition(labels, 5, 0.5, seed=1)
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            assert np.intersect1d(a, b).size == 0


def test_dirichlet_partition_indices_sorted_int64(labels: npt.NDArray[np.int64]) -> None:
    for part in dirichlet_partition(labels, 4, 0.5, seed=2):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)


def test_dirichlet_partition_same_seed_identical(labels: npt.NDArray[np.int64]) -> None:
    first = dirichlet_partition(labels, 5, 0.3, seed=11)
    second = dirichlet_partition(labels, 5, 0.3, seed=11)
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)


def test_dirichlet_partition_different_seeds_differ(labels: npt.NDArray[np.int64]) -> None:
    first = dirichlet_partition(labels, 5, 0.3, seed=11)
    second = dirichlet_partition(labels, 5, 0.3, seed=12)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(("alpha", "minimum"), [(0.1, 10), (0.1, 60), (1.0, 100)])
def test_dirichlet_partition_every_partition_at_least_min_size(
    labels: npt.NDArray[np.int64], alpha: float, minimum: int
) -> None:
    for seed in range(5):
        parts = dirichlet_partition(labels, 5, alpha, seed=seed, min_partition_size=minimum)
        assert min(len(p) for p in parts) >= minimum


def test_dirichlet_partition_small_alpha_more_label_skew_than_large(
    labels: npt.NDArray[np.int64],
) -> None:
    seeds = range(5)
    skewed = np.mean([label_skew(labels, dirichlet_partition(labels, 5, 0.1, s)) for s in seeds])
    near_iid = np.mean(
        [label_skew(labels, dirichlet_partition(labels, 5, 100.0, s)) for s in seeds]
    )
    assert skewed > 0.3
    assert near_iid < 0.1
    assert skewed > 3 * near_iid


def test_dirichlet_partition_single_partition_gets_everything(
    labels: npt.NDArray[np.int64],
) -> None:
    (only,) = dirichlet_partition(labels, 1, 0.5, seed=0)
    assert np.array_equal(only, np.arange(len(labels)))


def test_dirichlet_partition_exact_capacity_allowed() -> None:
    labels = np.repeat(np.arange(2, dtype=np.int64), 10)
    parts = dirichlet_partition(labels, 2, 1000.0, seed=0, min_partition_size=10)
    assert sorted(len(p) for p in parts) == [10, 10]


@pytest.mark.parametrize(
    ("num_partitions", "alpha", "minimum", "match"),
    [
        (0, 1.0, 1, "num_partitions"),
        (-3, 1.0, 1, "num_partitions"),
        (3, 0.0, 1, "alpha"),
        (3, -1.0, 1, "alpha"),
        (200, 1.0, 10, "cannot give"),  # 200 * 10 > 1438 training examples
    ],
)
def test_dirichlet_partition_invalid_arguments_raise_value_error(
    labels: npt.NDArray[np.int64], num_partitions: int, alpha: float, minimum: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(labels, num_partitions, alpha, seed=0, min_partition_size=minimum)


def test_dirichlet_partition_unreachable_minimum_raises_value_error() -> None:
    # One class, tiny alpha: each draw gives (almost) everything to one site, so an
    # even 5/5 split never comes up and the redraw loop must give up with a clear error.
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="raise alpha"):
        dirichlet_partition(labels, 2, 0.001, seed=0, min_partition_size=5)


# --- train_test_split ------------------------------------------------------------------


def _rows(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> list[bytes]:
    """Each example (image and label) as one hashable, comparable key."""
    flat = x.reshape(len(x), -1).astype(np.float32)
    return sorted(
        img.tobytes() + int(label).to_bytes(1, "little") for img, label in zip(flat, y, strict=True)
    )


def test_train_test_split_sizes_add_up(split: tuple[Split, Split]) -> None:
    train, test = split
    assert len(train.y) + len(test.y) == TOTAL_DIGITS
    assert len(test.y) == round(TOTAL_DIGITS * HOLDOUT_FRACTION)
    assert len(train.x) == len(train.y)
    assert len(test.x) == len(test.y)


def test_train_test_split_is_a_partition_of_all_digits(split: tuple[Split, Split]) -> None:
    # train + test must be exactly the full data set as a multiset of (image, label):
    # with the sizes adding up to 1797 that means no example is in both splits.
    train, test = split
    from sklearn.datasets import load_digits  # here: not in every worker at collection

    bunch = load_digits()
    everything = _rows(np.asarray(bunch.images, np.float32) / 16.0, bunch.target)
    combined = _rows(np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y]))
    assert combined == everything


def test_train_test_split_deterministic() -> None:
    (train_a, test_a), (train_b, test_b) = train_test_split(), train_test_split()
    assert np.array_equal(train_a.x, train_b.x)
    assert np.array_equal(train_a.y, train_b.y)
    assert np.array_equal(test_a.x, test_b.x)
    assert np.array_equal(test_a.y, test_b.y)


def test_train_test_split_shapes_dtypes_and_scale(split: tuple[Split, Split]) -> None:
    for part in split:
        assert part.x.dtype == np.float32
        assert part.y.dtype == np.int64
        assert part.x.shape[1:] == (1, 8, 8)
        assert float(part.x.min()) >= 0.0
        assert float(part.x.max()) <= 1.0
        assert set(np.unique(part.y).tolist()) == set(range(NUM_CLASSES))
