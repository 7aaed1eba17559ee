"""Child processes that are ours to stop: started in their own process group.

Flower's SuperLink and SuperNode each spawn helpers (SuperExec, ServerApp and
ClientApp processes). Starting a child with `start_new_session=True` makes it
the leader of a fresh process group, so stopping the group stops exactly the
processes we started and their descendants, and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


def venv_executable(name: str) -> str:
    """A console script installed beside the running interpreter (same venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class ChildProcess:
    """A child started in its own process group, its output sent to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log_path.open("ab")
        full_env = dict(os.environ)
        # Flower starts its helpers (flower-superexec, flwr-serverapp) by name.
        venv_bin = str(Path(sys.executable).parent)
        full_env["PATH"] = venv_bin + os.pathsep + full_env.get("PATH", "")
        full_env.update(env or {})
        log.debug("starting %s: %s (log: %s)", name, " ".join(argv), log_path)
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the child's group, then SIGKILL what is left after the timeout.

        Flower detaches some helpers into sessions of their own, so the
        descendants are collected first and ended as well: all were started by us.
        """
        descendants = descendant_pids(self.popen.pid)
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
        # Helpers in the group may outlive the leader; they are ours, end them too.
        _signal_group(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout_s)
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._log_file.close()


def descendant_pids(pid: int) -> list[int]:
    """All live descendants of `pid`, from /proc (Linux); empty elsewhere."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
