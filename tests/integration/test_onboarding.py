"""Onboarding and authentication against real servers on loopback.

A coordinator created with `coordinator init` serves mutual TLS; two
institutions are onboarded from site-held keys. Every refusal is checked on
the control plane and on the Flower SuperLink. The Ray channel, its token and its
replacement after a revocation are test_ray_channel.py's: this coordinator runs
without Ray, which none of these tests is about.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from client.data.check import write_example
from consortium import pki
from consortium.exit_codes import ExitCode
from consortium.net import reserve_free_port
from consortium.processes import venv_executable
from consortium.proto.v1 import nodes_pb2, nodes_pb2_grpc
from consortium.site_keys import SiteKeys
from consortium.tls import ClientTls
from coordinator.access.onboarding import init_consortium, revoke
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.state import SqliteStateStore
from tests.conftest import Processes
from tests.helpers import (
    auth_refusals as scraped_auth_refusals,
)
from tests.helpers import (
    run_cli,
    start_secure_consortium,
    supernode_keys_registered,
    wait_for,
    write_partitions,
)

NAMES = ("alpha", "beta")


@dataclass
class Consortium:
    root: Path
    data_dir: Path
    address: str
    processes: Processes

    def site(self, name: str) -> Path:
        return self.root / name

    def tls(self, name: str) -> ClientTls:
        site = self.site(name)
        return ClientTls(
            site / "bundle" / "ca.crt",
            site / "bundle" / "institution.crt",
            SiteKeys(site / "state").tls_key,
        )

    def registry(self, tls: ClientTls) -> tuple[grpc.Channel, nodes_pb2_grpc.NodeRegistryStub]:
        channel = grpc.secure_channel(self.address, tls.credentials())
        return channel, nodes_pb2_grpc.NodeRegistryStub(channel)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("onboarding")
    processes = Processes(root / "logs")
    try:
        data_dir, address = start_secure_consortium(processes, root, NAMES)
        yield Consortium(root, data_dir, address, processes)
    finally:
        processes.stop_all()


def register(stub: nodes_pb2_grpc.NodeRegistryStub, institution: str) -> nodes_pb2.Node:
    reply = stub.RegisterNode(
        nodes_pb2.RegisterNodeRequest(institution=institution, hostname="test", device="cpu"),
        timeout=10,
    )
    return reply.node


def auth_refusals(consortium: Consortium, channel: str, reason: str) -> float:
    return scraped_auth_refusals(consortium.data_dir, channel, reason)


def coordinator_log(consortium: Consortium) -> str:
    return (consortium.root / "logs" / "coordinator.log").read_text(errors="replace")


def forged_tls(
    consortium: Consortium,
    tmp_path: Path,
    name: str,
    not_before: dt.datetime | None = None,
    days: int = 30,
    own_ca: bool = False,
) -> ClientTls:
    """A client certificate for `name` signed by our CA (or by a stranger's)."""
    files = CoordinatorPki(consortium.data_dir)
    if own_ca:
        ca_key = pki.generate_key()
        ca_cert = pki.create_ca(ca_key, "Stranger CA")
    else:
        ca_key, ca_cert = pki.load_private_key(files.ca_key), pki.load_certificate(files.ca_cert)
    key = pki.generate_key()
    cert = pki.sign_csr(ca_key, ca_cert, pki.make_csr(key, name), name, days, not_before)
    pki.write_private_key(tmp_path / "forged.key", key)
    (tmp_path / "forged.crt").write_bytes(pki.pem(cert))
    return ClientTls(files.ca_cert, tmp_path / "forged.crt", tmp_path / "forged.key")


def test_valid_institution_is_accepted_on_the_control_plane(consortium: Consortium) -> None:
    channel, stub = consortium.registry(consortium.tls("alpha"))
    with channel:
        node = register(stub, "alpha")
        assert node.institution == "alpha"
        assert stub.Heartbeat(nodes_pb2.HeartbeatRequest(node_id=node.node_id), timeout=10)


def test_certificate_of_a_cannot_act_as_b(consortium: Consortium) -> None:
    channel, stub = consortium.registry(consortium.tls("alpha"))
    with channel, pytest.raises(grpc.RpcError) as raised:
        register(stub, "beta")
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "cannot act as 'beta'" in raised.value.details()


def test_heartbeat_for_another_institutions_node_is_denied(consortium: Consortium) -> None:
    beta_channel, beta = consortium.registry(consortium.tls("beta"))
    alpha_channel, alpha = consortium.registry(consortium.tls("alpha"))
    with beta_channel, alpha_channel:
        node = register(beta, "beta")
        with pytest.raises(grpc.RpcError) as raised:
            alpha.Heartbeat(nodes_pb2.HeartbeatRequest(node_id=node.node_id), timeout=10)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("case", "not_before", "days", "own_ca", "reason", "logged"),
    [
        ("unknown CA", None, 30, True, "untrusted_certificate", "not signed by this"),
        (
            "expired",
            dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
            1,
            False,
            "expired_certificate",
            "certificate has expired",
        ),
        (
            "not yet valid",
            dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
            30,
            False,
            "not_yet_valid_certificate",
            "certificate is not valid yet",
        ),
    ],
)
def test_bad_certificates_fail_the_tls_handshake_logged_and_counted(
    consortium: Consortium,
    tmp_path: Path,
    case: str,
    not_before: dt.datetime | None,
    days: int,
    own_ca: bool,
    reason: str,
    logged: str,
) -> None:
    before = auth_refusals(consortium, "control_plane", reason)
    tls = forged_tls(consortium, tmp_path, "alpha", not_before, days, own_ca)
    channel, stub = consortium.registry(tls)
    with channel, pytest.raises(grpc.RpcError) as raised:
        register(stub, "alpha")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, case
    wait_for(
        f"{reason} to be counted",
        lambda: auth_refusals(consortium, "control_plane", reason) > before,
    )
    wait_for(f"{case} in the coordinator log", lambda: logged in coordinator_log(consortium))
    assert "control plane: refused a TLS handshake" in coordinator_log(consortium)


def test_plain_text_caller_is_refused_logged_and_counted(consortium: Consortium) -> None:
    before = auth_refusals(consortium, "control_plane", "not_tls")
    with grpc.insecure_channel(consortium.address) as channel:
        stub = nodes_pb2_grpc.NodeRegistryStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            register(stub, "alpha")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_for(
        "not_tls to be counted",
        lambda: auth_refusals(consortium, "control_plane", "not_tls") > before,
    )
    assert "did not speak TLS" in coordinator_log(consortium)


def test_unregistered_supernode_key_cannot_join_the_superlink(
    consortium: Consortium, tmp_path: Path
) -> None:
    key = pki.generate_key()
    pki.write_private_key(tmp_path / "stranger.key", key, openssh=True)
    superlink_port = (consortium.data_dir / "flower" / "superlink.port").read_text().strip()
    stranger = consortium.processes.start(
        "stranger-supernode",
        "flower-supernode",
        "--superlink",
        f"127.0.0.1:{superlink_port}",
        "--root-certificates",
        str(CoordinatorPki(consortium.data_dir).ca_cert),
        "--auth-supernode-private-key",
        str(tmp_path / "stranger.key"),
        "--port",
        str(reserve_free_port()),
    )
    wait_for("the SuperLink to refuse the stranger", lambda: stranger.poll() is not None)
    assert stranger.poll() != 0
    assert "Failed to activate SuperNode" in stranger.log_tail(40)
    wait_for(
        "the refusal to be counted", lambda: auth_refusals(consortium, "fleet", "unknown_node") >= 1
    )
    assert "Flower SuperLink: refused a SuperNode" in coordinator_log(consortium)


def test_key_files_are_private_and_bundles_hold_no_secret(consortium: Consortium) -> None:
    files = CoordinatorPki(consortium.data_dir)
    private = [
        files.ca_key,
        files.server_key,
        files.operator_key,
        files.ray_token,
        DataDir(consortium.data_dir).signing_key,
    ]
    for name in NAMES:
        keys = SiteKeys(consortium.site(name) / "state")
        private += [keys.tls_key, keys.supernode_key, keys.signing_key]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    secrets = {p.read_bytes() for p in private if p != files.ray_token}
    for name in NAMES:
        bundle = consortium.site(name) / "bundle"
        contents = {p.name: p.read_bytes() for p in bundle.iterdir()}
        assert set(contents) == {
            "ca.crt",
            "ca.sha256",
            "institution.crt",
            "bundle.toml",
            "ray-token",
            "coordinator-signing.pub",
            "coordinator-signing.sig",
            "coordinator-signing.crt",
        }
        assert not secrets & set(contents.values())
        assert all(b"PRIVATE KEY" not in data for data in contents.values())


def test_corrupt_bundle_names_the_file(consortium: Consortium, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for item in (consortium.site("alpha") / "bundle").iterdir():
        (bundle / item.name).write_bytes(item.read_bytes())
    (bundle / "institution.crt").write_text("not a certificate\n")
    write_example("digits", tmp_path / "data", 1, 1)  # valid: the bundle check fails
    done = subprocess.run(
        [
            venv_executable("client"),
            "join",
            "--bundle",
            str(bundle),
            "--data",
            str(tmp_path / "data"),
            "--state-dir",
            str(consortium.site("alpha") / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode != 0
    assert "institution.crt" in done.stderr


def test_another_consortiums_bundle_is_named_as_such_and_the_handshake_logged(
    consortium: Consortium, tmp_path: Path
) -> None:
    """Issue 20: it failed six handshakes with raw gRPC lines and ended "check the
    address", while the coordinator recorded nothing."""
    other = tmp_path / "other-consortium"
    init_consortium(other, ["localhost", "127.0.0.1"], cert_days=1)
    done = run_cli(
        "coordinator", "onboard", "alpha", "--generate-keys", str(tmp_path / "keys"),
        "--data-dir", str(other), "--coordinator-address", consortium.address,
        "--out", str(tmp_path / "bundle"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    write_example("digits", tmp_path / "data", 1, 1)
    before = auth_refusals(consortium, "control_plane", "untrusted_certificate")
    joined = run_cli(
        "client", "join", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "data"),
        "--state-dir", str(tmp_path / "keys"), "--no-ray",
    )  # fmt: skip
    assert joined.returncode == ExitCode.UNAUTHENTICATED, joined.stderr
    assert "presents a certificate issued by" in joined.stderr
    assert "not by this bundle's CA" in joined.stderr
    assert "retry" not in joined.stdout  # said at once, not after six handshakes
    # The coordinator's operator sees why: a certificate of another CA.
    wait_for(
        "the refused handshake to be counted",
        lambda: auth_refusals(consortium, "control_plane", "untrusted_certificate") > before,
    )
    assert "not signed by this consortium's CA" in coordinator_log(consortium)


def test_revocation_refuses_the_institution_on_every_channel(consortium: Consortium) -> None:
    store = SqliteStateStore(consortium.data_dir / "state.db")
    try:
        revoke(store, "beta")
        wait_for(
            "beta's SuperNode key to be unregistered",
            lambda: dict((i, n) for i, _, n in store.supernode_keys())["beta"] == "unregistered",
        )
    finally:
        store.close()
    beta_channel, beta = consortium.registry(consortium.tls("beta"))
    alpha_channel, alpha = consortium.registry(consortium.tls("alpha"))
    with beta_channel, alpha_channel:
        with pytest.raises(grpc.RpcError) as raised:
            register(beta, "beta")
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in raised.value.details()
        assert register(alpha, "alpha").institution == "alpha"  # others continue
        # Nor the Ray cluster's token (what happens to the cluster: test_ray_channel.py).
        with pytest.raises(grpc.RpcError) as raised:
            beta.GetRayToken(nodes_pb2.GetRayTokenRequest(institution="beta"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert auth_refusals(consortium, "control_plane", "revoked_certificate") >= 1


def test_onboarding_scripts_bring_a_node_into_the_consortium(
    consortium: Consortium, tmp_path: Path
) -> None:
    """docs/onboarding.md's steps through deploy/onboarding/*.sh, as a new site would."""
    scripts = Path(__file__).resolve().parents[2] / "deploy" / "onboarding"
    env = {**os.environ, "PATH": f"{Path(venv_executable('client')).parent}:{os.environ['PATH']}"}
    state = tmp_path / "gamma-state"
    subprocess.run(
        ["bash", str(scripts / "join-institution.sh"), "keygen", "gamma", str(state)],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    onboarded = subprocess.run(
        [
            "bash",
            str(scripts / "onboard-institution.sh"),
            "gamma",
            str(state / "request"),
            consortium.address,
            str(consortium.data_dir),
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert "fingerprint" in onboarded.stdout
    data = tmp_path / "data"
    write_partitions(tmp_path, ["gamma", "delta"])
    (tmp_path / "institutions" / "gamma" / "data").rename(data)
    wait_for("gamma's SuperNode key", lambda: supernode_keys_registered(consortium.data_dir))
    joined = consortium.processes.start(
        "gamma-join",
        "bash",
        str(scripts / "join-institution.sh"),
        "join",
        str(tmp_path / "bundle-gamma"),
        str(data),
        str(state),
    )
    files = CoordinatorPki(consortium.data_dir)
    channel = grpc.secure_channel(consortium.address, files.operator_tls().credentials())
    with channel:
        stub = nodes_pb2_grpc.NodeRegistryStub(channel)

        def gamma_online() -> bool:
            if joined.poll() is not None:
                raise AssertionError(joined.log_tail(40))
            nodes = stub.ListNodes(nodes_pb2.ListNodesRequest(), timeout=10).nodes
            return any(
                n.institution == "gamma" and n.state == nodes_pb2.NODE_STATE_ONLINE for n in nodes
            )

        wait_for("gamma online", gamma_online)
