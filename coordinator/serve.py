"""`coordinator serve`: state, SuperLink and Ray head children, control-plane API, scheduler."""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent import futures
from pathlib import Path

import grpc

from consortium.errors import InsecureTransportError
from consortium.net import is_loopback_host, reserve_free_port, split_host_port
from consortium.proto.v1 import jobs_pb2_grpc, nodes_pb2_grpc
from consortium.provenance.signing import SigningKey
from consortium.ray_env import RayTls, use_ray_auth_in_this_process
from coordinator.access.pki_files import CoordinatorPki
from coordinator.access.refusals.control_plane import ControlPlaneRefusalWatch
from coordinator.access.refusals.fleet import FleetRefusalWatch
from coordinator.access.registry import NodeRegistry
from coordinator.access.supernode_keys import SuperNodeKeySync
from coordinator.api.auth import CertificateAuthInterceptor
from coordinator.api.servicers import JobsServicer, NodeRegistryServicer
from coordinator.federated.flower_app import FlowerCli
from coordinator.federated.runner import FlowerJobRunner
from coordinator.federated.superlink import SuperLink
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.runner import JobRunner, UnavailableRunner
from coordinator.jobs.scheduler import Scheduler
from coordinator.jobs.service import JobService
from coordinator.jobs.spec import FEDERATED, PRETRAIN
from coordinator.observability.metrics import (
    CoordinatorMetrics,
    MetricsEndpoint,
    RpcMetricsInterceptor,
)
from coordinator.pretraining.runner import PretrainRunner
from coordinator.provenance_paths import coordinator_key_path
from coordinator.ray.head import RayCluster, RayHead
from coordinator.ray.revocation import RayRevocationSync
from coordinator.ray.tls import coordinator_ray_tls
from coordinator.ray.token_rotation import RayTokenRotation
from coordinator.settings import CoordinatorSettings
from coordinator.state import SqliteStateStore

log = logging.getLogger(__name__)

GRPC_WORKERS = 32
SHUTDOWN_GRACE_S = 2.0


def check_transport(settings: CoordinatorSettings) -> CoordinatorPki | None:
    """Mutual TLS from the consortium PKI, or plain text with --insecure on loopback only."""
    listen_host, _ = split_host_port(settings.listen_address)
    if not settings.insecure:
        files = CoordinatorPki(settings.data_dir)
        files.require()
        return files
    hosts = [("listen_address", listen_host), ("superlink_host", settings.superlink_host)]
    if settings.ray_enabled and settings.ray_address is None:
        hosts.append(("ray_host", settings.ray_host))
    for name, host in hosts:
        if not is_loopback_host(host):
            raise InsecureTransportError(
                f"--insecure is allowed only on loopback, but {name} is {host!r}; use 127.0.0.1"
            )
    log.warning("running WITHOUT TLS (--insecure): only for loopback experiments")
    return None


def sticky_port(record: Path, host: str, requested: int) -> int:
    """The requested port, else the one used last time (so nodes can reconnect
    after a restart), else a fresh free one."""
    if requested:
        return requested
    if record.exists():
        previous = int(record.read_text().strip() or 0)
        try:
            with socket.socket() as probe:
                probe.bind((host, previous))
            return previous
        except OSError:
            log.info("port %d used last time is taken; choosing another", previous)
    return reserve_free_port(host)


class Coordinator:
    """A started coordinator; `stop()` ends everything it started."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.pki = check_transport(settings)
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.stopping = threading.Event()
        self.store = SqliteStateStore(settings.state_path)
        # Signs the provenance log (created on first start; `coordinator init`
        # will own this once onboarding lands).
        SigningKey.load_or_create(coordinator_key_path(settings.data_dir))
        flower_dir = settings.data_dir / "flower"
        flower_dir.mkdir(parents=True, exist_ok=True)
        port = sticky_port(
            flower_dir / "superlink.port", settings.superlink_host, settings.superlink_port
        )
        (flower_dir / "superlink.port").write_text(str(port))
        self.metrics = CoordinatorMetrics()
        # Refusals that only the SuperLink's log and gRPC's TLS layer record (secure
        # mode); the watches start before the servers so they miss nothing.
        self._watches: list[FleetRefusalWatch | ControlPlaneRefusalWatch] = []
        if self.pki is not None:
            self._watches = [
                FleetRefusalWatch(
                    settings.data_dir / "logs" / "superlink.log",
                    on_refusal=lambda r: self.metrics.auth_refused(r.channel, r.reason),
                ),
                ControlPlaneRefusalWatch(
                    on_refusal=lambda r: self.metrics.auth_refused(r.channel, r.reason)
                ),
            ]
        for watch in self._watches:
            watch.start()
        self.superlink = SuperLink(settings.data_dir, settings.superlink_host, port, self.pki)
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.ray_head: RayHead | None = None
        try:
            self.ray_cluster = self._start_ray()
            self.superlink.wait_ready(settings.superlink_start_timeout_s)
            if self.ray_head is not None:
                self.ray_head.wait_ready(settings.ray_start_timeout_s)
            # Before the API: coordinator.address appearing means metrics.address exists.
            self._metrics_endpoint = MetricsEndpoint(self.metrics, self.store, settings)
            self.server = self._start_api()
        except BaseException:
            if self._metrics_endpoint is not None:
                self._metrics_endpoint.stop()
            if self.ray_head is not None:
                self.ray_head.stop()
            self.superlink.stop()
            for watch in self._watches:
                watch.stop()
            self.store.close()
            raise
        flower = FlowerCli(settings.data_dir, self.superlink.address, self.pki)
        lifecycle = JobLifecycle(self.store)
        self.pretrain = (
            PretrainRunner(lifecycle, settings.data_dir, self.ray_cluster, self.metrics)
            if self.ray_cluster is not None
            else None
        )
        runners: dict[str, JobRunner] = {
            FEDERATED: FlowerJobRunner(lifecycle, self.store, flower, self.metrics),
            PRETRAIN: self.pretrain
            if self.pretrain is not None
            else UnavailableRunner(
                "pretraining needs Ray, but this coordinator runs with ray_enabled = false; "
                "start `coordinator serve` with Ray"
            ),
        }
        self.scheduler = Scheduler(
            lifecycle, runners, settings.scheduler_poll_interval_s, self.metrics
        )
        # With TLS, only onboarded SuperNode keys may connect; keep Flower's list current.
        key_sync = SuperNodeKeySync(self.store, flower).sync if self.pki is not None else None
        # Ray has one shared token: after a revocation it is replaced and the head
        # restarted (when no pretraining job runs); until then the institution's nodes
        # are drained. (A cluster we only attach to keeps its token: drain only.)
        rotation = (
            RayTokenRotation(
                self.store,
                self.pki.ray_token,
                settings.data_dir / "ray" / "token-excludes.json",
                self._restart_ray_head,
                self.pretrain.busy,
            ).sync
            if self.pki is not None and self.ray_head is not None and self.pretrain is not None
            else None
        )
        drain = (
            RayRevocationSync.for_cluster(self.store, self.ray_cluster).sync
            if self.pki is not None and self.ray_cluster is not None
            else None
        )
        syncs = [sync for sync in (key_sync, rotation, drain) if sync is not None]
        self._scheduler_thread = threading.Thread(
            target=self.scheduler.run_forever,
            args=(self.stopping, (lambda: [sync() for sync in syncs]) if syncs else None),
            name="scheduler",
        )
        self._scheduler_thread.start()

    def _start_ray(self) -> RayCluster | None:
        """Our own Ray head (child process), an existing cluster, or none."""
        settings = self.settings
        token = self.pki.ray_token if self.pki is not None else None
        if not settings.ray_enabled:
            log.info("Ray is off (ray_enabled = false): pretraining jobs will fail")
            return None
        tls = None
        if settings.ray_tls:
            if self.pki is None:
                raise InsecureTransportError(
                    "--ray-tls needs the consortium CA: run `coordinator init` and serve "
                    "without --insecure"
                )
            tls = coordinator_ray_tls(self.pki)
        # Process-wide and before any Ray call: Ray reads its auth mode once, and both
        # the pretraining driver and the nodes view talk to the GCS from this process.
        use_ray_auth_in_this_process(token, tls)
        if settings.ray_address is not None:
            log.info("attaching to the Ray cluster at %s", settings.ray_address)
            return RayCluster(settings.ray_address, token, tls)
        ray_dir = settings.data_dir / "ray"
        ray_dir.mkdir(parents=True, exist_ok=True)
        port = sticky_port(ray_dir / "head.port", settings.ray_host, settings.ray_port)
        (ray_dir / "head.port").write_text(str(port))
        self.ray_head = self._new_ray_head(port, token, tls)
        return self.ray_head.cluster

    def _new_ray_head(self, port: int, token: Path | None, tls: RayTls | None) -> RayHead:
        return RayHead(
            self.settings.data_dir,
            self.settings.ray_host,
            port,
            token,
            on_refusal=lambda refusal: self.metrics.auth_refused("ray", refusal.reason),
            tls=tls,
        )

    def _restart_ray_head(self) -> None:
        """Stop the Ray head and start it again on the same port, reading the token file
        anew (after a rotation); this process's driver and GCS clients follow."""
        head = self.ray_head
        assert head is not None and self.ray_cluster is not None
        if self.pretrain is not None:
            self.pretrain.disconnect()
        head.stop()
        port = int(head.address.rsplit(":", 1)[1])
        cluster = self.ray_cluster
        self.ray_head = self._new_ray_head(port, cluster.token_path, cluster.tls)
        self.ray_head.wait_ready(self.settings.ray_start_timeout_s)
        # Ray caches the token it read: read the new one.
        use_ray_auth_in_this_process(cluster.token_path, cluster.tls)

    def _start_api(self) -> grpc.Server:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS),
            interceptors=self._interceptors(),
        )
        registry = NodeRegistry(self.store, self.settings.node_timeout_s, self.metrics)
        # `coordinator nodes` shows each node's Ray side too, read from the GCS (this
        # process authenticates to it since `_start_ray`).
        from coordinator.ray.nodes import GcsNodesView, NoRay, RayNodesSource

        ray_nodes: RayNodesSource = (
            GcsNodesView(self.ray_cluster.address)
            if self.ray_cluster is not None
            else NoRay("Ray is off on this coordinator (ray_enabled = false)")
        )
        nodes_pb2_grpc.add_NodeRegistryServicer_to_server(
            NodeRegistryServicer(
                registry,
                self.superlink.address,
                int(self.settings.heartbeat_interval_s * 1000),
                self.ray_cluster.address if self.ray_cluster is not None else "",
                ray_nodes,
                # Signs contributed nodes' Ray certificates when the channel uses TLS.
                self.pki if self.ray_cluster is not None and self.ray_cluster.tls else None,
                self.ray_cluster.token_path if self.ray_cluster is not None else None,
            ),
            server,
        )
        jobs_pb2_grpc.add_JobsServicer_to_server(
            JobsServicer(JobService(self.store), self.store, self.stopping), server
        )
        host, port = split_host_port(self.settings.listen_address)
        previous = self.settings.data_dir / "coordinator.port"
        port = sticky_port(previous, host, port)
        if self.pki is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", self.pki.server_tls().credentials())
        server.start()
        previous.write_text(str(bound))
        self.address = f"{host}:{bound}"
        # Written last: its presence means the API is ready.
        partial = self.settings.address_file.with_suffix(".partial")
        partial.write_text(self.address)
        os.replace(partial, self.settings.address_file)
        log.info(
            "control-plane API on %s, Flower SuperLink on %s, Ray on %s, data in %s",
            self.address,
            self.superlink.address,
            self.ray_cluster.address if self.ray_cluster is not None else "(off)",
            self.settings.data_dir,
        )
        return server

    def _interceptors(self) -> list[grpc.ServerInterceptor]:
        interceptors: list[grpc.ServerInterceptor] = [RpcMetricsInterceptor(self.metrics)]
        if self.pki is not None:
            interceptors.append(
                CertificateAuthInterceptor(
                    self.store,
                    on_refusal=lambda reason, _: self.metrics.auth_refused("control_plane", reason),
                )
            )
        return interceptors

    def stop(self) -> None:
        self.stopping.set()
        self.settings.address_file.unlink(missing_ok=True)
        self._scheduler_thread.join()
        self.scheduler.shutdown()
        self.server.stop(SHUTDOWN_GRACE_S).wait()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
        # The two children stop independently; in parallel, a stop stays within the
        # few seconds a supervisor (or Ctrl-C) waits.
        children = [threading.Thread(target=self.superlink.stop, name="stop-superlink")]
        if self.ray_head is not None:
            children.append(threading.Thread(target=self.ray_head.stop, name="stop-ray-head"))
        for child in children:
            child.start()
        for child in children:
            child.join()
        for watch in self._watches:
            watch.stop()
        self.store.close()
        log.info("coordinator stopped")
