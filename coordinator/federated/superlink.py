"""The Flower SuperLink, started as a child process of `coordinator serve`.

It runs with `--isolation process`: it starts no ServerApp itself; the coordinator's
`ServerAppLauncher` (coordinator/federated/serverapp_launcher.py) takes each ServerApp
task, authenticated with the secret written here for this start (0600), and starts
the ServerApp of approved runs only.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from consortium.errors import ChildProcessFailedError
from consortium.file_modes import new_secret_file
from consortium.net import reserve_free_port
from consortium.processes import ChildProcess, venv_executable
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.federated.serverapp_launcher import RuntimeEndpoint

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
        secret_file = paths.superexec_secret
        self.task_secret = new_secret_file(secret_file)
        self.paths = paths
        self.pki = pki
        argv = [
            venv_executable("flower-superlink"),
            "--disable-runtime-dependency-installation",
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(secret_file),
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
        self.process = ChildProcess(
            "flower-superlink", argv, paths.log_file("superlink"), env=self.app_env
        )

    @property
    def app_env(self) -> dict[str, str]:
        """For the SuperLink and the ServerApps: the ServerApp finds the coordinator's
        state through DATA_DIR_ENV; GRPC_VERBOSITY quiets gRPC's logs whatever the
        coordinator's own setting (see coordinator.cli)."""
        return {DATA_DIR_ENV: str(self.paths.root.resolve()), "GRPC_VERBOSITY": "ERROR"}

    @property
    def runtime(self) -> RuntimeEndpoint:
        """Where ServerApps reach the Runtime API (the SuperLink's one port)."""
        return RuntimeEndpoint(self.address, self.pki.ca_cert.resolve() if self.pki else None)

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
