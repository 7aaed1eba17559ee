"""The load harness (tests/load.py) really loads the machine, and stops what it started."""

from __future__ import annotations

import psutil
import pytest

from tests.helpers import wait_for
from tests.load import LOAD_ENV, Load, requested_load


def test_the_load_spins_and_writes_until_stopped() -> None:
    load = Load(1)
    try:
        pids = load.running()
        assert len(pids) == 2
        spinner = psutil.Process(pids[0])
        # CPU time that grows: a busy process, not a sleeping one (however loaded the
        # machine is, and it may be: this suite also runs under this very load).
        wait_for("the spinner to burn CPU", lambda: spinner.cpu_times().user > 0.5, 60.0)
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
