"""Program start-up with Python's cyclic garbage collector paused while modules load.

Why: loading a program's modules (Flower, Ray, torch, gRPC, pydantic) allocates hundreds
of thousands of objects that live as long as the process, and CPython's collector,
started by allocation counts, scans the whole growing heap again and again while they
load: 17 to 28% of their loading's CPU on the project's 2-core VM (benchmarks/startup.py:
Flower's SuperLink 1.60 -> 1.15 CPU-s, `ray start` 1.42 -> 1.13, the `coordinator` CLI
0.47 -> 0.37). A consortium starts such processes all the time (every CLI call, every
run's ServerApp, every restart), and the test suite hundreds of them.

So the programs the project starts load their modules through `load` (Ray's worker
processes, which Ray starts itself, do not): the collector is off while they load,
then everything they made is moved to the permanent generation (`gc.freeze`:
module-level objects live as long as the process, so later full collections need not
scan them again) and the collector runs as before. The console scripts of
pyproject.toml point at small functions that do this (`coordinator.launch`,
`client.launch`, `ray_cli` here) instead of at the programs' modules.

Only the standard library is imported here (and, for a Ray head, the module that trims
it).
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "freeze_what_is_loaded",
    "imports_without_gc",
    "leave_out_unused_ray_cli_groups",
    "load",
    "ray_cli",
]


@contextmanager
def imports_without_gc(*, collect_first: bool = False) -> Iterator[None]:
    """The collector off inside; on leaving, what was made is frozen and the collector
    is back as it was. Frozen garbage is never collected: at start-up there is little
    (loading makes few cycles), but a process that has been running for a while, with
    other threads allocating, passes `collect_first` (one full collection before the
    freeze). A load that fails freezes nothing: a half-loaded module is a cycle, and a
    program that tries again must not keep one per try."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    except BaseException:
        if enabled:
            gc.enable()
        raise
    if collect_first:
        gc.collect()
    gc.freeze()
    if enabled:
        gc.enable()


def freeze_what_is_loaded() -> None:
    """For a process whose program was loaded by someone else, with the collector
    running (a Ray worker imports its actor's class, and torch with it, as it unpickles
    it): one full collection, then everything left frozen, as `imports_without_gc`
    leaves a load. Later full collections and the process's exit then skip torch's and
    Ray's objects: a process that trained the test suite's model for 5 x 100 inner
    steps took 6.3 CPU-s without and 5.0 with (side by side, the project's 2-core VM)."""
    gc.collect()
    gc.freeze()


def load(target: str, *preload: str) -> Any:
    """The attribute ``module:attribute`` names, its module (and the `preload` modules,
    which the program would otherwise import later) loaded with the collector paused."""
    module_name, _, attribute = target.partition(":")
    with imports_without_gc():
        for name in preload:
            importlib.import_module(name)
        return getattr(importlib.import_module(module_name), attribute)


# The command groups Ray's CLI module adds when it can import them, none of which `ray
# start` uses: `ray serve`, `ray job` and `ray list/get/summary/logs`. Trying them was 1.2
# of the 1.9 CPU-s that Ray's CLI took to load (benchmarks/startup.py), in every Ray
# node's `ray start`, which stays running beside the node: Serve's loads pandas, pyarrow
# and FastAPI before it fails (Ray is installed without its `serve` extra).
RAY_START_UNUSED_CLI_GROUPS = (
    "ray.serve.scripts",
    "ray.dashboard.modules.job.cli",
    "ray.util.state.state_cli",
)


def leave_out_unused_ray_cli_groups() -> None:
    """In this process, Ray's CLI module loads without the groups `ray start` never uses.
    A `None` entry in `sys.modules` makes their import raise ImportError, which Ray's CLI
    catches for each group (it leaves the group out, as when Serve is not installed)."""
    for name in RAY_START_UNUSED_CLI_GROUPS:
        if name not in sys.modules:
            # typeshed types the values as modules; None is the documented blocker.
            sys.modules[name] = None  # type: ignore[assignment]


def ray_cli() -> Any:
    """`consortium-ray`: Ray's own `ray` command line (its `ray start` starts every
    Ray node of the consortium). `ray start` loads without the command groups it never
    uses, and a head starts without the services nothing here uses
    (consortium/ray_head_services.py); other commands are Ray's, whole."""
    if sys.argv[1:2] == ["start"]:
        leave_out_unused_ray_cli_groups()
    main = load("ray.scripts.scripts:main")
    if "--head" in sys.argv[1:]:
        from consortium.ray_head_services import skip_unused_head_services

        skip_unused_head_services()
    return main()
