"""Exit codes: documented, unique, reachable from every error."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import consortium.errors as errors_module
from consortium.errors import ConsortiumError
from consortium.exit_codes import EXIT_CODE_HELP, ExitCode

REPO = Path(__file__).resolve().parents[2]


def error_defining_modules() -> dict[str, set[str]]:
    """Module name -> ConsortiumError subclasses it defines, found by parsing the source.

    Collection imports these modules, so the checks below cover every error class in
    the project, not only those some earlier test happened to import.
    """
    known = {"ConsortiumError"}
    classes: dict[str, set[str]] = {}
    trees = {
        ".".join(path.relative_to(REPO).with_suffix("").parts): ast.parse(path.read_text())
        for package in ("consortium", "coordinator", "client")
        for path in (REPO / package).rglob("*.py")
        if "proto" not in path.relative_to(REPO).parts
    }
    changed = True
    while changed:
        changed = False
        for module, tree in trees.items():
            for node in ast.walk(tree):
                if not isinstance(node, ast.ClassDef) or node.name in known:
                    continue
                bases = {
                    b.id if isinstance(b, ast.Name) else b.attr
                    for b in node.bases
                    if isinstance(b, ast.Name | ast.Attribute)
                }
                if bases & known:
                    known.add(node.name)
                    classes.setdefault(module, set()).add(node.name)
                    changed = True
    return classes


ERROR_MODULES = error_defining_modules()
for _module in ERROR_MODULES:
    importlib.import_module(_module)


def all_subclasses(cls: type) -> list[type]:
    found: list[type] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(all_subclasses(sub))
    return found


def test_exit_code_help_every_code_has_text() -> None:
    assert set(EXIT_CODE_HELP) == set(ExitCode)
    for code, text in EXIT_CODE_HELP.items():
        assert text.strip(), code
        assert text.rstrip().endswith("."), code


def test_exit_code_values_unique() -> None:
    values = [int(code) for code in ExitCode]
    assert len(values) == len(set(values))
    # An IntEnum silently turns a duplicated value into an alias; none may exist.
    assert len(ExitCode.__members__) == len(list(ExitCode))


def test_exit_code_fixed_values_match_conventions() -> None:
    assert ExitCode.SUCCESS == 0
    assert ExitCode.UNEXPECTED == 1
    assert ExitCode.USAGE == 2  # click's code for a bad command line
    assert ExitCode.INTERRUPTED == 130  # 128 + SIGINT
    assert all(0 <= code <= 255 for code in ExitCode)


def test_exit_code_table_in_operations_doc_matches_code() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([a-z_]+)\s*\|", doc, flags=re.MULTILINE)
    documented = {int(value): name for value, name in rows}
    assert documented == {int(code): code.name.lower() for code in ExitCode}


def test_consortium_errors_module_defines_expected_subclasses() -> None:
    defined = {
        obj
        for obj in vars(errors_module).values()
        if isinstance(obj, type) and issubclass(obj, ConsortiumError) and obj is not ConsortiumError
    }
    assert len(defined) >= 10
    assert defined <= set(all_subclasses(ConsortiumError))


def test_error_subclasses_found_by_parsing_match_runtime_subclasses() -> None:
    parsed = {f"{m}.{name}" for m, names in ERROR_MODULES.items() for name in names}
    runtime = {f"{c.__module__}.{c.__name__}" for c in all_subclasses(ConsortiumError)}
    assert "consortium.errors.JobSpecError" in parsed
    assert parsed <= runtime


@pytest.mark.parametrize(
    "error", all_subclasses(ConsortiumError), ids=lambda cls: f"{cls.__module__}.{cls.__name__}"
)
def test_error_subclass_maps_to_specific_exit_code(error: type[ConsortiumError]) -> None:
    assert isinstance(error.exit_code, ExitCode)
    assert error.exit_code in EXIT_CODE_HELP
    # Only the base (and truly unexpected failures) may exit with "unexpected".
    assert error.exit_code is not ExitCode.UNEXPECTED
    assert error.exit_code is not ExitCode.SUCCESS


def test_error_base_class_exit_code_is_unexpected() -> None:
    assert ConsortiumError.exit_code is ExitCode.UNEXPECTED


@pytest.mark.parametrize(
    ("error_name", "code"),
    [
        ("JobSpecError", ExitCode.INVALID_JOB_SPEC),
        ("NotFoundError", ExitCode.NOT_FOUND),
        ("ConflictError", ExitCode.CONFLICT),
        ("UnreachableError", ExitCode.COORDINATOR_UNREACHABLE),
        ("SettingsError", ExitCode.SETTINGS_INVALID),
        ("InsecureTransportError", ExitCode.INSECURE_TRANSPORT_REFUSED),
        ("DataDirError", ExitCode.DATA_DIR_INVALID),
        ("GpuUnavailableError", ExitCode.GPU_UNAVAILABLE),
        ("ChildProcessFailedError", ExitCode.CHILD_PROCESS_FAILED),
    ],
)
def test_error_exit_code_matches_documented_meaning(error_name: str, code: ExitCode) -> None:
    assert getattr(errors_module, error_name).exit_code is code
