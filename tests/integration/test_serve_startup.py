"""`coordinator serve` start-up cannot leak: a failure injected before any start step
stops exactly what the earlier steps started (real SuperLink and Ray head processes).

Each test runs the real `Coordinator` in this process with `on_start_step`, records
the process tree at every step, fails at the chosen one, and then checks with psutil
that every process started is gone, that every thread it started has been joined, and
on loopback that nothing listens on its ports any more.
"""

from __future__ import annotations

import os
import socket
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


def test_runtime_ports_another_process_binds_first_are_replaced(
    tmp_path: Path, baseline: Baseline
) -> None:
    """`serve` picks the SuperLink's and the Ray head's ports free and closes them until
    the child binds them, so another process can bind one first (a full test run once
    saw a Ray head's GCS fail on its port that way). Here this test binds each one right
    after its child was started, before the child can have bound it: both start again on
    a new port, which the port records then name, and nothing is left after the stop."""
    settings = settings_for(tmp_path, ray=True)
    paths = settings.paths
    holders: dict[str, socket.socket] = {}
    try:
        # Bound (SO_REUSEADDR) but not listening: `serve` finds the port it used last
        # time free and takes it again; listening, it keeps the child off it.
        for runtime, record in (
            ("superlink", paths.superlink_port_file),
            ("ray", paths.ray_head_port_file),
        ):
            holder = holders[runtime] = socket.socket()
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", 0))
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(str(holder.getsockname()[1]))
        taken = {runtime: holder.getsockname()[1] for runtime, holder in holders.items()}
        recorder = StartRecorder(baseline)

        def take_ports(step: str) -> None:
            recorder(step)
            # Each step runs right after the one that started the runtime's child.
            if step == "ray":
                holders["superlink"].listen()
            elif step == "superlink_ready":
                holders["ray"].listen()

        coordinator = Coordinator(settings, on_start_step=take_ports)
        try:
            assert coordinator.ray_cluster is not None
            ports = {
                "superlink": coordinator.superlink.port,
                "ray": int(coordinator.ray_cluster.address.rsplit(":", 1)[1]),
            }
            for runtime, port in ports.items():
                assert port != taken[runtime], runtime
                assert listening("127.0.0.1", port), runtime
            assert int(paths.superlink_port_file.read_text()) == ports["superlink"]
            assert int(paths.ray_head_port_file.read_text()) == ports["ray"]
            # The first SuperLink did fail on its taken port (the first Ray head's GCS
            # log went with its temp dir).
            assert paths.log_file("superlink").read_text().count("address already in use") == 1
        finally:
            coordinator.stop()
        assert_nothing_left(settings, recorder)
    finally:
        for holder in holders.values():
            holder.close()
