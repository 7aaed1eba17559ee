"""The Flower app that carries a federated job, and the `flwr` CLI that runs it.

The app directory holds only a pyproject.toml naming components installed with
this package (`coordinator.federated.server_app:app`, `client.federated.client_app:app`),
so the FAB that `flwr run` builds is tiny and sites run the code they installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from consortium.errors import ChildProcessFailedError
from consortium.processes import venv_executable
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.state.superlink_db import release_unregistered_node, run_fab_hash

SUPERLINK_NAME = "consortium"
FLWR_TIMEOUT_S = 120.0
# How often a running `flwr` command looks at the coordinator's stop event.
STOP_CHECK_S = 0.1

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "consortium-federated"
version = "1.0.0"
description = "A Consortium federated job"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "consortium"

[tool.flwr.app.components]
serverapp = "coordinator.federated.server_app:app"
clientapp = "client.federated.client_app:app"

[tool.flwr.app.config]
job-id = ""
"""


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    status: str  # e.g. "running", "finished:completed", "finished:failed"
    details: str

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")


@dataclass(frozen=True)
class SuperNodeEntry:
    """One node the SuperLink knows (`flwr supernode list`); Flower does not show keys."""

    node_id: str
    status: str  # "registered", "online", "offline" or "unregistered"

    @property
    def active(self) -> bool:
        """Whether its key may connect: every status but "unregistered"."""
        return self.status != "unregistered"


class FlowerCli:
    """`flwr run / ls / stop` against our SuperLink, with FLWR_HOME in the data dir."""

    def __init__(
        self,
        data_dir: DataDir | Path,
        superlink_address: str,
        pki: CoordinatorPki | None,
        stopping: threading.Event | None = None,
    ) -> None:
        # Set when the coordinator stops: its SuperLink is going away, so a `flwr`
        # command would only retry against it for up to FLWR_TIMEOUT_S, holding the
        # thread that the stop waits for (seen: a SIGTERMed `serve` killed after 10 s).
        self._stopping = stopping or threading.Event()
        paths = DataDir(data_dir) if isinstance(data_dir, Path) else data_dir
        self.superlink_db = paths.superlink_db
        self.app_dir = paths.flower_app_dir
        self.home = paths.flower_home
        self.app_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.app_dir / "pyproject.toml").write_text(APP_PYPROJECT)
        transport = (
            "insecure = true\n"
            if pki is None
            else f'root-certificates = "{pki.ca_cert.resolve()}"\n'
        )
        (self.home / "config.toml").write_text(
            f'[superlink.{SUPERLINK_NAME}]\naddress = "{superlink_address}"\n{transport}'
        )

    def _flwr(self, *args: str) -> dict[str, object]:
        argv = [venv_executable("flwr"), *args, "--format", "json"]
        env = dict(os.environ, FLWR_HOME=str(self.home))
        returncode, stdout, stderr = self._run_until_stopped(args[0], argv, env)
        try:
            result: dict[str, object] = json.loads(stdout)
        except json.JSONDecodeError:
            raise ChildProcessFailedError(
                f"`flwr {args[0]}` failed (exit {returncode}): {(stderr or stdout).strip()[-2000:]}"
            ) from None
        if not result.get("success", False):
            raise ChildProcessFailedError(
                f"`flwr {args[0]}` failed: {result.get('error-message', result)}"
            )
        return result

    def _run_until_stopped(
        self, command: str, argv: list[str], env: dict[str, str]
    ) -> tuple[int, str, str]:
        """Its exit code and output; raises when it takes over FLWR_TIMEOUT_S or the
        coordinator stops meanwhile (the command is killed either way)."""
        if self._stopping.is_set():
            raise ChildProcessFailedError(f"`flwr {command}` not run: the coordinator is stopping")
        deadline = time.monotonic() + FLWR_TIMEOUT_S
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        ) as process:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=STOP_CHECK_S)
                    return process.returncode, stdout, stderr
                except subprocess.TimeoutExpired:
                    pass  # communicate() may be called again without losing output
                if self._stopping.is_set() or time.monotonic() > deadline:
                    process.kill()
                    process.communicate()
                    why = (
                        "the coordinator is stopping"
                        if self._stopping.is_set()
                        else ("it did not answer in time")
                    )
                    raise ChildProcessFailedError(f"`flwr {command}` ended: {why}")

    def run(self, run_config: dict[str, str]) -> str:
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
        result = self._flwr("run", str(self.app_dir), SUPERLINK_NAME, "--run-config", overrides)
        return str(result["run-id"])

    def fab_hash(self, run_id: str) -> str:
        """The full sha256 of the app the SuperLink stored for the run."""
        return run_fab_hash(self.superlink_db, run_id, FLWR_TIMEOUT_S)

    def status(self, run_id: str) -> RunStatus:
        result = self._flwr("ls", SUPERLINK_NAME, "--run-id", run_id)
        runs = result.get("runs")
        if not isinstance(runs, list) or not runs:
            raise ChildProcessFailedError(f"Flower knows no run {run_id}")
        run = runs[0]
        return RunStatus(run_id, str(run.get("status", "")), str(run.get("status-details", "")))

    def stop(self, run_id: str) -> None:
        self._flwr("stop", run_id, SUPERLINK_NAME)

    def register_supernode(self, public_key: str, name: str) -> str:
        """Allow a SuperNode key to connect; returns Flower's node id for it."""
        key_file = self.home / f"supernode-{name}.pub"
        key_file.write_text(public_key + "\n")
        result = self._flwr("supernode", "register", str(key_file), SUPERLINK_NAME)
        return str(result["node-id"])

    def unregister_supernode(self, node_id: str) -> None:
        self._flwr("supernode", "unregister", node_id, SUPERLINK_NAME)

    def list_supernodes(self) -> list[SuperNodeEntry]:
        """Every node the SuperLink has, unregistered ones included."""
        result = self._flwr("supernode", "list", SUPERLINK_NAME)
        nodes = result.get("nodes")
        if not isinstance(nodes, list):
            raise ChildProcessFailedError(f"`flwr supernode list` gave no node list: {result}")
        return [
            SuperNodeEntry(str(node["node-id"]), str(node.get("status", "")))
            for node in nodes
            if isinstance(node, dict) and "node-id" in node
        ]

    def release_unregistered_key(self, public_key: str) -> bool:
        """Let an unregistered SuperNode key be registered again; True if one was released
        (why and how: `coordinator/state/superlink_db.py`). Flower stores the key as PEM
        SubjectPublicKeyInfo (`public_key_to_bytes`)."""
        key = serialization.load_ssh_public_key(public_key.encode())
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return release_unregistered_node(self.superlink_db, pem, FLWR_TIMEOUT_S)
