"""Keys and state at rest are the owner's alone, and no secret is in a command line.

A real consortium (the operator's and the site's commands as a person runs them,
Ray on, one site joined) leaves every dir 0700 and every file 0600 under the
coordinator's data dir and the site's state dir, the SuperLink's database included;
another local user cannot read them, nor reach Ray's files (sockets included) in /tmp;
and no process we started, nor any of their descendants, carries the Ray token or
private key material in its argv."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortium.ray_env import ray_started, ray_temp_dir, short_temp_dir
from consortium.sandbox import pool_uid
from coordinator.local_consortium import LocalConsortium
from tests.conftest import Processes
from tests.helpers import START_TIMEOUT_S, TEST_PROFILE, run_cli, wait_for, write_partitions


@pytest.fixture(scope="module")
def open_root() -> Iterator[Path]:
    """A world-traversable dir (pytest's own tmp dirs are 0700, which would hide any
    file below them from another user whatever its mode)."""
    root = Path(tempfile.mkdtemp(prefix="consortium-at-rest-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def other_user() -> Iterator[str]:
    name = f"probe{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--no-create-home", "--system", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


def modes_under(root: Path) -> dict[Path, int]:
    found = {root: stat.S_IMODE(root.lstat().st_mode)}
    for path in root.rglob("*"):
        if not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):  # a child's temporary file
                found[path] = stat.S_IMODE(path.lstat().st_mode)
    return found


def reads_as(user: str, path: Path) -> bool:
    done = subprocess.run(
        ["runuser", "-u", user, "--", "cat", str(path)], capture_output=True, check=False
    )
    return done.returncode == 0


def key_material(roots: list[Path]) -> list[str]:
    """The base64 body lines of every private key file (PEM and OpenSSH)."""
    lines = []
    for root in roots:
        for path in root.rglob("*.key"):
            for line in path.read_text().splitlines():
                if line and not line.startswith("-----"):
                    lines.append(line)
    return lines


def command_lines(processes: Processes) -> dict[int, str]:
    processes.remember_descendants()
    found = {}
    for pid in processes.seen_pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


@pytest.fixture(scope="module")
def started(open_root: Path) -> Iterator[Processes]:
    processes = Processes(open_root / "logs")
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def joined(started: Processes, open_root: Path) -> LocalConsortium:
    """init, keygen, onboard through the real commands; serve and join with Ray."""
    processes = started
    consortium = LocalConsortium(
        open_root, ray=True, env=TEST_PROFILE, launcher=processes, start_timeout_s=START_TIMEOUT_S
    )
    data_dir = str(consortium.data_dir)
    done = run_cli("coordinator", "init", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    state_dir = consortium.state_dir("alpha")
    done = run_cli("client", "keygen", "--institution", "alpha", "--state-dir", str(state_dir))
    assert done.returncode == 0, done.stderr
    consortium.serve()
    done = run_cli(
        "coordinator", "onboard", "alpha", "--data-dir", data_dir,
        "--request", str(state_dir / "request"), "--out", str(consortium.bundle_dir("alpha")),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    consortium.wait_for_supernode_keys()
    [data] = write_partitions(open_root, ["alpha"])
    consortium.join("alpha", data)
    consortium.wait_for_online(1)
    # Joined, not only starting: a `client join` stopped while its `ray start` still
    # starts takes longer than a test waits for it.
    worker_log = state_dir / "logs" / "ray-worker.log"
    consortium.wait(
        "the Ray worker to join",
        lambda: ray_started(worker_log, since=0),
    )
    return consortium


def test_state_and_keys_are_owner_only_after_serve_and_join(
    joined: LocalConsortium, other_user: str
) -> None:
    roots = [joined.data_dir, joined.state_dir("alpha"), joined.bundle_dir("alpha")]
    modes = {path: mode for root in roots for path, mode in modes_under(root).items()}
    assert joined.paths.superlink_db in modes and joined.paths.state_db in modes
    loose = {
        str(path): oct(mode)
        for path, mode in modes.items()
        if mode != (0o700 if path.is_dir() else 0o600)
    }
    assert loose == {}
    # The probe can read what is not ours to protect, so a refusal below means the modes.
    control = joined.work_dir / "public.txt"
    control.write_text("readable\n")
    control.chmod(0o644)
    assert reads_as(other_user, control)
    secrets = [
        joined.paths.state_db,
        joined.paths.superlink_db,
        joined.paths.pki_dir / "ray-token",
        joined.paths.pki_dir / "ca.key",
        joined.paths.signing_key,
        joined.state_dir("alpha") / "supernode.key",
        joined.bundle_dir("alpha") / "ray-token",
    ]
    readable = [str(path) for path in secrets if reads_as(other_user, path)]
    assert readable == []


def test_no_child_has_a_secret_in_its_command_line(
    joined: LocalConsortium, started: Processes
) -> None:
    token = (joined.paths.pki_dir / "ray-token").read_text().strip()
    material = key_material([joined.data_dir, joined.state_dir("alpha")])
    assert token and material
    lines = command_lines(started)
    assert any("gcs_server" in line or "raylet" in line for line in lines.values())
    leaks = {
        pid: line[:200]
        for pid, line in lines.items()
        if token in line or any(chunk in line for chunk in material)
    }
    assert leaks == {}


def _has_sockets(ray_dir: Path) -> bool:
    return any(ray_dir.glob("session_2*/sockets"))


def test_another_user_can_neither_plant_nor_read_in_rays_dirs(
    joined: LocalConsortium, other_user: str
) -> None:
    """Ray makes its temp dir and every dir below it world-writable (0777, no sticky
    bit), the one with the raylet's and object store's sockets included: another user
    could delete a socket and listen in its place. Each Ray temp dir is inside a 0700
    dir of ours, so the attempt fails for the coordinator's head and the site's node (run
    as root, each hands its dir to the pool user its Ray processes run as)."""
    ray_user = pool_uid() if os.geteuid() == 0 else os.geteuid()
    for anchor in (joined.data_dir, joined.state_dir("alpha")):
        private = short_temp_dir(anchor)
        found = private.lstat()
        assert stat.S_IMODE(found.st_mode) == 0o700 and found.st_uid == ray_user
        ray_dir = ray_temp_dir(anchor)
        wait_for(f"Ray's sockets in {ray_dir}", functools.partial(_has_sockets, ray_dir))
        [sockets] = ray_dir.glob("session_2*/sockets")
        assert stat.S_IMODE(sockets.stat().st_mode) == 0o777  # Ray's choice, hence ours
        planted = sockets / "raylet-planted"
        done = subprocess.run(
            ["runuser", "-u", other_user, "--", "touch", str(planted)],
            capture_output=True,
            check=False,
        )
        assert done.returncode != 0 and not planted.exists()
        done = subprocess.run(
            ["runuser", "-u", other_user, "--", "ls", str(sockets)],
            capture_output=True,
            check=False,
        )
        assert done.returncode != 0 and b"Permission denied" in done.stderr


def test_rays_dirs_go_when_serve_and_join_stop(joined: LocalConsortium) -> None:
    """Last in this module: it stops the consortium the tests above read."""
    anchors = (joined.data_dir, joined.state_dir("alpha"))
    assert all(short_temp_dir(anchor).is_dir() for anchor in anchors)
    joined.stop()
    assert [short_temp_dir(a) for a in anchors if short_temp_dir(a).exists()] == []
