"""Child processes that are ours to stop: started in their own process group.

Flower's SuperLink and SuperNode each spawn helpers (SuperExec, ServerApp and
ClientApp processes). Starting a child with `start_new_session=True` makes it
the leader of a fresh process group, so stopping the group stops exactly the
processes we started and their descendants, and nothing else. Process trees
come from psutil, which also refuses to signal a pid reused since it was listed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import psutil

from consortium import node_cgroup

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
WAIT_POLL_S = 0.02  # SIGKILLed descendants (not our children: nothing to wait on)


def venv_executable(name: str) -> str:
    """A console script installed beside the running interpreter (same venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def logged_since(log_path: Path, since: int, text: str) -> bool:
    """Whether `text` was written to `log_path` from offset `since` on."""
    try:
        with log_path.open("rb") as handle:
            handle.seek(since)
            return text.encode() in handle.read()
    except OSError:
        return False


class ChildProcess:
    """A child started in its own process group, its output sent to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
        cgroup: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.cgroup = cgroup  # a sandboxed child's (consortium/node_cgroup.py)
        self._stopped = False
        self._stop_lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log_path.open("ab")
        self._log_start = self._log_file.tell()  # the log is appended to across starts
        full_env = dict(os.environ)
        # Flower starts its helpers (flower-superexec, flwr-serverapp) by name.
        venv_bin = str(Path(sys.executable).parent)
        full_env["PATH"] = venv_bin + os.pathsep + full_env.get("PATH", "")
        full_env.update(env or {})
        log.debug("starting %s: %s (log: %s)", name, " ".join(argv), log_path)
        try:
            self.popen = subprocess.Popen(
                list(argv),
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        except BaseException:
            self._log_file.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The child's exit code once it has ended (negative: the signal), else None.

        It is not reaped here, only by `stop`: until then the dead child keeps its pid,
        which is also its process group's id, so no other process can be given that id
        and `stop` signals only the group this child led. Reaped at once (as
        `Popen.poll` does) and stopped after a supervisor's backoff, its pid could have
        gone to another user's session leader, and root's `stop` ended that session.
        """
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            ended = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped by a concurrent `stop`: its code comes next
            deadline = time.monotonic() + 1.0
            while self.popen.returncode is None and time.monotonic() < deadline:
                time.sleep(0.001)
            return self.popen.poll()
        if ended is None or ended.si_pid == 0:
            return None
        if ended.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return -ended.si_status
        return ended.si_status

    def wait_exit(self, timeout_s: float) -> int | None:
        """`poll` until the child ends or `timeout_s` passes; it is not reaped."""
        deadline = time.monotonic() + timeout_s
        while (code := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(WAIT_POLL_S)
        return code

    def logged(self, text: str) -> bool:
        """Whether this child (not an earlier one on the same log) wrote `text`."""
        return logged_since(self.log_path, self._log_start, text)

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
        A second call does nothing (an exit stack and a supervisor may both stop it).
        """
        with self._stop_lock:  # a supervisor's and an exit stack's stops may meet
            if self._stopped:
                return
            self._stopped = True
        # Reaped already (someone called Popen's own wait): its pid, and so its group's
        # id, may be another process's now. Nothing is signalled by pid then.
        reaped = self.popen.returncode is not None
        descendants = [] if reaped else descendants_of(self.popen.pid)
        if self.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            if self.wait_exit(timeout_s) is None:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
        if not reaped:
            # Helpers in the group may outlive the leader; they are ours, end them too.
            # The leader is not reaped yet, so the group's id is still this child's.
            _signal_group(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout_s)
        # psutil checks each process's start time before signalling, so a pid reused
        # since we listed it is never hit.
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                process.kill()
        for process in wait_gone(descendants, timeout_s):
            log.warning("%s: descendant %d outlived SIGKILL", self.name, process.pid)
        if self.cgroup is not None:  # what left the tree (a detached session) is in it
            node_cgroup.kill(self.cgroup, timeout_s)
        self._log_file.close()


def stop_in_parallel(stops: Iterable[Callable[[], None]]) -> None:
    """Run each stop in a thread of its own and wait for all of them.

    Independent children (a SuperLink and a Ray head, a SuperNode and a Ray worker
    that drains for seconds) then stop within the slowest one's timeout, not the sum,
    which keeps a stop within what a supervisor or Ctrl-C waits. Every stop runs even
    when one fails; the first failure is raised once all have ended.
    """
    failures: list[BaseException] = []

    def run(stop: Callable[[], None]) -> None:
        try:
            stop()
        except BaseException as error:
            failures.append(error)

    threads = [
        threading.Thread(target=run, args=(stop,), name=f"stop-{index}")
        for index, stop in enumerate(stops)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def stop_processes(children: Iterable[ChildProcess]) -> None:
    """Stop several children in parallel (see `stop_in_parallel`)."""
    stop_in_parallel([child.stop for child in children])


def descendants_of(pid: int) -> list[psutil.Process]:
    """All live descendants of `pid` (empty when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def descendant_pids(pid: int) -> list[int]:
    """The pids of all live descendants of `pid` (empty when it is gone)."""
    return [process.pid for process in descendants_of(pid)]


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listens_on(pid: int, port: int) -> bool:
    """Whether `pid` itself holds a listening TCP socket on `port`."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(_listening_port(c) == port for c in connections)


def port_holder(port: int) -> int | None:
    """The pid listening on TCP `port`, when this user may see it."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for connection in connections:
        if _listening_port(connection) == port:
            return connection.pid
    return None


def _listening_port(connection: object) -> int | None:
    """The local port of a listening socket (psutil's sconn or pconn), else None."""
    port = getattr(getattr(connection, "laddr", None), "port", None)
    listening = getattr(connection, "status", None) == psutil.CONN_LISTEN
    return port if listening and isinstance(port, int) else None


def wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until none of `processes` runs; returns those still running at the timeout.

    Not `psutil.wait_procs`: these are not our children, so a killed one stays a
    zombie until whoever adopted it reaps it, and a zombie runs nothing.
    """
    deadline = time.monotonic() + timeout_s
    running = [process for process in processes if is_live(process)]
    while running and time.monotonic() < deadline:
        time.sleep(WAIT_POLL_S)
        running = [process for process in running if is_live(process)]
    return running


def is_live(process: psutil.Process) -> bool:
    """Running and not a zombie (killed, not yet reaped: it runs nothing)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
