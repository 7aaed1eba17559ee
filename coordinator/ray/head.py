"""The coordinator's Ray head: a `ray start --head --block` child, or an existing cluster.

Contributed nodes (`client join`) join this cluster as Ray workers; pretraining jobs
run their DiLoCo controller in the coordinator process against it. The head announces
no CPUs, GPUs or `institution:` resource, so it never hosts training workers.

Ray runs with token authentication (`RAY_AUTH_MODE=token`): with TLS, the token
`coordinator init` wrote to `<data dir>/pki/ray-token`, which every onboarded site gets
in its startup bundle; in plain text, the head's own (`local_ray_token`), since Ray
listens beyond loopback whatever the head's address. Ray's GCS refuses a process without the token
itself; a `RayRefusalWatch` (coordinator/access/refusals/ray_gcs.py) follows the head's GCS log
and reports each refusal Ray records there.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from consortium.errors import ChildProcessFailedError
from consortium.leftovers import owner_env
from consortium.processes import STOP_TIMEOUT_S, ChildProcess, logged_since, venv_executable
from consortium.ray_env import (
    DRAIN_TIMEOUT_ENV,
    RayTls,
    log_end,
    new_ray_token,
    prepare_ray_temp_dir,
    ray_auth_env,
    ray_port_flags,
    ray_started,
    remove_ray_temp_dir,
    share_ray_credentials,
    write_ray_token,
)
from consortium.sandbox import sandbox_for
from coordinator.access.refusals.control_plane import TlsRefusal, parse_ray_handshake_failure
from coordinator.access.refusals.log import LogRefusalWatch, Refusal
from coordinator.access.refusals.ray_gcs import RayRefusal, RayRefusalWatch, gcs_log_path
from coordinator.data_dir import DataDir

log = logging.getLogger(__name__)

# What Ray's GCS writes to its error log, and exits, when it cannot bind its port
# ("Check failed: server_ Failed to start the grpc server. The specified port is N.").
GCS_PORT_TAKEN = "Failed to start the grpc server. The specified port is {port}."


@dataclass(frozen=True)
class RayCluster:
    """Where the coordinator's Ray cluster is and how to authenticate to it."""

    address: str  # host:port of the GCS
    token_path: Path | None  # None: no token authentication
    tls: RayTls | None = None  # None: no TLS


class RayHead:
    """A Ray head started as our child (own process group; `stop()` ends all of it)."""

    def __init__(
        self,
        data_dir: DataDir | Path,
        host: str,
        port: int,
        token_path: Path | None,
        on_refusal: Callable[[RayRefusal | TlsRefusal], None] | None = None,
        tls: RayTls | None = None,
        port_range: str | None = None,
    ) -> None:
        paths = DataDir(data_dir) if isinstance(data_dir, Path) else data_dir
        # Each head is a new cluster (its GCS keeps no state across starts): sites learn
        # of a new one from this id in heartbeat replies and rejoin it.
        self.head_id = secrets.token_hex(8)
        self.cluster = RayCluster(f"{host}:{port}", token_path, tls)
        self._anchor = paths.root
        # Made afresh, private to this user: Ray makes its own dirs world-writable. That
        # also drops our previous head's address (`ray_current_cluster`): while it was
        # there, a new head on the same port refused to start if any raylet on this
        # machine still pointed at it (a node joined from this machine, waiting out a
        # restart).
        self.temp_dir = prepare_ray_temp_dir(paths.root)
        # With a token, report what the GCS refuses; started first, so the new session's
        # log is read from its first line and an earlier session's is skipped.
        self.auth_watch = RayRefusalWatch(self.temp_dir, on_refusal) if token_path else None
        # With TLS, the GCS writes refused handshakes to its error log.
        self.tls_watch = (
            LogRefusalWatch(
                "ray-tls-watch",
                lambda: gcs_log_path(self.temp_dir, "gcs_server.err"),
                parse_ray_handshake_failure,
                cast(Callable[[Refusal], None] | None, on_refusal),
            )
            if tls is not None
            else None
        )
        argv = [
            venv_executable("consortium-ray"),
            "start",
            "--head",
            "--node-ip-address",
            host,
            "--port",
            str(port),
            "--num-cpus",
            "0",
            "--num-gpus",
            "0",
            "--include-dashboard",
            "false",
            # The head hosts no workers, so its log monitor would forward nothing (the
            # driver's own output goes to its log): one Python process less per start.
            "--include-log-monitor",
            "false",
            # No autoscaler monitor either: the cluster never scales (nodes are what
            # sites contribute), and the coordinator reads nodes from the GCS itself.
            "--no-monitor",
            "--disable-usage-stats",
            "--temp-dir",
            str(self.temp_dir),
            "--block",
            *ray_port_flags(port_range, head=True),
        ]
        # The head hosts no work, so it has nothing to drain: Ray's default would hold
        # its shutdown for 30 s whenever a node has ever joined.
        # GRPC_VERBOSITY: Ray's gRPC logs every connection at INFO; a refused handshake
        # is an ERROR line there, so it stays visible to the TLS watch.
        # The owner mark: Ray's GCS, raylet and workers inherit it, so the coordinator's
        # reaper and its successor find them (consortium/leftovers.py).
        env = {
            **ray_auth_env(token_path, tls),
            DRAIN_TIMEOUT_ENV: "0",
            "GRPC_VERBOSITY": "ERROR",
            **owner_env(paths.root),
        }
        # Run as root, the head's processes (GCS, raylet, agents) run as the pool user,
        # with the data dir (keys, state, provenance) out of their sight: any member
        # holding the token talks to them (consortium/sandbox.py).
        sandbox = sandbox_for(self.temp_dir.parent, hide=(paths.root,))
        if sandbox is not None:
            sandbox.prepare()
            env |= {
                **ray_auth_env(*share_ray_credentials(sandbox, token_path, tls)),
                **sandbox.env(),
            }
            argv = sandbox.wrap(argv)
        for watch in self._watches():
            watch.start()
        log_path = paths.log_file("ray-head")
        # The log is appended to across restarts; readiness is read from here on.
        self._log_offset = log_end(log_path)
        try:
            self.process = ChildProcess(
                "ray-head", argv, log_path, env=env, cgroup=sandbox.cgroup if sandbox else None
            )
        except BaseException:
            for watch in self._watches():
                watch.stop()
            raise

    @property
    def address(self) -> str:
        return self.cluster.address

    def wait_ready(self, timeout_s: float) -> None:
        """Block until `ray start` reports the runtime started (its GCS then listens and
        its SIGTERM handler is in place, so a stop is prompt), or raise with the log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ChildProcessFailedError(
                    f"the Ray head exited with code {self.process.poll()}; see "
                    f"{self.process.log_path}:\n{self.process.log_tail()}"
                )
            if ray_started(self.process.log_path, self._log_offset):
                return
            if self.port_taken():
                raise ChildProcessFailedError(
                    f"the Ray head's GCS could not listen on port {self.port}: another "
                    "process holds it"
                )
            time.sleep(0.1)
        raise ChildProcessFailedError(
            f"the Ray head on {self.address} did not start within {timeout_s:.0f} s; "
            f"see {self.process.log_path}:\n{self.process.log_tail()}"
        )

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def port_taken(self) -> bool:
        """Whether its GCS failed because another process holds its port. Read from the
        GCS's own log, written as it exits: `ray start` reports it only after waiting
        40 s for the GCS to answer."""
        gcs_log = gcs_log_path(self.temp_dir, "gcs_server.err")
        return gcs_log is not None and logged_since(
            gcs_log, 0, GCS_PORT_TAKEN.format(port=self.port)
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.process.stop(timeout_s)
        for watch in self._watches():
            watch.stop()
        remove_ray_temp_dir(self._anchor)
        log.info("Ray head stopped")

    def _watches(self) -> list[LogRefusalWatch]:
        return [w for w in (self.auth_watch, self.tls_watch) if w is not None]


def local_ray_token(paths: DataDir) -> Path:
    """A plain-text coordinator's Ray token, made (0600) on its first start. Ray's GCS
    and raylets listen on every interface whatever the head's address (Ray has no
    setting for it): without a token, any host reaching this machine ran code through
    them, and through the Ray Client server Ray then started on every head (measured).
    Sites on this machine get it with GetRayToken over the loopback control plane."""
    token = paths.local_ray_token
    if not token.exists():
        token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_ray_token(token, new_ray_token())
    return token
