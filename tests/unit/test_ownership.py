"""One owner per data dir (`consortium/ownership.py`): the lock, the sweep of a dead
owner's leftovers, and the reaper that outlives a `kill -9` of its owner. Real
processes throughout; each test ends the ones it started."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from consortium.errors import ConflictError
from consortium.leftovers import find_leftovers, owner_env
from consortium.ownership import DataDirInUseError, claim
from consortium.processes import pid_alive
from tests.helpers import wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
NOBODY = 65534


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed (by pid, if still running) at the end."""
    popens: list[subprocess.Popen[bytes]] = []
    yield popens
    for popen in popens:
        if popen.poll() is None:
            popen.kill()
        popen.wait()
        if popen.stdout is not None:
            popen.stdout.close()


def sleeper(started: list[subprocess.Popen[bytes]], env: dict[str, str]) -> subprocess.Popen[bytes]:
    popen = subprocess.Popen(SLEEPER, env={**os.environ, **env})
    started.append(popen)
    return popen


def test_a_second_owner_is_refused_naming_the_first_until_it_lets_go(tmp_path: Path) -> None:
    with ExitStack() as first:
        claim(tmp_path, "coordinator serve", first)
        with ExitStack() as second, pytest.raises(DataDirInUseError) as refused:
            claim(tmp_path, "coordinator serve", second)
        assert isinstance(refused.value, ConflictError)  # exit code CONFLICT
        assert f"pid {os.getpid()}" in str(refused.value)
        assert str(tmp_path) in str(refused.value)
    with ExitStack() as later:
        claim(tmp_path, "coordinator serve", later)  # released: taken again


def test_leftovers_of_a_previous_owner_are_stopped_and_logged_and_nothing_else(
    tmp_path: Path,
    started: list[subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mine = tmp_path / "mine"
    other = tmp_path / "other"
    leftover = sleeper(started, owner_env(mine))
    unmarked = sleeper(started, {})
    elsewhere = sleeper(started, owner_env(other))
    wait_for("the leftover's mark", lambda: bool(find_leftovers(mine)))
    with caplog.at_level(logging.WARNING), ExitStack() as stack:
        claim(mine, "coordinator serve", stack)
        assert leftover.wait(timeout=10) == -signal.SIGTERM
        assert unmarked.poll() is None and elsewhere.poll() is None
    assert f"(pid {leftover.pid}), left running for {mine}" in caplog.text


# A marked process whose child runs with an environment of its own (as Ray's raylet
# starts its agents): prints the child's pid, then waits.
PARENT_OF_UNMARKED = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], env={"PATH": "/usr/bin"}
    )
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


def test_unmarked_descendants_and_command_line_marks_are_found_too(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    mine = tmp_path / "mine"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_OF_UNMARKED],
        env={**os.environ, **owner_env(mine)},
        stdout=subprocess.PIPE,
    )
    started.append(parent)
    assert parent.stdout is not None
    unmarked_child = int(parent.stdout.readline())
    mark = f"{tmp_path}/ray-temp/"
    named = subprocess.Popen([*SLEEPER, mark])  # no owner env; its argv names our temp dir
    started.append(named)
    try:
        with ExitStack() as stack:
            claim(mine, "client join", stack, cmdline_marks=(mark,))
            assert parent.wait(timeout=10) == -signal.SIGTERM
            assert named.wait(timeout=10) == -signal.SIGTERM
            wait_for("the unmarked child to end", lambda: not pid_alive(unmarked_child), 10)
    finally:
        if pid_alive(unmarked_child):
            os.kill(unmarked_child, signal.SIGKILL)


# A stand-in owner: claims a dir, starts a marked child, says so, then waits forever.
OWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    from contextlib import ExitStack
    from pathlib import Path
    from consortium.leftovers import owner_env
    from consortium.ownership import claim
    import os
    owner_dir = Path(sys.argv[1])
    stack = ExitStack()
    claim(owner_dir, "coordinator serve", stack, remove=[Path(p) for p in sys.argv[2:]])
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, **owner_env(owner_dir)},
        start_new_session=True,
    )
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


def test_the_reaper_stops_the_children_of_an_owner_killed_with_sigkill(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path)], stdout=subprocess.PIPE, cwd=os.getcwd()
    )
    started.append(owner)
    assert owner.stdout is not None
    child = int(owner.stdout.readline())
    reapers = [
        p for p in psutil.Process(owner.pid).children() if "consortium.reaper" in p.cmdline()
    ]
    assert len(reapers) == 1 and pid_alive(child)
    owner.send_signal(signal.SIGKILL)  # no chance to stop anything itself
    owner.wait()
    try:
        wait_for("the reaper to stop the dead owner's child", lambda: not pid_alive(child), 20)
        wait_for("the reaper to exit", lambda: not pid_alive(reapers[0].pid), 20)
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)
    assert "reaper: stopped python" in (tmp_path / "logs" / "reaper.log").read_text()


def test_the_reaper_removes_a_killed_owners_dirs_outside_its_own_and_only_those(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    """Ray's files in /tmp (consortium/ray_env.py): a killed owner cannot remove them.
    A dir of another user's or a link under such a name is left alone."""
    owner_dir, ray_dir, theirs, link = (tmp_path / n for n in ("owner", "ray", "theirs", "link"))
    (ray_dir / "session" / "sockets").mkdir(parents=True)
    (ray_dir / "session" / "sockets" / "raylet").write_text("x")
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    target = tmp_path / "target"
    target.mkdir()
    link.symlink_to(target)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(owner_dir), str(ray_dir), str(theirs), str(link)],
        stdout=subprocess.PIPE,
    )
    started.append(owner)
    assert owner.stdout is not None
    child = int(owner.stdout.readline())
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    try:
        wait_for("the reaper to remove the dead owner's Ray dir", lambda: not ray_dir.exists(), 20)
        wait_for("the reaper to stop the dead owner's child", lambda: not pid_alive(child), 20)
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)
    assert theirs.is_dir() and link.is_symlink() and target.is_dir()
    assert f"reaper: removed {ray_dir}" in (owner_dir / "logs" / "reaper.log").read_text()
    with ExitStack() as successor:
        claim(tmp_path, "coordinator serve", successor)  # the kernel dropped the lock
