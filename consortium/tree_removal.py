"""Removing a tree another user can write into, as root, without following or waiting.

The Ray dirs and the pretraining driver's home are the pool user's, and pool processes
(a member's task) may be alive while root removes them. `shutil.rmtree` (Python 3.11)
opens each subdirectory with a plain `O_RDONLY`: a pool process that swapped a dir for
a FIFO between rmtree's look and its open left root blocked in that open for as long as
it liked (the pretraining run's start, a Ray node's restart). Here every dir is opened
with `O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK` relative to its parent's descriptor, so
what is not a dir (a FIFO, a link) is refused at once and unlinked instead.

Only the standard library: `consortium.sandbox` uses it before every node start.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
# Entries a writer adds while the tree goes: it is emptied again this many times.
ATTEMPTS = 5


def remove_tree_at(parent_fd: int, name: str) -> None:
    """Remove `name` (in the dir open as `parent_fd`) and all below it; a file, a link or
    a FIFO is unlinked, a dir emptied and removed. Gone already: nothing to do."""
    for attempt in range(ATTEMPTS):
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(name, dir_fd=parent_fd)
                return
            continue  # it became a dir meanwhile: open it
        try:
            _empty(fd)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return
        except FileNotFoundError:
            return
        except OSError as error:  # ENOTEMPTY: written to meanwhile; ENOTDIR: swapped
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            if attempt == ATTEMPTS - 1:
                raise


def remove_tree(path: Path) -> None:
    """`remove_tree_at` for `path`, relative to its parent opened without following a
    link in the last step (the parent itself is the caller's to trust: /tmp, a data dir)."""
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree_at(parent_fd, path.name)
    finally:
        os.close(parent_fd)


def _empty(dir_fd: int) -> None:
    with os.scandir(dir_fd) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        remove_tree_at(dir_fd, name)
