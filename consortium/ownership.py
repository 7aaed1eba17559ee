"""One owner per data dir: a lock, a sweep of what a dead owner left, and a reaper.

`coordinator serve` (its data dir) and `client join` (its state dir) each claim their
dir before starting any child:

1. an exclusive `flock` on `owner.lock`, held for the owner's lifetime. The kernel drops
   it when the owner dies, so a live owner refuses a second one (`DataDirInUseError`,
   naming the holder's pid and start time, which the file records) and a dead owner
   never blocks its successor;
2. the processes a previous owner left running (marked with the dir in their
   environment: `consortium/leftovers.py`) are stopped and each is logged. They would
   otherwise hold the old ports and go on writing to the dir's state;
3. a reaper (`consortium/reaper.py`) that stops this owner's processes once it is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import psutil

from consortium.errors import ConflictError
from consortium.leftovers import stop_leftovers
from consortium.reaper import Reaper

log = logging.getLogger(__name__)

LOCK_FILE = "owner.lock"


class DataDirInUseError(ConflictError):
    """Another live process owns the data dir."""


def _holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started_at"]))
        return f"pid {holder['pid']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid not yet recorded"


def _lock(lock_path: Path, what: str) -> IO[str]:
    handle = lock_path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirInUseError(
            f"{lock_path.parent} is in use by another {what} ({_holder(lock_path)}); "
            "stop it first, or use another directory"
        ) from None
    except BaseException:
        handle.close()
        raise
    return handle


def _record_holder(handle: IO[str]) -> None:
    handle.seek(0)
    handle.truncate()
    me = psutil.Process()
    handle.write(json.dumps({"pid": me.pid, "started_at": me.create_time()}))
    handle.flush()


def claim(
    owner_dir: Path,
    what: str,
    stack: ExitStack,
    cmdline_marks: Sequence[str] = (),
    remove: Sequence[Path] = (),
) -> Reaper:
    """Claim `owner_dir` for this process until `stack` closes; returns its reaper.
    `cmdline_marks`: strings in the command line of the owner's processes that do not
    carry its environment (Ray's agents name the owner's Ray temp dir). `remove`: dirs
    of the owner's outside `owner_dir` that its reaper removes once it stopped what was
    left (Ray's temp dir: a killed owner could not)."""
    owner_dir.mkdir(parents=True, exist_ok=True)
    lock_path = owner_dir / LOCK_FILE
    handle = _lock(lock_path, what)
    stack.callback(_unlock, handle)
    for process in stop_leftovers(owner_dir, cmdline_marks=cmdline_marks):
        log.warning(
            "stopped %s (pid %d), left running for %s by a previous %s",
            process.info.get("name", "a process"),
            process.pid,
            owner_dir,
            what,
        )
    reaper = Reaper.start(owner_dir, owner_dir / "logs" / "reaper.log", cmdline_marks, remove)
    # Closed after every child stopped (an exit stack unwinds newest first).
    stack.callback(reaper.close)
    _record_holder(handle)
    return reaper


def _unlock(handle: IO[str]) -> None:
    with contextlib.suppress(OSError):
        handle.seek(0)
        handle.truncate()
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
