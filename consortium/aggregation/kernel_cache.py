"""The compiled aggregation kernels, copied for a process that cannot write the install's
numba cache.

numba keeps what it compiles from `kernels` beside the module (its `__pycache__`), but
uses that cache only in a process that may write there; any other compiles the kernels
again before its first aggregation: 3.3 to 3.7 CPU-s (and seconds of waiting) on the
project's 2-core VM, against 0.9 to load them from a cache. A pretraining run's driver,
run as the pool user (coordinator/pretraining/engine.py), is such a process, and its
private dir is new at every run. `seed_kernel_cache` copies what the install's own
processes compiled (the coordinator's replay and ServerApps, run by the install's owner)
into a dir the driver owns, laid out as numba reads it under NUMBA_CACHE_DIR. Copied by
the coordinator, which reads them without loading numba; never the other way: what a
driver compiled is not trusted back. `make` compiles them once after installing
(`python -m consortium.aggregation.kernel_cache`), so that the first aggregation of
every process, a driver's copy included, finds them compiled.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

__all__ = [
    "CACHE_DIR_ENV",
    "KERNELS",
    "numba_cache_subpath",
    "seed_kernel_cache",
    "warm_kernel_cache",
]

KERNELS = Path(__file__).with_name("kernels.py")
CACHE_DIR_ENV = "NUMBA_CACHE_DIR"


def numba_cache_subpath(source: Path) -> str:
    """The folder numba keeps `source`'s compiled functions in, inside NUMBA_CACHE_DIR
    (numba's `_CacheLocator.get_suitable_cache_subpath`, which a test compares this
    with: the folder's name and the SHA-1 of its absolute path)."""
    folder = os.path.dirname(os.path.abspath(source))
    return f"{os.path.basename(folder)}_{hashlib.sha1(folder.encode()).hexdigest()}"


def seed_kernel_cache(home: int, name: str, owner: tuple[int, int] | None = None) -> list[Path]:
    """Copy the kernels' compiled code from the install's cache into the dir `name` (made
    if missing) of the dir open as `home`; returns what it made, relative to `home`.
    Nothing compiled yet copies nothing: the process then compiles, as it would have.

    Every dir and file is made relative to the one above it, opened without following
    a link (a file only if it is not there yet), and handed to `owner` (uid, gid) by
    descriptor: the root coordinator seeds a pool user's dir this way
    (coordinator/pretraining/engine.py), and a path followed by name could lead it
    anywhere a link pointed."""
    subpath = numba_cache_subpath(KERNELS)
    made = [Path(name), Path(name) / subpath]
    cache = _dir_in(home, name, owner)
    try:
        target = _dir_in(cache, subpath, owner)
        try:
            for source in sorted((KERNELS.parent / "__pycache__").glob(f"{KERNELS.stem}.*.nb[ic]")):
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with os.fdopen(os.open(source.name, flags, 0o600, dir_fd=target), "wb") as copy:
                    copy.write(source.read_bytes())
                    if owner is not None:
                        os.fchown(copy.fileno(), *owner)
                made.append(made[1] / source.name)
        finally:
            os.close(target)
    finally:
        os.close(cache)
    return made


def _dir_in(parent: int, name: str, owner: tuple[int, int] | None) -> int:
    """The dir `name` in the dir open as `parent`, made if missing, opened (never
    through a link) and handed to `owner`."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    if owner is not None:
        os.fchown(fd, *owner)
    return fd


def warm_kernel_cache() -> None:
    """Compile the kernels for float32 updates (the models' dtype) into numba's cache:
    the install's own, or NUMBA_CACHE_DIR where it is set."""
    import numpy as np

    from consortium.aggregation.streaming import StreamingMean
    from consortium.aggregation.validate import validate_update

    update = {"weights": np.full((8, 8), 0.5, np.float32)}
    validate_update(update, update, max_norm=None)
    mean = StreamingMean(update)
    mean.add(update, 1)
    mean.result()


if __name__ == "__main__":
    warm_kernel_cache()
