"""The suite's module order (tests/conftest.py): stacks longest first, then the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SLOWEST_FIRST, module_rank

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", SLOWEST_FIRST)
def test_every_listed_module_exists(module: str) -> None:
    # A renamed module left in the list would silently fall back to the end.
    assert (REPO / module).is_file()


def test_listed_modules_sort_first_and_tests_keep_their_order() -> None:
    collected = [
        "tests/unit/test_merkle.py::test_a",
        "tests/integration/test_bad_input.py::test_x",
        "tests/unit/test_merkle.py::test_b",
        "tests/integration/test_demo.py::test_one",
        "tests/integration/test_bad_input.py::test_y",
        "tests/integration/test_demo.py::test_two",
    ]
    assert sorted(collected, key=module_rank) == [
        "tests/integration/test_demo.py::test_one",
        "tests/integration/test_demo.py::test_two",
        "tests/integration/test_bad_input.py::test_x",
        "tests/integration/test_bad_input.py::test_y",
        "tests/unit/test_merkle.py::test_a",
        "tests/unit/test_merkle.py::test_b",
    ]
