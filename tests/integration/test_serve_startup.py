"""`coordinator serve` start-up cannot leak: a failure injected before any start step
stops exactly what the earlier steps started (real SuperLink and Ray head processes).

Each test runs the real `Coordinator` in this process with `on_start_step`, records
the process tree at every step, fails at the chosen one, and then checks with psutil
that every process started is gone, with `threading` that every thread it started has
been joined, and on loopback that nothing listens on its ports any more.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from coordinator.serve import START_STEPS, Coordinator
from coordinator.settings import CoordinatorSettings


class InjectedStartError(Exception):
    """Raised from `on_start_step` to fail start-up at one step."""


class StartRecorder:
    """The `on_start_step` hook: records the steps and every process started so far
    (all descendants of this test process), and fails at `fail_at`."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.fail_at = fail_at
        self.steps: list[str] = []
        self.processes: dict[int, psutil.Process] = {}
        self.commands: list[str] = []  # each process's command line, as first seen

    def __call__(self, name: str) -> None:
        self.steps.append(name)
        self.remember_processes()
        if name == self.fail_at:
            raise InjectedStartError(name)

    def remember_processes(self) -> None:
        for process in psutil.Process().children(recursive=True):
            if process.pid not in self.processes:
                self.processes[process.pid] = process
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.commands.append(" ".join(process.cmdline()))


@pytest.fixture
def baseline() -> Iterator[tuple[set[threading.Thread], set[int]]]:
    """The threads and child processes that ran before the test (not ours to check);
    the process environment is restored afterwards (starting Ray sets Ray's auth mode
    in it)."""
    environment = dict(os.environ)
    children = {process.pid for process in psutil.Process().children(recursive=True)}
    yield set(threading.enumerate()), children
    os.environ.clear()
    os.environ.update(environment)


def settings_for(tmp_path: Path, *, ray: bool) -> CoordinatorSettings:
    return CoordinatorSettings(
        data_dir=tmp_path / "coordinator",
        insecure=True,
        ray_enabled=ray,
        metrics_address="127.0.0.1:0",
    )


def assert_nothing_left(
    settings: CoordinatorSettings,
    recorder: StartRecorder,
    baseline: tuple[set[threading.Thread], set[int]],
) -> None:
    threads_before, children_before = baseline
    running = [
        process.pid
        for process in recorder.processes.values()
        if process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    ]
    assert running == [], f"processes left running: {running}"
    new_children = [
        process.pid
        for process in psutil.Process().children(recursive=True)
        if process.pid not in children_before and process.status() != psutil.STATUS_ZOMBIE
    ]
    assert new_children == [], f"new child processes left: {new_children}"
    threads_left = [thread.name for thread in set(threading.enumerate()) - threads_before]
    assert threads_left == [], f"threads not joined: {threads_left}"
    paths = settings.paths
    assert not paths.address_file.exists()
    assert not paths.metrics_address_file.exists()
    for port_file, host in (
        (paths.superlink_port_file, settings.superlink_host),
        (paths.port_file, "127.0.0.1"),
        (paths.ray_head_port_file, settings.ray_host),
    ):
        if port_file.exists():
            assert not listening(host, int(port_file.read_text())), f"{port_file} still bound"


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


@pytest.mark.parametrize("step", START_STEPS)
def test_start_failure_at_step_stops_everything_started_without_ray(
    tmp_path: Path, baseline: tuple[set[threading.Thread], set[int]], step: str
) -> None:
    settings = settings_for(tmp_path, ray=False)
    recorder = StartRecorder(fail_at=step)
    with pytest.raises(InjectedStartError):
        Coordinator(settings, on_start_step=recorder)
    assert recorder.steps == list(START_STEPS[: START_STEPS.index(step) + 1])
    if START_STEPS.index(step) > START_STEPS.index("superlink"):
        assert recorder.processes, "the SuperLink should have been running at this step"
    assert_nothing_left(settings, recorder, baseline)


def test_start_then_stop_leaves_nothing_without_ray(
    tmp_path: Path, baseline: tuple[set[threading.Thread], set[int]]
) -> None:
    settings = settings_for(tmp_path, ray=False)
    recorder = StartRecorder()
    coordinator = Coordinator(settings, on_start_step=recorder)
    try:
        assert recorder.steps == list(START_STEPS)
        assert settings.paths.address_file.read_text() == coordinator.address
        host, port = coordinator.address.rsplit(":", 1)
        assert listening(host, int(port))
        recorder.remember_processes()
    finally:
        coordinator.stop()
    assert_nothing_left(settings, recorder, baseline)


def test_start_failure_at_last_step_stops_ray_head_and_superlink(
    tmp_path: Path, baseline: tuple[set[threading.Thread], set[int]]
) -> None:
    """With Ray on, every step but the last has run: a Ray head, a SuperLink, the API
    and the scheduler (with its pretraining runner) are all stopped."""
    settings = settings_for(tmp_path, ray=True)
    recorder = StartRecorder(fail_at=START_STEPS[-1])
    with pytest.raises(InjectedStartError):
        Coordinator(settings, on_start_step=recorder)
    assert any("flower-superlink" in command for command in recorder.commands)
    assert any("--head" in command for command in recorder.commands), recorder.commands
    assert_nothing_left(settings, recorder, baseline)
