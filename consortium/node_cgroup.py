"""A control group (cgroup v2) for each sandboxed Ray node, so that stopping the node
stops everything the pool user started in it.

A member's task on a pool node can detach from the node's process tree (`setsid -f`,
under a command line that names nothing of the node): it is then neither in the
node's process group nor its descendant, nor marked, so neither `ChildProcess.stop` nor
the reaper finds it. Left running, it read every later start's copy of the cluster
credentials in the pool user's home, the token of a rotation that revoked its member
included. A process cannot leave its cgroup without write access to another one, which
the pool user has nowhere, so the sandbox (as root, before it drops to the pool user)
moves itself into the node's group, and stopping the node kills the whole group
(`cgroup.kill`), detached processes included; a node's next start kills whatever a
crash left there before its credentials are copied in again.

The groups lie in one place whoever starts the node (`consortium-nodes` at the
hierarchy's root), so a restart from another login session or service, in another
cgroup, still finds and ends what the last start left. Where the root is not writable
(a container given a delegated subtree) they lie below this process's own cgroup.
Where no cgroup v2 hierarchy is mounted and writable at all, `node_cgroup` says so and
returns None: the node then runs as before, and a detached process may outlive it.

Only the standard library: `consortium.sandbox` uses it before every node start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Where cgroup v2 is mounted: alone, or beside v1 controllers (the "hybrid" layout).
MOUNTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
KILL_POLL_S = 0.02
_warned = False


def v2_mount() -> Path | None:
    for mount in MOUNTS:
        if (mount / "cgroup.controllers").exists() and (mount / "cgroup.procs").exists():
            return mount
    return None


def own_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup")) -> Path | None:
    """This process's cgroup v2 dir, or None where there is none."""
    mount = v2_mount()
    if mount is None:
        return None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return None


NODES = "consortium-nodes"


def nodes_parent() -> Path | None:
    """The dir the nodes' groups go in: `consortium-nodes` at the root where it can be
    made, else this process's own cgroup where that is writable; None otherwise."""
    mount = v2_mount()
    if mount is not None and os.access(mount, os.W_OK):
        parent = mount / NODES
        with contextlib.suppress(FileExistsError):
            parent.mkdir(mode=0o755)
        return parent
    own = own_cgroup()
    return own if own is not None and os.access(own, os.W_OK) else None


def node_cgroup(name: str) -> Path | None:
    """Where the node `name`'s cgroup goes, or None where cgroups cannot be made here
    (said once, in the log)."""
    global _warned
    parent = nodes_parent()
    if parent is not None:
        return parent / name
    if not _warned:
        _warned = True
        log.warning(
            "no writable cgroup v2 hierarchy here: a process a Ray pool member detaches "
            "from its node may outlive the node (docs/security.md)"
        )
    return None


def join(group: Path, tries: int = 3) -> None:
    """Make `group` (if need be) and move this process into it; its children follow.
    Made again if it went in between (an empty group may be removed by a cleanup)."""
    for attempt in range(tries):
        with contextlib.suppress(FileExistsError):
            group.mkdir(mode=0o755)
        try:
            (group / "cgroup.procs").write_text("0")
            return
        except FileNotFoundError:
            if attempt == tries - 1:
                raise


def members(group: Path) -> list[int]:
    try:
        return [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def kill(group: Path, timeout_s: float = 10.0) -> bool:
    """SIGKILL every process in `group` and remove it; whether it is gone. Processes in
    the group are the node's by construction: none can have entered it but through
    the sandbox, so no pid read here is a stranger's."""
    if not group.exists():
        return True
    kill_file = group / "cgroup.kill"
    deadline = time.monotonic() + timeout_s
    while True:
        pids = members(group)
        if not pids:
            break
        if kill_file.exists():
            kill_file.write_text("1")
        else:  # kernels before 5.14
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("processes %s of %s outlived SIGKILL", pids, group)
            return False
        time.sleep(KILL_POLL_S)
    while True:
        try:
            group.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as error:  # EBUSY: the last member's exit not yet accounted
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("could not remove %s: %s", group, error)
                return False
            time.sleep(KILL_POLL_S)
