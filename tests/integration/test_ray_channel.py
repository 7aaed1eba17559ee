"""The Ray channel against a real secure coordinator and its Ray head on loopback.

`coordinator serve` (after `coordinator init`) runs its head with token authentication.
Nodes here are started exactly as `client join` starts its Ray worker
(`client.ray_worker.worker_argv`), with or without a token. What Ray 2.60 does:

* no token: the GCS refuses every request (`ray start` fails with ``InvalidAuthToken``)
  and logs ``Missing authorization header in request!`` for each; the coordinator turns
  those lines into a log line and ``consortium_auth_refusals_total{channel="ray"}``;
* a wrong token: refused the same way, but the GCS logs nothing at all, so the
  coordinator cannot see it (tested on the caller's side only);
* the bundle's token: the node joins;
* revocation: Ray has one shared token, so the coordinator replaces it and restarts its
  head; the revoked institution's old token is refused and the control plane does not
  give it the new one, while the others fetch it and rejoin.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.ray_worker import worker_argv
from consortium.processes import ChildProcess
from consortium.proto.v1 import nodes_pb2, nodes_pb2_grpc
from consortium.ray_env import DRAIN_TIMEOUT_ENV, ray_auth_env, short_temp_dir
from consortium.site_keys import SiteKeys
from consortium.tls import ClientTls
from coordinator.access.pki_files import CoordinatorPki
from tests.conftest import Processes, wait_for
from tests.integration.conftest import start_secure_consortium
from tests.integration.test_bad_input import run_cli

REPO = Path(__file__).resolve().parents[2]
NAMES = ("alpha", "beta")
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
PLANNER_QUERY = """
import json, sys
import ray
from coordinator.pretraining.cluster import RayClusterView
ray.init(address=sys.argv[1], logging_level="ERROR")
@ray.remote(num_cpus=1, resources={"institution:alpha": 1})
def node_id():
    return ray.get_runtime_context().get_node_id()
slots = RayClusterView().slots()
print(json.dumps({
    "slot_institutions": sorted({s.institution for s in slots}),
    "alpha_task_ran_on": ray.get(node_id.remote(), timeout=120),
}))
"""


@dataclass
class Channel:
    root: Path
    data_dir: Path
    processes: Processes
    coordinator: ChildProcess

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{(self.data_dir / 'ray' / 'head.port').read_text().strip()}"

    def token(self, name: str) -> Path:
        return self.root / name / "bundle" / "ray-token"

    def start_node(
        self, name: str, institution: str, auth: Mapping[str, str], refused: bool = False
    ) -> ChildProcess:
        """`ray start --address <head> --block` as `client join` runs it."""
        argv = worker_argv(
            self.ray_address, institution, f"{name}-node", None, short_temp_dir(self.root / name)
        )
        env = {**auth, DRAIN_TIMEOUT_ENV: "0", **(GCS_TRIES_ENV if refused else {})}
        child = ChildProcess(name, argv, self.processes.log_dir / f"{name}.log", env=env)
        self.processes.children.append(child)  # stopped with the rest, also on failure
        self.processes.seen_pids.add(child.pid)
        return child

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
        gcs_log = short_temp_dir(self.data_dir) / "session_latest" / "logs" / "gcs_server.out"
        return gcs_log.read_text(errors="replace").count("Missing authorization header in request!")

    def coordinator_log(self) -> str:
        return self.coordinator.log_path.read_text(errors="replace")

    def refusals(self, reason: str) -> float:
        address = (self.data_dir / "metrics.address").read_text().strip()
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "consortium_auth_refusals_total" and sample.labels == {
                    "channel": "ray",
                    "reason": reason,
                }:
                    return float(sample.value)
        raise AssertionError(f"no auth-refusal series for channel 'ray', reason {reason!r}")


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Channel]:
    root = tmp_path_factory.mktemp("ray-channel")
    processes = Processes(root / "logs")
    try:
        data_dir, _ = start_secure_consortium(processes, root, NAMES, wait_for_keys=False)
        yield Channel(root, data_dir, processes, processes.children[0])
    finally:
        processes.stop_all()


def alive(nodes: list[dict[str, Any]], institution: str) -> list[dict[str, Any]]:
    return [n for n in nodes if n["alive"] and n["institution"] == institution]


def refused_by_the_gcs(node: ChildProcess) -> bool:
    if node.poll() is None:
        return False
    assert node.poll() != 0
    assert "Authentication token is missing or incorrect" in node.log_tail(80)
    return True


def test_ray_join_without_the_token_is_refused_logged_and_counted(channel: Channel) -> None:
    before, ray_before = channel.refusals("missing_token"), channel.gcs_missing_token_lines()
    assert channel.refusals("invalid_token") == 0  # the series exists before any event
    node = channel.start_node("tokenless", "mallory", ray_auth_env(None), refused=True)
    wait_for("the GCS to refuse the tokenless node", lambda: refused_by_the_gcs(node))
    refused_by_ray = channel.gcs_missing_token_lines() - ray_before
    assert refused_by_ray >= 1  # one per try of `ray start`
    wait_for(
        "every request Ray refused counted",
        lambda: channel.refusals("missing_token") - before == refused_by_ray,
    )
    wait_for(
        "the refusal in the coordinator log",
        lambda: "Ray: refused a connection from" in channel.coordinator_log(),
    )
    line = next(
        line for line in channel.coordinator_log().splitlines() if "Ray: refused a conn" in line
    )
    assert "no token" in line and "RAY_AUTH_MODE=token" in line
    assert alive(channel.nodes(), "mallory") == []
    assert channel.coordinator.poll() is None  # refused, counted, and still serving


def test_ray_join_with_a_wrong_token_is_refused(channel: Channel, tmp_path: Path) -> None:
    wrong = tmp_path / "ray-token"
    wrong.write_text(secrets.token_hex(32))
    wrong.chmod(0o600)
    node = channel.start_node("wrong-token", "mallory", ray_auth_env(wrong), refused=True)
    wait_for("the GCS to refuse the wrong token", lambda: refused_by_the_gcs(node))
    assert alive(channel.nodes(), "mallory") == []


@pytest.fixture(scope="module")
def joined(channel: Channel) -> dict[str, ChildProcess]:
    """alpha's and beta's nodes, each with its bundle's token."""
    started = {
        name: channel.start_node(f"{name}-ray", name, ray_auth_env(channel.token(name)))
        for name in NAMES
    }

    def both_alive() -> bool:
        for name, child in started.items():
            if child.poll() is not None:
                raise AssertionError(f"{name}'s node exited:\n{child.log_tail(40)}")
        nodes = channel.nodes()
        return all(len(alive(nodes, name)) == 1 for name in NAMES)

    wait_for("alpha's and beta's nodes alive", both_alive)
    return started


def test_institutions_join_ray_with_the_bundle_token(
    channel: Channel, joined: dict[str, ChildProcess]
) -> None:
    nodes = channel.nodes()
    for name in NAMES:
        (node,) = alive(nodes, name)
        assert node["resources"][f"institution:{name}"] == 1
        assert not node["draining"]
        assert joined[name].poll() is None


def fetch_ray_token(channel: Channel, name: str, tmp_path: Path) -> Path:
    """`GetRayToken` over mutual TLS with `name`'s bundle, as `client join` does."""
    site = channel.root / name
    tls = ClientTls(
        site / "bundle" / "ca.crt",
        site / "bundle" / "institution.crt",
        SiteKeys(site / "state").tls_key,
    )
    address = (channel.data_dir / "coordinator.address").read_text().strip()
    with grpc.secure_channel(address, tls.credentials()) as rpc:
        stub = nodes_pb2_grpc.NodeRegistryStub(rpc)
        reply = stub.GetRayToken(nodes_pb2.GetRayTokenRequest(institution=name), timeout=10)
    path = tmp_path / f"{name}-ray-token"
    path.write_bytes(reply.token)
    path.chmod(0o600)
    return path


def test_revocation_replaces_the_ray_token_so_the_institution_is_refused_while_others_rejoin(
    channel: Channel, joined: dict[str, ChildProcess], tmp_path: Path
) -> None:
    (alpha,) = alive(channel.nodes(), "alpha")
    old_token = CoordinatorPki(channel.data_dir).ray_token.read_bytes()

    revoked = run_cli("coordinator", "revoke", "beta", "--data-dir", str(channel.data_dir))
    assert revoked.returncode == 0, revoked.stderr
    wait_for(
        "the coordinator to replace the Ray token",
        lambda: "Ray: replaced the cluster token" in channel.coordinator_log(),
    )
    assert CoordinatorPki(channel.data_dir).ray_token.read_bytes() != old_token
    assert "beta can no longer join" in channel.coordinator_log()

    # beta's next Ray join, with the token its bundle carries, is refused by the GCS...
    again = channel.start_node("beta-again", "beta", ray_auth_env(channel.token("beta")), True)
    wait_for("the GCS to refuse beta's old token", lambda: refused_by_the_gcs(again))
    # ... and the control plane will not hand beta the new one.
    with pytest.raises(grpc.RpcError) as raised:
        fetch_ray_token(channel, "beta", tmp_path)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # alpha fetches the new token, as its `client join` does before restarting its
    # worker, and its node joins the restarted head and runs work.
    token = fetch_ray_token(channel, "alpha", tmp_path)
    assert token.read_bytes() == CoordinatorPki(channel.data_dir).ray_token.read_bytes()
    starts = [channel.start_node("alpha-again", "alpha", ray_auth_env(token))]

    def alpha_back() -> bool:
        # `client join` restarts an exited worker (RayWorker.ensure_running); on a loaded
        # 2-core machine the just-restarted GCS can miss a new raylet's first deadline.
        if starts[-1].poll() is not None:
            if len(starts) == 3:
                raise AssertionError(f"alpha's node exited 3 times:\n{starts[-1].log_tail(40)}")
            starts.append(
                channel.start_node(f"alpha-again-{len(starts)}", "alpha", ray_auth_env(token))
            )
            return False
        return any(n["id"] != alpha["id"] for n in alive(channel.nodes(), "alpha"))

    wait_for("alpha's node on the restarted head", alpha_back)
    assert alive(channel.nodes(), "beta") == []
    planner = channel.query(PLANNER_QUERY)
    assert planner["slot_institutions"] == ["alpha"]
