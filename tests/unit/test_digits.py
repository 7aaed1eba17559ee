"""The digits data set is read from scikit-learn's own file without importing it, and
is exactly what `sklearn.datasets.load_digits` returns."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.data import digits


def test_the_digits_match_scikit_learns_loader() -> None:
    # Imported here: at module level every pytest-xdist worker would import scikit-learn
    # (with scipy and pandas) while collecting, for this one test.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ours = digits._all_digits()
    assert ours.x.shape == (1797, 1, 8, 8) and ours.x.dtype == np.float32
    assert np.array_equal(ours.x, (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None])
    assert np.array_equal(ours.y, bunch.target.astype(np.int64))
    train, test = digits.train_test_split()
    assert len(train.y) + len(test.y) == 1797 and len(test.y) == 359


def test_without_scikit_learn_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda _: None)
    with pytest.raises(digits.DataDirError, match="ships with scikit-learn"):
        digits.train_test_split()
