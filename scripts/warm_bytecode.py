"""Write the bytecode of every module the project's processes import, once, at set-up.

`make test` starts a few hundred Python processes. Without bytecode for the libraries
they import (torch, Flower, SQLAlchemy, numba, scipy, transformers...), each one that
finds a module uncompiled compiles it again, many of them at once, until one has written
its `.pyc`; the pretraining driver and the sites' Ray workers run as the pool user, which
cannot write into the virtual environment, and compile them on every start. Measured on
2 cores: the suite took 628 s with cold bytecode and 551 s with warm.

Compiling all of site-packages takes about 35 s on 2 cores, mostly on modules nothing
imports, so instead this imports every module of the project's packages (and of the
example workloads): what they import at module level is what the processes import, and
Python writes its bytecode on the way. Ray and the project itself are compiled whole by
the Makefile (`compileall`), as a Ray worker imports much of Ray lazily.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

PACKAGES = ("consortium", "coordinator", "client", "tiny_workload", "hf_lora")


def module_names(package: str) -> list[str]:
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # runs a command when imported
            names.append(info.name)
    return names


def main() -> int:
    sys.dont_write_bytecode = False  # the point of the script, whatever the environment says
    started = time.monotonic()
    names = [name for package in PACKAGES for name in module_names(package)]
    for name in names:
        importlib.import_module(name)
    print(
        f"bytecode written for {len(names)} project modules and what they import "
        f"({len(sys.modules)} modules) in {time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
