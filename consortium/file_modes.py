"""Keys and state at rest are readable by their owner only: dirs 0700, files 0600.

Every command that writes secrets or state (`coordinator init/onboard/serve`, `client
keygen/join`) calls `restrict_umask()` first, so whatever it and its children create
(the SuperLink database, SQLite's -wal/-shm files, the provenance log, retained
updates, logs) is private without each writer having to remember a mode; children
inherit the umask. `private_dir()` creates a data or state dir 0700 and tightens one
that an older version (or another tool) left group/world-accessible.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_GROUP_OR_OTHER = 0o077


def restrict_umask() -> None:
    """New files of this process and its children: 0600; new dirs: 0700."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) mode 0700; if it exists with group or world
    access, remove that access from it and from everything below it, and say so."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    tightened = tighten_tree(path)
    if tightened:
        log.warning(
            "%s held %d group/world-accessible paths; now owner-only (dirs 0700, files 0600)",
            path,
            tightened,
        )
    return path


def tighten_tree(root: Path) -> int:
    """Remove group and other permission bits from `root` and everything below it
    (symbolic links are not followed); returns how many paths changed."""
    changed = 0
    for current, dirs, files in os.walk(root):
        for name in [current, *(os.path.join(current, d) for d in dirs)]:
            changed += _tighten(name)
        for name in files:
            changed += _tighten(os.path.join(current, name))
    return changed


def _tighten(path: str) -> int:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return 0  # removed meanwhile (a running child's temporary file)
    if stat.S_ISLNK(mode) or not mode & _GROUP_OR_OTHER:
        return 0
    os.chmod(path, stat.S_IMODE(mode) & ~_GROUP_OR_OTHER)
    return 1


def new_secret_file(path: Path, size: int = 32) -> bytes:
    """Random bytes, written to a fresh owner-only (0600) file at `path` (replacing an
    older one) for a child process to read; returned for this process's own use."""
    secret = secrets.token_bytes(size)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return secret
