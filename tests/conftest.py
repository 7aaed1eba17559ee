"""Shared fixtures: real processes on loopback, always stopped, also on failure.

`Processes` is the launcher every test's `LocalConsortium` starts its children with
(tests/helpers.py); it remembers their descendants so a test can check none is left."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil
import pytest

from consortium import node_cgroup
from consortium.processes import (
    ChildProcess,
    descendant_pids,
    pid_alive,
    stop_processes,
    venv_executable,
)
from consortium.startup import imports_without_gc
from tests import cpu_by_module
from tests.load import Load, requested_load


class Processes:
    """Starts CLI processes; remembers them and their descendants to stop later."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[ChildProcess] = []
        self.seen_pids: set[int] = set()
        self.seen_commands: set[tuple[str, ...]] = set()  # argv of every descendant seen

    def start(self, name: str, *argv: str, env: Mapping[str, str] | None = None) -> ChildProcess:
        executable = venv_executable(argv[0])
        child = ChildProcess(name, [executable, *argv[1:]], self.log_dir / f"{name}.log", env)
        self.children.append(child)
        self.seen_pids.add(child.pid)
        return child

    def remember_descendants(self) -> None:
        for child in self.children:
            pids = descendant_pids(child.pid)
            self.seen_pids.update(pids)
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    self.seen_commands.add(tuple(psutil.Process(pid).cmdline()))

    def stop_all(self) -> None:
        """Stop every child (and its descendants) in parallel; a stopped one is skipped."""
        self.remember_descendants()
        stop_processes(self.children)

    def alive(self) -> list[int]:
        """The remembered pids that still run (zombies do not)."""
        return [pid for pid in self.seen_pids if pid_alive(pid)]


@pytest.fixture(autouse=True, scope="session")
def node_cgroups_removed() -> Iterator[None]:
    """The empty node cgroups the session's sandboxes left (consortium/node_cgroup.py):
    a node stopped through its ChildProcess removes its own, but tests that run a
    sandboxed command directly leave theirs. One another worker's node is in is busy,
    and stays."""
    parent = node_cgroup.nodes_parent()
    before = set(parent.glob("consortium-*")) if parent is not None else set()
    yield
    if parent is not None:
        for group in set(parent.glob("consortium-*")) - before:
            with contextlib.suppress(OSError):
                group.rmdir()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


# --- an optional load beside the suite (tests/load.py) ------------------------------
_LOAD = pytest.StashKey[Load]()


def pytest_configure(config: pytest.Config) -> None:
    """With CONSORTIUM_TEST_LOAD=N, start the load once, in the controller (xdist
    workers are its children and share it); it stops when the session ends."""
    spinners = requested_load()
    if spinners and not hasattr(config, "workerinput"):
        load = Load(spinners)
        config.stash[_LOAD] = load
        config.add_cleanup(load.stop)
    cpu_by_module.pytest_configure(config)  # with CONSORTIUM_CPU_BY_MODULE set


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    cpu_by_module.pytest_terminal_summary(terminalreporter)


def pytest_report_header(config: pytest.Config) -> str | None:
    load = config.stash.get(_LOAD, None)
    return load.describe() if load is not None else None


# --- collection with the garbage collector paused --------------------------------------
# Collecting imports every test module and with them torch, Flower and Ray: as in the
# project's own programs (consortium/startup.py), the collector is off meanwhile and what
# they made is frozen afterwards, so the tests' collections do not scan it again.
@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> object:
    with imports_without_gc():
        return (yield)


# --- the longest modules first -------------------------------------------------------
# `--dist loadfile` hands whole modules to the workers in collection order, two ahead;
# a long module collected last runs while the other worker idles. Ordering modules by
# their measured length (tests/durations.json, `make durations`) schedules the longest
# first. Modules not listed (new, or under a second) keep their order, after the rest.
_DURATIONS = Path(__file__).with_name("durations.json")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds: dict[str, float] = json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], 0.0))
