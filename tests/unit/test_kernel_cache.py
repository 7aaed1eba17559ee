"""A process that cannot write the install's numba cache (a sandboxed pretraining driver)
loads the aggregation kernels from a seeded copy instead of compiling them again
(consortium/aggregation/kernel_cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from numba.core.caching import _CacheLocator

from consortium.aggregation import kernel_cache
from consortium.aggregation.kernel_cache import (
    CACHE_DIR_ENV,
    KERNELS,
    numba_cache_subpath,
    seed_kernel_cache,
)

# One aggregation (the warm-up's), then how often numba found each kernel it ran in a
# cache, and how often it had to compile.
AGGREGATE = """
import json, numba
from consortium.aggregation import kernels
from consortium.aggregation.kernel_cache import warm_kernel_cache
warm_kernel_cache()
dispatchers = [f for f in vars(kernels).values() if isinstance(f, numba.core.dispatcher.Dispatcher)]
stats = [f.stats for f in dispatchers]
print(json.dumps({"hits": sum(sum(s.cache_hits.values()) for s in stats),
                  "misses": sum(sum(s.cache_misses.values()) for s in stats)}))
"""


def aggregate(cache_dir: Path | None) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != CACHE_DIR_ENV}
    if cache_dir is not None:
        env[CACHE_DIR_ENV] = str(cache_dir)
    result = subprocess.run(
        [sys.executable, "-c", AGGREGATE],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    counts: dict[str, int] = json.loads(result.stdout.splitlines()[-1])
    return counts


def seed(home: Path, name: str) -> list[Path]:
    """`seed_kernel_cache` into `home`/`name`; what it made, as paths."""
    home.mkdir(exist_ok=True)
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [home / path for path in seed_kernel_cache(fd, name)]
    finally:
        os.close(fd)


def test_the_folder_is_the_one_numba_reads_under_its_cache_dir() -> None:
    assert numba_cache_subpath(KERNELS) == _CacheLocator.get_suitable_cache_subpath(str(KERNELS))


def test_a_process_given_the_seeded_cache_loads_the_kernels_instead_of_compiling(
    tmp_path: Path,
) -> None:
    """A kernel compiled is a miss; one loaded from the cache a hit."""
    aggregate(None)  # the install's own cache, beside the kernels: compiled there once
    made = seed(tmp_path, "seeded")
    assert any(path.suffix == ".nbi" for path in made)
    seeded = aggregate(tmp_path / "seeded")
    assert seeded["misses"] == 0 and seeded["hits"] > 0, seeded


def test_the_warm_up_make_runs_compiles_what_an_aggregation_needs(tmp_path: Path) -> None:
    env = {**os.environ, CACHE_DIR_ENV: str(tmp_path)}
    warm = [sys.executable, "-m", "consortium.aggregation.kernel_cache"]
    subprocess.run(warm, check=True, timeout=120, env=env)
    compiled = {path.name.split("-")[0] for path in tmp_path.glob("*/kernels.*.nbi")}
    assert {"kernels.add_blocks", "kernels.mean_blocks", "kernels.tensor_stats"} <= compiled
    warmed = aggregate(tmp_path)
    assert warmed["misses"] == 0 and warmed["hits"] > 0, warmed


def test_nothing_compiled_yet_seeds_an_empty_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "pkg" / "kernels.py"
    (source.parent / "__pycache__").mkdir(parents=True)
    monkeypatch.setattr(kernel_cache, "KERNELS", source)
    made = seed(tmp_path, "cache")
    assert made == [tmp_path / "cache", tmp_path / "cache" / numba_cache_subpath(source)]
    assert list(made[1].iterdir()) == []


def test_a_link_where_a_copy_goes_is_refused_and_not_written_through(tmp_path: Path) -> None:
    """Copies are made only as new files, never through a link already in their place
    (as root, into a dir a pool process could have written first)."""
    aggregate(None)  # the install's cache holds the kernels
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file")
    first = sorted((KERNELS.parent / "__pycache__").glob("kernels.*.nbi"))[0]
    target = tmp_path / "home" / "cache" / numba_cache_subpath(KERNELS)
    target.mkdir(parents=True)
    (target / first.name).symlink_to(victim)
    with pytest.raises(FileExistsError):
        seed(tmp_path / "home", "cache")
    assert victim.read_bytes() == b"root's file"
