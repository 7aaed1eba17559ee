"""`coordinator serve`: state, SuperLink and Ray head children, control-plane API, scheduler."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from consortium.errors import InsecureTransportError
from consortium.lifecycle import ParallelStops, StartStep, start_in_order
from consortium.net import (
    is_loopback_host,
    join_host_port,
    ready_on_a_free_port,
    reserve_free_port,
    split_host_port,
)
from consortium.ownership import claim
from consortium.processes import ChildProcess
from consortium.proto.v1 import jobs_pb2_grpc, nodes_pb2_grpc, status_pb2_grpc
from consortium.provenance.signing import SigningKey
from consortium.ray_env import (
    RAY_DEFAULT_PORTS,
    RayTls,
    short_temp_dir,
    use_ray_auth_in_this_process,
)
from consortium.supervision import ProcessChild, Supervised, Supervisor
from coordinator.access.pki_files import CoordinatorPki
from coordinator.access.refusals.control_plane import ControlPlaneRefusalWatch
from coordinator.access.refusals.fleet import FleetRefusalWatch
from coordinator.access.registry import NodeRegistry
from coordinator.access.supernode_keys import SuperNodeKeySync
from coordinator.addresses import announced, check_server_names, public_host, told_hosts
from coordinator.api.auth import CertificateAuthInterceptor
from coordinator.api.runtime_status import CoordinatorStatusServicer, RuntimeHealth
from coordinator.api.servicers import JobsServicer, NodeRegistryServicer, OpenStreamLimit
from coordinator.federated.approvals import RunApprovals
from coordinator.federated.edge import FleetEdge
from coordinator.federated.flower_app import FlowerControl
from coordinator.federated.runner import FlowerJobRunner
from coordinator.federated.serverapp_launcher import ServerAppLauncher
from coordinator.federated.superlink import SuperLink
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.runner import ByPlacement, JobRunner, NeedsRuntime, UnavailableRunner
from coordinator.jobs.scheduler import Scheduler
from coordinator.jobs.service import JobService
from coordinator.jobs.spec import FEDERATED, PRETRAIN, placement_of
from coordinator.observability.metrics import (
    CoordinatorMetrics,
    MetricsEndpoint,
    RpcMetricsInterceptor,
    RuntimeCollector,
)
from coordinator.pretraining.engine import DriverProcessEngine, driver_sandbox
from coordinator.pretraining.runner import PretrainRunner
from coordinator.ray.claims import RayNodeClaims
from coordinator.ray.head import RayCluster, RayHead, local_ray_token
from coordinator.ray.revocation import RayRevocationSync
from coordinator.ray.tls import coordinator_ray_tls
from coordinator.ray.token_rotation import RayTokenRotation
from coordinator.settings import CoordinatorSettings
from coordinator.state import SqliteStateStore

log = logging.getLogger(__name__)

# Server streams may hold at most half of them (coordinator/api/servicers.py,
# MAX_OPEN_STREAMS); the rest serve unary calls.
GRPC_WORKERS = 32
SUPERVISION_INTERVAL_S = 1.0
SHUTDOWN_GRACE_S = 2.0


def check_transport(settings: CoordinatorSettings) -> CoordinatorPki | None:
    """Mutual TLS from the consortium PKI, or plain text with --insecure on loopback only.

    The SuperLink is on loopback in both: it serves Fleet, Control and Runtime APIs on
    one port with no client authentication; sites reach its Fleet API through the edge.
    """
    listen_host, _ = split_host_port(settings.listen_address)
    if not is_loopback_host(settings.superlink_host):
        raise InsecureTransportError(
            f"superlink_host is {settings.superlink_host!r}, but the Flower SuperLink must "
            "listen on loopback (127.0.0.1): it serves its Control and Runtime APIs to "
            "anyone who reaches it. Sites connect to the Fleet edge instead: set "
            "fleet_edge_address (docs/onboarding.md)"
        )
    if not settings.insecure:
        files = CoordinatorPki(settings.data_dir)
        files.require()
        check_server_names(files.server_cert, told_hosts(settings))
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


def sticky_port(
    record: Path, host: str, requested: int, avoid: frozenset[int] = frozenset()
) -> int:
    """The requested port, else the one used last time (so nodes can reconnect
    after a restart), else a fresh free one; never one in `avoid` unless requested."""
    if requested:
        return requested
    previous = int(record.read_text().strip() or 0) if record.exists() else 0
    if previous in avoid:
        log.info(
            "port %d used last time is one the server's own parts take; choosing another", previous
        )
    elif previous:
        try:
            with socket.socket() as probe:
                # As the servers bind: a crashed predecessor's connections in TIME_WAIT
                # must not move the port (sites reconnect to it); a listener still does.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, previous))
            return previous
        except OSError:
            log.info("port %d used last time is taken; choosing another", previous)
    return fresh_port(host, avoid)


def fresh_port(host: str, avoid: frozenset[int] = frozenset()) -> int:
    """A free port the OS hands out for `host`, never one in `avoid`."""
    port = reserve_free_port(host)
    while port in avoid:
        port = reserve_free_port(host)
    return port


# The start steps of `Coordinator`, in order (`on_start_step` receives these names).
START_STEPS = (
    "transport",
    "data_dir",
    "ownership",
    "state_store",
    "signing_key",
    "refusal_watches",
    "superlink",
    "ray",
    "superlink_ready",
    "serverapp_launcher",
    "edge",
    "ray_head_ready",
    "metrics_endpoint",
    "supervisor",
    "api",
    "scheduler",
    "address_file",
)


class Coordinator:
    """A started coordinator; `stop()` ends everything it started.

    The composition root of `coordinator serve`: `__init__` runs the named steps of
    `START_STEPS`, and each step registers the stop of what it started on one
    `ExitStack` the moment it has started it. A failure at any step (or `stop()`)
    closes the stack: what was started stops, newest first, the SuperLink and the Ray
    head side by side. `on_start_step(name)` is called before each step: a test seam
    that fails start-up at a chosen step.
    """

    pki: CoordinatorPki | None
    store: SqliteStateStore
    superlink: SuperLink
    edge: FleetEdge | None
    fleet_address: str  # what RegisterNode hands sites: the edge, or (insecure) the SuperLink
    server: grpc.Server
    address: str
    scheduler: Scheduler | None
    approvals: RunApprovals
    flower: FlowerControl
    serverapps: ServerAppLauncher
    supervisor: Supervisor
    runtime_health: RuntimeHealth
    runtime_status: CoordinatorStatusServicer

    def __init__(
        self,
        settings: CoordinatorSettings,
        on_start_step: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.stopping = threading.Event()
        self.metrics = CoordinatorMetrics()
        self.pki = None
        self.edge = None
        self.ray_cluster: RayCluster | None = None
        self.ray_head: RayHead | None = None
        self.pretrain: PretrainRunner | None = None
        self.ray_claims: RayNodeClaims | None = None  # None: nodes' declarations count
        self.scheduler = None
        self._scheduler_thread: threading.Thread | None = None
        self._stack = ExitStack()
        # Held while a runtime is restarted (by the supervisor, or by a token rotation,
        # which restarts the Ray head on purpose): neither sees the other's half-done work.
        self._runtimes_lock = threading.RLock()
        # The SuperLink and the Ray head stop independently: one entry, in parallel.
        self._children = ParallelStops()
        steps: list[StartStep] = [
            ("transport", self._check_transport),
            ("data_dir", self._make_data_dir),
            ("ownership", self._claim_data_dir),
            ("state_store", self._open_store),
            ("signing_key", self._load_signing_key),
            ("refusal_watches", self._start_watches),
            ("superlink", self._start_superlink),
            ("ray", self._start_ray_step),
            ("superlink_ready", self._wait_superlink),
            ("serverapp_launcher", self._start_serverapp_launcher),
            ("edge", self._start_edge),
            ("ray_head_ready", self._wait_ray_head),
            ("metrics_endpoint", self._start_metrics_endpoint),
            ("supervisor", self._start_supervisor),
            ("api", self._start_api_step),
            ("scheduler", self._start_scheduler),
            ("address_file", self._write_address_file),
        ]
        assert tuple(name for name, _ in steps) == START_STEPS
        start_in_order(self._stack, steps, on_start_step)

    # --- start steps, in order ------------------------------------------------
    def _check_transport(self) -> None:
        self.pki = check_transport(self.settings)

    def _make_data_dir(self) -> None:
        self.paths.root.mkdir(parents=True, exist_ok=True)

    def _claim_data_dir(self) -> None:
        """One coordinator per data dir: a second is refused, a dead one's leftovers (a
        SuperLink still holding its port, a ServerApp still writing rounds) are stopped,
        and a reaper stops this one's children if it dies (consortium/ownership.py)."""
        # Ray's agents carry no owner mark; their command line names our Ray temp dir.
        ray_dir = short_temp_dir(self.paths.root)
        claim(
            self.paths.root,
            "coordinator serve",
            self._stack,
            cmdline_marks=(f"{ray_dir}/",),
            remove=(ray_dir,),
        )

    def _open_store(self) -> None:
        self.store = SqliteStateStore(self.paths.state_db)
        self._stack.callback(self.store.close)

    def _load_signing_key(self) -> None:
        # Signs the provenance log and the runs sites may execute (`coordinator init`
        # creates it; created here on first start when there is none, as with --insecure).
        self.approvals = RunApprovals(SigningKey.load_or_create(self.paths.signing_key))

    def _start_watches(self) -> None:
        """Refusals that only the SuperLink's log and gRPC's TLS layer record (secure
        mode); the watches start before the servers so they miss nothing."""
        if self.pki is None:
            return
        watches: list[FleetRefusalWatch | ControlPlaneRefusalWatch] = [
            FleetRefusalWatch(
                self.paths.log_file("superlink"),
                on_refusal=lambda r: self.metrics.auth_refused(r.channel, r.reason),
            ),
            ControlPlaneRefusalWatch(
                on_refusal=lambda r: self.metrics.auth_refused(r.channel, r.reason)
            ),
        ]
        for watch in watches:
            watch.start()
            self._stack.callback(watch.stop)

    def _start_superlink(self) -> None:
        settings = self.settings
        self.paths.flower_dir.mkdir(parents=True, exist_ok=True)
        record = self.paths.superlink_port_file
        port = sticky_port(record, settings.superlink_host, settings.superlink_port)
        record.write_text(str(port))
        self._stack.callback(self._children)
        self.superlink = SuperLink(self.paths, settings.superlink_host, port, self.pki)
        self._children.add(self.superlink.stop)

    def _start_ray_step(self) -> None:
        self.ray_cluster = self._start_ray()

    def _wait_superlink(self) -> None:
        superlink, settings = self.superlink, self.settings
        timeout_s = settings.superlink_start_timeout_s
        if settings.superlink_port:
            superlink.wait_ready(timeout_s)
            return

        def move_to(port: int) -> None:
            superlink.move_to(port)
            self.paths.superlink_port_file.write_text(str(port))

        ready_on_a_free_port(
            "Flower SuperLink",
            lambda: superlink.wait_ready(timeout_s),
            superlink.port_taken,
            move_to,
            lambda: reserve_free_port(settings.superlink_host),
        )

    def _start_serverapp_launcher(self) -> None:
        """Starts the ServerApp of runs this coordinator approved, and no other."""
        self.flower = FlowerControl(
            self.settings.data_dir, self.superlink.address, self.pki, stopping=self.stopping
        )
        self._stack.callback(self.flower.close)
        launcher = ServerAppLauncher(
            self.superlink.runtime,
            self.superlink.task_secret,
            self.approvals,
            self.paths.serverapp_tokens_dir,
            self.paths.log_file("superlink"),  # where Flower's own launcher wrote them
            self.superlink.app_env,
            self.flower.stop,
            on_refusal=lambda reason: self.metrics.auth_refused("flower_run", reason),
        )
        self._stack.callback(launcher.stop)
        self.serverapps = launcher

    def _start_edge(self) -> None:
        """The sites' door to the SuperLink's Fleet API (mutual TLS, revocation, Fleet
        paths only); without TLS (loopback experiments) sites use the SuperLink directly."""
        if self.pki is None:
            self.fleet_address = self.superlink.address
            return
        host, port = split_host_port(self.settings.fleet_edge_address)
        record = self.paths.fleet_edge_port_file
        port = sticky_port(record, host, port)
        edge = FleetEdge(
            host,
            port,
            self.superlink.address,
            self.pki.server_tls(),
            self.store.is_revoked,
            self.store.current_certificate_serial,
            on_refusal=lambda reason, _: self.metrics.auth_refused("fleet", reason),
        )
        self._stack.callback(edge.stop)
        record.write_text(str(edge.port))
        self.edge = edge
        self.fleet_address = announced(edge.address, public_host(self.settings))

    def _wait_ray_head(self) -> None:
        settings = self.settings
        if self.ray_head is None:
            return
        if settings.ray_port:
            self.ray_head.wait_ready(settings.ray_start_timeout_s)
            return

        def head() -> RayHead:
            assert self.ray_head is not None
            return self.ray_head

        def move_to(port: int) -> None:
            # Nothing has been handed the head's address yet (the API starts later).
            cluster = head().cluster
            # Its `ray start` waits 40 s for the dead GCS before it heeds SIGTERM.
            head().stop(timeout_s=1.0)
            self.ray_head = self._new_ray_head(port, cluster.token_path, cluster.tls)
            self.ray_cluster = self.ray_head.cluster
            self.paths.ray_head_port_file.write_text(str(port))

        ready_on_a_free_port(
            "Ray head",
            lambda: head().wait_ready(settings.ray_start_timeout_s),
            lambda: head().port_taken(),
            move_to,
            lambda: fresh_port(settings.ray_host, RAY_DEFAULT_PORTS),
        )

    def _start_metrics_endpoint(self) -> None:
        # Before the API: coordinator.address appearing means metrics.address exists.
        endpoint = MetricsEndpoint(self.metrics, self.store, self.settings)
        self._stack.callback(endpoint.stop)

    def _start_supervisor(self) -> None:
        """Restart the SuperLink or the Ray head when one dies (consortium/supervision.py):
        the control plane never goes down with a runtime. Checked every second on a
        thread that stops, with the rest, before the runtimes themselves do."""
        children: list[Supervised] = [
            ProcessChild("superlink", lambda: self.superlink.process, self._restart_superlink)
        ]
        addresses = {"superlink": self.superlink.address}
        head = self.ray_head
        if head is not None:
            children.append(
                ProcessChild("ray-head", self._ray_head_process, self._restart_dead_ray_head)
            )
            addresses["ray-head"] = head.address
        self.supervisor = Supervisor(children, on_restart=self.metrics.child_restarted)
        self.runtime_health = RuntimeHealth(self.supervisor)
        self.runtime_status = CoordinatorStatusServicer(self.supervisor, addresses)
        self.metrics.add_collector(RuntimeCollector(self.supervisor.status))
        thread = threading.Thread(target=self._supervise, name="supervisor")
        thread.start()
        self._stack.callback(thread.join)
        self._stack.callback(self.stopping.set)

    def _supervise(self) -> None:
        while not self.stopping.wait(SUPERVISION_INTERVAL_S):
            with self._runtimes_lock:
                if self.stopping.is_set():
                    return
                self.supervisor.check()
            self.runtime_health.refresh()

    def _ray_head_process(self) -> ChildProcess:
        assert self.ray_head is not None
        return self.ray_head.process

    def _restart_superlink(self) -> None:
        self.superlink.restart(self.settings.superlink_start_timeout_s)

    def _restart_dead_ray_head(self) -> None:
        """A pretraining run loses its cluster with the head: it is interrupted and its
        job re-queued, to resume from its checkpoint on the new head."""
        if self.pretrain is not None:
            self.pretrain.interrupt("the Ray head died")
        self._restart_ray_head()

    def _start_api_step(self) -> None:
        self.server = self._start_api()

    def _start_scheduler(self) -> None:
        """The scheduler, one job runner per kind and the periodic syncs, on a thread.

        Its stop is registered first, so a failure part-way stops whatever had started.
        """
        settings = self.settings
        self._stack.callback(self._stop_scheduler)
        flower = self.flower
        lifecycle = JobLifecycle(self.store)
        self.pretrain = (
            PretrainRunner(
                lifecycle,
                settings.data_dir,
                DriverProcessEngine(
                    self.ray_cluster,
                    self.paths.log_file("pretrain-driver"),
                    revoked=self.store.revoked_institutions,
                    node_institutions=(
                        self.ray_claims.assignments if self.ray_claims is not None else None
                    ),
                    sandbox=driver_sandbox(self.paths.root),
                ),
                self.metrics,
            )
            if self.ray_cluster is not None
            else None
        )
        supervisor = self.supervisor
        # Fine-tuning and federated pretraining both run as Flower runs on the SuperLink.
        on_flower = NeedsRuntime(
            FlowerJobRunner(
                lifecycle,
                self.store,
                flower,
                self.approvals,
                self.metrics,
                settings.flower_status_interval_s,
                provenance_log=self.paths.provenance_log,
                serverapp_exit=self.serverapps.exit_code,
            ),
            lambda: supervisor.down_reason("superlink"),
        )
        on_ray_pool: JobRunner = (
            NeedsRuntime(self.pretrain, lambda: supervisor.down_reason("ray-head"))
            if self.pretrain is not None
            else UnavailableRunner(
                'pretraining with placement = "ray-pool" needs Ray, but this coordinator '
                "runs with ray_enabled = false; start `coordinator serve` with Ray, or "
                'submit the job with placement = "federated"'
            )
        )
        runners: dict[str, JobRunner] = {
            FEDERATED: on_flower,
            PRETRAIN: ByPlacement({"federated": on_flower, "ray-pool": on_ray_pool}, placement_of),
        }
        self.scheduler = Scheduler(
            lifecycle, runners, settings.scheduler_poll_interval_s, self.metrics
        )
        # With TLS, only onboarded SuperNode keys may connect; keep Flower's list current.
        key_sync = (
            SuperNodeKeySync(
                self.store, flower, self.metrics, settings.flower_status_interval_s
            ).sync
            if self.pki is not None
            else None
        )
        # Ray has one shared token: after a revocation it is replaced and the head
        # restarted (when no pretraining job runs); until then the institution's nodes
        # are drained. (A cluster we only attach to keeps its token: drain only.)
        rotation = (
            RayTokenRotation(
                self.store,
                self.pki.ray_token,
                settings.paths.ray_token_excludes,
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
        # Claims bind to the first node seen carrying them: look at every new read.
        claims = self.ray_claims.sync if self.ray_claims is not None else None
        syncs = [sync for sync in (key_sync, rotation, drain, claims) if sync is not None]
        self._scheduler_thread = threading.Thread(
            target=self.scheduler.run_forever,
            args=(self.stopping, (lambda: [sync() for sync in syncs]) if syncs else None),
            name="scheduler",
        )
        self._scheduler_thread.start()

    def _write_address_file(self) -> None:
        """Written last, whole, then renamed: its presence means the coordinator is ready
        (and it is the first thing a stop removes)."""
        address_file = self.paths.address_file
        partial = address_file.with_suffix(".partial")
        partial.write_text(self.address)
        self._stack.callback(address_file.unlink, missing_ok=True)
        os.replace(partial, address_file)
        log.info(
            "control-plane API on %s, Flower SuperLink on %s (sites: %s), Ray on %s, data in %s",
            self.address,
            self.superlink.address,
            self.fleet_address,
            self.ray_cluster.address if self.ray_cluster is not None else "(off)",
            self.paths.root,
        )

    # --- helpers ----------------------------------------------------------------
    def _stop_scheduler(self) -> None:
        self.stopping.set()
        if self._scheduler_thread is not None and self._scheduler_thread.ident is not None:
            self._scheduler_thread.join()
        if self.scheduler is not None:
            self.scheduler.shutdown()

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
        if token is None and settings.ray_address is None:
            token = local_ray_token(self.paths)  # plain text: our own head's token
        # Process-wide and before any Ray call: Ray reads its auth mode once, and the
        # nodes view and the revocation drain talk to the GCS from this process (each
        # pretraining driver, a child process, sets up its own).
        use_ray_auth_in_this_process(token, tls)
        if settings.ray_address is not None:
            log.info("attaching to the Ray cluster at %s", settings.ray_address)
            return RayCluster(settings.ray_address, token, tls)
        self.paths.ray_dir.mkdir(parents=True, exist_ok=True)
        record = self.paths.ray_head_port_file
        # Not a port Ray's head takes by default for another of its parts: a GCS port of
        # 52365 (its dashboard agent's) once made the head refuse to start.
        port = sticky_port(record, settings.ray_host, settings.ray_port, avoid=RAY_DEFAULT_PORTS)
        record.write_text(str(port))
        self.ray_head = self._new_ray_head(port, token, tls)
        # Stops whichever head runs then (a token rotation restarts it).
        self._children.add(self._stop_ray_head)
        return self.ray_head.cluster

    def _new_ray_head(self, port: int, token: Path | None, tls: RayTls | None) -> RayHead:
        return RayHead(
            self.paths,
            self.settings.ray_host,
            port,
            token,
            on_refusal=lambda refusal: self.metrics.auth_refused("ray", refusal.reason),
            tls=tls,
            port_range=self.settings.ray_port_range,
        )

    def _stop_ray_head(self) -> None:
        if self.ray_head is not None:
            self.ray_head.stop()

    def _restart_ray_head(self) -> None:
        """Stop the Ray head and start it again on the same port, reading the token file
        anew (after a rotation); this process's GCS clients follow, and the next pretraining
        driver reads it when it starts."""
        with self._runtimes_lock:
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
        # grpc does not shut down an executor it was given: ours, so ours to stop.
        executor = futures.ThreadPoolExecutor(
            max_workers=GRPC_WORKERS, thread_name_prefix="control-plane"
        )
        self._stack.callback(executor.shutdown, wait=True)
        server = grpc.server(executor, interceptors=self._interceptors())
        self._stack.callback(self._stop_server, server)
        registry = NodeRegistry(self.store, self.settings.node_timeout_s, self.metrics)
        # `coordinator nodes` shows each node's Ray side too, read from the GCS (this
        # process authenticates to it since `_start_ray`).
        from coordinator.ray.nodes import GcsNodesView, NoRay, RayNodesSource

        ray_nodes: RayNodesSource = (
            GcsNodesView(self.ray_cluster.address)
            if self.ray_cluster is not None
            else NoRay("Ray is off on this coordinator (ray_enabled = false)")
        )
        if self.ray_cluster is not None and self.pki is not None:
            # Which institution each Ray node counts for: the claims this coordinator
            # issued over mutual TLS, not what nodes declare (coordinator/ray/claims.py).
            self.ray_claims = RayNodeClaims(self.store, ray_nodes, self.metrics.auth_refused)
        nodes_pb2_grpc.add_NodeRegistryServicer_to_server(
            NodeRegistryServicer(
                registry,
                self.fleet_address,  # the edge (the SuperLink itself is on loopback)
                int(self.settings.heartbeat_interval_s * 1000),
                self.ray_cluster.address if self.ray_cluster is not None else "",
                ray_nodes,
                # Signs contributed nodes' Ray certificates when the channel uses TLS.
                self.pki if self.ray_cluster is not None and self.ray_cluster.tls else None,
                self.ray_cluster.token_path if self.ray_cluster is not None else None,
                self.approvals,
                lambda: self.ray_head.head_id if self.ray_head is not None else "",
                self.ray_claims,
            ),
            server,
        )
        status_pb2_grpc.add_CoordinatorStatusServicer_to_server(self.runtime_status, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.runtime_health.servicer, server)
        jobs_pb2_grpc.add_JobsServicer_to_server(
            JobsServicer(
                JobService(self.store, metrics=self.metrics),
                self.store,
                self.stopping,
                self.metrics,
            ),
            server,
        )
        host, port = split_host_port(self.settings.listen_address)
        record = self.paths.port_file
        port = sticky_port(record, host, port)
        if self.pki is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", self.pki.server_tls().credentials())
        server.start()
        record.write_text(str(bound))
        self.address = announced(join_host_port(host, bound), public_host(self.settings))
        return server

    def _stop_server(self, server: grpc.Server) -> None:
        self.stopping.set()  # ends the open watch streams
        self.runtime_health.shutting_down()
        server.stop(SHUTDOWN_GRACE_S).wait()

    def _interceptors(self) -> list[grpc.ServerInterceptor]:
        interceptors: list[grpc.ServerInterceptor] = [RpcMetricsInterceptor(self.metrics)]
        if self.pki is not None:
            interceptors.append(
                CertificateAuthInterceptor(
                    self.store,
                    on_refusal=lambda reason, _: self.metrics.auth_refused("control_plane", reason),
                )
            )
        # Last: it counts streams by the caller the certificate interceptor has set.
        interceptors.append(OpenStreamLimit())
        return interceptors

    def stop(self) -> None:
        """Stop everything that was started, newest first (closes the exit stack)."""
        self._stack.close()
        log.info("coordinator stopped")

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
