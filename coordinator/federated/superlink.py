"""The Flower SuperLink, started as a child process of `coordinator serve`."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from consortium.errors import ChildProcessFailedError
from consortium.net import reserve_free_port
from consortium.processes import ChildProcess, venv_executable
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir

DATA_DIR_ENV = "CONSORTIUM_DATA_DIR"


class SuperLink:
    """A running `flower-superlink`: state in the data dir, runtime installs off."""

    def __init__(
        self, data_dir: DataDir | Path, host: str, port: int, pki: CoordinatorPki | None
    ) -> None:
        paths = DataDir(data_dir) if isinstance(data_dir, Path) else data_dir
        self.host = host
        self.port = port or reserve_free_port(host)
        paths.flower_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            venv_executable("flower-superlink"),
            "--disable-runtime-dependency-installation",
            "--database",
            str(paths.superlink_db),
            "--host",
            host,
            "--port",
            str(self.port),
        ]
        if pki is None:
            argv.append("--insecure")
        else:
            # TLS from the consortium CA, and only SuperNodes whose keys were
            # registered at onboarding may connect.
            argv += [
                "--ssl-certfile",
                str(pki.server_cert),
                "--ssl-keyfile",
                str(pki.server_key),
                "--ssl-ca-certfile",
                str(pki.ca_cert),
                "--enable-supernode-auth",
            ]
        # The ServerApp runs in a grandchild process; it finds the coordinator's
        # state through this variable, inherited down the process tree.
        # GRPC_VERBOSITY: quiet gRPC logs in the SuperLink and its apps, whatever the
        # coordinator's own setting (see coordinator.cli).
        env = {DATA_DIR_ENV: str(paths.root.resolve()), "GRPC_VERBOSITY": "ERROR"}
        self.process = ChildProcess("flower-superlink", argv, paths.log_file("superlink"), env=env)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the SuperLink accepts connections, or raise with its log tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ChildProcessFailedError(
                    f"flower-superlink exited with code {self.process.poll()}; "
                    f"see {self.process.log_path}:\n{self.process.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise ChildProcessFailedError(
            f"flower-superlink did not listen on {self.address} within {timeout_s:.0f} s; "
            f"see {self.process.log_path}"
        )

    def stop(self) -> None:
        self.process.stop()
