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

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from consortium.processes import ChildProcess, stop_in_parallel
from consortium.proto.v1 import nodes_pb2, nodes_pb2_grpc
from consortium.ray_env import ray_auth_env
from consortium.site_keys import SiteKeys
from consortium.tls import ClientTls
from coordinator.access.pki_files import CoordinatorPki
from coordinator.cli.remote import connect
from tests.conftest import Processes
from tests.helpers import START_TIMEOUT_S, run_cli, start_secure_consortium, wait_for, wait_for_log
from tests.helpers_ray import Channel, alive

NAMES = ("alpha", "beta")

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


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Channel]:
    root = tmp_path_factory.mktemp("ray-channel")
    processes = Processes(root / "logs")
    channel: Channel | None = None
    try:
        data_dir, _ = start_secure_consortium(processes, root, NAMES, wait_for_keys=False, ray=True)
        channel = Channel(root, data_dir, processes, processes.children[0])
        yield channel
    finally:
        processes.stop_all()
        if channel is not None:
            channel.stop()


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


def get_ray_token(channel: Channel, name: str) -> nodes_pb2.GetRayTokenResponse:
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
        reply: nodes_pb2.GetRayTokenResponse = stub.GetRayToken(
            nodes_pb2.GetRayTokenRequest(institution=name), timeout=10
        )
    return reply


def fetch_ray_token(channel: Channel, name: str, tmp_path: Path) -> Path:
    """The cluster token `GetRayToken` hands `name`, in a file as `client join` keeps it."""
    reply = get_ray_token(channel, name)
    path = tmp_path / f"{name}-ray-token"
    path.write_bytes(reply.token)
    path.chmod(0o600)
    return path


def counted_for(channel: Channel) -> dict[str, str]:
    """Each live Ray node's institution as `coordinator nodes` shows it (ListNodes),
    by the node name `start_node` gave it (its `node` label), "" for none."""
    with connect(None, channel.data_dir) as remote:
        overview = remote.nodes_overview()
    assert not overview.ray_unavailable_reason, overview.ray_unavailable_reason
    ray_nodes = [n.ray for n in overview.nodes if n.HasField("ray")]
    ray_nodes += list(overview.unmatched_ray_nodes)
    live = [n for n in ray_nodes if n.state == "ALIVE" and "node" in n.labels]
    return {n.labels["node"]: n.counted_for for n in live}


def test_a_node_counts_for_the_institution_its_claim_names_never_for_what_it_declares(
    channel: Channel, joined: dict[str, ChildProcess]
) -> None:
    """Every member holds the cluster token and names its own node's institution. Only
    the coordinator's claims decide: alpha's and beta's plain nodes (no claim) count for
    no one; beta's node carrying beta's claim while declaring alpha counts for beta; a
    node copying that claim (labels are public to members) counts for no one and is
    refused in the log and the metrics."""
    wait_for(  # the coordinator's view of the cluster is a couple of seconds old at most
        "alpha's and beta's unclaimed nodes, counted for no one",
        lambda: counted_for(channel) == {"alpha-ray-no": "", "beta-ray-nod": ""},
    )
    reused_before = channel.refusals("claim_reused")
    claim = get_ray_token(channel, "beta").node_claim
    assert len(claim) == 32
    auth = ray_auth_env(channel.token("beta"))
    claimed = channel.start_node("claimed", "alpha", auth, claim=claim)
    wait_for(
        "beta's claimed node to count for beta",
        lambda: counted_for(channel).get("claimed-node") == "beta",
    )
    copy = channel.start_node("copy", "beta", ray_auth_env(channel.token("alpha")), claim=claim)
    wait_for("the copy to be refused", lambda: channel.refusals("claim_reused") > reused_before)
    counts = counted_for(channel)
    assert counts["copy-node"] == "" and counts["claimed-node"] == "beta", counts
    wait_for_log(channel.coordinator_log, "copies the claim of beta's node")
    for node in (claimed, copy):
        node.stop()


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
    wait_for_log(channel.coordinator_log, "beta can no longer join")
    # The old head is gone, and with it the cluster both nodes were in. Their `client
    # join`s would stop them now (alpha's restarts its worker on the heartbeat naming the
    # new head, beta's exits refused); these bare nodes are stopped here instead. Left
    # running, each raylet retries the new GCS with the old token without a pause until
    # Ray's reconnect timeout (measured: about 0.4 of a core each, and 0.7 of the GCS's).
    stop_in_parallel(node.stop for node in joined.values())
    # Issue 20: in the seconds after a rotation `coordinator nodes` printed Ray's
    # WrongClusterID trace advising `ray get-auth-token --generate`. Now it answers, with
    # at most one readable line about Ray.
    for _ in range(3):
        listed = run_cli("coordinator", "nodes", "--data-dir", str(channel.data_dir))
        assert listed.returncode == 0, listed.stderr
        shown = listed.stdout + listed.stderr
        assert "Traceback" not in shown and "get-auth-token" not in shown, shown
        assert "WrongClusterID" not in shown and "ClusterID" not in shown, shown
        time.sleep(1.0)

    # beta's next Ray join, with the token its bundle carries, is refused by the GCS...
    again = channel.start_node("beta-again", "beta", ray_auth_env(channel.token("beta")), True)
    # `ray start` retries its GCS connection several times before it gives up; on a
    # loaded machine that takes longer than a process start.
    wait_for(
        "the GCS to refuse beta's old token",
        lambda: refused_by_the_gcs(again),
        timeout_s=3 * START_TIMEOUT_S,
    )
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
        # `client join` restarts an exited worker (its supervisor, RayWorker.restart); on a loaded
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
