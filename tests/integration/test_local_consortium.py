"""`LocalConsortium`, the harness behind `coordinator demo` and these tests, stops every
process it started when the code inside it fails, as the demo promises on Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from coordinator.local_consortium import LocalConsortium
from tests.helpers import TEST_PROFILE, wait_for


class BodyFailedError(Exception):
    """Raised inside the harness, as a failing demo step would."""


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_local_consortium_stops_every_process_when_its_body_fails(tmp_path: Path) -> None:
    started: list[psutil.Process] = []
    with (
        pytest.raises(BodyFailedError),
        LocalConsortium(tmp_path, secure=False, ray=False, env=TEST_PROFILE) as consortium,
    ):
        address = consortium.serve()
        with consortium.connect() as remote:
            assert remote.list_jobs() == []
        (coordinator,) = consortium.children
        started = [psutil.Process(coordinator.pid)]
        started += started[0].children(recursive=True)  # the SuperLink and its helpers
        assert address == consortium.paths.address_file.read_text().strip()
        raise BodyFailedError
    assert len(started) >= 2
    wait_for(
        "every process the harness started to end",
        lambda: not any(running(process) for process in started),
        15.0,
    )
