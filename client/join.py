"""`client join`: register the node, start the SuperNode and the Ray worker, heartbeat,
leave cleanly."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from client.bundle import Bundle, load_bundle
from client.data.loaders import check_data_dir
from client.devices import describe_device, hardware_labels, resolve_device
from client.metrics import ClientMetrics
from client.ray_worker import RayWorker
from client.settings import ClientSettings
from client.supernode import SIGNING_KEY_FILE, SuperNode
from consortium import pki
from consortium.errors import ChildProcessFailedError, InsecureTransportError, UnreachableError
from consortium.metrics_http import MetricsServer
from consortium.net import is_loopback_host, split_host_port
from consortium.proto.v1 import nodes_pb2, nodes_pb2_grpc
from consortium.provenance.signing import SigningKey
from consortium.ray_env import RayTls, ray_node_ip, write_ray_token
from consortium.rpc import RetryPolicy, call_with_retry, open_channel

log = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Joined:
    node_id: str
    superlink_address: str
    heartbeat_interval_s: float
    ray_address: str = ""  # "": the coordinator runs without Ray
    ray_tls: bool = False  # the Ray channel uses TLS: get a node certificate first


def check_transport(settings: ClientSettings) -> Bundle | None:
    """The verified bundle (mutual TLS), or None for plain text on loopback (--insecure)."""
    host, _ = split_host_port(settings.coordinator)
    if not settings.insecure:
        if settings.bundle is None:
            raise InsecureTransportError(
                "no startup bundle: pass --bundle DIR from your operator (see "
                "docs/onboarding.md), or --insecure to join a loopback coordinator"
            )
        return load_bundle(settings.bundle, settings.resolved_state_dir)
    if not is_loopback_host(host):
        raise InsecureTransportError(
            f"--insecure is allowed only on loopback, but the coordinator is {host!r}"
        )
    return None


class SiteNode:
    """One institution node: validated data, a registration, a SuperNode child."""

    def __init__(
        self, settings: ClientSettings, on_event: Callable[[str], None] = log.info
    ) -> None:
        self.settings = settings
        self._say = on_event
        # Everything that can be checked locally is checked before joining.
        self.datasets = check_data_dir(settings.data)
        self.device = resolve_device(settings.gpu)
        self.metrics = ClientMetrics(
            settings.institution, settings.resolved_state_dir, settings.gpu
        )
        self.bundle = check_transport(settings)
        # The key that signs this site's model updates; it never leaves the site.
        self.signing_key = SigningKey.load_or_create(settings.resolved_state_dir / SIGNING_KEY_FILE)
        self._channel = open_channel(
            settings.coordinator, self.bundle.tls() if self.bundle else None
        )
        self._stub = nodes_pb2_grpc.NodeRegistryStub(self._channel)
        self._policy = RetryPolicy(
            attempts=settings.connect_attempts, initial_backoff_s=settings.connect_backoff_s
        )

    def register(self) -> Joined:
        request = nodes_pb2.RegisterNodeRequest(
            institution=self.settings.institution,
            hostname=socket.gethostname(),
            device=describe_device(self.device),
            signing_public_key=self.signing_key.public.raw,
        )
        response: nodes_pb2.RegisterNodeResponse = call_with_retry(
            lambda t: self._stub.RegisterNode(request, timeout=t),
            self.settings.coordinator,
            self._policy,
            on_retry=lambda n, wait, why: self._say(
                f"coordinator not reachable ({why}); retry {n} in {wait:.1f} s"
            ),
        )
        return Joined(
            node_id=response.node.node_id,
            superlink_address=response.superlink_fleet_address,
            heartbeat_interval_s=response.heartbeat_interval_ms / 1000,
            ray_address=response.ray_address,
            ray_tls=response.ray_tls,
        )

    def run(self, stop: threading.Event) -> None:
        """Join, then heartbeat until `stop` is set or the SuperNode dies."""
        metrics = MetricsServer(
            self.settings.metrics_address, self.metrics.registry, self.settings.metrics_address_file
        )
        try:
            self._join_and_heartbeat(stop)
        finally:
            metrics.stop()

    def _join_and_heartbeat(self, stop: threading.Event) -> None:
        joined = self.register()
        self.metrics.contacted()
        self._say(
            f"registered node {joined.node_id[:12]} for {self.settings.institution} "
            f"on {self.device}; datasets: {', '.join(self.datasets)}"
        )
        supernode = SuperNode(
            joined.superlink_address,
            self.settings.data,
            self.settings.institution,
            self.device,
            self.settings.resolved_state_dir,
            (self.bundle.ca_cert, self.bundle.keys.supernode_key) if self.bundle else None,
            port=self.settings.supernode_port,
        )
        self.metrics.watch_supernode(lambda: supernode.process.poll() is None)
        self._say(
            f"SuperNode connected to {joined.superlink_address} (log: {supernode.process.log_path})"
        )
        ray_worker: RayWorker | None = None
        try:
            ray_worker = self._start_ray_worker(joined)
            while not stop.wait(joined.heartbeat_interval_s):
                if supernode.process.poll() is not None:
                    raise ChildProcessFailedError(
                        f"the Flower SuperNode exited with code {supernode.process.poll()}; "
                        f"see {supernode.process.log_path}:\n{supernode.process.log_tail()}"
                    )
                if ray_worker is not None:
                    ray_worker.ensure_running()
                self._heartbeat(joined.node_id)
        finally:
            # In parallel: the Ray worker drains for a few seconds, the SuperNode need not wait.
            stoppers = [threading.Thread(target=supernode.stop, name="stop-supernode")]
            if ray_worker is not None:
                stoppers.append(threading.Thread(target=ray_worker.stop, name="stop-ray-worker"))
            for stopper in stoppers:
                stopper.start()
            for stopper in stoppers:
                stopper.join()
            self._leave(joined.node_id)
            self._channel.close()

    def _start_ray_worker(self, joined: Joined) -> RayWorker | None:
        if not self.settings.ray_enabled:
            return None
        if not joined.ray_address:
            self._say("the coordinator runs without Ray: contributing no compute to pretraining")
            return None
        worker = RayWorker(
            joined.ray_address,
            self.settings.institution,
            joined.node_id,
            self.settings.gpu,
            self.settings.resolved_state_dir,
            self._ray_token_path(),
            hardware=hardware_labels(self.device),
            tls=self._ray_certificate() if joined.ray_tls else None,
            before_start=self._fetch_ray_token if self.bundle else None,
        )
        self._say(
            f"Ray worker joining {joined.ray_address} as institution:{self.settings.institution} "
            f"(log: {worker.process.log_path})"
        )
        return worker

    def _ray_token_path(self) -> Path | None:
        """Where the Ray worker reads the cluster token: the state dir's copy of the
        coordinator's current one (None without TLS: no token)."""
        return self.settings.resolved_state_dir / "ray-token" if self.bundle else None

    def _fetch_ray_token(self) -> None:
        """The cluster's current token, over mutual TLS, into the state dir (0600). A
        coordinator that cannot hand it out leaves the bundle's copy in use."""
        assert self.bundle is not None
        path = self.settings.resolved_state_dir / "ray-token"
        request = nodes_pb2.GetRayTokenRequest(institution=self.settings.institution)
        try:
            token = call_with_retry(
                lambda t: self._stub.GetRayToken(request, timeout=t),
                self.settings.coordinator,
                self._policy,
            ).token
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise UnreachableError(
                    f"the coordinator refused the Ray token ({error.code().name}: "
                    f"{error.details()})"
                ) from None
            token = self.bundle.ray_token.read_bytes()
        write_ray_token(path, token)

    def _ray_certificate(self) -> RayTls:
        """A fresh Ray node certificate for this host's address, signed by the coordinator
        over mutual TLS; the key is made here and never leaves the state dir."""
        if self.bundle is None:
            raise InsecureTransportError(
                "the coordinator's Ray channel uses TLS: join with --bundle"
            )
        directory = self.settings.resolved_state_dir / "ray-tls"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls = RayTls(directory / "node.crt", directory / "node.key", directory / "ca.crt")
        key = pki.generate_key()
        csr = pki.make_node_csr(key, self.settings.institution, [ray_node_ip()])
        request = nodes_pb2.IssueRayCertificateRequest(
            institution=self.settings.institution, csr_pem=pki.pem(csr)
        )
        response: nodes_pb2.IssueRayCertificateResponse = call_with_retry(
            lambda t: self._stub.IssueRayCertificate(request, timeout=t),
            self.settings.coordinator,
            self._policy,
        )
        pki.write_private_key(tls.key, key)
        tls.certificate.write_bytes(response.certificate_pem)
        tls.ca_certificate.write_bytes(response.ca_certificate_pem)
        return tls

    def _heartbeat(self, node_id: str) -> None:
        try:
            self._stub.Heartbeat(nodes_pb2.HeartbeatRequest(node_id=node_id), timeout=5)
            self.metrics.heartbeat_sent(ok=True)
        except grpc.RpcError as error:
            # The coordinator may be restarting; keep the SuperNode and try again.
            log.warning("heartbeat failed: %s", error)
            self.metrics.heartbeat_sent(ok=False)

    def _leave(self, node_id: str) -> None:
        try:
            self._stub.LeaveNode(
                nodes_pb2.LeaveNodeRequest(node_id=node_id), timeout=LEAVE_TIMEOUT_S
            )
            self._say(f"node {node_id[:12]} left the consortium")
        except grpc.RpcError as error:
            log.warning("could not tell the coordinator that the node left: %s", error)


__all__ = ["Joined", "SiteNode", "UnreachableError"]
