"""The Flower app that carries a federated job, and the Control API that runs it.

The app directory holds only a pyproject.toml naming components installed with
this package (`coordinator.federated.server_app:app`, `client.federated.client_app:app`),
so the FAB built from it is tiny and sites run the code they installed.

`FlowerControl` calls the SuperLink's Control API in this process, with the client the
`flwr` CLI itself uses (`flwr.supercore.control.ControlHttpClient`: protobuf over HTTP,
TLS verified against the consortium's CA). It did run `flwr run / ls / stop / supernode
...` as child processes: each cost about 0.9 s of CPU to start (typer, rich and Flower's
imports) for a request that takes milliseconds, and the coordinator makes one at every
job start, status check, stop and SuperNode key check. FLWR_HOME in the data dir keeps a
`config.toml` naming the SuperLink, so an operator's own `flwr` commands reach it too.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from consortium.errors import ConsortiumError, InvalidArgumentError, UnreachableError
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.state.superlink_db import release_unregistered_node, run_fab_hash

SUPERLINK_NAME = "consortium"
FLWR_TIMEOUT_S = 120.0  # the SuperLink's database lock, in `release_unregistered_node`
# One Control API request: the SuperLink answers in milliseconds when it is up.
CONTROL_TIMEOUT_S = 30.0
# How often a caller waiting on a request looks at the coordinator's stop event.
STOP_CHECK_S = 0.1
ERROR_TEXT_LIMIT = 2000

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

Reply = TypeVar("Reply")


class FlowerControlError(UnreachableError):
    """A Control API request failed: the SuperLink is down, refused it, or the
    coordinator is stopping."""


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


class FlowerControl:
    """Runs, run status and SuperNode keys at our SuperLink, through its Control API."""

    def __init__(
        self,
        data_dir: DataDir | Path,
        superlink_address: str,
        pki: CoordinatorPki | None,
        stopping: threading.Event | None = None,
    ) -> None:
        # Set when the coordinator stops: its SuperLink is going away, so a caller
        # (the scheduler's thread, which the stop waits for) stops waiting on a request
        # at once instead of for CONTROL_TIMEOUT_S (seen with the CLI: a SIGTERMed
        # `serve` killed after 10 s).
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
        self._client = ControlHttpClient.from_server_address(
            superlink_address,
            insecure=pki is None,
            root_certificates=None if pki is None else str(pki.ca_cert.resolve()),
            interceptors=[CliClientHttpInterceptor()],
        )

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, request: Callable[[ControlHttpClient], Reply]) -> Reply:
        """`request`'s reply, from a thread of its own so that the caller stops
        waiting as soon as the coordinator stops (the request then ends by itself,
        within CONTROL_TIMEOUT_S)."""
        if self._stopping.is_set():
            raise FlowerControlError(f"Flower's {what} not asked: the coordinator is stopping")
        outcome: list[Reply] = []
        failure: list[BaseException] = []

        def send() -> None:
            try:
                outcome.append(request(self._client))
            except BaseException as error:  # handed to the caller below
                failure.append(error)

        sender = threading.Thread(target=send, name=f"flower-{what}", daemon=True)
        sender.start()
        while sender.is_alive():
            sender.join(STOP_CHECK_S)
            if self._stopping.is_set() and sender.is_alive():
                raise FlowerControlError(f"Flower's {what} abandoned: the coordinator is stopping")
        if failure:
            raise _control_error(what, failure[0]) from failure[0]
        return outcome[0]

    def run(self, run_config: dict[str, str]) -> str:
        # Imported at the first run: Flower's FAB builder brings its CLI's dependencies
        # (hundreds of modules) that `coordinator serve` does not otherwise need.
        from flwr.cli.build import build_fab_from_disk

        fab_bytes = build_fab_from_disk(self.app_dir)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        request = StartRunRequest(
            fab=fab_to_proto(fab),
            override_config=user_config_to_proto(dict(run_config)),
            federation="",
        )
        reply = self._call("run start", lambda client: client.StartRun(request))
        if not reply.HasField("run_id"):
            raise FlowerControlError(f"the SuperLink started no run: {reply}")
        return str(reply.run_id)

    def fab_hash(self, run_id: str) -> str:
        """The full sha256 of the app the SuperLink stored for the run."""
        return run_fab_hash(self.superlink_db, run_id, FLWR_TIMEOUT_S)

    def status(self, run_id: str) -> RunStatus:
        request = ListRunsRequest(run_id=int(run_id))
        reply = self._call("run status", lambda client: client.ListRuns(request))
        run = reply.run_dict.get(int(run_id))
        if run is None:
            raise FlowerControlError(f"Flower knows no run {run_id}")
        status = run.status.status
        if run.status.sub_status:  # as `flwr ls` shows it: "finished:completed"
            status = f"{status}:{run.status.sub_status}"
        return RunStatus(run_id, status, run.status.details)

    def stop(self, run_id: str) -> None:
        request = StopRunRequest(run_id=int(run_id))
        self._call("run stop", lambda client: client.StopRun(request))

    def register_supernode(self, public_key: str, name: str) -> str:
        """Allow a SuperNode key (OpenSSH format) to connect; returns Flower's node id."""
        request = RegisterNodeRequest(public_key=_flower_key_bytes(public_key), name=name)
        reply = self._call("node registration", lambda client: client.RegisterNode(request))
        if not reply.node_id:
            raise FlowerControlError(f"the SuperLink registered no node for {name}")
        return str(reply.node_id)

    def unregister_supernode(self, node_id: str) -> None:
        request = UnregisterNodeRequest(node_id=int(node_id))
        self._call("node unregistration", lambda client: client.UnregisterNode(request))

    def list_supernodes(self) -> list[SuperNodeEntry]:
        """Every node the SuperLink has, unregistered ones included."""
        reply = self._call("node list", lambda client: client.ListNodes(ListNodesRequest()))
        return [SuperNodeEntry(str(node.node_id), node.status) for node in reply.nodes_info]

    def release_unregistered_key(self, public_key: str) -> bool:
        """Let an unregistered SuperNode key be registered again; True if one was released
        (why and how: `coordinator/state/superlink_db.py`)."""
        return release_unregistered_node(
            self.superlink_db, _flower_key_bytes(public_key), FLWR_TIMEOUT_S
        )


def _flower_key_bytes(public_key: str) -> bytes:
    """An onboarded SuperNode key (OpenSSH) as Flower takes and stores it: what
    `flwr supernode register` sends for a key file (`public_key_to_bytes`)."""
    key = serialization.load_ssh_public_key(public_key.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidArgumentError(f"a SuperNode key must be an EC key, not {type(key).__name__}")
    return public_key_to_bytes(key)


def _control_error(what: str, error: BaseException) -> ConsortiumError:
    """One readable error for a failed request: the SuperLink's own words if it answered."""
    if isinstance(error, httpx.HTTPStatusError):
        body = error.response.text.strip()[:ERROR_TEXT_LIMIT]
        return FlowerControlError(
            f"Flower's {what} refused (HTTP {error.response.status_code}): {body}"
        )
    if isinstance(error, httpx.TimeoutException):
        return FlowerControlError(f"Flower's {what}: no answer in {CONTROL_TIMEOUT_S:.0f} s")
    if isinstance(error, httpx.TransportError):
        return FlowerControlError(f"Flower's {what}: the SuperLink is unreachable ({error})")
    return FlowerControlError(f"Flower's {what} failed: {type(error).__name__}: {error}")
