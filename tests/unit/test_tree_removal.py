"""Removing a tree another user writes into (consortium/tree_removal.py): nothing is
followed, nothing waited on, and no depth exhausts the stack or the descriptors."""

from __future__ import annotations

import os
from pathlib import Path

from consortium.tree_removal import MAX_DEPTH, remove_tree


def deep_tree(root: Path, depth: int) -> None:
    """`depth` nested dirs below `root`, made relative to descriptors (the path would
    pass PATH_MAX), a file at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


def test_a_tree_thousands_of_levels_deep_is_removed(tmp_path: Path) -> None:
    """A pool process can build one: `shutil.rmtree` and a recursive walk ran out of
    stack (RecursionError, which no caller expected), a walk holding a descriptor per
    level would run out of those."""
    top = tmp_path / "ray"
    top.mkdir()
    deep_tree(top, 40 * MAX_DEPTH)
    remove_tree(top)
    assert not top.exists()
    assert list(tmp_path.iterdir()) == []  # nothing moved up was left behind


def test_links_and_fifos_are_unlinked_never_followed_or_opened(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("kept\n")
    top = tmp_path / "ray"
    (top / "session").mkdir(parents=True)
    (top / "session" / "to-outside").symlink_to(outside)
    (top / "to-file").symlink_to(outside / "keep.txt")
    os.mkfifo(top / "session" / "fifo")  # opened as a dir, it would block
    remove_tree(top)
    assert not top.exists()
    assert (outside / "keep.txt").read_text() == "kept\n"


def test_a_missing_tree_is_nothing_to_do(tmp_path: Path) -> None:
    remove_tree(tmp_path / "gone")
    assert list(tmp_path.iterdir()) == []
