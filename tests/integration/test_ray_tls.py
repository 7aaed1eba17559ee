"""Ray TLS from the consortium CA (`coordinator serve --ray-tls`) on a real head.

A site that joins with its bundle gets a Ray node certificate over the control plane
and its worker joins the head over mutual TLS (and the token). A node with a
certificate from another CA, or without TLS, is refused in the handshake; the head's
GCS writes that to its error log, and the coordinator logs and counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from consortium import pki
from consortium.processes import descendants_of
from consortium.proto.v1 import jobs_pb2
from consortium.ray_env import RayTls, ray_auth_env, ray_node_ip
from coordinator.access.pki_files import CoordinatorPki
from coordinator.cli.remote import connect
from tests.conftest import Processes
from tests.helpers import (
    FINAL_STATES,
    TINY_PRETRAIN,
    join_site,
    start_secure_consortium,
    wait_for,
    wait_for_log,
    write_partitions,
)
from tests.helpers_ray import Channel, alive

NAMES = ("alpha",)


class TlsChannel(Channel):
    def coordinator_tls(self) -> RayTls:
        files = CoordinatorPki(self.data_dir)
        return RayTls(
            files.root / "ray" / "node.crt", files.root / "ray" / "node.key", files.ca_cert
        )

    def query_env(self) -> dict[str, str]:
        return ray_auth_env(CoordinatorPki(self.data_dir).ray_token, self.coordinator_tls())


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsChannel]:
    root = tmp_path_factory.mktemp("ray-tls")
    processes = Processes(root / "logs")
    channel: TlsChannel | None = None
    try:
        data_dir, _ = start_secure_consortium(processes, root, NAMES, flags=["--ray-tls"], ray=True)
        channel = TlsChannel(root, data_dir, processes, processes.children[0])
        yield channel
    finally:
        processes.stop_all()
        if channel is not None:
            channel.stop()


def command_of(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # it ended meanwhile
        return ""


def test_a_site_joins_the_ray_cluster_over_mutual_tls(channel: TlsChannel) -> None:
    (site,) = write_partitions(channel.root, list(NAMES))
    joined = join_site(
        channel.processes,
        "client-alpha",
        site,
        channel.root / "alpha" / "state",
        bundle=channel.root / "alpha" / "bundle",
        ray=True,
    )
    wait_for("alpha's Ray node over TLS", lambda: len(alive(channel.nodes(), "alpha")) == 1)
    # The coordinator's own GCS client (ListNodes' Ray side) reads over TLS too; its view
    # is a couple of seconds old at most.
    overviews = []

    def alpha_in_the_coordinators_view() -> bool:
        with connect(None, channel.data_dir) as remote:
            overviews.append(remote.nodes_overview())
        return any(n.institution == "alpha" and n.HasField("ray") for n in overviews[-1].nodes)

    wait_for("alpha's Ray node in `coordinator nodes`", alpha_in_the_coordinators_view)
    overview = overviews[-1]
    assert overview.ray_unavailable_reason == ""
    (node,) = [n for n in overview.nodes if n.institution == "alpha"]
    assert node.ray.labels["institution"] == "alpha"
    node_cert = pki.load_certificate(channel.root / "alpha" / "state" / "ray-tls" / "node.crt")
    assert pki.institution_of(node_cert.subject) == "alpha"
    key = channel.root / "alpha" / "state" / "ray-tls" / "node.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    # Ray's log monitor would publish the site's worker output to every driver of the
    # cluster; the head hosts no workers. Neither node runs one, and the head runs no
    # autoscaler monitor (the cluster never scales).
    for owner in (channel.coordinator, joined):
        commands = [command_of(p) for p in descendants_of(owner.pid)]
        assert any(command.endswith("raylet") or "/raylet " in command for command in commands)
        assert not [command for command in commands if "log_monitor" in command]
        assert not [command for command in commands if "autoscaler/_private/monitor" in command]


def test_pretraining_runs_on_the_tls_cluster(channel: TlsChannel) -> None:
    """The coordinator's driver (ray.init in-process) and the site's worker, over TLS."""
    job_toml = f"""\
name = "tiny-pretrain-tls"
{TINY_PRETRAIN}inner_steps = 3
outer_steps = 1
min_workers = 1
wait_for_workers_s = 60.0
worker_start_timeout_s = 120.0
step_timeout_s = 120.0
"""
    with connect(None, channel.data_dir) as remote:
        wait_for("alpha's Ray node", lambda: len(alive(channel.nodes(), "alpha")) == 1)
        job = remote.submit(job_toml)
        wait_for(
            "the pretraining job to end",
            lambda: remote.get(job.job_id).job.state in FINAL_STATES,
            timeout_s=240.0,
        )
        reply = remote.get(job.job_id)
    assert reply.job.state == jobs_pb2.JOB_STATE_SUCCEEDED, reply.job.message
    assert [r.participants for r in reply.rounds] == [1]


def _stranger_tls(tmp_path: Path, consortium_ca: Path) -> RayTls:
    """A node certificate that would be perfect, were it not from another CA; it trusts
    the consortium's CA certificate, which is public, so only the head can refuse it."""
    ca_key = pki.generate_key()
    ca_cert = pki.create_ca(ca_key, "Stranger CA")
    key = pki.generate_key()
    cert = pki.issue_node_certificate(
        ca_key, ca_cert, key.public_key(), "mallory", [ray_node_ip()], 30
    )
    pki.write_private_key(tmp_path / "node.key", key)
    (tmp_path / "node.crt").write_bytes(pki.pem(cert))
    return RayTls(tmp_path / "node.crt", tmp_path / "node.key", consortium_ca)


@pytest.mark.parametrize(
    ("case", "reason"), [("foreign CA", "rejected_certificate"), ("no TLS", "not_tls")]
)
def test_a_node_without_a_consortium_certificate_is_refused_logged_and_counted(
    channel: TlsChannel, tmp_path: Path, case: str, reason: str
) -> None:
    before = channel.refusals(reason)
    token = channel.token("alpha")  # the right token: only TLS stands in the way
    ca = CoordinatorPki(channel.data_dir).ca_cert
    tls = _stranger_tls(tmp_path, ca) if case == "foreign CA" else None
    node = channel.start_node(
        f"mallory-{reason}", "mallory", ray_auth_env(token, tls), refused=True
    )
    wait_for(f"{reason} counted", lambda: channel.refusals(reason) > before)
    wait_for_log(channel.coordinator_log, "Ray: refused a TLS handshake")
    assert alive(channel.nodes(), "mallory") == []
    # A refused `ray start` keeps retrying its GCS and outlives SIGTERM's 10 s wait:
    # the attacker's process, ended here without the wait.
    node.stop(timeout_s=1.0)
