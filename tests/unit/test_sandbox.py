"""The pool user's sandbox (consortium/sandbox.py), attacked from inside: code running
in it, as a pool member's code would on a site's Ray node, tries to read the site's
keys and data, to gain privileges and to see past what was exposed to it.

The sandbox needs root (as `client join` does to use it); CI runs as root. Off root,
`pool_sandbox` gives none and the node runs as the joining user, which each test
checks there instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from client.ray_worker import pool_sandbox
from consortium import node_cgroup
from consortium.aggregation.kernel_cache import KERNELS, numba_cache_subpath
from consortium.aggregation.streaming import StreamingMean
from consortium.leftovers import (
    find_leftovers,
    own_uids,
    owner_env,
    remove_own_dir,
    stop_leftovers,
)
from consortium.processes import ChildProcess, descendant_pids, pid_alive
from consortium.ray_env import prepare_ray_temp_dir, short_temp_dir
from consortium.sandbox import (
    POOL_USER,
    Sandbox,
    SandboxSetupError,
    ensure_pool_user,
    interpreter_paths,
    new_private_dir,
    pool_uid,
    remove_private_dir,
)
from coordinator.pretraining.engine import DRIVER_KERNEL_CACHE, driver_sandbox

AS_ROOT = os.geteuid() == 0

# What the sandboxed code reports: who it is, what it could read, list and write.
PROBE = """
import json, os, sys
def attempt(action, path):
    try:
        result = action(path)
        return result if result is not None else "ok"
    except OSError as error:
        return type(error).__name__
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "no_new_privs": status["NoNewPrivs"].strip(), "caps": status["CapEff"].strip(),
    "read": {p: attempt(lambda p: open(p).read(), p) for p in json.loads(sys.argv[1])},
    "listed": {p: attempt(lambda p: sorted(os.listdir(p)), p) for p in json.loads(sys.argv[2])},
    "wrote": {p: attempt(lambda p: open(p, "w").close(), p) for p in json.loads(sys.argv[3])},
}))
"""


@pytest.fixture
def site_root() -> Iterator[Path]:
    """A dir other users may enter (pytest's tmp_path lies below a 0700 dir, which would
    keep the pool user out of everything in it, hidden or not), removed afterwards,
    with the Ray dir of its site's state."""
    root = Path(tempfile.mkdtemp(prefix="consortium-sandbox-test-"))
    try:
        yield root
    finally:
        remove_own_dir(short_temp_dir(root / "state"))
        shutil.rmtree(root)


def site_layout(root: Path) -> dict[str, Path]:
    """A site's state dir (a 0600 key) and data dir (left world-readable, as data often
    is), a world-readable file beside them, and a closed dir holding a tool to expose
    and a secret beside it."""
    root.chmod(0o755)
    state, data, public, closed = (root / n for n in ("state", "data", "public", "closed"))
    for path in (state, data, public, closed / "tool"):
        path.mkdir(parents=True, mode=0o755)
    state.chmod(0o700)
    closed.chmod(0o700)
    (state / "institution-signing.key").write_text("key")
    (state / "institution-signing.key").chmod(0o600)
    for path in (
        data / "patients.csv",
        public / "readme",
        closed / "tool" / "run",
        closed / "secret",
    ):
        path.write_text(path.name)
        path.chmod(0o644)
    return {"state": state, "data": data, "public": public, "closed": closed}


def sandbox_for(layout: dict[str, Path], *hidden: Path) -> Sandbox:
    """As `client join` makes it for its Ray node (hiding `hidden` too)."""
    home = prepare_ray_temp_dir(layout["state"]).parent
    sandbox = Sandbox(
        ensure_pool_user(),
        home,
        hide=(layout["state"], layout["data"], *hidden),
        expose=(*interpreter_paths(), layout["closed"] / "tool"),
    )
    sandbox.prepare()
    return sandbox


def probe(
    sandbox: Sandbox, read: list[Path], listed: list[Path], wrote: list[Path]
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-c",
        PROBE,
        *(json.dumps(list(map(str, p))) for p in (read, listed, wrote)),
    ]
    done = subprocess.run(
        sandbox.wrap(argv),
        capture_output=True,
        text=True,
        env={**os.environ, **sandbox.env()},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_code_in_the_sandbox_reads_neither_the_sites_keys_nor_its_data(site_root: Path) -> None:
    layout = site_layout(site_root)
    key, patients = layout["state"] / "institution-signing.key", layout["data"] / "patients.csv"
    if not AS_ROOT:
        assert pool_sandbox(layout["state"], [layout["data"]]) is None
        return
    sandbox = sandbox_for(layout)
    readme = layout["public"] / "readme"
    seen = probe(sandbox, [key, patients, readme], [layout["state"], layout["data"]], [])
    user = ensure_pool_user()
    # Its own group alone: the user database gives it no other (root's are dropped).
    assert (seen["uid"], seen["gid"], seen["groups"]) == (user.uid, user.gid, [user.gid])
    # The data file is world-readable: only the tmpfs over its dir keeps it out of reach
    # (the file beside it, not hidden, is read).
    assert seen["read"] == {
        str(key): "PermissionError",
        str(patients): "PermissionError",
        str(readme): "readme",
    }
    assert set(seen["listed"].values()) == {"PermissionError"}
    # Outside the sandbox nothing changed: its mounts live in its own namespace.
    assert patients.read_text() == "patients.csv"
    assert str(layout["data"]) not in Path("/proc/self/mountinfo").read_text()


def test_code_in_the_sandbox_has_no_privilege_and_cannot_gain_one(site_root: Path) -> None:
    layout = site_layout(site_root)
    if not AS_ROOT:
        assert pool_sandbox(layout["state"], []) is None
        return
    seen = probe(sandbox_for(layout), [Path("/etc/shadow")], [], [Path("/etc/consortium-owned")])
    assert seen["caps"] == "0000000000000000" and seen["no_new_privs"] == "1"
    assert seen["read"] == {"/etc/shadow": "PermissionError"}
    assert seen["wrote"] == {"/etc/consortium-owned": "PermissionError"}
    assert not Path("/etc/consortium-owned").exists()


def test_an_exposed_path_is_reached_through_a_closed_dir_and_nothing_beside_it(
    site_root: Path,
) -> None:
    """The interpreter may lie below a dir other users cannot enter (a pyenv under /root):
    what is exposed is reachable, read-only, and the rest of that dir is not there."""
    layout = site_layout(site_root)
    if not AS_ROOT:
        assert pool_sandbox(layout["state"], []) is None
        return
    closed, tool = layout["closed"], layout["closed"] / "tool"
    seen = probe(
        sandbox_for(layout),
        [tool / "run", closed / "secret"],
        [closed],
        [tool / "planted", closed / "planted"],
    )
    assert seen["read"] == {str(tool / "run"): "run", str(closed / "secret"): "FileNotFoundError"}
    assert seen["listed"] == {str(closed): ["tool"]}
    assert seen["wrote"] == {str(tool / "planted"): "OSError", str(closed / "planted"): "OSError"}
    assert sorted(p.name for p in closed.iterdir()) == ["secret", "tool"]  # the host's view


def test_a_hidden_dir_inside_an_exposed_path_stays_hidden(site_root: Path) -> None:
    """A data dir kept inside the checkout, where the checkout is exposed (it lies below
    a closed dir, as a clone under /root does): the exposure does not bring it back."""
    layout = site_layout(site_root)
    inside = layout["closed"] / "tool" / "data"
    inside.mkdir(mode=0o755)
    (inside / "rows.csv").write_text("rows")
    (inside / "rows.csv").chmod(0o644)
    if not AS_ROOT:
        assert pool_sandbox(layout["state"], [inside]) is None
        return
    tool = layout["closed"] / "tool"
    seen = probe(sandbox_for(layout, inside), [tool / "run", inside / "rows.csv"], [tool], [])
    assert seen["read"] == {str(tool / "run"): "run", str(inside / "rows.csv"): "PermissionError"}
    assert seen["listed"] == {str(tool): ["data", "run"]}


def test_the_node_gets_its_own_copy_of_a_credential_and_nothing_else(site_root: Path) -> None:
    layout = site_layout(site_root)
    token = layout["state"] / "ray-token"
    token.write_bytes(b"cluster-token")
    token.chmod(0o600)
    if not AS_ROOT:
        assert pool_sandbox(layout["state"], []) is None
        return
    sandbox = sandbox_for(layout)
    copy = sandbox.share(token)
    found = copy.stat()
    assert copy.parent == sandbox.home and copy.read_bytes() == b"cluster-token"
    assert (found.st_uid, stat.S_IMODE(found.st_mode)) == (sandbox.user.uid, 0o600)
    assert stat.S_IMODE(sandbox.home.stat().st_mode) == 0o700
    seen = probe(sandbox, [copy, token], [], [])
    assert seen["read"] == {str(copy): "cluster-token", str(token): "PermissionError"}


def test_a_killed_owners_sandboxed_node_is_found_stopped_and_its_dir_removed(
    tmp_path: Path,
) -> None:
    """The reaper and a successor find the pool user's processes of a dir, marked as
    for any child, and remove the private dir the pool user was handed."""
    owner = tmp_path / "state"
    owner.mkdir()
    if not AS_ROOT:
        assert own_uids() == {os.geteuid()}
        return
    ensure_pool_user()
    assert own_uids() == {0, pool_uid()}
    home = prepare_ray_temp_dir(owner).parent
    sandbox = Sandbox(ensure_pool_user(), home, hide=(owner,), expose=interpreter_paths())
    sandbox.prepare()
    node = subprocess.Popen(
        sandbox.wrap([sys.executable, "-c", "import time; time.sleep(600)"]),
        env={**os.environ, **sandbox.env(), **owner_env(owner)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(node.pid).uids().real != sandbox.user.uid:
            assert time.monotonic() < deadline, (
                "the sandboxed command never dropped to the pool user"
            )
            time.sleep(0.05)
        assert [p.pid for p in find_leftovers(owner)] == [node.pid]
        assert [p.pid for p in stop_leftovers(owner, grace_s=5.0)] == [node.pid]
        assert node.wait(timeout=10) != 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    # A successor's start takes over the dir the pool user was handed, made afresh.
    assert home.stat().st_uid == sandbox.user.uid
    assert prepare_ray_temp_dir(owner).parent == home == short_temp_dir(owner)
    assert home.stat().st_uid == 0
    # The reaper removes it as the pool user's, too.
    sandbox.prepare()
    assert remove_own_dir(home) and not home.exists()


def test_the_pool_user_is_a_system_user_without_login(tmp_path: Path) -> None:
    if not AS_ROOT:
        assert pool_uid() is None or pool_uid() != os.geteuid()
        return
    user = ensure_pool_user()
    entry = pwd.getpwnam(POOL_USER)
    assert (entry.pw_uid, entry.pw_gid) == (user.uid, user.gid) and user.uid != 0
    assert entry.pw_shell.endswith("nologin") and not Path(entry.pw_dir).exists()
    assert ensure_pool_user() == user  # made once


def test_a_pretraining_driver_sees_only_its_checkpoint_dir_of_the_data_dir(
    site_root: Path,
) -> None:
    """The coordinator's pretraining driver unpickles what Ray's workers return: run as
    root it runs as the pool user, and of the data dir it sees (and may write) only its
    run's checkpoint dir; the keys and state beside it are not there at all."""
    data_dir = site_root / "coordinator"
    (data_dir / "keys").mkdir(parents=True)
    key = data_dir / "keys" / "signing.key"
    key.write_text("key")
    state = data_dir / "state.db"
    state.write_text("state")
    state.chmod(0o644)  # even a file left world-readable
    checkpoints = data_dir / "checkpoints" / "job-1"
    if not AS_ROOT:
        assert driver_sandbox(data_dir)(checkpoints) is None
        return
    sandbox = driver_sandbox(data_dir)(checkpoints)
    try:
        assert sandbox is not None and sandbox.home == short_temp_dir(data_dir) / "driver"
        sandbox.prepare()
        seen = probe(
            sandbox,
            [key, state],
            [data_dir, data_dir / "checkpoints"],
            [checkpoints / "latest.pt", data_dir / "planted"],
        )
        assert seen["read"] == {str(key): "FileNotFoundError", str(state): "FileNotFoundError"}
        assert seen["listed"] == {
            str(data_dir): ["checkpoints"],
            str(data_dir / "checkpoints"): ["job-1"],
        }
        assert seen["wrote"] == {
            str(checkpoints / "latest.pt"): "ok",
            str(data_dir / "planted"): "OSError",
        }
        assert (checkpoints / "latest.pt").stat().st_uid == sandbox.user.uid  # on the host
        assert key.read_text() == "key" and not (data_dir / "planted").exists()
    finally:
        remove_own_dir(short_temp_dir(data_dir))


def test_a_pretraining_driver_gets_its_own_copy_of_the_compiled_aggregation_kernels(
    site_root: Path,
) -> None:
    """The driver cannot write the install's numba cache, so it would compile the
    kernels at every run: its private dir holds a copy of what the install compiled,
    the pool user's to read and to add to, and the install's own files are untouched."""
    data_dir = site_root / "coordinator"
    checkpoints = data_dir / "checkpoints" / "job-1"
    data_dir.mkdir()
    update = {"w": np.ones((4, 4), np.float32)}
    StreamingMean(update).add(update, 1)  # the install's cache holds the kernels now
    installed = sorted((KERNELS.parent / "__pycache__").glob("kernels.*.nbi"))
    assert installed
    if not AS_ROOT:
        assert driver_sandbox(data_dir)(checkpoints) is None
        return
    sandbox = driver_sandbox(data_dir)(checkpoints)
    try:
        assert sandbox is not None
        cache = sandbox.home / DRIVER_KERNEL_CACHE / numba_cache_subpath(KERNELS)
        copies = {path.name: path for path in cache.iterdir()}
        assert {path.name for path in installed} <= set(copies)
        for path in (cache.parent, cache, *copies.values()):
            assert path.stat().st_uid == sandbox.user.uid, path
        sandbox.prepare()
        seen = probe(sandbox, [], [cache], [cache / "kernels.new.nbi"])
        assert set(copies) <= set(seen["listed"][str(cache)])
        assert seen["wrote"] == {str(cache / "kernels.new.nbi"): "ok"}
        assert all(path.stat().st_uid == 0 for path in installed)
    finally:
        remove_own_dir(short_temp_dir(data_dir))


def swap_in_after_mkdir(
    monkeypatch: pytest.MonkeyPatch, name: str, swap: Callable[[str, int | None], None]
) -> None:
    """A pool process winning the race: `swap(path, dir_fd)` runs just after the
    coordinator makes a dir called `name`, before its next step."""
    made = os.mkdir

    def mkdir_then_swap(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        made(path, mode, dir_fd=dir_fd)
        if os.path.basename(path) == name:
            os.rename(path, f"{path}-moved", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            swap(os.fspath(path), dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)


def pool_owned_ray_dir(data_dir: Path) -> Path:
    """The coordinator's Ray dir as the head's sandbox leaves it: the pool user's."""
    ray_home = prepare_ray_temp_dir(data_dir).parent
    user = ensure_pool_user()
    os.chown(ray_home, user.uid, user.gid)
    return ray_home


@pytest.mark.parametrize("swapped_in", ["a link to root's dir", "a dir of the pool user's"])
def test_a_drivers_home_swapped_as_it_is_made_is_refused_and_nothing_goes_through_it(
    site_root: Path, monkeypatch: pytest.MonkeyPatch, swapped_in: str
) -> None:
    """The coordinator's Ray dir is the pool user's, so a pool process (a member's task
    on the head, a subverted driver) can rename the driver's new home and leave a link
    or a dir of its own in its place between two of the coordinator's steps. Had the
    coordinator seeded the kernel cache by path (it once did), it would have made dirs
    and files wherever the link pointed and handed them to the pool user: the install's
    numba package, for one, whose code root imports next. Swapped at the worst moment,
    just after the home is made: the run is refused, nothing is made or handed over
    through the link, and nothing is seeded into the pool user's dir."""
    data_dir = site_root / "coordinator"
    data_dir.mkdir()
    checkpoints = data_dir / "checkpoints" / "job-1"
    if not AS_ROOT:
        assert driver_sandbox(data_dir)(checkpoints) is None
        return
    ray_home = pool_owned_ray_dir(data_dir)
    package = site_root / "site-packages"  # stands for the install
    package.mkdir(mode=0o755)
    theirs = site_root / "theirs"
    theirs.mkdir(mode=0o700)
    user = ensure_pool_user()
    os.chown(theirs, user.uid, user.gid)

    def swap(path: str, dir_fd: int | None) -> None:
        if swapped_in == "a link to root's dir":
            os.symlink(package, path, dir_fd=dir_fd)
        else:
            os.rename(theirs, ray_home / "driver")

    swap_in_after_mkdir(monkeypatch, "driver", swap)
    try:
        with pytest.raises(SandboxSetupError, match="replaced as it was made"):
            driver_sandbox(data_dir)(checkpoints)
        monkeypatch.undo()
        assert list(package.iterdir()) == [] and package.stat().st_uid == 0
        assert stat.S_IMODE(package.stat().st_mode) == 0o755
        if swapped_in != "a link to root's dir":
            assert list((ray_home / "driver").iterdir()) == []
    finally:
        monkeypatch.undo()
        remove_own_dir(ray_home)


def test_links_left_for_the_driver_are_removed_not_followed(site_root: Path) -> None:
    """A link left where the driver's home goes is removed and a fresh home made (the
    run goes on); a link left in place of the Ray dir itself (the pool user may rename
    what it owns in /tmp) is refused; either way, nothing is made, handed over or
    removed where the link points, at the run's start or at its end."""
    data_dir = site_root / "coordinator"
    data_dir.mkdir()
    checkpoints = data_dir / "checkpoints" / "job-1"
    if not AS_ROOT:
        assert driver_sandbox(data_dir)(checkpoints) is None
        return
    ray_home = pool_owned_ray_dir(data_dir)
    roots_dir = site_root / "roots"  # stands for a dir of root's, with a "driver" in it
    (roots_dir / "driver").mkdir(parents=True, mode=0o755)
    try:
        (ray_home / "driver").symlink_to(roots_dir / "driver")
        sandbox = driver_sandbox(data_dir)(checkpoints)
        assert sandbox is not None and not sandbox.home.is_symlink()
        assert sandbox.home.stat().st_uid == 0 and (sandbox.home / DRIVER_KERNEL_CACHE).is_dir()
        assert list((roots_dir / "driver").iterdir()) == []

        ray_home.rename(site_root / "ray-moved")
        ray_home.symlink_to(roots_dir)
        with pytest.raises(SandboxSetupError, match="not a directory of its own"):
            driver_sandbox(data_dir)(checkpoints)
        assert not remove_private_dir(ray_home, "driver")  # as a run's end does
        assert list(roots_dir.iterdir()) == [roots_dir / "driver"]
        assert (roots_dir / "driver").stat().st_uid == 0
        ray_home.unlink()
    finally:
        remove_own_dir(site_root / "ray-moved")
        remove_own_dir(ray_home)


def test_a_link_left_in_place_of_the_private_dir_is_refused_not_followed(
    site_root: Path,
) -> None:
    """The pool user owns its private dir once handed over, so a pool process can rename
    it and leave a link to a dir of root's in its place: handing over and sharing
    credentials then refuse, and write nothing through the link."""
    layout = site_layout(site_root)
    if not AS_ROOT:
        assert pool_sandbox(layout["state"], []) is None
        return
    sandbox = sandbox_for(layout)
    token = layout["state"] / "ray-token"
    token.write_bytes(b"cluster-token")
    roots_dir = site_root / "roots"  # stands for /etc
    roots_dir.mkdir(mode=0o755)
    sandbox.home.rename(site_root / "moved-away")
    sandbox.home.symlink_to(roots_dir)
    with pytest.raises(SandboxSetupError, match="not a directory of its own"):
        sandbox.prepare()
    with pytest.raises(SandboxSetupError, match="not a directory of its own"):
        sandbox.share(token)
    assert list(roots_dir.iterdir()) == [] and roots_dir.stat().st_uid == 0
    assert stat.S_IMODE(roots_dir.stat().st_mode) == 0o755
    sandbox.home.unlink()


def test_a_process_a_member_detaches_from_its_node_ends_with_the_node(site_root: Path) -> None:
    """A member's task on a pool node starts a session of its own (`setsid -f`), out of
    the node's process group and tree and marked with nothing of the node's: left
    running, it read every later start's copy of the cluster token, the token of a
    rotation that revoked its member included. The node's cgroup ends it with the node,
    and a next start would end whatever a crash left there (consortium/node_cgroup.py)."""
    layout = site_layout(site_root)
    sandbox = pool_sandbox(layout["state"], [layout["data"]])
    if not AS_ROOT:
        assert sandbox is None
        return
    assert sandbox is not None and sandbox.cgroup is not None
    prepare_ray_temp_dir(layout["state"])  # the node's private dir, as its start makes it
    sandbox.prepare()
    escaped_pid = sandbox.home / "escaped.pid"
    detach = f"echo $$ > {escaped_pid}; exec sleep 300"
    node = ChildProcess(
        "ray-worker",
        sandbox.wrap(["sh", "-c", f"setsid -f sh -c '{detach}'; exec sleep 300"]),
        site_root / "node.log",
        env=sandbox.env(),
        cgroup=sandbox.cgroup,
    )
    try:
        deadline = time.monotonic() + 30
        while not escaped_pid.exists() or not escaped_pid.read_text().strip():
            assert node.poll() is None, node.log_tail()
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.05)
        escaped = int(escaped_pid.read_text())
        assert psutil.Process(escaped).uids().real == sandbox.user.uid
        assert escaped not in descendant_pids(node.pid)  # out of the tree and the group
        assert os.getpgid(escaped) != node.pid
    finally:
        node.stop(timeout_s=5.0)
    assert not pid_alive(escaped), "the detached process outlived its node"
    assert not sandbox.cgroup.exists()


SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
os.chdir(sys.argv[1])
while True:
    try:
        if not os.path.lexists("driver"):
            os.mkdir("driver")
        if not os.path.lexists("fifo"):
            os.mkfifo("fifo")
    except OSError:
        pass
    libc.renameat2(-100, b"driver", -100, b"fifo", 2)  # RENAME_EXCHANGE
"""


SWAP_FOR_S = 3.0


def test_a_fifo_swapped_in_for_a_dir_root_removes_never_blocks_it(site_root: Path) -> None:
    """A pool process on the head (a member's task) swaps the driver's old home for a
    FIFO, over and over, while a run's start removes it: `shutil.rmtree` opened the
    FIFO as a dir and root waited there for as long as the swapper liked. Every step of
    the removal now refuses what is not a dir at once (consortium/tree_removal.py)."""
    if not AS_ROOT:
        return
    user = ensure_pool_user()
    site_root.chmod(0o755)  # the pool user reaches its dir
    ray_dir = site_root / "ray"
    ray_dir.mkdir(mode=0o700)
    os.chown(ray_dir, user.uid, user.gid)
    as_pool_user = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
    swapper = subprocess.Popen([*as_pool_user, sys.executable, "-c", SWAPPER, str(ray_dir)])
    outcome: dict[str, int] = {}

    def starts() -> None:
        end = time.monotonic() + SWAP_FOR_S
        while time.monotonic() < end:
            try:
                os.close(new_private_dir(ray_dir, "driver"))
                outcome["made"] = outcome.get("made", 0) + 1
            except (OSError, SandboxSetupError) as refused:  # raced: refused, not followed
                name = type(refused).__name__
                outcome[name] = outcome.get(name, 0) + 1

    runner = threading.Thread(target=starts, daemon=True)
    try:
        deadline = time.monotonic() + 30
        while not (ray_dir / "fifo").exists():  # the swapper is at work
            assert swapper.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        runner.start()
        runner.join(60)
        blocked = runner.is_alive()
    finally:
        swapper.kill()
        swapper.wait()
        for fifo in ray_dir.rglob("*"):  # a blocked open returns once a writer comes
            if fifo.is_fifo():
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked, f"a removal blocked on a FIFO ({outcome})"
    assert outcome.get("made", 0) > 0, outcome  # between swaps, starts still succeed


def test_root_imports_nothing_from_the_current_dir_to_set_a_node_up(
    site_root: Path, tmp_path: Path
) -> None:
    """`python -m` puts the current dir first on sys.path: `coordinator serve` started in
    a dir another user writes (/tmp) had root import that user's `random.py` (tempfile
    imports it) while it set a node's sandbox up."""
    layout = site_layout(site_root)
    if not AS_ROOT:
        return
    cwd = tmp_path / "shared"
    cwd.mkdir()
    marker = tmp_path / "imported-as-root"
    (cwd / "random.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    done = subprocess.run(
        sandbox_for(layout).wrap(["true"]),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert not marker.exists()
    assert done.returncode == 0, done.stderr


ELSEWHERE = """
import sys
from pathlib import Path
from consortium import node_cgroup
other = Path(sys.argv[1])
node_cgroup.join(other)  # another login session's or service's group
print(node_cgroup.node_cgroup("consortium-some-node"))
"""


def test_a_nodes_group_is_found_whichever_cgroup_its_owner_restarts_in(tmp_path: Path) -> None:
    """A coordinator killed and started again from another session (another cgroup)
    must find the group its last node left a detached process in."""
    if not AS_ROOT:
        return
    here = node_cgroup.node_cgroup("consortium-some-node")
    mount = node_cgroup.v2_mount()
    assert here is not None and mount is not None
    other = mount / f"consortium-test-elsewhere-{os.getpid()}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", ELSEWHERE, str(other)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        with contextlib.suppress(OSError):
            other.rmdir()
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == here
