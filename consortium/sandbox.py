"""A separate OS user, in a mount namespace of its own, for every Ray process.

Ray processes run code from every member that holds the cluster token (Ray is one trust
domain): a site's pool node runs their tasks, the coordinator's head runs any zero-CPU
task placed on it, and each pretraining driver unpickles what their workers return. Run
as the user of `client join` or `coordinator serve`, that code could read the site's
keys and data, or the coordinator's signing key and state. Where they run as root, their
Ray processes therefore run as the system user `consortium-pool` (made on first use, no
login shell, no home), in a mount namespace where:

* the site's state dir (keys, tokens, logs), its bundle and its data dir, or the
  coordinator's data dir, are covered by an empty root-only tmpfs, so even data left
  world-readable is out of reach (a driver's checkpoint dir alone is granted back);
* the interpreter, the venv and the project's sources are reachable although they may
  lie below a dir other users cannot enter (a pyenv under /root): that dir is covered
  by a tmpfs holding only those paths, bound read-only;
* the process has no capabilities left and cannot gain any (no_new_privs).

What they need of those secrets (the Ray token, the Ray TLS key) is copied into their
own private dir, owned by the pool user: those are the cluster's credentials, which
every pool node holds anyway.

`Sandbox.wrap` turns a command line into `python -m consortium.sandbox ... -- argv`,
which sets the namespace up as root, drops to the pool user and execs argv: the same
process (and process group) from start to end, so stopping it is stopping the node.
Only the standard library is imported here: it runs before every Ray node start.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from consortium import node_cgroup
from consortium.errors import ChildProcessFailedError
from consortium.tree_removal import remove_tree_at

POOL_USER = "consortium-pool"
USERADD_TRIES = 5  # useradd fails while another one holds /etc/passwd's lock

# Linux's unshare(2), mount(2) and prctl(2) constants (linux/sched.h, linux/mount.h,
# linux/prctl.h): Python 3.11 has no os.unshare, and no wrapper for mount or prctl.
CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38


class SandboxSetupError(OSError):
    """The sandbox could not be set up; the command was not run."""


@dataclass(frozen=True)
class PoolUser:
    name: str
    uid: int
    gid: int


def pool_uid() -> int | None:
    """The pool user's uid, or None where it does not exist (yet)."""
    try:
        return pwd.getpwnam(POOL_USER).pw_uid
    except KeyError:
        return None


def ensure_pool_user() -> PoolUser:
    """The pool user, made first if missing (a system user: no home, no login shell).
    Needs root."""
    last_error = ""
    for attempt in range(USERADD_TRIES):
        try:
            entry = pwd.getpwnam(POOL_USER)
        except KeyError:
            pass
        else:
            return PoolUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
        made = subprocess.run(
            [
                "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                "--shell", "/usr/sbin/nologin", "--user-group", POOL_USER,
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if made.returncode == 0:
            continue
        # Another process made it meanwhile (exit 9), or holds the passwd lock: look again.
        time.sleep(0.2 * (attempt + 1))
        last_error = made.stderr.strip()
    try:
        entry = pwd.getpwnam(POOL_USER)
    except KeyError:
        raise SandboxSetupError(
            f"could not create the OS user {POOL_USER!r} for the Ray pool node: {last_error}"
        ) from None
    return PoolUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def interpreter_paths() -> tuple[Path, ...]:
    """What a Ray node's processes must reach: this interpreter's installation, the venv
    and the dir the project's packages are imported from (an editable install)."""
    project = Path(__file__).resolve().parent.parent
    return tuple(dict.fromkeys(Path(p).resolve() for p in (sys.base_prefix, sys.prefix, project)))


@dataclass(frozen=True)
class Sandbox:
    """How to run a command as `user`: `home` is the command's private dir (made by the
    caller, handed over by `prepare`), `hide` what it must not see at all, `cgroup` the
    control group its processes are kept in (consortium/node_cgroup.py; None where
    there is no cgroup v2 to use)."""

    user: PoolUser
    home: Path
    hide: tuple[Path, ...]
    expose: tuple[Path, ...]
    grant: tuple[Path, ...] = ()
    cgroup: Path | None = None

    def prepare(self) -> None:
        """End whatever an earlier start left in the command's cgroup (a process a pool
        member detached, which would read the credentials `share` copies in next), then
        hand the private dir (0700) and each granted dir over to the pool user: the
        dirs themselves, never what is in them, and never through a link (a pool
        process can rename what it owns and leave a link in its place)."""
        if self.cgroup is not None:
            node_cgroup.kill(self.cgroup)
        for path in (self.home, *self.grant):
            fd = _open_dir(path)
            try:
                os.fchown(fd, self.user.uid, self.user.gid)
                if path == self.home:
                    os.fchmod(fd, 0o700)
            finally:
                os.close(fd)

    def share(self, source: Path) -> Path:
        """A copy of `source` in the private dir that only the pool user (and root) can
        read: what the node needs of the site's files (the cluster token, its Ray TLS
        key). Replaced atomically, so a start reads the old copy or the new one. Written
        relative to the dir opened without following a link, and never through a link
        in it, since the pool user owns that dir by now."""
        content = source.read_bytes()
        partial = source.name + ".new"
        home = _open_dir(self.home)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial, dir_fd=home)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            with os.fdopen(os.open(partial, flags, 0o600, dir_fd=home), "wb") as handle:
                handle.write(content)
                os.fchown(handle.fileno(), self.user.uid, self.user.gid)
            os.replace(partial, source.name, src_dir_fd=home, dst_dir_fd=home)
        finally:
            os.close(home)
        return self.home / source.name

    def env(self) -> dict[str, str]:
        """The user's identity for the command (Ray and Python read these, not passwd)."""
        return {"HOME": str(self.home), "USER": self.user.name, "LOGNAME": self.user.name}

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return [
            # -P: run as root, it must not import the current dir's modules (`-m`
            # puts that dir first on sys.path: a `random.py` in /tmp ran as root).
            sys.executable, "-P", "-m", "consortium.sandbox",
            "--uid", str(self.user.uid), "--gid", str(self.user.gid),
            "--home", str(self.home),
            *(f"--hide={path}" for path in self.hide),
            *(f"--expose={path}" for path in self.expose),
            *(f"--grant={path}" for path in self.grant),
            *([f"--cgroup={self.cgroup}"] if self.cgroup is not None else []),
            "--", *argv,
        ]  # fmt: skip


def _open_dir(path: Path) -> int:
    """`path` opened as a directory, refused if it is a link or not a directory."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as error:
        raise SandboxSetupError(f"{path} is not a directory of its own: {error}") from None


def new_private_dir(parent: Path, name: str) -> int:
    """`parent`/`name` made afresh, this user's and 0700, and returned open.

    `parent` may be the pool user's (the coordinator's Ray dir is: the head's processes
    run as that user), so a pool process can rename what is in it, or `parent` itself
    in /tmp, and leave a link in its place, between any two steps taken by path. So
    `parent` is opened without following a link and must be this user's or the pool
    user's; an earlier `name` is removed (a link unlinked, never followed) and the new
    one made and opened relative to it, and refused unless it is the dir just made
    (this user's: a pool process can only put its own in its place). What goes into it
    then is written relative to the descriptor, inside a dir no pool process can enter.
    """
    parent_fd = _open_shared_dir(parent)
    try:
        _remove_entry(parent_fd, name)
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError as error:
            what = f"{parent / name} was replaced as it was made"
            raise SandboxSetupError(f"{what}: {error}") from None
        made = os.fstat(fd)
        if made.st_uid != os.geteuid() or stat.S_IMODE(made.st_mode) & 0o077:
            os.close(fd)
            raise SandboxSetupError(
                f"{parent / name} was replaced as it was made (uid {made.st_uid})"
            )
        return fd
    finally:
        os.close(parent_fd)


def remove_private_dir(parent: Path, name: str) -> bool:
    """Remove `parent`/`name` and what is in it (a link: the link), as `new_private_dir`
    works: relative to `parent` opened without following a link. False, with nothing
    removed, where `parent` is gone, a link or another user's."""
    try:
        parent_fd = _open_shared_dir(parent)
    except SandboxSetupError:
        return False
    try:
        _remove_entry(parent_fd, name)
    finally:
        os.close(parent_fd)
    return True


def _open_shared_dir(path: Path) -> int:
    """`path` (this user's or the pool user's) opened without following a link."""
    fd = _open_dir(path)
    owner = os.fstat(fd).st_uid
    if owner not in (os.geteuid(), pool_uid()):
        os.close(fd)
        raise SandboxSetupError(f"{path} is another user's (uid {owner})")
    return fd


def _remove_entry(parent: int, name: str) -> None:
    remove_tree_at(parent, name)  # never follows a link, never waits on a FIFO


def sandbox_for(home: Path, hide: Sequence[Path], grant: Sequence[Path] = ()) -> Sandbox | None:
    """For a process running as root: the sandbox its Ray processes run in, as the pool
    user, with `home` (a private dir of root's, made by the caller) handed to it, the
    `hide` dirs out of sight but for the `grant` dirs inside them. None for any other
    user: those Ray processes then run as that user."""
    if os.geteuid() != 0:
        return None
    try:
        user = ensure_pool_user()
    except SandboxSetupError as error:
        raise ChildProcessFailedError(
            f"{error}; create that user yourself (useradd --system {POOL_USER}) or run without Ray"
        ) from None
    # One group per private dir: a restart of the same node reuses (and first empties) it.
    # Named by the path as given: a pool process could point a link at another node's.
    group = "consortium-" + hashlib.sha256(str(home.absolute()).encode()).hexdigest()[:16]
    return Sandbox(
        user,
        home,
        hide=tuple(dict.fromkeys(p.resolve() for p in hide)),
        expose=interpreter_paths(),
        grant=tuple(p.resolve() for p in grant),
        cgroup=node_cgroup.node_cgroup(group),
    )


# --- inside the sandbox, as root until `drop_to` -------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise SandboxSetupError(error, f"{what}: {os.strerror(error)}")


def _bytes(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def _mount(
    source: str | None, target: Path, fstype: str | None, flags: int, data: str | None = None
) -> None:
    result = _libc().mount(_bytes(source), _bytes(str(target)), _bytes(fstype), flags, _bytes(data))
    _check(result, f"mount {target}")


def enter_mount_namespace() -> None:
    """A mount namespace of this process's own, whose mounts never reach the host's."""
    _check(_libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, Path("/"), None, MS_REC | MS_PRIVATE)


def blocking_ancestor(path: Path) -> Path | None:
    """The outermost dir above `path` that other users cannot enter, if any."""
    for ancestor in reversed(path.parents):
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def _outermost(paths: Iterable[Path]) -> list[Path]:
    listed = list(dict.fromkeys(paths))
    return [p for p in listed if not any(q in p.parents for q in listed)]


def build_view(expose: Sequence[Path], hide: Sequence[Path], grant: Sequence[Path]) -> None:
    """Shape what this mount namespace shows, before dropping to the pool user:

    * each `expose` path is reachable although a dir above it is closed to other users:
      that dir is covered by a tmpfs holding only the kept paths, exposed ones bound
      read-only;
    * each `hide` dir is covered by an empty tmpfs only root may enter, also where it
      lies inside an exposed path (a data dir in the checkout), or, with `grant` paths
      inside it, by one that holds only those, bound writable (a driver's checkpoint dir
      inside the hidden data dir); a granted path below a closed dir is reached as an
      exposed one is.

    In that order: every kept path bound aside, the covers of closed dirs on (outer
    first), the exposed paths back in place, the hidden dirs covered, the granted paths
    in place; the covers end read-only."""
    exposed, granted = _outermost(expose), _outermost(grant)
    blocked = {p: blocking_ancestor(p) for p in [*exposed, *granted]}
    closed = {c for c in blocked.values() if c is not None}
    staging = Path(tempfile.mkdtemp(prefix="consortium-sandbox-"))
    aside: dict[Path, Path] = {}
    for index, path in enumerate([p for p in exposed if blocked[p] is not None] + granted):
        aside[path] = staging / str(index)
        aside[path].mkdir()
        _mount(str(path), aside[path], None, MS_BIND | MS_REC)
    mounted = _cover(sorted(closed, key=lambda c: len(c.parts)), "0755")
    for path in exposed:
        if path in aside:
            _move_into_place(aside[path], path)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in hide:
        mode = "0755" if any(path in g.parents for g in granted) else "0700"
        mounted += _cover([path], mode)
    for path in granted:
        _move_into_place(aside[path], path)
    for cover in mounted:
        _mount(None, cover, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    shutil.rmtree(staging, ignore_errors=True)  # its spots are empty now


def _cover(dirs: Iterable[Path], mode: str) -> list[Path]:
    """An empty tmpfs over each dir still in sight (one below a cover is not)."""
    mounted = []
    for path in dirs:
        if path.is_dir():
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size=64k")
            mounted.append(path)
    return mounted


def _move_into_place(aside: Path, path: Path) -> None:
    # The dirs down to it, enterable whatever the caller's umask (join's is 077).
    for step in [*reversed(path.parents), path]:
        if not step.exists():
            step.mkdir(mode=0o755)
            step.chmod(0o755)
    _mount(str(aside), path, None, MS_MOVE)


def drop_to(uid: int, gid: int) -> None:
    """Become uid/gid for good: the user's own supplementary groups only (none unless an
    operator added some, say a GPU's device group), no capabilities (the kernel clears
    them when root's uids all change), and none to gain by exec (setuid programs
    included)."""
    try:
        os.initgroups(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:  # not in the user database: no groups at all
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise SandboxSetupError(f"still uid {os.getuid()} after dropping to uid {uid}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m consortium.sandbox")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--hide", action="append", default=[], type=Path)
    parser.add_argument("--expose", action="append", default=[], type=Path)
    parser.add_argument("--grant", action="append", default=[], type=Path)
    parser.add_argument("--cgroup", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("no command to run")
    if options.uid == 0:
        parser.error("--uid 0 is no sandbox")
    try:
        if options.cgroup is not None:  # as root: the pool user could not leave it
            node_cgroup.join(options.cgroup)
        enter_mount_namespace()
        build_view(options.expose, options.hide, options.grant)
        drop_to(options.uid, options.gid)
        os.chdir(options.home)
    except OSError as error:
        print(f"sandbox: {error}", file=sys.stderr, flush=True)
        return 126
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"sandbox: cannot run {' '.join(command)}: {error}", file=sys.stderr, flush=True)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
