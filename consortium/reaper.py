"""A watcher that stops a data dir's processes once their owner is gone, however it went.

`coordinator serve` and `client join` each start one (`Reaper.start`) before any other
child. It runs in a session of its own (a signal to the owner's process group does not
reach it) and blocks reading a pipe whose only writer is its owner: the kernel closes
that pipe when the owner ends for any reason, `kill -9` included, and the reaper then
stops every process marked as the dir's (`consortium/leftovers.py`) and exits. A normal
stop closes the pipe too, after the children stopped; the reaper then finds nothing.

`python -m consortium.reaper OWNER_DIR` imports only the standard library and psutil,
so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from consortium.leftovers import remove_own_dir, stop_leftovers

log = logging.getLogger(__name__)

EXIT_WAIT_S = 15.0  # the reaper's own stop: SIGTERM grace, then SIGKILL grace


class Reaper:
    """The owner's end of a running reaper: closing it (or dying) sets the reaper off."""

    def __init__(self, process: subprocess.Popen[bytes], pipe: IO[bytes]) -> None:
        self.process = process
        self._pipe = pipe

    @classmethod
    def start(
        cls,
        owner_dir: Path,
        log_path: Path,
        cmdline_marks: Sequence[str] = (),
        remove: Sequence[Path] = (),
    ) -> Reaper:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-P",  # not the current dir's modules first (`-m` puts it on sys.path)
                    "-m",
                    "consortium.reaper",
                    str(owner_dir.resolve()),
                    *cmdline_marks,
                    *(f"--remove={path}" for path in remove),
                ],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        assert process.stdin is not None
        return cls(process, process.stdin)

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        """Owner stopping normally: the reaper sweeps (finding what outlived the stop,
        if anything) and exits."""
        if not self._pipe.closed:
            self._pipe.close()
        try:
            self.process.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("the reaper (pid %d) did not exit; killing it", self.process.pid)
            self.process.kill()
            self.process.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m consortium.reaper")
    parser.add_argument("owner_dir", type=Path)
    parser.add_argument("cmdline_marks", nargs="*", metavar="CMDLINE_MARK")
    parser.add_argument(
        "--remove", action="append", default=[], type=Path, metavar="DIR",
        help="a dir of the owner's outside its own (Ray's files in /tmp), removed once "
        "its processes are stopped",
    )  # fmt: skip
    options = parser.parse_args(argv)
    owner_dir, marks = options.owner_dir, options.cmdline_marks
    # EOF comes when the owner closes its end or dies; nothing is ever written.
    while os.read(sys.stdin.fileno(), 4096):
        pass
    stopped = stop_leftovers(owner_dir, cmdline_marks=marks)
    for process in stopped:
        name = process.info.get("name", "a process")
        print(f"reaper: stopped {name} (pid {process.pid}) of {owner_dir}", flush=True)
    for path in options.remove:
        if remove_own_dir(path):
            print(f"reaper: removed {path} of {owner_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
