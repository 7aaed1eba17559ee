"""Shared fixtures: real processes on loopback, always stopped, also on failure.

`Processes` is the launcher every test's `LocalConsortium` starts its children with
(tests/helpers.py); it remembers their descendants so a test can check none is left."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil
import pytest

from consortium.processes import (
    ChildProcess,
    descendant_pids,
    pid_alive,
    stop_processes,
    venv_executable,
)


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


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


# Modules that bring up whole stacks, longest first (pytest --durations on 2 cores).
# `make test` runs pytest-xdist with --dist loadfile --no-loadscope-reorder, which hands
# out modules in collection order: the longest start first and the many short unit
# modules fill in at the end, instead of (xdist's default order, by test count) the
# longest starting last and running alone. The order changes nothing but the packing.
SLOWEST_FIRST = (
    "tests/integration/test_demo.py",
    "tests/integration/test_pretrain_replay.py",
    "tests/security/test_flower_attacks.py",
    "tests/integration/test_pretrain.py",
    "tests/integration/test_federated_job.py",
    "tests/integration/test_ray_channel.py",
    "tests/integration/test_observability.py",
    "tests/integration/test_pretrain_job.py",
    "tests/integration/test_ray_tls.py",
    "tests/integration/test_bad_input.py",
    "tests/integration/test_serve_startup.py",
    "tests/security/test_secrets_at_rest.py",
    "tests/security/test_supernode_keys.py",
    "tests/integration/test_onboarding.py",
    "tests/security/test_flower_edge.py",
    "tests/security/test_member_attacks.py",
)


_RANK = {path: index for index, path in enumerate(SLOWEST_FIRST)}


def module_rank(nodeid: str) -> int:
    """Where a test's module goes: its place in SLOWEST_FIRST, else after all of them."""
    return _RANK.get(nodeid.split("::", 1)[0], len(SLOWEST_FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: module_rank(item.nodeid))  # stable within a module
