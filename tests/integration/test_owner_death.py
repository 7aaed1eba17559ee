"""A killed `coordinator serve` or `client join` takes its children along, and a second
one on the same dir is refused: the attacks of issue 15 part 1, on real processes.

`kill -9` leaves the owner no chance to stop anything; its reaper (consortium/reaper.py)
must. What a dead owner left behind anyway is stopped by its successor before it starts,
and the successor's readiness is its own SuperLink's, never an old one's port. (A job
whose coordinator is killed mid-run: tests/chaos/test_chaos.py, whose first fault it is.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from consortium.errors import ChildProcessFailedError
from consortium.exit_codes import ExitCode
from consortium.leftovers import owner_env
from consortium.processes import descendant_pids, pid_alive
from consortium.ray_env import short_temp_dir
from coordinator.data_dir import DataDir
from coordinator.federated.superlink import SuperLink
from tests.conftest import Processes
from tests.helpers import (
    join_site,
    run_cli,
    start_coordinator,
    wait_for,
    write_partitions,
)

GONE_TIMEOUT_S = 60.0  # the reaper: SIGTERM, 5 s, SIGKILL, on a loaded machine


def names_of(pids: list[int]) -> set[str]:
    names = set()
    for pid in pids:
        try:
            names.add(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:
            continue
    return names


def kill_and_wait_for_its_tree(processes: Processes, pid: int) -> list[int]:
    """SIGKILL `pid` alone; returns its descendants once every one of them is gone."""
    processes.remember_descendants()
    tree = descendant_pids(pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(
        f"the children of killed pid {pid} to end",
        lambda: not [p for p in tree if pid_alive(p)],
        GONE_TIMEOUT_S,
    )
    return tree


def test_killed_coordinator_and_site_leave_nothing_and_a_second_owner_is_refused(
    tmp_path: Path, processes: Processes
) -> None:
    data_dir = tmp_path / "coordinator"
    start_coordinator(processes, data_dir, ray=True)
    serve = processes.children[-1]
    tree = names_of(descendant_pids(serve.pid))
    assert any("flower-superlink" in n for n in tree), tree
    assert any("gcs_server" in n for n in tree), tree  # Ray's head processes, not only `ray`
    assert any("consortium.reaper" in n for n in tree), tree

    second = run_cli("coordinator", "serve", "--data-dir", str(data_dir), "--insecure", "--no-ray")
    assert second.returncode == ExitCode.CONFLICT, second.stderr
    assert f"in use by another coordinator serve (pid {serve.pid}" in second.stderr
    assert DataDir(data_dir).address_file.exists()  # the running one lost nothing

    assert short_temp_dir(data_dir).is_dir()
    killed = kill_and_wait_for_its_tree(processes, serve.pid)
    assert len(killed) >= 4
    # Ray's files in /tmp too: the reaper removes them once it stopped the tree.
    ray_dir = short_temp_dir(data_dir)
    wait_for("the killed coordinator's Ray dir to go", lambda: not ray_dir.exists())

    # What a dead owner's reaper could not stop (here: a stand-in with its mark) is
    # stopped by the next owner before it starts anything.
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, **owner_env(data_dir)},
    )
    try:
        address = start_coordinator(processes, data_dir, name="coordinator-2")
        assert leftover.wait(timeout=10) == -signal.SIGTERM
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
    assert (
        f"(pid {leftover.pid}), left running for {data_dir.resolve()}"
        in (processes.log_dir / "coordinator-2.log").read_text()
    )

    (data,) = write_partitions(tmp_path, ["alpha"])
    state_dir = tmp_path / "alpha-state"
    join = join_site(processes, "alpha", data, state_dir, coordinator=address, institution="alpha")
    wait_for("alpha's SuperNode", (state_dir / "supernode.log").exists)
    wait_for(
        "alpha's SuperNode process",
        lambda: any("flower-supernode" in n for n in names_of(descendant_pids(join.pid))),
    )
    again = run_cli(
        "client", "join", "--insecure", "--coordinator", address, "--institution", "alpha",
        "--data", str(data), "--state-dir", str(state_dir), "--no-ray",
    )  # fmt: skip
    assert again.returncode == ExitCode.CONFLICT, again.stderr
    assert f"in use by another client join (pid {join.pid}" in again.stderr
    kill_and_wait_for_its_tree(processes, join.pid)


def test_superlink_readiness_is_its_own_port_not_an_old_listener(tmp_path: Path) -> None:
    """An old SuperLink still holding the port made a restarted coordinator say ready
    while its own SuperLink had died on `address already in use`."""
    with socket.socket() as old:
        old.bind(("127.0.0.1", 0))
        old.listen()
        port = old.getsockname()[1]
        superlink = SuperLink(DataDir(tmp_path), "127.0.0.1", port, None)
        try:
            with pytest.raises(ChildProcessFailedError) as failed:
                superlink.wait_ready(60)
        finally:
            superlink.stop()
    assert f"port {port} is held by pid {os.getpid()}" in str(failed.value)
