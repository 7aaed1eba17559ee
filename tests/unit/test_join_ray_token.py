"""`client join` fetches the Ray token over mutual TLS, falling back to the bundle's copy
only when the coordinator does not implement GetRayToken.

A real gRPC server on 127.0.0.1:0 with the consortium's server certificate stands in
for the coordinator's NodeRegistry; the site is really onboarded (bundle, keys) and the
real `SiteNode.fetch_ray_token` with its retrying call runs against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from client.bundle import load_bundle
from client.join import SiteNode
from client.settings import ClientSettings
from consortium.data import TEXT_DIR
from consortium.errors import PermissionDeniedError
from consortium.proto.v1 import nodes_pb2, nodes_pb2_grpc
from consortium.site_keys import create_site_keys
from coordinator.access.onboarding import Request, init_consortium, onboard
from coordinator.access.pki_files import CoordinatorPki
from coordinator.state import SqliteStateStore

INSTITUTION = "alpha"
CURRENT_TOKEN = b"the-current-cluster-token"


class RefusingRegistry(nodes_pb2_grpc.NodeRegistryServicer):
    """A coordinator that knows GetRayToken and refuses it (a revoked institution)."""

    def GetRayToken(  # noqa: N802 - the proto names the method
        self, request: nodes_pb2.GetRayTokenRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.GetRayTokenResponse:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{request.institution} is revoked")
        raise AssertionError("abort raises")


class AnsweringRegistry(nodes_pb2_grpc.NodeRegistryServicer):
    def GetRayToken(  # noqa: N802 - the proto names the method
        self, request: nodes_pb2.GetRayTokenRequest, context: grpc.ServicerContext
    ) -> nodes_pb2.GetRayTokenResponse:
        return nodes_pb2.GetRayTokenResponse(token=CURRENT_TOKEN)


@pytest.fixture
def onboarded(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(coordinator data dir, site state dir, bundle dir) for INSTITUTION."""
    data_dir = tmp_path / "coordinator"
    init_consortium(data_dir, ["127.0.0.1"], cert_days=1)
    keys = create_site_keys(tmp_path / "site", INSTITUTION)
    store = SqliteStateStore(data_dir / "state.db")
    try:
        onboard(
            data_dir,
            store,
            INSTITUTION,
            Request.from_dir(keys.request_dir),
            tmp_path / "bundle",
            "127.0.0.1:1",
            cert_days=1,
        )
    finally:
        store.close()
    return data_dir, tmp_path / "site", tmp_path / "bundle"


@contextmanager
def registry_server(data_dir: Path, servicer: nodes_pb2_grpc.NodeRegistryServicer) -> Iterator[str]:
    """A mutual-TLS NodeRegistry server on 127.0.0.1:0; yields its address."""
    executor = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.server(executor)
    nodes_pb2_grpc.add_NodeRegistryServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0", CoordinatorPki(data_dir).server_tls().credentials()
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()
        executor.shutdown(wait=True)


def site_node(tmp_path: Path, state_dir: Path, bundle: Path, address: str) -> SiteNode:
    data = tmp_path / "data"
    (data / TEXT_DIR).mkdir(parents=True)
    (data / TEXT_DIR / "notes.txt").write_text("local text that never leaves the site\n")
    settings = ClientSettings(
        coordinator=address,
        institution=INSTITUTION,
        data=data,
        bundle=bundle,
        state_dir=state_dir,
        connect_attempts=1,
        ray_enabled=False,
    )
    return SiteNode(settings)


def test_fetch_ray_token_coordinator_without_get_ray_token_uses_bundle_token(
    tmp_path: Path, onboarded: tuple[Path, Path, Path]
) -> None:
    data_dir, state_dir, bundle_dir = onboarded
    bundle_token = load_bundle(bundle_dir, state_dir).ray_token.read_bytes()
    # The generated base servicer answers every method with UNIMPLEMENTED.
    with registry_server(data_dir, nodes_pb2_grpc.NodeRegistryServicer()) as address:
        site_node(tmp_path, state_dir, bundle_dir, address).fetch_ray_token()
    assert bundle_token
    assert (state_dir / "ray-token").read_bytes() == bundle_token


def test_fetch_ray_token_coordinator_answers_writes_current_token(
    tmp_path: Path, onboarded: tuple[Path, Path, Path]
) -> None:
    data_dir, state_dir, bundle_dir = onboarded
    with registry_server(data_dir, AnsweringRegistry()) as address:
        site_node(tmp_path, state_dir, bundle_dir, address).fetch_ray_token()
    assert (state_dir / "ray-token").read_bytes() == CURRENT_TOKEN


def test_fetch_ray_token_coordinator_refuses_raises_without_fallback(
    tmp_path: Path, onboarded: tuple[Path, Path, Path]
) -> None:
    data_dir, state_dir, bundle_dir = onboarded
    with (
        registry_server(data_dir, RefusingRegistry()) as address,
        pytest.raises(PermissionDeniedError, match="refused the Ray token: alpha is revoked"),
    ):
        site_node(tmp_path, state_dir, bundle_dir, address).fetch_ray_token()
    assert not (state_dir / "ray-token").exists()
