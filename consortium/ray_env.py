"""How every Ray process of a consortium (head, coordinator driver, contributed node)
authenticates and where it keeps its files."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from consortium.errors import DataDirError
from consortium.leftovers import own_uids, remove_own_dir
from consortium.processes import logged_since
from consortium.sandbox import Sandbox
from consortium.tree_removal import remove_tree

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# How long `ray start --block` drains its node on SIGTERM (marks it DRAINING in the GCS,
# so no new work lands there, and waits for running work) before ending its processes.
DRAIN_TIMEOUT_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"
RAY_TEMP_SUBDIR = "ray"
# What `ray start` prints once its node runs (and its SIGTERM handler is in place).
RAY_STARTED_LINE = "Ray runtime started."


@dataclass(frozen=True)
class RayTls:
    """One Ray process's TLS files: Ray uses the certificate as both server and client."""

    certificate: Path
    key: Path
    ca_certificate: Path


def ray_auth_env(token_path: Path | None, tls: RayTls | None = None) -> dict[str, str]:
    """Environment that makes a Ray process (or driver) use token authentication, or
    (without a token, --insecure) explicitly not: Ray would otherwise turn it on by
    itself when it finds a token in the user's home. With `tls`, every connection also
    uses mutual TLS from the consortium CA (Ray's RAY_USE_TLS)."""
    env = {"RAY_USE_TLS": "0"}
    if tls is not None:
        env = {
            "RAY_USE_TLS": "1",
            "RAY_TLS_SERVER_CERT": str(tls.certificate.resolve()),
            "RAY_TLS_SERVER_KEY": str(tls.key.resolve()),
            "RAY_TLS_CA_CERT": str(tls.ca_certificate.resolve()),
        }
    if token_path is None:
        return {**env, AUTH_MODE_ENV: "disabled"}
    return {**env, AUTH_MODE_ENV: "token", AUTH_TOKEN_PATH_ENV: str(token_path.resolve())}


# The label a contributed Ray node carries its coordinator-issued claim in: the
# coordinator counts the node for the institution it issued the claim to
# (coordinator/ray/claims.py), not for the institution the node declares.
CLAIM_LABEL = "consortium-claim"

# A Ray node's own listening ports, within a range the operator opens in a firewall:
# offsets from its start for the fixed ones, then the workers' ports to its end.
RAY_FIXED_PORTS = (
    "--node-manager-port",
    "--object-manager-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-grpc-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
    # A head's only: reserved for Ray Client's server, which a head here does not start
    # (consortium/ray_head_services.py).
    "--ray-client-server-port",
)
# The ports a Ray node takes for its other parts when no range is set (Ray's
# DEFAULT_DASHBOARD_PORT, its Ray Client server's and DEFAULT_DASHBOARD_AGENT_LISTEN_PORT):
# a GCS port chosen among free ports must not be one of them, or `ray start` refuses.
RAY_DEFAULT_PORTS = frozenset({8265, 10001, 52365})
RAY_WORKER_PORTS_FROM = 10  # offset of the first worker port
MIN_RAY_PORT_RANGE = 32  # the fixed ports and at least 22 worker processes


def parse_port_range(value: str) -> tuple[int, int]:
    """ "LOW-HIGH" as two ports; ValueError says what a valid range looks like."""
    low_text, sep, high_text = value.partition("-")
    if not sep or not low_text.strip().isdigit() or not high_text.strip().isdigit():
        raise ValueError(f"{value!r} is not a port range such as 20000-20099")
    low, high = int(low_text), int(high_text)
    if not 1024 <= low < high <= 65535:
        raise ValueError(f"{value!r}: need 1024 <= low < high <= 65535")
    if high - low + 1 < MIN_RAY_PORT_RANGE:
        raise ValueError(f"{value!r}: a Ray node needs at least {MIN_RAY_PORT_RANGE} ports")
    return low, high


def _checked_port_range(value: str | None) -> str | None:
    if value is not None:
        parse_port_range(value)
    return value


# A settings field (both roles): "LOW-HIGH", checked when the settings are read.
RayPortRange = Annotated[str | None, AfterValidator(_checked_port_range)]


def ray_port_flags(port_range: str | None, head: bool) -> list[str]:
    """`ray start` flags that keep every port the node listens on (besides a head's GCS
    port) within `port_range`; none when no range is set (Ray then picks ports)."""
    if port_range is None:
        return []
    low, high = parse_port_range(port_range)
    names = RAY_FIXED_PORTS if head else RAY_FIXED_PORTS[:-1]
    flags = [item for index, name in enumerate(names) for item in (name, str(low + index))]
    return [
        *flags,
        "--min-worker-port",
        str(low + RAY_WORKER_PORTS_FROM),
        "--max-worker-port",
        str(high),
    ]


def new_ray_token() -> bytes:
    """A fresh cluster token: 32 random bytes as hex (Ray reads its token as text)."""
    return secrets.token_hex(32).encode()


def write_ray_token(path: Path, token: bytes) -> None:
    """Replace a token file atomically, mode 0600: a Ray process starting meanwhile reads
    the old token or the new one, never a partial file."""
    partial = path.with_suffix(".new")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(token)
    os.replace(partial, path)


def ray_node_ip() -> str:
    """The address Ray announces for this host, which peers connect to and which a
    Ray TLS certificate must name (Ray's own choice: it replaces 127.0.0.1 with it)."""
    from ray._private.services import get_node_ip_address

    return str(get_node_ip_address())  # type: ignore[no-untyped-call]


def short_temp_dir(anchor: Path) -> Path:
    """The private dir, one per data or state dir, that holds a Ray process's temp dir
    (`ray_temp_dir`), short enough that Ray's Unix socket paths stay under 107 bytes.
    Every process Ray starts for the dir names a path under it on its command line, so
    it also marks them as the dir's (consortium/leftovers.py)."""
    digest = hashlib.sha256(str(anchor.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"consortium-ray-{digest}"


def log_end(log_path: Path) -> int:
    """Where the next start's lines begin in a log appended to across restarts."""
    return log_path.stat().st_size if log_path.exists() else 0


def ray_started(log_path: Path, since: int) -> bool:
    """Whether `ray start`, logging to `log_path` from offset `since` on, reported its
    node running (RAY_STARTED_LINE)."""
    return logged_since(log_path, since, RAY_STARTED_LINE)


def ray_temp_dir(anchor: Path) -> Path:
    """Ray's `--temp-dir` for `anchor`'s processes, inside its private dir."""
    return short_temp_dir(anchor) / RAY_TEMP_SUBDIR


def prepare_ray_temp_dir(anchor: Path) -> Path:
    """Make `anchor`'s private dir afresh, this user's and 0700, and return Ray's temp
    dir inside it (Ray creates that one).

    Ray makes its temp dir and every dir below it world-writable (0777 without the
    sticky bit, "so others can use it"), the one holding the raylet's and the object
    store's sockets included. Under a predictable name in /tmp that let any local user
    create the dir first and own all of it, or delete the raylet's socket and listen in
    its place for the workers that connect to it. Inside a 0700 dir of ours, no other
    user reaches any of it. Each Ray start is a new session, so what an earlier one left
    is of no use and goes (also when another user could have written into it). A path
    that is not ours (`own_uids`: root's pool user's is, as root's sites run their Ray
    node as it) or not a directory is refused, not followed or removed."""
    private = short_temp_dir(anchor)
    try:
        found = private.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISDIR(found.st_mode) or found.st_uid not in own_uids():
            what = "is not a directory" if not stat.S_ISDIR(found.st_mode) else "is another user's"
            raise DataDirError(
                f"{private}, where Ray's files for {anchor} go, {what} (uid {found.st_uid}): "
                "another user could read or replace them. Remove it and start again."
            )
        remove_tree(private)
    try:
        private.mkdir(mode=0o700)
    except FileExistsError as raced:  # made by someone else since the check above
        raise DataDirError(
            f"{private}, where Ray's files for {anchor} go, was created by someone else "
            "while this process was making it; remove it and start again."
        ) from raced
    private.chmod(0o700)  # whatever the umask
    return private / RAY_TEMP_SUBDIR


def share_ray_credentials(
    sandbox: Sandbox, token_path: Path | None, tls: RayTls | None
) -> tuple[Path | None, RayTls | None]:
    """The sandbox's own copies of the cluster token and the Ray TLS files, for Ray
    processes running as its user (which cannot read the originals)."""
    token = sandbox.share(token_path) if token_path is not None else None
    if tls is not None:
        share = sandbox.share
        tls = RayTls(share(tls.certificate), share(tls.key), share(tls.ca_certificate))
    return token, tls


def remove_ray_temp_dir(anchor: Path) -> None:
    """Remove `anchor`'s private dir once its Ray processes stopped (theirs only: a dir
    of another user's under that name is left alone)."""
    remove_own_dir(short_temp_dir(anchor))


def use_ray_auth_in_this_process(token_path: Path | None, tls: RayTls | None = None) -> None:
    """Make this process's Ray calls (driver, GCS clients) authenticate like the cluster.

    Ray reads its auth mode (and TLS settings) into a cached config when it is imported,
    so changing the environment afterwards is not enough: refresh that config and the
    token cache, as Ray itself does when it turns token auth on for a process.
    """
    os.environ.update(ray_auth_env(token_path, tls))
    # Ray's compiled module ships no type information for these two.
    from ray._raylet import (  # type: ignore[attr-defined]
        AuthenticationTokenLoader,
        Config,
    )

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
