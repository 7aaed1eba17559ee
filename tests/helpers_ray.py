"""Ray-channel helpers shared by test_ray_channel.py and test_ray_tls.py: Ray nodes
started exactly as `client join` starts its worker, and queries of the cluster run in a
child (with the consortium's token) so the test process stays out of Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.ray_worker import worker_argv
from consortium.processes import ChildProcess
from consortium.ray_env import (
    DRAIN_TIMEOUT_ENV,
    prepare_ray_temp_dir,
    ray_auth_env,
    ray_temp_dir,
    remove_ray_temp_dir,
)
from coordinator.access.pki_files import CoordinatorPki
from tests.conftest import Processes
from tests.helpers import auth_refusals

REPO = Path(__file__).resolve().parents[2]
# `ray start` retries the GCS once a second; three tries are enough to be refused.
GCS_TRIES_ENV = {"RAY_gcs_server_port_wait_time_s": "3"}
QUERY_TIMEOUT_S = 180

# Run in a child with the consortium's token: this test process stays out of Ray.
NODES_QUERY = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated import gcs_pb2
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=20)
print(json.dumps([
    {
        "id": node_id.hex(),
        "alive": info.state == gcs_pb2.GcsNodeInfo.ALIVE,
        "draining": info.state_snapshot.state == gcs_pb2.NodeSnapshot.DRAINING,
        "institution": dict(info.labels).get("institution"),
        "resources": dict(info.resources_total),
    }
    for node_id, info in nodes.items()
]))
"""


@dataclass
class Channel:
    root: Path
    data_dir: Path
    processes: Processes
    coordinator: ChildProcess
    # The dirs `start_node` made for its nodes' Ray files (`client join` removes its own).
    node_anchors: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        """Stop every process the tests started, then remove the nodes' Ray dirs."""
        self.processes.stop_all()
        for anchor in self.node_anchors:
            remove_ray_temp_dir(anchor)

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{(self.data_dir / 'ray' / 'head.port').read_text().strip()}"

    def token(self, name: str) -> Path:
        return self.root / name / "bundle" / "ray-token"

    def start_node(
        self,
        name: str,
        institution: str,
        auth: Mapping[str, str],
        refused: bool = False,
        claim: str | None = None,
    ) -> ChildProcess:
        """`ray start --address <head> --block` as `client join` runs it, declaring
        `institution` (label and resource) and carrying `claim` if given."""
        argv = worker_argv(
            self.ray_address,
            institution,
            f"{name}-node",
            None,
            self._prepare_node_dir(self.root / name),
            claim=claim,
        )
        env = {**auth, DRAIN_TIMEOUT_ENV: "0", **(GCS_TRIES_ENV if refused else {})}
        child = ChildProcess(name, argv, self.processes.log_dir / f"{name}.log", env=env)
        self.processes.children.append(child)  # stopped with the rest, also on failure
        self.processes.seen_pids.add(child.pid)
        return child

    def _prepare_node_dir(self, anchor: Path) -> Path:
        self.node_anchors.append(anchor)
        return prepare_ray_temp_dir(anchor)

    def query(self, script: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-c", script, self.ray_address],
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_S,
            check=False,
            cwd=REPO,
            env={**os.environ, **self.query_env()},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def query_env(self) -> dict[str, str]:
        """How the query child authenticates to the cluster (the coordinator's token)."""
        return ray_auth_env(CoordinatorPki(self.data_dir).ray_token)

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.query(NODES_QUERY)
        return nodes

    def gcs_missing_token_lines(self) -> int:
        """What the head's own GCS log recorded (the ground truth the coordinator reads)."""
        gcs_log = ray_temp_dir(self.data_dir) / "session_latest" / "logs" / "gcs_server.out"
        return gcs_log.read_text(errors="replace").count("Missing authorization header in request!")

    def coordinator_log(self) -> str:
        return self.coordinator.log_path.read_text(errors="replace")

    def refusals(self, reason: str) -> float:
        return auth_refusals(self.data_dir, "ray", reason)


def alive(nodes: list[dict[str, Any]], institution: str) -> list[dict[str, Any]]:
    return [n for n in nodes if n["alive"] and n["institution"] == institution]
