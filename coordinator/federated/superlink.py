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
from consortium.leftovers import owner_env
from consortium.net import PORT_IN_USE, reserve_free_port
from consortium.processes import ChildProcess, listens_on, port_holder, venv_executable
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DATA_DIR_ENV, DataDir
from coordinator.federated.serverapp_launcher import RuntimeEndpoint


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
            venv_executable("consortium-flower-superlink"),
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
        self._argv = argv
        self.process = self._start()

    def _start(self) -> ChildProcess:
        return ChildProcess(
            "flower-superlink", self._argv, self.paths.log_file("superlink"), env=self.app_env
        )

    def port_taken(self) -> bool:
        """Whether it exited because another process had bound its port."""
        return self.process.poll() is not None and self.process.logged(PORT_IN_USE)

    def move_to(self, port: int) -> None:
        """Start it again on `port` (at start-up, before anyone was told the old one)."""
        self.process.stop()
        self.port = port
        self._argv[self._argv.index("--port") + 1] = str(port)
        self.process = self._start()

    def restart(self, timeout_s: float) -> None:
        """Start it again on the same port, database and task secret (what the
        ServerApp launcher, the Fleet edge and sites hold stays valid); return once it
        listens, or raise as `wait_ready` does."""
        self.process.stop()
        self.process = self._start()
        self.wait_ready(timeout_s)

    @property
    def app_env(self) -> dict[str, str]:
        """For the SuperLink and the ServerApps: the ServerApp finds the coordinator's
        state through DATA_DIR_ENV; GRPC_VERBOSITY quiets gRPC's logs whatever the
        coordinator's own setting (see coordinator.cli); the owner mark lets the
        coordinator's reaper and its successor find them (consortium/leftovers.py)."""
        return {
            DATA_DIR_ENV: str(self.paths.root.resolve()),
            "GRPC_VERBOSITY": "ERROR",
            **owner_env(self.paths.root),  # a dead coordinator's leftovers are found
        }

    @property
    def runtime(self) -> RuntimeEndpoint:
        """Where ServerApps reach the Runtime API (the SuperLink's one port)."""
        return RuntimeEndpoint(self.address, self.pki.ca_cert.resolve() if self.pki else None)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        """Block until our SuperLink accepts connections, or raise with its log tail.

        The port answering is not enough: an old SuperLink (of a coordinator killed
        without a chance to stop it) may hold it, while ours fails to bind and exits.
        Ready means the listening socket is our child's own.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ChildProcessFailedError(
                    f"flower-superlink exited with code {self.process.poll()}"
                    f"{self._port_holder()}; see {self.process.log_path}:\n"
                    f"{self.process.log_tail()}"
                )
            if listens_on(self.process.pid, self.port):
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return
                except OSError:
                    pass
            time.sleep(0.1)
        raise ChildProcessFailedError(
            f"flower-superlink did not listen on {self.address} within {timeout_s:.0f} s"
            f"{self._port_holder()}; see {self.process.log_path}"
        )

    def _port_holder(self) -> str:
        holder = port_holder(self.port)
        return f" (port {self.port} is held by pid {holder})" if holder is not None else ""

    def stop(self) -> None:
        self.process.stop()
