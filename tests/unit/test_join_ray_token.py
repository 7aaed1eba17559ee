"""`client join` fetches the Ray token over mutual TLS, falling back to the bundle's copy
only when the coordinator does not implement GetRayToken; in plain text it fetches the
token of the coordinator's own head over loopback, and runs without one only when the
coordinator's cluster takes none.

A real gRPC server on 127.0.0.1:0 with the consortium's server certificate stands in
for the coordinator's NodeRegistry; the site is really onboarded (bundle, keys) and the
real `SiteNode.fetch_ray_token` with its retrying call runs against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
from consortium.proto.v1 import nodes_pb2
from consortium.site_keys import create_site_keys
from coordinator.access.onboarding import Request, init_consortium, onboard
from coordinator.access.pki_files import CoordinatorPki
from coordinator.state import SqliteStateStore

INSTITUTION = "alpha"
CURRENT_TOKEN = b"the-current-cluster-token"
SERVICE = "consortium.proto.v1.NodeRegistry"


GetRayToken = Callable[[nodes_pb2.GetRayTokenRequest, grpc.ServicerContext], bytes]


def refuse(request: nodes_pb2.GetRayTokenRequest, context: grpc.ServicerContext) -> bytes:
    """A coordinator that knows GetRayToken and refuses it (a revoked institution)."""
    context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{request.institution} is revoked")
    raise AssertionError("abort raises")


def answer(request: nodes_pb2.GetRayTokenRequest, context: grpc.ServicerContext) -> bytes:
    return CURRENT_TOKEN


def takes_no_token(request: nodes_pb2.GetRayTokenRequest, context: grpc.ServicerContext) -> bytes:
    """A plain-text coordinator attached to a cluster that takes no token."""
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the Ray cluster takes no token")
    raise AssertionError("abort raises")


def get_ray_token_only(token: GetRayToken) -> grpc.GenericRpcHandler:
    """A NodeRegistry that serves GetRayToken alone (other methods: UNIMPLEMENTED)."""
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: nodes_pb2.GetRayTokenResponse(token=token(request, context)),
        request_deserializer=nodes_pb2.GetRayTokenRequest.FromString,
        response_serializer=nodes_pb2.GetRayTokenResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"GetRayToken": handler})


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
def registry_server(data_dir: Path | None, *handlers: grpc.GenericRpcHandler) -> Iterator[str]:
    """A mutual-TLS server on 127.0.0.1:0 with the consortium's server certificate (no
    `data_dir`: plain text), serving `handlers` (none: every method answers
    UNIMPLEMENTED); yields its address."""
    executor = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.server(executor, handlers=handlers)
    port = (
        server.add_secure_port("127.0.0.1:0", CoordinatorPki(data_dir).server_tls().credentials())
        if data_dir is not None
        else server.add_insecure_port("127.0.0.1:0")
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()
        executor.shutdown(wait=True)


def site_node(tmp_path: Path, state_dir: Path, bundle: Path | None, address: str) -> SiteNode:
    """The site with its bundle, or (no `bundle`) a plain-text one."""
    data = tmp_path / "data"
    (data / TEXT_DIR).mkdir(parents=True)
    (data / TEXT_DIR / "notes.txt").write_text("local text that never leaves the site\n")
    settings = ClientSettings(
        coordinator=address,
        institution=INSTITUTION,
        data=data,
        bundle=bundle,
        insecure=bundle is None,
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
    # A coordinator from before GetRayToken: the method is UNIMPLEMENTED.
    with registry_server(data_dir) as address:
        site_node(tmp_path, state_dir, bundle_dir, address).fetch_ray_token()
    assert bundle_token
    assert (state_dir / "ray-token").read_bytes() == bundle_token


def test_fetch_ray_token_coordinator_answers_writes_current_token(
    tmp_path: Path, onboarded: tuple[Path, Path, Path]
) -> None:
    data_dir, state_dir, bundle_dir = onboarded
    with registry_server(data_dir, get_ray_token_only(answer)) as address:
        site_node(tmp_path, state_dir, bundle_dir, address).fetch_ray_token()
    assert (state_dir / "ray-token").read_bytes() == CURRENT_TOKEN


def test_fetch_ray_token_coordinator_refuses_raises_without_fallback(
    tmp_path: Path, onboarded: tuple[Path, Path, Path]
) -> None:
    data_dir, state_dir, bundle_dir = onboarded
    with (
        registry_server(data_dir, get_ray_token_only(refuse)) as address,
        pytest.raises(PermissionDeniedError, match="refused the Ray token: alpha is revoked"),
    ):
        site_node(tmp_path, state_dir, bundle_dir, address).fetch_ray_token()
    assert not (state_dir / "ray-token").exists()


def test_plain_text_join_fetches_the_token_of_the_coordinators_own_head(tmp_path: Path) -> None:
    with registry_server(None, get_ray_token_only(answer)) as address:
        token = site_node(tmp_path, tmp_path / "state", None, address)._ray_token_for_worker()
    assert token == tmp_path / "state" / "ray-token"
    assert token.read_bytes() == CURRENT_TOKEN
    assert token.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("handlers", [[], [get_ray_token_only(takes_no_token)]])
def test_plain_text_join_runs_tokenless_only_where_the_cluster_takes_no_token(
    tmp_path: Path, handlers: list[grpc.GenericRpcHandler]
) -> None:
    """A cluster the coordinator attached to (FAILED_PRECONDITION), or a coordinator
    from before GetRayToken (UNIMPLEMENTED)."""
    with registry_server(None, *handlers) as address:
        site = site_node(tmp_path, tmp_path / "state", None, address)
        assert site._ray_token_for_worker() is None
    assert not (tmp_path / "state" / "ray-token").exists()


def test_plain_text_join_raises_on_any_other_refusal(tmp_path: Path) -> None:
    with (
        registry_server(None, get_ray_token_only(refuse)) as address,
        pytest.raises(PermissionDeniedError, match="refused the Ray token"),
    ):
        site_node(tmp_path, tmp_path / "state", None, address)._ray_token_for_worker()
