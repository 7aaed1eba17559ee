"""Program start-up with Python's cyclic garbage collector paused while modules load.

Why: loading a program's modules (Flower, Ray, torch, gRPC, pydantic) allocates hundreds
of thousands of objects that live as long as the process, and CPython's collector,
started by allocation counts, scans the whole growing heap again and again while they
load. Measured on the project's 2-core VM, it took a fifth to a third of the import
time: `coordinator`'s CLI 0.35 -> 0.25 CPU-s, Flower's SuperLink 1.22 -> 0.97, its
SuperNode 1.14 -> 0.89, `ray start` 1.19 -> 0.95, torch 1.28 -> 1.04. A consortium starts
such processes all the time (every CLI call, every run's ServerApp, every restart), and
the test suite hundreds of them.

So each program the project starts loads its modules through `load`: the collector is
off while they load, then everything they made is moved to the permanent generation
(`gc.freeze`: module-level objects live as long as the process, so later full
collections need not scan them again) and the collector runs as before. The console
scripts of pyproject.toml point at small functions that do this (`coordinator.launch`,
`client.launch`, `ray_cli` here) instead of at the programs' modules.

Only the standard library is imported here.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["imports_without_gc", "load", "ray_cli"]


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """The collector off inside; on leaving, what was made is frozen and the collector
    is back as it was (a garbage cycle made meanwhile is kept: loading makes few)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def load(target: str, *preload: str) -> Any:
    """The attribute ``module:attribute`` names, its module (and the `preload` modules,
    which the program would otherwise import later) loaded with the collector paused."""
    module_name, _, attribute = target.partition(":")
    with imports_without_gc():
        for name in preload:
            importlib.import_module(name)
        return getattr(importlib.import_module(module_name), attribute)


def ray_cli() -> Any:
    """`consortium-ray`: Ray's own `ray` command line (its `ray start` starts every
    Ray node of the consortium)."""
    return load("ray.scripts.scripts:main")()
