"""CPU time of each test module, every process it started included (`make cpu-by-module`).

`/usr/bin/time` and pytest's durations miss most of the suite's CPU: what a module costs
is spent in the coordinators, sites, SuperLinks and Ray processes it starts, many of
them reparented away from the test process (Ray's and Flower's daemons), which `time`
never counts (on the suite: 1,405 CPU-s by `time`, 1,762 by this). So each pytest-xdist
worker (or the one pytest process) moves itself into a control group of its own, which
every process it starts inherits whoever its parent becomes, and the group's CPU
counter is read as each module starts and after its last test's teardown. A worker
runs one module at a time (`--dist loadfile`), so the difference is the module's.

Needs root (to make the group) and a cgroup v1 `cpuacct` or cgroup v2 hierarchy;
elsewhere it says so once and measures nothing. With CONSORTIUM_CPU_BY_MODULE=FILE set,
one JSON line per module goes to FILE, and the run ends with the costliest modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Generator
from pathlib import Path

import pytest

OUTPUT_ENV = "CONSORTIUM_CPU_BY_MODULE"
SHOWN = 20  # modules in the summary
_V1 = Path("/sys/fs/cgroup/cpuacct")  # cpuacct.usage: nanoseconds
_V2_MOUNTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))  # cpu.stat: usage_usec


class CpuGroup:
    """A control group holding this process and all it starts, and its CPU seconds."""

    def __init__(self, name: str) -> None:
        self.path, self._v2 = _make_group(name)
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def cpu_s(self) -> float:
        if self._v2:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, value = line.split()
                if key == "usage_usec":
                    return int(value) / 1e6
            raise OSError(f"{self.path}/cpu.stat has no usage_usec")
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def leave(self) -> None:
        """Move back to the parent group and remove this one (if all in it have ended)."""
        (self.path.parent / "cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _make_group(name: str) -> tuple[Path, bool]:
    if (_V1 / "cpuacct.usage").exists():
        path, v2 = _V1 / name, False
    else:
        mounts = [m for m in _V2_MOUNTS if (m / "cgroup.controllers").exists()]
        if not mounts:
            raise OSError("no cgroup v1 cpuacct or cgroup v2 hierarchy is mounted")
        path, v2 = mounts[0] / name, True
    path.mkdir(exist_ok=True)
    return path, v2


class ModuleCpu:
    """The plugin: one JSON line per module, {"module", "cpu_s", "wall_s"}."""

    def __init__(self, output: Path, group: CpuGroup) -> None:
        self.output = output
        self.group = group
        self._module: str | None = None
        self._started = (0.0, 0.0)  # cpu_s, monotonic

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        module = item.nodeid.split("::")[0]
        if module != self._module:
            self._module = module
            self._started = (self.group.cpu_s(), time.monotonic())
        result = yield
        if nextitem is None or nextitem.nodeid.split("::")[0] != module:
            # nextitem in another module: this module's fixtures are torn down by now
            cpu_s = self.group.cpu_s() - self._started[0]
            wall_s = time.monotonic() - self._started[1]
            line = {"module": module, "cpu_s": round(cpu_s, 2), "wall_s": round(wall_s, 1)}
            with self.output.open("a") as out:
                out.write(json.dumps(line) + "\n")
        return result


def pytest_configure(config: pytest.Config) -> None:
    """Start measuring where CONSORTIUM_CPU_BY_MODULE is set (from tests/conftest.py, or
    as a plugin: ``-p tests.cpu_by_module``); the controller starts the file afresh."""
    output = os.environ.get(OUTPUT_ENV)
    if not output:
        return
    if not hasattr(config, "workerinput"):  # before any xdist worker starts
        Path(output).write_text("")
        if getattr(config.option, "numprocesses", None):
            return  # xdist's controller runs no test; its workers measure
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    try:
        group = CpuGroup(f"consortium-tests-{worker}-{os.getpid()}")
    except OSError as error:
        if not hasattr(config, "workerinput"):
            print(f"{OUTPUT_ENV}: not measured ({error}; root is needed)")
        return
    config.add_cleanup(group.leave)
    config.pluginmanager.register(ModuleCpu(Path(output), group), "cpu_by_module")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The costliest modules, in the controller's summary."""
    output = os.environ.get(OUTPUT_ENV)
    if not output or hasattr(terminalreporter.config, "workerinput"):
        return
    path = Path(output)
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not rows:
        return
    total = sum(row["cpu_s"] for row in rows)
    terminalreporter.section(f"CPU by module ({len(rows)} modules, {total:.0f} CPU-s)")
    for row in sorted(rows, key=lambda row: -row["cpu_s"])[:SHOWN]:
        share = row["cpu_s"] / total if total else 0.0
        terminalreporter.write_line(
            f"{row['cpu_s']:8.1f} CPU-s {share:4.0%} {row['wall_s']:7.1f} s  {row['module']}"
        )
