"""Removing a tree another user can write into, as root, without following or waiting.

The Ray dirs and the pretraining driver's home are the pool user's, and pool processes
(a member's task) may be alive while root removes them. `shutil.rmtree` (Python 3.11)
opens each subdirectory with a plain `O_RDONLY`: a pool process that swapped a dir for
a FIFO between rmtree's look and its open left root blocked in that open for as long as
it liked (the pretraining run's start, a Ray node's restart). Here every dir is opened
with `O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK` relative to its parent's descriptor, so
what is not a dir (a FIFO, a link) is refused at once and unlinked instead.

The walk is iterative and holds at most `MAX_DEPTH` descriptors: a dir deeper than that
is moved up beside the tree's top (as fts does) and removed on its own, so a tree built
thousands of levels deep neither exhausts the stack nor the descriptors. What a writer
keeps adding while the tree goes may outlast `ATTEMPTS` passes over a dir: then an
OSError (ENOTEMPTY) says so.

Only the standard library: `consortium.sandbox` uses it before every node start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
MAX_DEPTH = 64  # descriptors held at once
ATTEMPTS = 5  # passes over a dir that a writer keeps filling
_MOVED_PREFIX = ".removing-"


@dataclass
class _Dir:
    fd: int
    name: str  # in the dir below it on the stack (or the top)
    names: list[str] = field(default_factory=list)  # still to remove
    passes: int = 0


def remove_tree(path: Path) -> None:
    """`remove_tree_at` for `path`, relative to its parent opened as a dir (the parent
    itself is the caller's to trust: /tmp, a data dir)."""
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree_at(parent_fd, path.name)
    finally:
        os.close(parent_fd)


def remove_tree_at(parent_fd: int, name: str) -> None:
    """Remove `name` (in the dir open as `parent_fd`) and all below it; a file, a link or
    a FIFO is unlinked, a dir emptied and removed. Gone already: nothing to do."""
    todo = [name]
    while todo:
        _remove(parent_fd, todo.pop(), todo)


def _remove(top_fd: int, name: str, todo: list[str]) -> None:
    stack: list[_Dir] = []
    try:
        parent, entry = top_fd, name
        while True:
            fd = _open_dir_or_unlink(parent, entry)
            if fd is not None:
                if len(stack) >= MAX_DEPTH:
                    os.close(fd)
                    moved = _MOVED_PREFIX + secrets.token_hex(8)
                    os.rename(entry, moved, src_dir_fd=parent, dst_dir_fd=top_fd)
                    todo.append(moved)
                else:
                    stack.append(_Dir(fd, entry))
            next_entry = _next_entry(stack, top_fd)
            if next_entry is None:
                return
            parent, entry = next_entry
    finally:
        for open_dir in stack:
            os.close(open_dir.fd)


def _next_entry(stack: list[_Dir], top_fd: int) -> tuple[int, str] | None:
    """The next entry to remove (its dir's descriptor and its name), removing every dir
    on the stack that is found empty on the way; None once the tree is gone."""
    while stack:
        current = stack[-1]
        if not current.names:
            if current.passes < ATTEMPTS:
                current.passes += 1
                with os.scandir(current.fd) as entries:
                    current.names = [e.name for e in entries]
            if not current.names:  # empty, or still filling after every pass
                stack.pop()
                os.close(current.fd)
                _rmdir(stack[-1].fd if stack else top_fd, current.name)
                continue
        return current.fd, current.names.pop()
    return None


def _open_dir_or_unlink(parent: int, name: str) -> int | None:
    """`name` opened as a dir, or None once it is gone (unlinked, if it was not a dir)."""
    for _ in range(ATTEMPTS):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
        with contextlib.suppress(FileNotFoundError):
            try:
                os.unlink(name, dir_fd=parent)
                return None
            except IsADirectoryError:
                continue  # it became a dir meanwhile: open it
    raise OSError(errno.EBUSY, f"{name} kept changing between a dir and a file")


def _rmdir(parent: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=parent)
    except FileNotFoundError:
        return
