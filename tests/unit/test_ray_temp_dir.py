"""Ray's temp dir lives in a private dir of ours (consortium/ray_env.py): made afresh
at each start, 0700, and refused where another user got there first."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.errors import DataDirError
from consortium.ray_env import (
    RAY_TEMP_SUBDIR,
    prepare_ray_temp_dir,
    remove_ray_temp_dir,
    short_temp_dir,
)

NOBODY = 65534


@pytest.fixture
def anchor(tmp_path: Path) -> Iterator[Path]:
    """A data dir; whatever a test leaves at its private dir in /tmp is removed."""
    yield tmp_path
    private = short_temp_dir(tmp_path)
    with contextlib.suppress(FileNotFoundError):
        if private.is_symlink() or not private.is_dir():
            private.unlink()
        else:
            shutil.rmtree(private)


def test_the_private_dir_is_made_ours_and_0700_with_rays_dir_inside(anchor: Path) -> None:
    ray_dir = prepare_ray_temp_dir(anchor)
    private = short_temp_dir(anchor)
    assert ray_dir == private / RAY_TEMP_SUBDIR
    found = private.lstat()
    assert stat.S_ISDIR(found.st_mode) and stat.S_IMODE(found.st_mode) == 0o700
    assert found.st_uid == os.geteuid()
    remove_ray_temp_dir(anchor)
    assert not private.exists()


def test_what_an_earlier_start_left_is_replaced(anchor: Path) -> None:
    """An older version's dir (Ray made it 0777), where anyone could have written."""
    private = short_temp_dir(anchor)
    private.mkdir()
    private.chmod(0o777)
    planted = private / RAY_TEMP_SUBDIR / "session_latest" / "sockets" / "raylet"
    planted.parent.mkdir(parents=True)
    planted.write_text("not Ray's")
    prepare_ray_temp_dir(anchor)
    assert not planted.exists() and list(private.iterdir()) == []
    assert stat.S_IMODE(private.lstat().st_mode) == 0o700


def test_another_users_dir_under_the_name_is_refused_and_left_alone(anchor: Path) -> None:
    private = short_temp_dir(anchor)
    private.mkdir()
    (private / "theirs").write_text("x")
    os.chown(private, NOBODY, NOBODY)
    with pytest.raises(DataDirError, match=r"is another user's \(uid 65534\).*Remove it"):
        prepare_ray_temp_dir(anchor)
    remove_ray_temp_dir(anchor)  # nor removed at stop: it is not ours
    assert (private / "theirs").read_text() == "x" and private.lstat().st_uid == NOBODY


def test_a_link_under_the_name_is_refused_not_followed(anchor: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    short_temp_dir(anchor).symlink_to(target)
    with pytest.raises(DataDirError, match="is not a directory"):
        prepare_ray_temp_dir(anchor)
    remove_ray_temp_dir(anchor)
    assert short_temp_dir(anchor).is_symlink() and (target / "keep").read_text() == "x"
