"""A stopped child's process group is the one it led, never a stranger's
(consortium/processes.py). The attack: a supervised child dies (a local user can make a
SuperNode exit by taking its port), and the supervisor stops it after its backoff. Had
the dead child been reaped when the death was noticed, its pid could meanwhile go to
another user's session leader, and root's `stop` would have ended that session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from consortium.processes import ChildProcess

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


@contextlib.contextmanager
def session_leader_on(pid: int) -> Iterator[subprocess.Popen[bytes]]:
    """A new session (another user's, as far as the child can tell) started on `pid`
    if the kernel will give it out: as root, by setting the last pid handed out."""
    with contextlib.suppress(OSError):
        NS_LAST_PID.write_text(str(pid - 1))
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield victim
    finally:
        victim.kill()
        victim.wait()


def ended(child: ChildProcess) -> int:
    deadline = time.monotonic() + 30
    while (code := child.poll()) is None:
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.01)
    return code


def test_a_dead_child_keeps_its_pid_until_stopped_and_stop_spares_other_sessions(
    tmp_path: Path,
) -> None:
    child = ChildProcess("short-lived", ["sh", "-c", "exit 3"], tmp_path / "child.log")
    try:
        assert ended(child) == 3
        assert child.poll() == 3  # asked again (a supervisor's next look): the same answer
        # Noticed but not reaped: the pid, and so the group id, are still the child's.
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        with session_leader_on(child.pid) as victim:
            assert victim.pid != child.pid
            child.stop()
            assert victim.poll() is None, "stop ended another session"
    finally:
        child.stop()
    assert child.popen.returncode == 3  # reaped by stop


def test_a_killed_child_reports_the_signal_as_popen_does(tmp_path: Path) -> None:
    child = ChildProcess("killed", ["sleep", "300"], tmp_path / "child.log")
    try:
        os.kill(child.pid, 9)
        assert ended(child) == -9
    finally:
        child.stop()
    assert child.popen.returncode == -9


def test_wait_exit_waits_for_the_end_without_reaping(tmp_path: Path) -> None:
    child = ChildProcess("sleeper", ["sleep", "0.2"], tmp_path / "child.log")
    try:
        assert child.wait_exit(0.01) is None
        assert child.wait_exit(30.0) == 0
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        child.stop()
