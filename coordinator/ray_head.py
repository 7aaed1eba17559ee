"""The coordinator's Ray head: a `ray start --head --block` child, or an existing cluster.

Contributed nodes (`client join`) join this cluster as Ray workers; pretraining jobs
run their DiLoCo controller in the coordinator process against it. The head announces
no CPUs, GPUs or `institution:` resource, so it never hosts training workers.

With TLS, Ray runs with token authentication (`RAY_AUTH_MODE=token`) and the token
`coordinator init` wrote to `<data dir>/pki/ray-token`; every onboarded site gets the
same token in its startup bundle.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from consortium.errors import ChildProcessFailedError
from consortium.net import split_host_port
from consortium.processes import ChildProcess, venv_executable
from consortium.ray_env import DRAIN_TIMEOUT_ENV, ray_auth_env, short_temp_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayCluster:
    """Where the coordinator's Ray cluster is and how to authenticate to it."""

    address: str  # host:port of the GCS
    token_path: Path | None  # None: no token authentication


class RayHead:
    """A Ray head started as our child (own process group; `stop()` ends all of it)."""

    def __init__(self, data_dir: Path, host: str, port: int, token_path: Path | None) -> None:
        self.cluster = RayCluster(f"{host}:{port}", token_path)
        self.temp_dir = short_temp_dir(data_dir)
        argv = [
            venv_executable("ray"),
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
            "--disable-usage-stats",
            "--temp-dir",
            str(self.temp_dir),
            "--block",
        ]
        # The head hosts no work, so it has nothing to drain: Ray's default would hold
        # its shutdown for 30 s whenever a node has ever joined.
        env = {**ray_auth_env(token_path), DRAIN_TIMEOUT_ENV: "0"}
        self.process = ChildProcess("ray-head", argv, data_dir / "logs" / "ray-head.log", env=env)

    @property
    def address(self) -> str:
        return self.cluster.address

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the GCS accepts connections, or raise with the log's tail."""
        host, port = split_host_port(self.address)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ChildProcessFailedError(
                    f"the Ray head exited with code {self.process.poll()}; see "
                    f"{self.process.log_path}:\n{self.process.log_tail()}"
                )
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise ChildProcessFailedError(
            f"the Ray head did not listen on {self.address} within {timeout_s:.0f} s; "
            f"see {self.process.log_path}"
        )

    def stop(self) -> None:
        self.process.stop()
        log.info("Ray head stopped")
