"""consortium/file_modes.py: a loosened data dir is tightened, and what links name is
left alone (a link planted in a dir another user writes must not aim root's chmod)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from consortium.errors import DataDirError
from consortium.file_modes import private_dir, replace_file, tighten_tree


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_loosened_tree_is_tightened_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "keys").mkdir(parents=True)
    key = root / "keys" / "signing.key"
    key.write_text("key")
    root.chmod(0o755)
    (root / "keys").chmod(0o775)
    key.chmod(0o644)
    (root / "keys" / "deeper").mkdir(mode=0o750)
    assert tighten_tree(root) == 4
    assert (mode(root), mode(root / "keys"), mode(key)) == (0o700, 0o700, 0o600)
    assert mode(root / "keys" / "deeper") == 0o700
    assert tighten_tree(root) == 0  # nothing left to change


def test_what_a_link_names_keeps_its_mode(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("not ours to change")
    outside.chmod(0o4755)  # the bits a planted file would pass on, set-user-ID included
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    root = tmp_path / "data"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "latest.pt").symlink_to(outside)
    (root / "dir-link").symlink_to(elsewhere, target_is_directory=True)
    root.chmod(0o755)
    private_dir(root)
    assert mode(root) == 0o700  # the tree itself was tightened
    assert (mode(outside), mode(elsewhere)) == (0o4755, 0o755)


def test_a_socket_in_the_tree_is_tightened_too(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(root / "s"))
        (root / "s").chmod(0o777)
        assert tighten_tree(root) == 1
        assert mode(root / "s") == 0o700


NOBODY = 65534


def test_a_dir_another_user_owns_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """Its owner could plant links where files are about to be written (`coordinator
    onboard --out` overwrote a file of root's through one) or read what lands there."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(DataDirError, match=f"another user's \\(uid {NOBODY}\\)"):
        private_dir(theirs)
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o777  # not tightened either


def test_replace_file_replaces_a_planted_link_and_never_writes_through_it(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("root's own\n")
    out = tmp_path / "shared" / "checkpoint"
    out.parent.mkdir()
    out.symlink_to(victim)
    replace_file(out, b"the checkpoint\n")
    assert victim.read_text() == "root's own\n"
    assert not out.is_symlink() and out.read_bytes() == b"the checkpoint\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["checkpoint"]  # no partial left


@pytest.mark.parametrize("link_at", ["final", "on the way"])
def test_a_link_of_another_users_on_the_way_is_refused_and_nothing_written(
    tmp_path: Path, link_at: str
) -> None:
    """`--out theirs/bundle` with `bundle` (or a dir on the way) a link of theirs to a
    dir of root's: the owner check of the target saw root's, and root wrote there."""
    roots = tmp_path / "roots-service"
    roots.mkdir()
    (roots / "ca.crt").write_text("the service's own\n")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o777)
    link = theirs / ("bundle" if link_at == "final" else "via")
    link.symlink_to(roots)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    os.chown(theirs, NOBODY, NOBODY)
    target = link if link_at == "final" else link / "sub"
    with pytest.raises(DataDirError, match="another user's"):
        private_dir(target)
    assert sorted(p.name for p in roots.iterdir()) == ["ca.crt"]  # nothing made there
