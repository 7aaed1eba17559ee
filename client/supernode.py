"""The site's Flower SuperNode, started as a child process of `client join`.

It runs with `--isolation process`: it starts no ClientApp itself. `client join`'s
`SiteTaskRunner` (client/federated/task_runner.py) takes its tasks from the loopback
Runtime API, authenticated with a secret written here for this start (0600), and
executes only runs the coordinator approved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from client.federated.fast_poll_supernode import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_POLL_INTERVAL_S,
)
from consortium.file_modes import new_secret_file
from consortium.leftovers import owner_env
from consortium.net import PORT_IN_USE, reserve_free_port
from consortium.processes import ChildProcess, venv_executable
from consortium.workloads import BUILTIN_WORKLOADS

SIGNING_KEY_FILE = "institution-signing.key"
COMMITMENT_KEY_FILE = "data-commitment.key"
TASK_SECRET_FILE = "supernode-task.secret"
# What flower-supernode 1.41 logs when the SuperLink answered and refused to activate
# it (its key is not registered, or the institution's one node is active already);
# an unreachable SuperLink is retried inside the SuperNode instead.
ACTIVATION_REFUSED = "Failed to activate SuperNode"
# Its Runtime API's server (uvicorn) logs PORT_IN_USE when the port is taken: the port
# was free when reserved, then another process bound it first (two `client join`s on
# one host were handed the same free port and the second's SuperNode never started).

log = logging.getLogger(__name__)


def node_config(values: dict[str, str | int]) -> str:
    """Flower's --node-config syntax: space-separated key=value with TOML values."""
    parts = []
    for key, value in values.items():
        rendered = str(value) if isinstance(value, int) else '"' + value.replace('"', '\\"') + '"'
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


class SuperNode:
    def __init__(
        self,
        superlink_address: str,
        data_dir: Path,
        institution: str,
        device: str,
        state_dir: Path,
        tls: tuple[Path, Path] | None,
        port: int = 0,
        torch_threads: int = 1,
        coordinator_key: Path | None = None,
        workloads: Sequence[str] = BUILTIN_WORKLOADS,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
    ) -> None:
        self.port = port or reserve_free_port()
        secret_file = state_dir / TASK_SECRET_FILE
        # Authenticates the site's task runner to the Runtime API, so another local user
        # cannot take the site's tasks.
        self.task_secret = new_secret_file(secret_file)
        argv = [
            # flower-supernode, polling the SuperLink every 0.2 s instead of every 3 s
            # while busy, and declaring the site's heartbeat interval.
            venv_executable("consortium-flower-supernode"),
            "--poll-interval-s",
            str(poll_interval_s),
            "--heartbeat-interval-s",
            str(heartbeat_interval_s),
            "--superlink",
            superlink_address,
            "--port",
            str(self.port),
            # Our task runner, not Flower's launcher, executes tasks (see above).
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(secret_file.resolve()),
            "--node-config",
            node_config(
                {
                    "data-dir": str(data_dir.resolve()),
                    "institution": institution,
                    "device": device,
                    "torch-threads": torch_threads,
                    # The workloads the site agreed to run; the ClientApp refuses others.
                    "workloads": ",".join(workloads),
                    # Keys stay at the site; the ClientApp reads them from here.
                    "signing-key": str((state_dir / SIGNING_KEY_FILE).resolve()),
                    "commitment-key": str((state_dir / COMMITMENT_KEY_FILE).resolve()),
                    # For `client join`'s metrics, and the heads this site cosigned.
                    "state-dir": str(state_dir.resolve()),
                    # Checks the log heads the site cosigns ("": joined without a bundle).
                    "coordinator-key": str(coordinator_key.resolve()) if coordinator_key else "",
                }
            ),
        ]
        if tls is None:
            argv.append("--insecure")
        else:
            ca_cert, auth_key = tls  # verify the SuperLink; prove our onboarded key
            argv += [
                "--root-certificates",
                str(ca_cert.resolve()),
                "--auth-supernode-private-key",
                str(auth_key.resolve()),
            ]
        self._port_at = argv.index("--port") + 1  # a restart may move it (see `restart`)
        self._argv = argv
        self._log_path = state_dir / "supernode.log"
        self._env = owner_env(state_dir)
        self.process = self._start()

    def _start(self) -> ChildProcess:
        return ChildProcess("flower-supernode", self._argv, self._log_path, env=self._env)

    def refusal(self) -> str | None:
        """Why its last exit was the SuperLink's refusal, which a restart will not
        change (the supervisor gives up after a few in a row), else None."""
        if ACTIVATION_REFUSED in self.process.log_tail(40):
            return (
                "the SuperLink refused to activate this SuperNode: its key is not "
                "registered, or another node of this institution is joined (one node per "
                "institution takes part in federated jobs)"
            )
        return None

    def restart(self) -> None:
        """Start it again on the same Runtime API port and task secret, so the site's
        task runner reaches it where it did; it reconnects to the SuperLink itself. If
        another process took the port, on a new one: the task runner follows
        `runtime_api_address`."""
        self.process.stop()
        if self.process.logged(PORT_IN_USE):
            taken, self.port = self.port, reserve_free_port()
            self._argv[self._port_at] = str(self.port)
            log.warning(
                "the SuperNode's Runtime API port %d is taken by another process; "
                "starting it on port %d",
                taken,
                self.port,
            )
        self.process = self._start()

    @property
    def runtime_api_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop()
