"""`coordinator serve` start-up cannot leak: a failure injected before any start step
stops exactly what the earlier steps started (real SuperLink and Ray head processes).

Each test runs the real `Coordinator` in this process with `on_start_step`, records
the process tree at every step, fails at the chosen one, and then checks with psutil
that every process started is gone, that every thread it started has been joined, and
on loopback that nothing listens on its ports any more.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.serve import START_STEPS, Coordinator
from coordinator.settings import CoordinatorSettings
from tests.integration.startup_checks import (
    Baseline,
    InjectedStartError,
    StartRecorder,
    listening,
)


@pytest.fixture
def baseline() -> Iterator[Baseline]:
    """What ran before the test; the process environment is restored afterwards
    (starting Ray sets Ray's auth mode in it)."""
    environment = dict(os.environ)
    yield Baseline.now()
    os.environ.clear()
    os.environ.update(environment)


def settings_for(tmp_path: Path, *, ray: bool) -> CoordinatorSettings:
    return CoordinatorSettings(data_dir=tmp_path / "coordinator", insecure=True, ray_enabled=ray)


def assert_nothing_left(settings: CoordinatorSettings, recorder: StartRecorder) -> None:
    recorder.assert_nothing_left()
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


@pytest.mark.parametrize("step", START_STEPS)
def test_start_failure_at_step_stops_everything_started_without_ray(
    tmp_path: Path, baseline: Baseline, step: str
) -> None:
    settings = settings_for(tmp_path, ray=False)
    recorder = StartRecorder(baseline, fail_at=step)
    with pytest.raises(InjectedStartError):
        Coordinator(settings, on_start_step=recorder)
    assert recorder.steps == list(START_STEPS[: START_STEPS.index(step) + 1])
    if START_STEPS.index(step) > START_STEPS.index("superlink"):
        assert recorder.processes, "the SuperLink should have been running at this step"
    assert_nothing_left(settings, recorder)


def test_start_then_stop_leaves_nothing_without_ray(tmp_path: Path, baseline: Baseline) -> None:
    settings = settings_for(tmp_path, ray=False)
    recorder = StartRecorder(baseline)
    coordinator = Coordinator(settings, on_start_step=recorder)
    try:
        assert recorder.steps == list(START_STEPS)
        assert settings.paths.address_file.read_text() == coordinator.address
        host, port = coordinator.address.rsplit(":", 1)
        assert listening(host, int(port))
        recorder.remember_processes()
    finally:
        coordinator.stop()
    assert_nothing_left(settings, recorder)


def test_start_failure_at_last_step_stops_ray_head_and_superlink(
    tmp_path: Path, baseline: Baseline
) -> None:
    """With Ray on, every step but the last has run: a Ray head, a SuperLink, the API
    and the scheduler (with its pretraining runner) are all stopped."""
    settings = settings_for(tmp_path, ray=True)
    recorder = StartRecorder(baseline, fail_at=START_STEPS[-1])
    with pytest.raises(InjectedStartError):
        Coordinator(settings, on_start_step=recorder)
    assert any("flower-superlink" in command for command in recorder.commands)
    assert any("--head" in command for command in recorder.commands), recorder.commands
    assert_nothing_left(settings, recorder)
