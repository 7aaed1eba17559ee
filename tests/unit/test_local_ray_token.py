"""A plain-text coordinator's own Ray head takes a token too (Ray listens beyond
loopback): made once, private, and the same on every later start, so sites that fetched
it rejoin a restarted head."""

from __future__ import annotations

from pathlib import Path

from coordinator.data_dir import DataDir
from coordinator.ray.head import local_ray_token


def test_the_token_is_made_once_private_and_kept_across_starts(tmp_path: Path) -> None:
    paths = DataDir(tmp_path / "coordinator")
    token = local_ray_token(paths)
    assert token == paths.local_ray_token
    first = token.read_bytes()
    assert len(first) == 64 and int(first, 16) >= 0  # 32 random bytes, hex
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.parent.stat().st_mode & 0o777 == 0o700
    assert local_ray_token(paths).read_bytes() == first
    other = local_ray_token(DataDir(tmp_path / "another"))
    assert other.read_bytes() != first
