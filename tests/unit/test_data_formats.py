"""Site data against the formats jobs train on: `client data check` and `example`
(issue 20: a site's flat sklearn arrays used to be accepted, then fail every round)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.data.check import check_site_data, write_example
from consortium.data.formats import FORMATS
from consortium.data.site_loaders import load_dataset
from consortium.errors import DataDirError, InvalidArgumentError
from consortium.workloads import BUILTIN_WORKLOADS, load_workload


def _digits(tmp_path: Path, x: object, y: object) -> Path:
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    return tmp_path


def test_every_dataset_a_builtin_workload_trains_on_has_a_format() -> None:
    trained = set().union(*(load_workload(name).datasets for name in BUILTIN_WORKLOADS))
    assert set(FORMATS) == trained


def test_example_digits_pass_the_check_and_split_into_disjoint_shares(tmp_path: Path) -> None:
    shares = []
    for part in (1, 2, 3):
        write_example("digits", tmp_path / str(part), part, 3)
        [checked] = check_site_data(tmp_path / str(part))
        assert checked.known and checked.name == "digits"
        shares.append(load_dataset(tmp_path / str(part), "digits"))
    sizes = [len(share.y) for share in shares]
    assert sum(sizes) == 1438 and max(sizes) - min(sizes) <= 1  # the shareable pool
    flat = [share.x.reshape(len(share.y), -1) for share in shares]
    rows = {row.tobytes() for block in flat for row in block}
    assert len(rows) > 1400  # the shares do not repeat one another's images


def test_example_text_passes_the_check(tmp_path: Path) -> None:
    write_example("docstrings", tmp_path, 1, 2)
    [checked] = check_site_data(tmp_path)
    assert checked.name == "docstrings" and checked.examples > 1000


def test_sklearns_own_digits_arrays_are_refused_with_the_fix(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits  # here: not in every worker at collection

    bunch = load_digits()
    _digits(tmp_path, bunch.data, bunch.target)  # (n, 64), 0..16: the case from issue 20
    with pytest.raises(DataDirError) as raised:
        check_site_data(tmp_path)
    message = str(raised.value)
    assert "x has shape (1797, 64)" in message
    assert "float32 (n, 1, 8, 8) in [0, 1]" in message
    assert "reshape(-1, 1, 8, 8)" in message


@pytest.mark.parametrize(
    ("x", "y", "problem"),
    [
        (np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, np.int64), "x holds uint8"),
        (np.full((4, 1, 8, 8), 16.0, np.float32), np.zeros(4, np.int64), "ranges over [16, 16]"),
        (np.full((4, 1, 8, 8), np.nan, np.float32), np.zeros(4), "NaN or infinite"),
        (np.zeros((4, 1, 8, 8), np.float32), np.zeros(3, np.int64), "4 examples but y has 3"),
        (np.zeros((4, 1, 8, 8), np.float32), np.full(4, 10), "labels 10..10"),
        (np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.float32), "y holds float32"),
        (np.zeros((4, 1, 8, 8), np.float32), np.zeros((4, 1), np.int64), "y has shape (4, 1)"),
        (np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64), "holds no example"),
    ],
)
def test_each_malformed_digits_file_is_refused_naming_the_problem(
    tmp_path: Path, x: object, y: object, problem: str
) -> None:
    with pytest.raises(DataDirError, match="digits") as raised:
        check_site_data(_digits(tmp_path, x, y))
    assert problem in str(raised.value)


def test_an_empty_text_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "docstrings.txt").write_text("  \n")
    with pytest.raises(DataDirError, match="docstrings"):
        check_site_data(tmp_path)


def test_a_dataset_no_job_names_is_listed_but_not_checked(tmp_path: Path) -> None:
    np.savez(tmp_path / "cohort.npz", x=np.zeros((2, 3)), y=np.zeros(2))
    [checked] = check_site_data(tmp_path)
    assert (checked.name, checked.known) == ("cohort", False)


def test_checking_a_dataset_the_site_lacks_names_what_it_has(tmp_path: Path) -> None:
    write_example("digits", tmp_path, 1, 1)
    with pytest.raises(DataDirError, match="no dataset 'docstrings'; it offers: digits"):
        check_site_data(tmp_path, ["docstrings"])


@pytest.mark.parametrize(("dataset", "part", "parts"), [("mnist", 1, 1), ("digits", 3, 2)])
def test_example_refuses_unknown_datasets_and_shares(
    tmp_path: Path, dataset: str, part: int, parts: int
) -> None:
    with pytest.raises(InvalidArgumentError):
        write_example(dataset, tmp_path, part, parts)
    assert not any(tmp_path.iterdir())  # nothing written for a refused request
