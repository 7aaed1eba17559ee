"""Shared fixtures: real processes on loopback, always stopped, also on failure.

`Processes` is the launcher every test's `LocalConsortium` starts its children with
(tests/helpers.py); it remembers their descendants so a test can check none is left."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from consortium.processes import ChildProcess, descendant_pids, venv_executable


class Processes:
    """Starts CLI processes; remembers them and their descendants to stop later."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[ChildProcess] = []
        self.seen_pids: set[int] = set()

    def start(self, name: str, *argv: str, env: Mapping[str, str] | None = None) -> ChildProcess:
        executable = venv_executable(argv[0])
        child = ChildProcess(name, [executable, *argv[1:]], self.log_dir / f"{name}.log", env)
        self.children.append(child)
        self.seen_pids.add(child.pid)
        return child

    def remember_descendants(self) -> None:
        for child in self.children:
            self.seen_pids.update(descendant_pids(child.pid))

    def stop_all(self) -> None:
        self.remember_descendants()
        for child in reversed(self.children):
            child.stop()

    def alive(self) -> list[int]:
        return [pid for pid in self.seen_pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()
