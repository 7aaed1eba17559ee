"""Outsiders and members attack the Flower channel through the Fleet edge.

flwr 1.41's SuperLink serves Fleet, Control and Runtime APIs on one port with no client
authentication. Each test performs the attack against a real mutual-TLS `coordinator
serve` (Ray off) with two onboarded institutions and asserts that it failed at the
edge, and that the refusal was logged and counted (docs/security.md names these tests).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from consortium import pki
from consortium.errors import InsecureTransportError
from consortium.site_keys import SiteKeys, create_site_keys
from consortium.tls import ClientTls
from coordinator.access.onboarding import renew, revoke
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.federated.edge import MAX_CONNECTIONS_PER_INSTITUTION
from coordinator.ray.tls import coordinator_ray_tls, sign_node_csr
from coordinator.serve import check_transport
from coordinator.settings import CoordinatorSettings
from coordinator.state import SqliteStateStore
from tests.conftest import Processes
from tests.helpers import auth_refusals, start_secure_consortium, wait_for, wait_for_log

NAMES = ("alpha", "beta", "gamma")  # gamma is renewed, beta revoked
REFUSAL_TIMEOUT_S = 10.0


@dataclass
class Consortium:
    root: Path
    data_dir: Path

    @property
    def paths(self) -> DataDir:
        return DataDir(self.data_dir)

    @property
    def edge(self) -> tuple[str, int]:
        return "127.0.0.1", int(self.paths.fleet_edge_port_file.read_text())

    @property
    def ca_cert(self) -> Path:
        return CoordinatorPki(self.data_dir).ca_cert

    def institution(self, name: str) -> ClientTls:
        site = self.root / name
        return ClientTls(
            site / "bundle" / "ca.crt",
            site / "bundle" / "institution.crt",
            SiteKeys(site / "state").tls_key,
        )

    def context(self, name: str | None) -> ssl.SSLContext:
        """What a caller holds: the public CA certificate, and an institution's key."""
        return self.tls_context(self.institution(name) if name is not None else None)

    def tls_context(self, tls: ClientTls | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if tls is not None:
            context.load_cert_chain(str(tls.cert), str(tls.key))
        return context

    def post(self, name: str | None, path: str) -> tuple[int, bytes]:
        """POST `path` to the edge exactly as written (no client-side normalization);
        the status and body."""
        return self.post_with(self.institution(name) if name is not None else None, path)

    def post_with(self, tls: ClientTls | None, path: str) -> tuple[int, bytes]:
        host, port = self.edge
        connection = http.client.HTTPSConnection(
            host, port, context=self.tls_context(tls), timeout=10
        )
        try:
            connection.request("POST", path, body=b"", headers={"content-type": "application/x"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def refusals(self, reason: str) -> float:
        return auth_refusals(self.paths.root, "fleet", reason)

    def log(self) -> str:
        return (self.root / "logs" / "coordinator.log").read_text(errors="replace")

    def superlink_port(self) -> int:
        return int(self.paths.superlink_port_file.read_text())


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("flower-edge")
    processes = Processes(root / "logs")
    try:
        data_dir, _ = start_secure_consortium(processes, root, NAMES)
        yield Consortium(root, data_dir)
    finally:
        processes.stop_all()


def test_edge_refuses_outsider_holding_only_the_ca_certificate(consortium: Consortium) -> None:
    before = consortium.refusals("no_client_certificate")
    host, port = consortium.edge
    with (
        httpx.Client(verify=consortium.context(None), timeout=10) as outsider,
        pytest.raises(httpx.TransportError),
    ):
        outsider.post(f"https://{host}:{port}/v1/control/list-runs", content=b"")
    wait_for(
        "the refused handshake counted",
        lambda: consortium.refusals("no_client_certificate") == before + 1,
        REFUSAL_TIMEOUT_S,
    )
    wait_for_log(consortium.log, "Fleet edge refused no certificate (no_client_certificate)")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/list-runs",  # `flwr ls`
        "/v1/control/start-run",  # `flwr run` of an outsider's app
        "/v1/runtime/get-run",
        "/v1/fleet/../control/list-runs",  # a proxy that normalizes would forward this
        "/v1/fleet/%2e%2e/control/list-runs",
        "/health",
    ],
)
def test_edge_forbids_non_fleet_api_with_valid_institution_certificate(
    consortium: Consortium, path: str
) -> None:
    before = consortium.refusals("forbidden_api")
    status, body = consortium.post("alpha", path)
    assert status == 403
    assert b"only the Flower Fleet API" in body
    assert consortium.refusals("forbidden_api") == before + 1
    assert re.search(
        r"Fleet edge refused alpha \(forbidden_api\) from 127\.0\.0\.1", consortium.log()
    )


def test_edge_forwards_fleet_api_to_the_superlink(consortium: Consortium) -> None:
    # An unsigned Fleet call: it passes the edge and the SuperLink itself refuses it.
    status, body = consortium.post("alpha", "/v1/fleet/get-run")
    assert status == 415, body  # the SuperLink's own answer: it wants protobuf
    assert b"Unsupported Content-Type" in body


def test_superlink_not_reachable_on_non_loopback_address(consortium: Consortium) -> None:
    port = consortium.superlink_port()
    listening = [
        c.laddr
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    ]
    assert listening, "the SuperLink does not listen"
    assert {address.ip for address in listening} <= {"127.0.0.1", "::1"}
    others = [
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and not address.address.startswith("127.")
    ]
    for ip in others:
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=2).close()


def test_serve_refuses_non_loopback_superlink_host(tmp_path: Path) -> None:
    settings = CoordinatorSettings(data_dir=tmp_path, superlink_host="0.0.0.0")
    with pytest.raises(InsecureTransportError, match="must listen on loopback"):
        check_transport(settings)


def test_edge_refuses_a_certificate_replaced_by_a_renewal(consortium: Consortium) -> None:
    """`coordinator renew` issues gamma a new certificate: the old bundle's one no longer
    passes the edge (by serial), logged and counted; the renewed one does."""
    assert consortium.post("gamma", "/v1/fleet/get-run")[0] != 403
    renewed = consortium.root / "gamma-renewed"
    keys = create_site_keys(renewed / "state", "gamma")
    store = SqliteStateStore(consortium.paths.state_db)
    try:
        renew(consortium.data_dir, store, "gamma", keys.csr, renewed / "bundle", "x:1", 30)
    finally:
        store.close()
    before = consortium.refusals("superseded_certificate")
    status, body = consortium.post("gamma", "/v1/fleet/get-run")
    assert status == 403
    assert b"replaced by a renewal" in body
    assert consortium.refusals("superseded_certificate") == before + 1
    wait_for_log(consortium.log, "Fleet edge refused gamma (superseded_certificate)")
    tls = ClientTls(
        renewed / "bundle" / "ca.crt", renewed / "bundle" / "institution.crt", keys.tls_key
    )
    status, _ = consortium.post_with(tls, "/v1/fleet/get-run")
    assert status != 403


def test_edge_refuses_revoked_institution(consortium: Consortium) -> None:
    before = consortium.refusals("revoked_certificate")
    assert consortium.post("beta", "/v1/fleet/get-run")[0] != 403
    store = SqliteStateStore(consortium.paths.state_db)
    try:
        revoke(store, "beta")
    finally:
        store.close()
    status, body = consortium.post("beta", "/v1/fleet/get-run")
    assert status == 403
    assert b"revoked" in body
    assert consortium.refusals("revoked_certificate") == before + 1
    wait_for_log(consortium.log, "Fleet edge refused beta (revoked_certificate)")


def test_edge_refuses_the_coordinators_own_ray_certificate(consortium: Consortium) -> None:
    """The coordinator's Ray certificate chains to the CA, and its key is in the hands of
    the sandboxed Ray head and drivers; no institution's serial is on record for it."""
    ray = coordinator_ray_tls(CoordinatorPki(consortium.data_dir))
    before = consortium.refusals("unknown_certificate")
    status, body = consortium.post_with(
        ClientTls(consortium.ca_cert, ray.certificate, ray.key), "/v1/fleet/get-run"
    )
    assert status == 403
    assert b"not an onboarded institution's" in body
    assert consortium.refusals("unknown_certificate") == before + 1
    wait_for_log(consortium.log, "Fleet edge refused consortium-coordinator (unknown_certificate)")


def test_an_institutions_ray_node_certificate_cannot_lock_its_site_out_of_the_edge(
    consortium: Consortium,
) -> None:
    """alpha's Ray node certificate (alpha's name, signed by the CA; a pool node holds it)
    opening more idle connections than alpha's cap: each is refused by serial after its
    handshake, before it counts, and alpha's site still reaches the SuperLink."""
    files = CoordinatorPki(consortium.data_dir)
    key = pki.generate_key()
    csr = pki.pem(pki.make_node_csr(key, "alpha", ["127.0.0.1"]))
    (consortium.root / "alpha-ray-node.crt").write_bytes(
        pki.pem(sign_node_csr(files, "alpha", csr, "127.0.0.1"))
    )
    pki.write_private_key(consortium.root / "alpha-ray-node.key", key)
    stolen = ClientTls(
        consortium.ca_cert,
        consortium.root / "alpha-ray-node.crt",
        consortium.root / "alpha-ray-node.key",
    )
    before = consortium.refusals("superseded_certificate")
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(MAX_CONNECTIONS_PER_INSTITUTION + 1):
            raw = socket.create_connection(consortium.edge, timeout=10)
            held.append(
                consortium.tls_context(stolen).wrap_socket(raw, server_hostname="127.0.0.1")
            )
        wait_for(
            "every connection refused after its handshake",
            lambda: consortium.refusals("superseded_certificate") == before + len(held),
            REFUSAL_TIMEOUT_S,
        )
        status, body = consortium.post("alpha", "/v1/fleet/get-run")
        assert status == 415, body  # the SuperLink's own answer: past the edge
    finally:
        for connection in held:
            connection.close()
    wait_for_log(consortium.log, "Fleet edge refused alpha (superseded_certificate)")
