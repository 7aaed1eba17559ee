"""Code identity and environment, recorded so a run can be replayed.

The source digest covers every .py file of the three packages, so two
installations with the same digest run the same code; the package-set digest
covers every installed distribution's name and version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("consortium", "coordinator", "client")


def source_digest() -> str:
    hasher = hashlib.sha256()
    for package in PACKAGES:
        root = Path(__import__(package).__file__ or "").parent
        for path in sorted(root.rglob("*.py")):
            hasher.update(str(path.relative_to(root.parent)).encode() + b"\0")
            hasher.update(hashlib.sha256(path.read_bytes()).digest())
    return hasher.hexdigest()


def installed_packages_digest() -> str:
    names = sorted(
        f"{dist.metadata['Name'].lower()}=={dist.version}"
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    )
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


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
