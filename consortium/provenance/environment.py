"""Code identity and environment, recorded so a run can be replayed.

The source digest covers every .py file of the three packages, so two
installations with the same digest run the same code; the package-set digest
covers every installed distribution's name and version (`installed_packages`, the
lock an attestation carries).

`write_source_archive` writes those same files as a deterministic tar (sorted, zero
times and owners, USTAR), so the archive's sha256 is a function of the source alone
and `source_digest_of_archive` recomputes the source digest from it: a reviewer can
check that an archive is the code a job ran.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import platform
import sys
import sysconfig
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from consortium.file_modes import replacing

PACKAGES = ("consortium", "coordinator", "client")


def source_files() -> list[tuple[str, Path]]:
    """(path relative to the packages' parent, file) in the order the digest takes them."""
    files = []
    for package in PACKAGES:
        root = Path(__import__(package).__file__ or "").parent
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                files.append((str(path.relative_to(root.parent)), path))
    return files


def _digest(files: list[tuple[str, bytes]]) -> str:
    hasher = hashlib.sha256()
    for name, data in files:
        hasher.update(name.encode() + b"\0")
        hasher.update(hashlib.sha256(data).digest())
    return hasher.hexdigest()


def source_digest() -> str:
    return _digest([(name, path.read_bytes()) for name, path in source_files()])


def write_source_archive(out: Path) -> str:
    """Write the installed source as a deterministic tar; return the archive's sha256."""
    with (
        replacing(out) as file,
        tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as archive,
    ):
        for name, path in source_files():
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(out.read_bytes()).hexdigest()


def source_digest_of_archive(path: Path) -> str:
    """The source digest of the files in an archive `write_source_archive` wrote."""
    files: list[tuple[str, bytes]] = []
    with tarfile.open(path, "r") as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            if handle is not None:
                files.append((member.name, handle.read()))
    order = {package: i for i, package in enumerate(PACKAGES)}
    files.sort(key=lambda f: (order.get(f[0].split("/")[0], len(order)), PurePosixPath(f[0])))
    return _digest(files)


def installed_packages() -> list[str]:
    """Every distribution installed in this environment's site-packages, as
    `name==version`, sorted: the environment's lock. Only site-packages, not all of
    `sys.path`: Ray puts its vendored packages on the path when imported, and Python
    run from a checkout finds its `*.egg-info`; the lock must depend on neither."""
    paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    return sorted(
        {
            f"{dist.metadata['Name'].lower()}=={dist.version}"
            for dist in importlib.metadata.distributions(path=paths)
            if dist.metadata["Name"]
        }
    )


def packages_digest(packages: list[str]) -> str:
    return hashlib.sha256("\n".join(packages).encode()).hexdigest()


def installed_packages_digest() -> str:
    return packages_digest(installed_packages())


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def describe_environment(device: str, deterministic: bool) -> dict[str, Any]:
    return {
        "code": {
            "package": "consortium",
            "version": _version("consortium"),
            "source_digest": source_digest(),
        },
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in ("torch", "flwr", "ray", "numpy")},
        "installed_packages_digest": installed_packages_digest(),
        "device": device,
        "deterministic": deterministic,
    }
