"""Finding and stopping the processes that a data dir's owner started, by a marker.

Every child of `coordinator serve` and `client join` carries `CONSORTIUM_OWNER_DIR`
(the absolute data or state dir) in its environment, and its own children inherit it:
Flower's helpers, the Ray head's GCS and raylet, Ray's workers. A process tree whose
owner was killed (`kill -9` leaves no chance to stop anything) is then still
recognisable as that dir's, however it was reparented or re-grouped, and only
processes of our own user are ever looked at.

Kept free of heavy imports: the reaper (`consortium/reaper.py`) runs this alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import psutil

from consortium.processes import is_live, wait_gone

OWNER_ENV = "CONSORTIUM_OWNER_DIR"
STOP_GRACE_S = 5.0


def owner_marker(owner_dir: Path) -> str:
    return str(owner_dir.resolve())


def owner_env(owner_dir: Path) -> dict[str, str]:
    """The environment entry that marks a child (and its descendants) as `owner_dir`'s."""
    return {OWNER_ENV: owner_marker(owner_dir)}


def find_leftovers(owner_dir: Path, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Live processes of this user marked as `owner_dir`'s (never this process)."""
    marker = owner_marker(owner_dir)
    skip = {os.getpid(), *exclude}
    uid = os.getuid()
    found = []
    for process in psutil.process_iter(["pid", "name", "uids"]):
        if process.pid in skip or process.info["uids"] is None:
            continue
        if process.info["uids"].real != uid:
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(OWNER_ENV) == marker and is_live(process):
                found.append(process)
    return found


def stop_leftovers(
    owner_dir: Path, exclude: Iterable[int] = (), grace_s: float = STOP_GRACE_S
) -> list[psutil.Process]:
    """SIGTERM every leftover, SIGKILL those still running after `grace_s`; returns
    the processes that were found (psutil checks each one's start time before
    signalling, so a pid reused meanwhile is never hit)."""
    leftovers = find_leftovers(owner_dir, exclude)
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    for process in wait_gone(leftovers, grace_s):
        with contextlib.suppress(psutil.Error):
            process.kill()
    wait_gone(leftovers, grace_s)
    return leftovers
