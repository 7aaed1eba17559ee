"""A load beside the test suite, so it is tried on a busy machine (issue 19).

    CONSORTIUM_TEST_LOAD=2 make pytest      # or: make test-under-load

With `CONSORTIUM_TEST_LOAD=N` set, the test session (its controller, not each xdist
worker) starts N processes that spin on a core and one that writes and fsyncs a
64 MiB file over and over, the kind of neighbour a shared CI machine or a site's
busy server has. They run at the suite's own priority, and are stopped, by their
process ids, when the session ends (also when it fails). Tests must hold under it:
readiness waits on events, not on fixed sleeps; timeouts leave room for a slow
machine; and bit-equality is asserted only where determinism is promised.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from consortium.processes import ChildProcess

LOAD_ENV = "CONSORTIUM_TEST_LOAD"
IO_CHUNK_BYTES = 4 * 2**20
IO_FILE_BYTES = 64 * 2**20

_SPIN = "while True:\n    pass\n"
_WRITE = f"""\
import os, sys
path = sys.argv[1]
chunk = os.urandom({IO_CHUNK_BYTES})
while True:
    with open(path, "wb") as file:
        for _ in range({IO_FILE_BYTES // IO_CHUNK_BYTES}):
            file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
"""


def requested_load() -> int:
    """How many spinning processes the environment asks for (0: no load)."""
    value = os.environ.get(LOAD_ENV, "").strip()
    if not value:
        return 0
    try:
        spinners = int(value)
    except ValueError:
        raise SystemExit(f"{LOAD_ENV}={value!r}: expected a number of busy processes") from None
    if spinners < 0:
        raise SystemExit(f"{LOAD_ENV}={value!r}: expected 0 or more busy processes")
    return spinners


class Load:
    """`spinners` CPU-bound processes and one I/O-bound one, until `stop()`."""

    def __init__(self, spinners: int, log_dir: Path | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="consortium-load-")
        logs = log_dir or Path(self._dir.name)
        self.children: list[ChildProcess] = []
        try:
            for number in range(spinners):
                self.children.append(
                    ChildProcess(
                        f"load-cpu-{number}",
                        [sys.executable, "-c", _SPIN],
                        logs / f"load-cpu-{number}.log",
                    )
                )
            target = Path(self._dir.name) / "io-load.bin"
            self.children.append(
                ChildProcess(
                    "load-io", [sys.executable, "-c", _WRITE, str(target)], logs / "load-io.log"
                )
            )
        except BaseException:
            self.stop()
            raise

    def running(self) -> list[int]:
        return [child.pid for child in self.children if child.poll() is None]

    def stop(self) -> None:
        for child in self.children:
            child.stop(timeout_s=5.0)
        self._dir.cleanup()

    def describe(self) -> str:
        pids = ", ".join(str(pid) for pid in self.running())
        return (
            f"test load: {len(self.children) - 1} spinning and 1 fsync-writing process "
            f"(pids {pids}) beside the suite on {os.cpu_count()} cores"
        )
