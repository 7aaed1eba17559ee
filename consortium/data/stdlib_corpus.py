"""A public byte-level text corpus: the Python standard library's own source files.

Every machine with Python has it, so nothing is downloaded and every worker can build
the same shards locally; the corpus digest proves that it did.

Rules (all deterministic, none depends on file-system order):

* Files: ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``,
  ``dist-packages``, ``__pycache__`` and test directories (``test``, ``tests``,
  ``idle_test``) at any depth.
* Split: a file belongs to the held-out validation split when the SHA-256 of its *group*
  (the first component of its relative path: ``json`` for ``json/decoder.py``,
  ``abc.py`` for ``abc.py``) falls below ``validation_fraction``. Keeping a package
  whole on one side stops near-duplicate files (``encodings/cp1250.py`` and
  ``encodings/cp1251.py``) from leaking validation text into training.
* Order: within each split, files are ordered by the SHA-256 of their relative path (a
  fixed pseudo-random order that mixes topics) and concatenated byte for byte until the
  byte cap is reached; the last file is cut at the cap.
* Shards: the training bytes are cut into ``num_shards`` contiguous shards of equal
  size ``len // num_shards`` (the remainder, under ``num_shards`` bytes, is dropped).
* Digest: SHA-256 over a version tag and, length-prefixed, every shard then the
  validation bytes. Different Python versions ship different files, so the digest (and
  ``python_version``) belong in the provenance record of anything trained on it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from consortium.errors import DataDirError

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
DEFAULT_VALIDATION_FRACTION = 0.05
DIGEST_TAG = b"consortium-stdlib-corpus-v1"

ByteArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class StdlibCorpus:
    """Training shards and a held-out validation split, as read-only uint8 arrays."""

    shards: tuple[ByteArray, ...]
    validation: ByteArray
    train_files: tuple[str, ...]  # relative paths, in concatenation order (maybe cut)
    validation_files: tuple[str, ...]
    digest: str  # sha256 over the shard contents and the validation bytes
    shard_digests: tuple[str, ...]
    python_version: str

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def shard_bytes(self) -> int:
        return int(self.shards[0].size) if self.shards else 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path) -> list[str]:
    """Relative POSIX paths of the corpus's ``*.py`` files, sorted."""
    found: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        rel_dir = Path(directory).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in files if f.endswith(".py"))
    return sorted(found)


def is_validation_file(rel_path: str, fraction: float = DEFAULT_VALIDATION_FRACTION) -> bool:
    """Whether ``rel_path`` belongs to the held-out split (decided by its top-level group)."""
    group = rel_path.split("/", 1)[0]
    return _unit_interval(group) < fraction


def load_stdlib_corpus(
    num_shards: int,
    max_train_bytes: int,
    max_validation_bytes: int,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    root: Path | None = None,
) -> StdlibCorpus:
    """Build (or return the cached) corpus; identical inputs give identical bytes."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if max_train_bytes < num_shards or max_validation_bytes < 1:
        raise ValueError(
            f"need max_train_bytes >= num_shards ({max_train_bytes} < {num_shards}) "
            f"and max_validation_bytes >= 1 ({max_validation_bytes})"
        )
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    return _load(
        num_shards,
        max_train_bytes,
        max_validation_bytes,
        validation_fraction,
        str(root if root is not None else stdlib_root()),
    )


@functools.lru_cache(maxsize=4)
def _load(
    num_shards: int,
    max_train_bytes: int,
    max_validation_bytes: int,
    validation_fraction: float,
    root: str,
) -> StdlibCorpus:
    base = Path(root)
    files = list_source_files(base)
    if not files:
        raise DataDirError(f"no Python source files found under {base}")
    by_hash = sorted(files, key=lambda rel: hashlib.sha256(rel.encode()).digest())
    train_paths = [f for f in by_hash if not is_validation_file(f, validation_fraction)]
    val_paths = [f for f in by_hash if is_validation_file(f, validation_fraction)]
    train, train_used = _concatenate(base, train_paths, max_train_bytes)
    validation, val_used = _concatenate(base, val_paths, max_validation_bytes)
    shard_size = train.size // num_shards
    if shard_size == 0 or validation.size == 0:
        raise DataDirError(
            f"the corpus under {base} is too small: {train.size} training bytes for "
            f"{num_shards} shards, {validation.size} validation bytes"
        )
    shards = tuple(_frozen(train[i * shard_size : (i + 1) * shard_size]) for i in range(num_shards))
    validation = _frozen(validation)
    return StdlibCorpus(
        shards=shards,
        validation=validation,
        train_files=tuple(train_used),
        validation_files=tuple(val_used),
        digest=corpus_digest(shards, validation),
        shard_digests=tuple(hashlib.sha256(s.tobytes()).hexdigest() for s in shards),
        python_version=platform.python_version(),
    )


def corpus_digest(shards: tuple[ByteArray, ...], validation: ByteArray) -> str:
    hasher = hashlib.sha256(DIGEST_TAG)
    for part in (*shards, validation):
        hasher.update(struct.pack(">Q", part.size))
        hasher.update(part.tobytes())
    return hasher.hexdigest()


def _concatenate(base: Path, paths: list[str], cap: int) -> tuple[ByteArray, list[str]]:
    chunks: list[bytes] = []
    used: list[str] = []
    total = 0
    for rel in paths:
        if total >= cap:
            break
        data = (base / rel).read_bytes()[: cap - total]
        chunks.append(data)
        used.append(rel)
        total += len(data)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), used


def _frozen(array: ByteArray) -> ByteArray:
    out = np.array(array, dtype=np.uint8, copy=True)
    out.flags.writeable = False  # shared by the cache: nobody may change it
    return out


def _unit_interval(key: str) -> float:
    """A stable pseudo-random number in [0, 1) from the SHA-256 of ``key``."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
