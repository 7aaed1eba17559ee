"""Keys and state at rest are readable by their owner only: dirs 0700, files 0600.

Every command that writes secrets or state (`coordinator init/onboard/serve`, `client
keygen/join`) calls `restrict_umask()` first, so whatever it and its children create
(the SuperLink database, SQLite's -wal/-shm files, the provenance log, retained
updates, logs) is private without each writer having to remember a mode; children
inherit the umask. `private_dir()` creates a data or state dir 0700 and tightens one
that an older version (or another tool) left group/world-accessible.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from consortium.errors import DataDirError

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
    access, remove that access from it and from everything below it, and say so.

    One that exists must be this user's: its owner could otherwise plant links where
    files are about to be written (a bundle's `ca.sha256` linked to a file of root's,
    which `coordinator onboard --out` then overwrote) or read what lands in it. And no
    step on the way to it may be another user's (but root's): a link or dir of theirs
    on the way lets them point the path at a dir of root's (`--out theirs/bundle`, with
    `bundle` a link to /etc/ssl, had root's bundle files written there)."""
    _check_no_other_users_on_the_way(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    owner = path.stat().st_uid
    if owner != os.geteuid():
        raise DataDirError(
            f"{path} is another user's (uid {owner}), who could read or replace what is "
            "written there; remove it, or choose a dir of your own"
        )
    tightened = tighten_tree(path)
    if tightened:
        log.warning(
            "%s held %d group/world-accessible paths; now owner-only (dirs 0700, files 0600)",
            path,
            tightened,
        )
    return path


def _check_no_other_users_on_the_way(path: Path) -> None:
    """Every existing step of `path` as given (links not followed: each is checked as
    the entry it is) is this user's or root's."""
    trusted = {0, os.geteuid()}
    absolute = path.absolute()
    step = Path(absolute.anchor)
    for part in absolute.parts[1:]:
        step = step / part
        try:
            owner = os.lstat(step).st_uid
        except FileNotFoundError:
            return  # the rest is made here, by this user
        if owner not in trusted:
            raise DataDirError(
                f"{step}, on the way to {path}, is another user's (uid {owner}), who could "
                "point it elsewhere; use a path of your own"
            )


def tighten_tree(root: Path) -> int:
    """Remove group and other permission bits from `root` and everything below it
    (symbolic links are not followed); returns how many paths changed.

    A data dir holds dirs another user writes (a pool driver's checkpoint dir), where an
    entry checked by name could be swapped for a link before it is changed or entered
    by name: so the walk goes by directory descriptors (`os.fwalk`, which checks that
    each dir it enters is the one it listed), and each entry is checked and changed
    through one descriptor of its own."""
    changed = _tighten(str(root))
    for _, dirs, files, dir_fd in os.fwalk(root):
        for name in (*dirs, *files):
            changed += _tighten(name, dir_fd)
    return changed


def _tighten(path: str, dir_fd: int | None = None) -> int:
    """One entry's group and other bits off, through an O_PATH descriptor of the entry
    itself (never what a link names). Linux changes an O_PATH descriptor's file through
    its /proc/self/fd entry (what glibc's fchmodat does for AT_SYMLINK_NOFOLLOW),
    sockets included."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0  # removed meanwhile (a running child's temporary file)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISLNK(mode) or not mode & _GROUP_OR_OTHER:
            return 0
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode) & ~_GROUP_OR_OTHER)
        return 1
    finally:
        os.close(fd)


def new_secret_file(path: Path, size: int = 32) -> bytes:
    """Random bytes, written to a fresh owner-only (0600) file at `path` (replacing an
    older one) for a child process to read; returned for this process's own use."""
    secret = secrets.token_bytes(size)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return secret


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` as `path` (umask's mode): a new file in the same dir, renamed over
    whatever was there. A link at `path` (planted in a dir others write, pointing at a
    file of root's) is replaced, never written through."""
    with replacing(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A file to write `path`'s new content to, renamed over `path` once the block ends
    without an error (see `replace_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            yield handle
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def _umask() -> int:
    current = os.umask(PRIVATE_UMASK)
    os.umask(current)
    return current
