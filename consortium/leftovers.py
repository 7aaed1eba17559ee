"""Finding and stopping the processes that a data dir's owner started, by a marker.

Every child of `coordinator serve` and `client join` carries `CONSORTIUM_OWNER_DIR`
(the absolute data or state dir) in its environment, and its own children inherit it:
Flower's helpers, the Ray head's GCS and raylet, Ray's workers. A process tree whose
owner was killed (`kill -9` leaves no chance to stop anything) is then still
recognisable as that dir's, however it was reparented or re-grouped, and only
processes of our own user are ever looked at (and, for root, of the Ray pool user that
root runs a site's Ray node as: `consortium/sandbox.py`). Ray's raylet starts its agents with an
environment of its own making; they are found as descendants of a marked process, or
by a mark in their command line (the owner's Ray temp dir, `cmdline_marks`) once their
raylet is gone.

Kept free of heavy imports: the reaper (`consortium/reaper.py`) runs this alone.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

from consortium.processes import is_live, wait_gone
from consortium.sandbox import pool_uid
from consortium.tree_removal import remove_tree

OWNER_ENV = "CONSORTIUM_OWNER_DIR"
STOP_GRACE_S = 5.0
MAX_PASSES = 5


def own_uids() -> frozenset[int]:
    """The users whose processes and dirs are ours: this one, and for root the pool user
    its sites' Ray nodes run as (root made that user for them)."""
    uid = os.geteuid()
    pool = pool_uid() if uid == 0 else None
    return frozenset({uid} if pool is None else {uid, pool})


def remove_own_dir(path: Path) -> bool:
    """Remove `path` and everything below it if it is a directory of ours (`own_uids`;
    not a link, not another user's: those are left alone); whether it went."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(found.st_mode) or found.st_uid not in own_uids():
        return False
    with contextlib.suppress(OSError):
        remove_tree(path)
    return not path.exists()


def owner_marker(owner_dir: Path) -> str:
    return str(owner_dir.resolve())


def owner_env(owner_dir: Path) -> dict[str, str]:
    """The environment entry that marks a child (and its descendants) as `owner_dir`'s."""
    return {OWNER_ENV: owner_marker(owner_dir)}


def find_leftovers(
    owner_dir: Path, exclude: Iterable[int] = (), cmdline_marks: Sequence[str] = ()
) -> list[psutil.Process]:
    """Live processes of ours (`own_uids`) that are `owner_dir`'s: marked in their
    environment or command line, or descended from one that is (never this process)."""
    marker = owner_marker(owner_dir)
    skip = {os.getpid(), *exclude}
    uids = own_uids()
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["pid", "name", "uids", "cmdline"]):
        if process.pid in skip or process.info["uids"] is None:
            continue
        if process.info["uids"].real not in uids:
            continue
        with contextlib.suppress(psutil.Error):
            command = " ".join(process.info["cmdline"] or ())
            marked = any(mark in command for mark in cmdline_marks)
            if (marked or process.environ().get(OWNER_ENV) == marker) and is_live(process):
                found[process.pid] = process
    for process in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in process.children(recursive=True):
                if child.pid not in skip and is_live(child):
                    child.info = {"name": child.name()}
                    found.setdefault(child.pid, child)
    return list(found.values())


def stop_leftovers(
    owner_dir: Path,
    exclude: Iterable[int] = (),
    grace_s: float = STOP_GRACE_S,
    cmdline_marks: Sequence[str] = (),
) -> list[psutil.Process]:
    """SIGTERM every leftover, SIGKILL those still running after `grace_s`, and look
    again (a dying raylet may have started a worker meanwhile) until a pass finds
    nothing; returns the processes stopped (psutil checks each one's start time before
    signalling, so a pid reused meanwhile is never hit)."""
    stopped: list[psutil.Process] = []
    skip = set(exclude)
    for _ in range(MAX_PASSES):
        leftovers = find_leftovers(owner_dir, skip, cmdline_marks)
        if not leftovers:
            break
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        for process in wait_gone(leftovers, grace_s):
            with contextlib.suppress(psutil.Error):
                process.kill()
        wait_gone(leftovers, grace_s)
        stopped += leftovers
        skip |= {p.pid for p in leftovers if not is_live(p)}
    return stopped
