"""Supervised runtimes (issue 19): `kill -9` of the coordinator's SuperLink, and then of a
site's SuperNode, while a federated job runs. The coordinator and `client join` keep
serving; each child comes back on its own (logged with its last lines, counted in
`consortium_child_restarts_total`, shown by `coordinator status`, `coordinator nodes`
and the standard gRPC health service); while a runtime cannot come back (another process took its
port), status exits 18 (degraded) and health says NOT_SERVING; and the job finishes with
every round logged exactly once. (The Ray head and a site's Ray worker node are
killed in the chaos run, tests/chaos/.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import urllib.request
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from consortium.exit_codes import ExitCode
from consortium.processes import descendant_pids
from consortium.proto.v1 import jobs_pb2, status_pb2
from consortium.provenance.records import Round
from consortium.provenance.signing import SigningKey
from consortium.provenance.verify import verify_log
from coordinator.cli.remote import Remote
from coordinator.data_dir import DataDir
from tests.conftest import Processes
from tests.helpers import (
    FINAL_STATES,
    join_site,
    metric_value,
    online_nodes,
    run_cli,
    start_coordinator,
    wait_for,
    write_partitions,
)

ROUNDS = 4
JOB_TIMEOUT_S = 300.0
RESTART_TIMEOUT_S = 60.0
JOB = (
    f'name = "supervised"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = {ROUNDS}\n'
    "min_clients = 1\nlocal_epochs = 1\nround_timeout_s = 20.0\n"
)


def child_pid(parent: int, marker: str) -> int:
    for pid in descendant_pids(parent):
        try:
            if any(marker in part for part in psutil.Process(pid).cmdline()):
                return pid
        except psutil.Error:
            continue
    raise AssertionError(f"no {marker} under pid {parent}")


def runtime(remote: Remote, name: str) -> status_pb2.Runtime:
    (found,) = [r for r in remote.status().runtimes if r.name == name]
    return found


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(reply.status)


def site_restarts(state_dir: Path, child: str) -> float:
    address = (state_dir / "metrics.address").read_text().strip()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "consortium_child_restarts_total"
                and sample.labels.get("child") == child
            ):
                return float(sample.value)
    raise AssertionError(f"the site exports no restarts of its {child}")


def test_a_killed_superlink_and_supernode_come_back_and_the_job_finishes(
    tmp_path: Path, processes: Processes
) -> None:
    data_dir = tmp_path / "coordinator"
    address = start_coordinator(processes, data_dir)
    serve = processes.children[-1]
    (data,) = write_partitions(tmp_path, ["alpha"])
    state_dir = tmp_path / "state"
    join = join_site(processes, "client", data, state_dir, coordinator=address, institution="alpha")
    serving = health_pb2.HealthCheckResponse.SERVING
    with Remote(address) as remote:
        assert runtime(remote, "superlink").state == status_pb2.RUNTIME_STATE_RUNNING
        assert remote.status().degraded == []
        assert health(address, "") == serving == health(address, "runtime/superlink")
        wait_for("the node online", lambda: online_nodes(remote.list_nodes()) > 0)
        job_id = remote.submit(JOB).job_id
        wait_for("round 1", lambda: remote.get(job_id).job.rounds_completed >= 1, JOB_TIMEOUT_S)

        kill_the_superlink_and_hold_its_port(remote, address, data_dir, serve.pid)

        # The site's SuperNode dies; `client join` restarts it.
        done = remote.get(job_id).job.rounds_completed
        wait_for(
            "a round after the SuperLink restart",
            lambda: (
                remote.get(job_id).job.rounds_completed > done
                or remote.get(job_id).job.state in FINAL_STATES
            ),
            JOB_TIMEOUT_S,
        )
        before = site_restarts(state_dir, "supernode")  # it may have lost the SuperLink
        os.kill(child_pid(join.pid, "flower-supernode"), signal.SIGKILL)
        wait_for(
            "the SuperNode back",
            lambda: site_restarts(state_dir, "supernode") > before,
            RESTART_TIMEOUT_S,
        )
        wait_for(
            "the job to end",
            lambda: remote.get(job_id).job.state in FINAL_STATES,
            JOB_TIMEOUT_S,
        )
        reply = remote.get(job_id)
    assert reply.job.state == jobs_pb2.JOB_STATE_SUCCEEDED, reply.job.message
    assert serve.poll() is None and join.poll() is None  # neither went down with a child
    paths = DataDir(data_dir)
    # A plain-text consortium has no onboarding: its site's key is logged unbound.
    verified = verify_log(
        paths.provenance_log, SigningKey.load(paths.signing_key).public, allow_unbound_keys=True
    )
    rounds = [r.round for r in verified.jobs[job_id] if isinstance(r, Round)]
    assert rounds == list(range(1, ROUNDS + 1))  # every round once, none lost
    coordinator_log = serve.log_path.read_text()
    assert "the superlink exited with code -9" in coordinator_log
    assert "restarting the superlink" in coordinator_log
    assert "restarting the supernode" in join.log_path.read_text()
    # Both SuperNodes (the killed one's node and its successor's) declared the site's
    # heartbeat interval (TEST_PROFILE: 10 s), so the dead node was taken for gone
    # after 20 s, not Flower's 60.
    assert declared_heartbeats(paths) == [10.0, 10.0]


def declared_heartbeats(paths: DataDir) -> list[float]:
    """The heartbeat interval of every node in the SuperLink's own state (Flower's
    LinkState, a SQLite file: read here, as the SuperLink's operator could)."""
    with contextlib.closing(sqlite3.connect(paths.superlink_db)) as db:
        return [float(row[0]) for row in db.execute("SELECT heartbeat_interval FROM node")]


def _bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def kill_the_superlink_and_hold_its_port(
    remote: Remote, address: str, data_dir: Path, serve_pid: int
) -> None:
    """The SuperLink dies and another process takes its port before it can restart:
    status says degraded and why, health NOT_SERVING (the control plane still
    serving); once the port is free again, the SuperLink is back, counted."""
    serving = health_pb2.HealthCheckResponse.SERVING
    # The SuperLink dies, and another process takes its port before it can restart.
    superlink = DataDir(data_dir).superlink_port_file.read_text().strip()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    os.kill(child_pid(serve_pid, "flower-superlink"), signal.SIGKILL)
    try:
        wait_for("the port", lambda: _bind(holder, int(superlink)), 10.0)
        holder.listen()
        wait_for(
            "a failed restart",
            lambda: "held by pid" in runtime(remote, "superlink").detail,
            RESTART_TIMEOUT_S,
        )
        stuck = runtime(remote, "superlink")
        assert stuck.state == status_pb2.RUNTIME_STATE_RESTARTING
        assert remote.status().degraded == ["superlink"]
        assert health(address, "runtime/superlink") != serving
        assert health(address, "") == serving  # the control plane still serves
        cli = run_cli("coordinator", "status", "--coordinator", address)
        assert cli.returncode == ExitCode.DEGRADED, cli.stdout + cli.stderr
        assert "superlink not running" in cli.stdout
        cli = run_cli("coordinator", "nodes", "--coordinator", address)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "superlink: restarting (" in cli.stdout and "held by pid" in cli.stdout
    finally:
        holder.close()
    wait_for(
        "the SuperLink back",
        lambda: runtime(remote, "superlink").state == status_pb2.RUNTIME_STATE_RUNNING,
        RESTART_TIMEOUT_S,
    )
    back = runtime(remote, "superlink")
    assert back.restarts >= 2 and back.last_exit_code != 0 and back.detail == ""
    assert health(address, "runtime/superlink") == serving
    restarts = metric_value(data_dir, "consortium_child_restarts_total", {"child": "superlink"})
    assert restarts == back.restarts
    cli = run_cli("coordinator", "status", "--coordinator", address)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "all runtimes running" in cli.stdout
