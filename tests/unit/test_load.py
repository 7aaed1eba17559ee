"""The load harness (tests/load.py) really loads the machine, and stops what it started."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.load import LOAD_ENV, Load, requested_load


def test_the_load_spins_and_writes_until_stopped() -> None:
    load = Load(1)
    try:
        pids = load.running()
        assert len(pids) == 2
        processes = [psutil.Process(pid) for pid in pids]
        for process in processes:
            process.cpu_percent()
        time.sleep(1.0)
        spinner = processes[0]
        assert spinner.cpu_percent() > 50.0  # a busy core, not a sleeping process
        assert "1 spinning and 1 fsync-writing process" in load.describe()
    finally:
        load.stop()
    assert load.running() == []
    assert not any(psutil.pid_exists(pid) for pid in pids)  # stopped and reaped


def test_the_requested_load_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOAD_ENV, raising=False)
    assert requested_load() == 0
    monkeypatch.setenv(LOAD_ENV, "2")
    assert requested_load() == 2
    for bad in ("two", "-1"):
        monkeypatch.setenv(LOAD_ENV, bad)
        with pytest.raises(SystemExit, match=LOAD_ENV):
            requested_load()
