"""A public English corpus that every installation already holds: the documentation
strings of installed packages (the consortium's own pinned dependencies).

Each package's ``*.py`` files are visited in SHA-256-of-path order; every module,
class and function docstring (``ast.get_docstring``, cleaned) is kept, separated by a
blank line. A file belongs to the held-out split when the hash of its package-relative
path falls under `HELD_OUT_FRACTION`, so the split is the same on every machine with
the same package versions. Sites get *different packages* (a non-IID partition): one
institution's text is numpy's documentation, another's scikit-learn's, and so on; the
coordinator evaluates on the held-out files of all of them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from consortium.errors import DataDirError

DATASET = "docstrings"
# Runtime dependencies of consortium, so present wherever it is installed.
PACKAGES = ("numpy", "sklearn", "rich", "click", "pydantic", "grpc")
HELD_OUT_FRACTION = 0.1
# Training bytes taken from each package (held out: a quarter of that).
DEFAULT_BYTES_PER_PACKAGE = 64 * 1024
SEPARATOR = b"\n\n"

ByteArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class PackageText:
    package: str
    train: bytes
    held_out: bytes


def package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataDirError(f"package {package!r} is not installed; its docstrings are needed")
    return Path(next(iter(spec.submodule_search_locations)))


def file_docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []  # vendored Python 2 files and the like: nothing to learn from
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    found = (ast.get_docstring(n, clean=True) for n in nodes)
    return [d for d in found if d]


def is_held_out(rel_path: str) -> bool:
    value = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") / 2**64
    return value < HELD_OUT_FRACTION


@functools.lru_cache(maxsize=16)
def package_text(package: str, max_bytes: int) -> PackageText:
    """Up to ``max_bytes`` of training and ``max_bytes // 4`` of held-out docstrings."""
    root = package_root(package)
    files = sorted(
        (p.relative_to(root).as_posix() for p in root.rglob("*.py")),
        key=lambda rel: hashlib.sha256(rel.encode()).digest(),
    )
    train: list[bytes] = []
    held_out: list[bytes] = []
    sizes = {"train": 0, "held_out": 0}
    caps = {"train": max_bytes, "held_out": max(max_bytes // 4, 1)}
    for rel in files:
        split = "held_out" if is_held_out(rel) else "train"
        if sizes[split] >= caps[split]:
            if all(sizes[s] >= caps[s] for s in sizes):
                break
            continue
        for doc in file_docstrings(root / rel):
            chunk = doc.encode("utf-8") + SEPARATOR
            (held_out if split == "held_out" else train).append(chunk)
            sizes[split] += len(chunk)
    return PackageText(package, b"".join(train)[:max_bytes], b"".join(held_out)[: caps["held_out"]])


def packages_for(institutions: int) -> list[tuple[str, ...]]:
    """Which packages' docstrings each of ``institutions`` sites holds (round-robin)."""
    if institutions < 1:
        raise ValueError(f"need at least one institution, got {institutions}")
    shares: list[list[str]] = [[] for _ in range(institutions)]
    for index, package in enumerate(PACKAGES):
        shares[index % institutions].append(package)
    return [tuple(share) for share in shares]


def site_text(packages: tuple[str, ...], max_bytes_per_package: int) -> bytes:
    return b"".join(package_text(p, max_bytes_per_package).train for p in packages)


def held_out_text(max_bytes_per_package: int) -> ByteArray:
    """The coordinator's evaluation text: every package's held-out docstrings."""
    text = b"".join(package_text(p, max_bytes_per_package).held_out for p in PACKAGES)
    return np.frombuffer(text, dtype=np.uint8)
