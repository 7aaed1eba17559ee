"""Pretraining on a contributed node, end to end, and `coordinator nodes` beside it.

One `coordinator serve --insecure` with its Ray head (which takes the coordinator's own
token even in plain text: Ray listens beyond loopback), and
one real `client join` (CPU only) whose Ray worker joins it: a tiny DiLoCo run submitted
over the API; `coordinator nodes` showing the registry and the Ray cluster side by side;
a pretraining job the cluster cannot serve waiting with a reason; and code any pool member
runs on the site's node, which (join running as root) cannot read the site's secrets."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from consortium.exit_codes import ExitCode
from consortium.processes import descendant_pids
from consortium.proto.v1 import jobs_pb2, jobs_pb2_grpc, nodes_pb2
from consortium.ray_env import ray_auth_env
from consortium.sandbox import POOL_USER
from coordinator.cli.remote import Remote
from coordinator.data_dir import DataDir
from tests.conftest import Processes
from tests.helpers import (
    FINAL_STATES,
    TINY_PRETRAIN,
    auth_refusals,
    join_site,
    run_cli,
    start_coordinator,
    wait_for,
    write_partitions,
)

INSTITUTION = "aurora"
RAY_JOIN_TIMEOUT_S = 120.0
WAIT_MESSAGE_TIMEOUT_S = 120.0
OUTER_STEPS = 2
JOB_TIMEOUT_S = 150.0

PRETRAIN_JOB = f"""\
name = "tiny-pretrain"
{TINY_PRETRAIN}inner_steps = 5
outer_steps = {OUTER_STEPS}
min_workers = 1
wait_for_workers_s = 30.0
worker_start_timeout_s = 120.0
step_timeout_s = 120.0
"""

# Asks for GPUs on a CPU-only cluster; caps name the institution whose node registered
# (an insecure coordinator has no onboarding, so that is how it knows the name).
GPU_JOB = f"""\
name = "wants-gpus"
{TINY_PRETRAIN}inner_steps = 5
outer_steps = 2
device = "gpu"
min_workers = 1
per_institution_caps = {{ {INSTITUTION} = 1 }}
wait_for_workers_s = 1.0
"""


@dataclass
class Site:
    address: str
    data_dir: Path
    node_id: str
    ray_address: str  # the coordinator's Ray head
    join_pid: int
    state_dir: Path  # the site's
    data: Path  # the site's private data
    coordinator_pid: int


def ray_alive(remote: Remote) -> str | None:
    """The registry id of the online node once its Ray worker is ALIVE."""
    for node in remote.nodes_overview().nodes:
        if node.state == nodes_pb2.NODE_STATE_ONLINE and node.ray.state == "ALIVE":
            return node.node_id
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("pretrain-job")
    processes = Processes(root / "logs")
    try:
        data_dir = root / "coordinator"
        address = start_coordinator(processes, data_dir, ray=True)
        (data,) = write_partitions(root, [INSTITUTION])
        join = join_site(
            processes,
            "client",
            data,
            root / "state",
            coordinator=address,
            institution=INSTITUTION,
            ray=True,
        )
        with Remote(address) as remote:
            wait_for(
                "the node's Ray worker ALIVE",
                lambda: ray_alive(remote) is not None,
                timeout_s=RAY_JOIN_TIMEOUT_S,
            )
            node_id = ray_alive(remote)
        assert node_id is not None
        joined = re.search(r"Ray worker joining (\S+) as", join.log_path.read_text())
        assert joined is not None, join.log_tail()
        coordinator_pid = processes.children[0].pid
        yield Site(
            address, data_dir, node_id, joined[1], join.pid, root / "state", data, coordinator_pid
        )
    finally:
        processes.stop_all()


def test_pretrain_job_succeeds_on_contributed_node_with_provenance_and_accounting(
    site: Site,
) -> None:
    drivers: dict[int, tuple[int, list[str]]] = {}  # pid -> (uid, what it sees of the data dir)

    def ended() -> bool:
        drivers.update(driver_views(site))
        return remote.get(job.job_id).job.state in FINAL_STATES

    with Remote(site.address) as remote:
        job = remote.submit(PRETRAIN_JOB)
        assert job.rounds_total == OUTER_STEPS
        wait_for("the pretraining job to end", ended, timeout_s=JOB_TIMEOUT_S)
        reply = remote.get(job.job_id)
    assert reply.job.state == jobs_pb2.JOB_STATE_SUCCEEDED, reply.job.message
    # Issue 17: the driver unpickles what Ray's workers return. Run as root, it runs as
    # the pool user and sees nothing of the data dir (the signing key, the state, the
    # CA) but the way to its run's checkpoint dir.
    assert drivers, "no pretraining driver was seen running"
    for uid, seen in drivers.values():
        if os.geteuid() == 0:
            assert (uid, seen) == (pwd.getpwnam(POOL_USER).pw_uid, ["checkpoints"])
        else:
            assert uid == os.getuid() and "state.db" in seen
    assert [r.round for r in reply.rounds] == [1, 2]
    assert all(r.participants == 1 and "val_loss" in r.metrics for r in reply.rounds)
    model = site.data_dir / "models" / f"{job.job_id}.safetensors"
    assert model.is_file() and reply.job.model_path == str(model)

    shown = run_cli(
        "coordinator", "accounting", "--job", job.job_id, "--data-dir", str(site.data_dir)
    )
    assert shown.returncode == 0, shown.stderr
    assert INSTITUTION in shown.stdout

    verified = run_cli("coordinator", "provenance", "verify", "--data-dir", str(site.data_dir))
    assert verified.returncode == 0, verified.stderr
    entries = [
        json.loads(line) for line in DataDir(site.data_dir).provenance_log.read_text().splitlines()
    ]
    steps = [
        e["body"]
        for e in entries
        if e.get("type") == "outer_step" and e["body"]["job_id"] == job.job_id
    ]
    assert [s["step"] for s in steps] == [0, 1]
    assert all(w["institution"] == INSTITUTION for s in steps for w in s["workers"])
    assert steps[-1]["val_loss"] == pytest.approx(reply.rounds[-1].metrics["val_loss"])


def test_pretrain_spec_with_zero_inner_steps_is_invalid_argument(site: Site) -> None:
    spec = PRETRAIN_JOB.replace("inner_steps = 5", "inner_steps = 0")
    with grpc.insecure_channel(site.address) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=spec), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 'inner_steps'" in raised.value.details()


def test_nodes_command_shows_registry_node_with_its_ray_state_and_resources(
    site: Site,
) -> None:
    shown = run_cli("coordinator", "nodes", "--coordinator", site.address)
    assert shown.returncode == 0, shown.stderr
    rows = shown.stdout.splitlines()
    (row,) = [r for r in rows if site.node_id[:12] in r]
    for expected in (
        INSTITUTION,
        "online",
        "ALIVE",
        "CPU 1",
        "GPU 0",
        f"institution:{INSTITUTION} 1",
    ):
        assert expected in row, shown.stdout
    # The head matches no registry node and is listed as such, without CPUs to offer.
    (head,) = [r for r in rows if "Ray head" in r]
    assert "ALIVE" in head and "CPU 0" in head, shown.stdout
    assert "Ray unavailable" not in shown.stdout


def test_nodes_reply_matches_the_ray_node_by_its_node_label(site: Site) -> None:
    with Remote(site.address) as remote:
        overview = remote.nodes_overview()
    (node,) = [n for n in overview.nodes if n.node_id == site.node_id]
    assert node.ray.labels["node"] == site.node_id[:12]
    assert node.ray.labels["institution"] == INSTITUTION
    assert node.ray.labels["memory"].endswith("GiB")  # hardware labels reach Ray
    assert "gpu-model" not in node.ray.labels  # a CPU node
    assert node.ray.resources["CPU"] == 1.0
    assert node.ray.resources[f"institution:{INSTITUTION}"] == 1.0
    assert node.ray.resources["memory"] > 0
    assert [n.is_head for n in overview.unmatched_ray_nodes] == [True]
    assert overview.ray_unavailable_reason == ""
    assert overview.ray_read_at_ms > 0


def test_gpu_job_on_cpu_cluster_waits_naming_gpus_until_cancelled(site: Site) -> None:
    with Remote(site.address) as remote:
        job = remote.submit(GPU_JOB)

        def waiting_message() -> str | None:
            current = remote.get(job.job_id).job
            assert current.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING), (
                current.message
            )
            return current.message if current.message.startswith("waiting:") else None

        wait_for(
            "the waiting reason", lambda: waiting_message() is not None, WAIT_MESSAGE_TIMEOUT_S
        )
        message = remote.get(job.job_id).job.message
        assert "needs 1 GPU worker, the cluster offers 0" in message

        listed = run_cli("coordinator", "jobs", "list", "--coordinator", site.address)
        assert listed.returncode == 0, listed.stderr
        assert "needs 1 GPU worker" in listed.stdout

        assert remote.cancel(job.job_id).state == jobs_pb2.JOB_STATE_CANCELLED
        final = remote.get(job.job_id).job
        assert final.state == jobs_pb2.JOB_STATE_CANCELLED
        assert final.message == "cancelled by request"


def test_cap_for_unknown_institution_is_refused_at_submit(site: Site, tmp_path: Path) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text(GPU_JOB.replace(f"{{ {INSTITUTION} = 1 }}", "{ aurorra = 1 }"))
    with Remote(site.address) as remote:
        before = len(remote.list_jobs())
        done = run_cli("coordinator", "jobs", "submit", str(spec), "--coordinator", site.address)
        assert done.returncode == ExitCode.INVALID_JOB_SPEC, done.stderr
        assert "field 'per_institution_caps'" in done.stderr
        assert "'aurorra'" in done.stderr and INSTITUTION in done.stderr  # names the known one
        assert len(remote.list_jobs()) == before


def driver_views(site: Site) -> dict[int, tuple[int, list[str]]]:
    """Each running pretraining driver of the coordinator: its uid, and what it sees in
    the data dir (its mount namespace's view, read through /proc as root may)."""
    views = {}
    for process in psutil.Process(site.coordinator_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            command = process.cmdline()
            if "coordinator.pretraining.driver" in command and "consortium.sandbox" not in command:
                seen = sorted(os.listdir(f"/proc/{process.pid}/root{site.data_dir.resolve()}"))
                views[process.pid] = (process.uids().real, seen)
    return views


# A pool member's code, placed on the site's node (its institution's resource), or with
# no CPU on the coordinator's head node (which hosts no work, but would run it).
POOL_MEMBERS_TASK = """
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR")
if sys.argv[2] == "head":
    alive = [n for n in ray.nodes() if n["Alive"]]
    [head] = [n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]]
    on_head = NodeAffinitySchedulingStrategy(head, soft=False)
    placed = {"num_cpus": 0, "scheduling_strategy": on_head}
else:
    placed = {"num_cpus": 1, "resources": {"institution:INSTITUTION": 1}}
@ray.remote(**placed)
def try_to_read(paths):
    found = {}
    for path in paths:
        try:
            with open(path, "rb") as handle:
                handle.read(1)
            found[path] = "read"
        except OSError as error:
            found[path] = type(error).__name__
    return {"uid": os.getuid(), "found": found}
print(json.dumps(ray.get(try_to_read.remote(sys.argv[3:]), timeout=120)))
""".replace("INSTITUTION", INSTITUTION)


def run_ray_script(script: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`script` in a child with `env` (this test process stays out of Ray): the JSON
    object it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def run_pool_members_task(site: Site, where: str, targets: list[Path]) -> dict[str, Any]:
    # A pool member holds the cluster's token (this coordinator's own, plain text).
    member = ray_auth_env(DataDir(site.data_dir).local_ray_token)
    return run_ray_script(POOL_MEMBERS_TASK, [site.ray_address, where, *map(str, targets)], member)


def refused_as_the_pool_user(seen: dict[str, Any], targets: list[Path]) -> None:
    """As root: the task ran as the pool user and read none of `targets`. Otherwise it
    ran as this user, and read the first (what `client join`'s warning says)."""
    if os.geteuid() == 0:
        assert seen["uid"] == pwd.getpwnam(POOL_USER).pw_uid
        assert seen["found"] == {str(t): "PermissionError" for t in targets}
    else:
        assert seen["uid"] == os.getuid()
        assert seen["found"][str(targets[0])] == "read"


def test_code_on_the_sites_pool_node_cannot_read_its_keys_or_data(site: Site) -> None:
    """Issue 17: Ray is one trust domain, so any member's code can run on a pool node.
    Where `client join` runs as root (as in CI) that code runs as the pool user, which
    reads neither the site's state (its institution's signing key, the SuperNode's task
    secret) nor its private data, nor the join process's environment. Off root the node
    runs as the joining user, which can (the warning `client join` logs says so)."""
    targets = [
        site.state_dir / "institution-signing.key",
        site.state_dir / "supernode-task.secret",
        *sorted(p for p in site.data.rglob("*") if p.is_file()),
        Path(f"/proc/{site.join_pid}/environ"),
    ]
    assert all(t.exists() for t in targets) and len(targets) >= 4
    refused_as_the_pool_user(run_pool_members_task(site, "site", targets), targets)


def test_code_on_the_coordinators_head_node_cannot_read_its_keys_or_state(site: Site) -> None:
    """Issue 17's first attack: a member's driver ran a task on the head node that read
    the coordinator's keys. Run as root, the head's processes (and so the workers it
    starts) run as the pool user, with the data dir out of sight."""
    paths = DataDir(site.data_dir)
    targets = [paths.signing_key, paths.state_db, Path(f"/proc/{site.coordinator_pid}/environ")]
    assert all(t.exists() for t in targets)
    refused_as_the_pool_user(run_pool_members_task(site, "head", targets), targets)


def test_the_coordinators_ray_head_starts_no_ray_client_server_and_no_api_server(
    site: Site,
) -> None:
    """Ray starts a Ray Client server (port 10001, every interface: code from any token
    holder) and an API server beside every head's GCS; nothing here uses either, and the
    coordinator's head starts neither (consortium/ray_head_services.py)."""
    head: dict[int, str] = {}
    listening: set[int] = set()
    for pid in descendant_pids(site.coordinator_pid):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            head[pid] = " ".join(process.cmdline())
            listening |= {
                c.laddr.port
                for c in process.net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            }
    assert any("/gcs_server" in command for command in head.values()), head
    assert int(site.ray_address.rsplit(":", 1)[1]) in listening  # the GCS's, as before
    for service in ("ray.util.client.server", "dashboard/dashboard.py"):
        assert not [command for command in head.values() if service in command], head
    assert 10001 not in listening, listening  # Ray Client's port (this head has no range)


# What a host on the network tries against this machine's Ray head without its token:
# a GCS query (what any driver does first) and a Ray Client driver (port 10001), at the
# address Ray announces for this machine (not loopback, where it has one).
OUTSIDER_ATTEMPT = """
import json, sys
import ray.util
from ray._private.services import get_node_ip_address
from ray._raylet import GcsClient
host = get_node_ip_address()
found = {"host": host}
try:
    nodes = GcsClient(address=f"{host}:{sys.argv[1]}").get_all_node_info(timeout=10)
    found["gcs"] = f"answered: {len(nodes)} nodes"
except Exception as error:
    found["gcs"] = f"refused: {type(error).__name__}"
if sys.argv[2] == "ray-client":
    try:
        ray.util.connect(f"{host}:10001", connection_retries=0)
        found["ray_client"] = "connected"
    except ConnectionError as error:
        found["ray_client"] = f"refused: {error}"
print(json.dumps(found))
"""


def outsider_attempt(site: Site, env: dict[str, str], ray_client: bool) -> dict[str, Any]:
    port = site.ray_address.rsplit(":", 1)[1]
    return run_ray_script(OUTSIDER_ATTEMPT, [port, "ray-client" if ray_client else "-"], env)


def test_a_plain_text_coordinators_ray_head_refuses_callers_without_its_token(
    site: Site,
) -> None:
    """Ray's GCS and raylets listen on every interface whatever the head's address, and
    Ray's head served Ray Client on port 10001 of every interface: before the plain-text
    head took a token, a host reaching this machine queried the GCS and ran code through
    Ray Client. Now the GCS refuses a caller without the token, and no Ray Client server
    answers at all (the test above); the same query with the
    coordinator's token (0600 in its data dir) is answered. The GCS's refusals are logged
    and counted, as in a consortium's."""
    token = DataDir(site.data_dir).local_ray_token
    assert oct(token.stat().st_mode & 0o777) == oct(0o600)
    member = outsider_attempt(site, ray_auth_env(token), ray_client=False)
    assert member["gcs"].startswith("answered"), member
    before = auth_refusals(site.data_dir, "ray", "missing_token")
    outsider = outsider_attempt(site, ray_auth_env(None), ray_client=True)
    assert outsider["host"] == member["host"]
    assert outsider["gcs"].startswith("refused"), outsider
    assert outsider["ray_client"].startswith("refused"), outsider
    wait_for(
        "the GCS's refusals counted",
        lambda: auth_refusals(site.data_dir, "ray", "missing_token") > before,
    )
    coordinator_log = site.data_dir.parent / "logs" / "coordinator.log"
    assert "Ray: refused a connection from" in coordinator_log.read_text(errors="replace")
