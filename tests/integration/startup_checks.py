"""Checks for start-ups that must not leak: what a composition root started (processes,
threads, ports, files) is gone after a failed start or a stop.

`StartRecorder` is an `on_start_step` hook: it records the steps and every process
started so far, and fails at a chosen step; `Baseline` is what ran before the test and
is not the test's to check.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

import psutil


class InjectedStartError(Exception):
    """Raised from `on_start_step` to fail start-up at one step."""


@dataclass(frozen=True)
class Baseline:
    threads: frozenset[threading.Thread]
    children: frozenset[int]

    @classmethod
    def now(cls) -> Baseline:
        return cls(frozenset(threading.enumerate()), frozenset(descendant_pids()))


@dataclass
class StartRecorder:
    baseline: Baseline
    fail_at: str | None = None
    steps: list[str] = field(default_factory=list)
    processes: dict[int, psutil.Process] = field(default_factory=dict)
    # Each process's command line as last seen: one seen between its fork and its exec
    # (a loaded machine) still shows its parent's, so it is read again at every step.
    command_of: dict[int, str] = field(default_factory=dict)

    @property
    def commands(self) -> list[str]:
        return list(self.command_of.values())

    def __call__(self, name: str) -> None:
        self.steps.append(name)
        self.remember_processes()
        if name == self.fail_at:
            raise InjectedStartError(name)

    def remember_processes(self) -> None:
        for process in psutil.Process().children(recursive=True):
            if process.pid in self.baseline.children:
                continue
            self.processes.setdefault(process.pid, process)
            with contextlib.suppress(psutil.Error):
                self.command_of[process.pid] = " ".join(process.cmdline())

    def assert_nothing_left(self) -> None:
        """Every process recorded has ended, no new child of this process runs, and
        every thread started since the baseline has been joined."""
        running = [p.pid for p in self.processes.values() if _running(p)]
        assert running == [], f"processes left running: {running}"
        new_children = [
            p.pid
            for p in psutil.Process().children(recursive=True)
            if p.pid not in self.baseline.children and _running(p)
        ]
        assert new_children == [], f"new child processes left: {new_children}"
        threads_left = [t.name for t in set(threading.enumerate()) - self.baseline.threads]
        assert threads_left == [], f"threads not joined: {threads_left}"


def descendant_pids() -> list[int]:
    return [process.pid for process in psutil.Process().children(recursive=True)]


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
