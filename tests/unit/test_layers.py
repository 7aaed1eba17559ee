"""Import contracts: import-linter keeps every contract in pyproject.toml on this checkout,
and each contract breaks when a tree breaks it.

The second test runs the real `[tool.importlinter]` section against a mirror of the
package tree (every module present, every file empty) with one forbidden import added,
so a contract that silently stopped matching anything (a typo in a module name, a
missing `include_external_packages`) fails here instead of passing forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from consortium.processes import venv_executable

REPO = Path(__file__).resolve().parents[2]
ROOT_PACKAGES = ("consortium", "coordinator", "client")
LINT_TIMEOUT_S = 120
ALLOWED_SQLITE_IMPORTER = "coordinator/state/sqlite_store.py"

# Contract name -> (file, line) that breaks it; every contract in pyproject.toml has one.
VIOLATIONS: dict[str, tuple[str, str]] = {
    "coordinator and client never import each other": (
        "client/cli.py",
        "import coordinator.state\n",
    ),
    "consortium, the shared library, imports neither role": (
        "consortium/errors.py",
        "from client import cli\n",
    ),
    "sqlite3 is imported only by coordinator.state": (
        "coordinator/jobs/scheduler.py",
        "import sqlite3\n",
    ),
    "the ServerApp does not import coordinator.state itself": (
        "coordinator/federated/server_app.py",
        "from coordinator.state import StateStore\n",
    ),
    "coordinator layers: cli above serve above api above domain above state": (
        "coordinator/state/store.py",
        "from coordinator.api import servicers\n",
    ),
}


def contract_names() -> list[str]:
    config: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [contract["name"] for contract in config["tool"]["importlinter"]["contracts"]]


def lint_imports(root: Path) -> tuple[int, dict[str, str]]:
    """Run the venv's lint-imports in `root`; exit code and contract name -> KEPT/BROKEN.

    lint-imports puts its working directory first on sys.path, so a mirror tree in
    `root` is analysed instead of the installed packages.
    """
    result = subprocess.run(
        [venv_executable("lint-imports"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT_S,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        check=False,
    )
    output = result.stdout + result.stderr
    verdicts = {
        name: verdict
        for name in contract_names()
        for verdict in ("KEPT", "BROKEN")
        if f"{name} {verdict}" in output.splitlines()
    }
    return result.returncode, verdicts


def mirror_packages(destination: Path) -> None:
    """Every module of the three packages as an empty file, and the real pyproject.toml.

    The one allowed sqlite3 import stays: import-linter refuses a protected module that
    is absent from the graph, and the real tree has it.
    """
    for package in ROOT_PACKAGES:
        for source in (REPO / package).rglob("*.py"):
            target = destination / source.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    (destination / ALLOWED_SQLITE_IMPORTER).write_text("import sqlite3\n")
    shutil.copy(REPO / "pyproject.toml", destination / "pyproject.toml")


def test_import_contracts_all_kept_in_this_checkout() -> None:
    returncode, verdicts = lint_imports(REPO)
    assert verdicts == dict.fromkeys(contract_names(), "KEPT")
    assert returncode == 0


def test_import_contracts_each_has_a_violation_case() -> None:
    assert set(VIOLATIONS) == set(contract_names())
    for path, _ in VIOLATIONS.values():
        assert (REPO / path).is_file(), path


@pytest.mark.parametrize("broken", sorted(VIOLATIONS))
def test_import_contract_breaks_when_tree_violates_it(tmp_path: Path, broken: str) -> None:
    mirror_packages(tmp_path)
    path, line = VIOLATIONS[broken]
    (tmp_path / path).write_text(line)

    returncode, verdicts = lint_imports(tmp_path)

    expected = dict.fromkeys(contract_names(), "KEPT")
    expected[broken] = "BROKEN"
    assert verdicts == expected
    assert returncode == 1
