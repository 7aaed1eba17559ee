"""`client join`: register the node, start the SuperNode and the Ray worker, heartbeat,
leave cleanly."""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from flwr.app import Context, Message

from client.bundle import Bundle, load_bundle, pin_ca, read_bundle_file
from client.data.check import check_site_data
from client.devices import describe_device, hardware_labels, resolve_device
from client.federated.run_check import CoordinatorRunCheck
from client.federated.task_runner import SiteTaskRunner
from client.fleet_forwarder import FleetForwarder, LocalTls, edge_target
from client.metrics import ClientMetrics
from client.ray_worker import RayWorker, node_ip, pool_sandbox
from client.settings import ClientSettings
from client.supernode import SIGNING_KEY_FILE, SuperNode
from consortium import pki
from consortium.data.site_loaders import count_examples
from consortium.errors import (
    ChildProcessFailedError,
    ConsortiumError,
    InsecureTransportError,
    UnauthenticatedError,
    UnreachableError,
)
from consortium.lifecycle import ParallelStops, StartStep, start_in_order
from consortium.metrics_http import MetricsServer
from consortium.net import is_loopback_host, split_host_port
from consortium.ownership import claim
from consortium.proto.v1 import nodes_pb2, nodes_pb2_grpc
from consortium.provenance.signing import SigningKey
from consortium.ray_env import RayTls, short_temp_dir, write_ray_token
from consortium.rpc import RetryPolicy, call_with_retry, open_channel
from consortium.sandbox import POOL_USER
from consortium.startup import imports_without_gc
from consortium.supervision import (
    ChildState,
    ProcessChild,
    RestartPolicy,
    Supervised,
    Supervisor,
)
from consortium.tls import check_server_identity
from consortium.workloads import load_workload

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from client.federated.site_trainer import SiteTrainer

log = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 3.0
TASK_RUNNER_STOP_WAIT_S = 5.0
# A site's SuperNode and Ray worker are restarted after 1, 2, 4 ... 30 s, never given up.
SITE_RESTART_POLICY = RestartPolicy(max_restarts=None)


_client_app_lock = threading.Lock()


def load_client_app() -> tuple[SiteTrainer, ClientApp]:
    """The site's ClientApp and its trainer, loaded once: behind `client join`'s start
    (`preload_client_app`) or at the first task, whichever asks first; the other waits
    for it."""
    with _client_app_lock:
        return _load_client_app()


@functools.cache
def _load_client_app() -> tuple[SiteTrainer, ClientApp]:
    # Not at start-up (torch and the training code: 1.4 s of CPU), with the garbage
    # collector paused (consortium/startup.py).
    with imports_without_gc(collect_first=True):  # threads have been running meanwhile
        from client.federated.client_app import TRAINER, app
    return TRAINER, app


def preload_client_app() -> None:
    """Load the ClientApp now (run in a thread of its own), so that the site's first
    task, the first outer step of a pretraining job, does not wait for torch: measured
    behind the WAN test bed, three sites loading it at their first task started
    training 3.4 to 3.9 s after the message arrived. A failure is logged; the first
    task tries again."""
    started = time.monotonic()
    try:
        with _client_app_lock:
            first = _load_client_app.cache_info().currsize == 0
            _load_client_app()
    except Exception:
        log.exception("ClientApp preload failed; the first task loads it")
        return
    if first:
        seconds = time.monotonic() - started
        log.info("ClientApp preload: loaded ahead of the first task in %.1f s", seconds)
    else:
        log.info("ClientApp preload: a task had loaded it first")


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


# The start steps of `SiteNode.run`, in order (`on_start_step` receives these names).
JOIN_STEPS = (
    "ownership",
    "metrics_endpoint",
    "register",
    "fleet_forwarder",
    "supernode",
    "task_runner",
    "ray_worker",
    "heartbeat",
)


class HeadWatch:
    """Tells when the coordinator's Ray head (by its id in heartbeat replies) is a new
    one since the last reply that named one: not at the first, nor when a heartbeat
    failed (None) or the coordinator runs without Ray ("")."""

    def __init__(self) -> None:
        self._seen: str | None = None

    def is_new(self, head_id: str | None) -> bool:
        if not head_id:
            return False
        new = self._seen is not None and head_id != self._seen
        self._seen = head_id
        return new


@dataclass
class _Run:
    """What one `SiteNode.run` has started so far."""

    stop: threading.Event
    children: ParallelStops = field(default_factory=ParallelStops)
    joined: Joined | None = None
    forwarder: FleetForwarder | None = None
    supernode: SuperNode | None = None
    ray_worker: RayWorker | None = None
    failure: Exception | None = None

    def require_joined(self) -> Joined:
        assert self.joined is not None, "the node has not registered yet"
        return self.joined


class SiteNode:
    """One institution node: validated data, a registration, a SuperNode child."""

    def __init__(
        self,
        settings: ClientSettings,
        on_event: Callable[[str], None] = log.info,
        on_start_step: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._say = on_event
        # Called with each step's name before it starts (a test seam; see `run`).
        self._on_start_step = on_start_step
        # Everything that can be checked locally is checked before joining.
        # Each dataset in the format its jobs train on (client/data/check.py).
        self.datasets = [dataset.name for dataset in check_site_data(settings.data)]
        for workload in settings.workloads:  # each one installed here, or a clear refusal
            load_workload(workload)
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
        self.task_runner: SiteTaskRunner | None = None  # once started
        self._heartbeat_failing = False  # logged once per outage
        self._policy = RetryPolicy(
            attempts=settings.connect_attempts, initial_backoff_s=settings.connect_backoff_s
        )

    def register(self) -> Joined:
        if self.bundle is not None:  # another consortium's coordinator, or a wrong name
            check_server_identity(self.settings.coordinator, self.bundle.tls())
        request = nodes_pb2.RegisterNodeRequest(
            institution=self.settings.institution,
            hostname=socket.gethostname(),
            device=describe_device(self.device),
            signing_public_key=self.signing_key.public.raw,
            # The cap on the example count of this site's updates (0: no dataset readable).
            declared_examples=count_examples(self.settings.data),
        )
        response: nodes_pb2.RegisterNodeResponse = call_with_retry(
            lambda t: self._stub.RegisterNode(request, timeout=t),
            self.settings.coordinator,
            self._policy,
            on_retry=lambda n, wait, why: self._say(
                f"coordinator not reachable ({why}); retry {n} in {wait:.1f} s"
            ),
        )
        if self.bundle is not None:  # joined under its CA: a later bundle needs the same
            pin_ca(self.bundle)
        return Joined(
            node_id=response.node.node_id,
            superlink_address=response.superlink_fleet_address,
            heartbeat_interval_s=response.heartbeat_interval_ms / 1000,
            ray_address=response.ray_address,
            ray_tls=response.ray_tls,
        )

    def run(self, stop: threading.Event) -> None:
        """Join, then heartbeat until `stop` is set or the SuperNode dies (which raises).

        The composition root of `client join`: the steps of `JOIN_STEPS` each register
        the stop of what they started on one `ExitStack` the moment it started, so a
        failure at any step, and the end of the run, stop exactly what runs, newest
        first: the heartbeat thread, then the SuperNode and the Ray worker side by side,
        then the node leaves, then the metrics endpoint. `stop` is set when this returns.
        """
        with ExitStack() as stack:
            stack.callback(self._channel.close)
            run = _Run(stop)
            steps: list[StartStep] = [
                ("ownership", lambda: self._claim_state_dir(stack)),
                ("metrics_endpoint", lambda: self._start_metrics(stack)),
                ("register", lambda: self._register(stack, run)),
                ("fleet_forwarder", lambda: self._start_forwarder(stack, run)),
                ("supernode", lambda: self._start_supernode(stack, run)),
                ("task_runner", lambda: self._start_task_runner(stack, run)),
                ("ray_worker", lambda: self._start_ray_worker_step(run)),
                ("heartbeat", lambda: self._start_heartbeat(stack, run)),
            ]
            assert tuple(name for name, _ in steps) == JOIN_STEPS
            start_in_order(stack, steps, self._on_start_step)
            stop.wait()
        if run.failure is not None:
            raise run.failure

    # --- start steps, in order ------------------------------------------------
    def _claim_state_dir(self, stack: ExitStack) -> None:
        """One `client join` per state dir: a second is refused, a dead one's SuperNode
        and Ray worker are stopped, and a reaper stops this one's children if it dies
        (consortium/ownership.py)."""
        state_dir = self.settings.resolved_state_dir
        # Ray's agents carry no owner mark; their command line names our Ray temp dir.
        ray_dir = short_temp_dir(state_dir)
        claim(state_dir, "client join", stack, cmdline_marks=(f"{ray_dir}/",), remove=(ray_dir,))

    def _start_metrics(self, stack: ExitStack) -> None:
        metrics = MetricsServer(
            self.settings.metrics_address, self.metrics.registry, self.settings.metrics_address_file
        )
        stack.callback(metrics.stop)

    def _register(self, stack: ExitStack, run: _Run) -> None:
        run.joined = joined = self.register()
        stack.callback(self._leave, joined.node_id)
        self.metrics.contacted()
        self._say(
            f"registered node {joined.node_id[:12]} for {self.settings.institution} "
            f"on {self.device}; datasets: {', '.join(self.datasets)}; "
            f"workloads: {', '.join(self.settings.workloads)}"
            + (f"; consortium CA sha256 {self.bundle.ca_fingerprint}" if self.bundle else "")
        )
        # The SuperNode and the Ray worker stop independently (the worker drains for a
        # few seconds; the SuperNode need not wait): one entry, in parallel.
        stack.callback(run.children)

    def _start_forwarder(self, stack: ExitStack, run: _Run) -> None:
        """With a bundle, the SuperNode reaches the coordinator's Fleet edge through a
        loopback forwarder that holds the institution's mutual TLS (flwr's SuperNode
        cannot present a client certificate); without one (loopback experiment) it
        connects to the SuperLink directly."""
        if self.bundle is None:
            return
        host, port = edge_target(run.require_joined().superlink_address, self.settings.coordinator)
        local = LocalTls.create(self.settings.resolved_state_dir / "fleet-forwarder")
        forwarder = FleetForwarder(
            host, port, self.bundle.tls(), local, port=self.settings.fleet_forwarder_port
        )
        stack.callback(forwarder.stop)
        run.forwarder = forwarder

    def _start_supernode(self, stack: ExitStack, run: _Run) -> None:
        joined = run.require_joined()
        forwarder = run.forwarder
        supernode = SuperNode(
            forwarder.address if forwarder is not None else joined.superlink_address,
            self.settings.data,
            self.settings.institution,
            self.device,
            self.settings.resolved_state_dir,
            # TLS to the forwarder (its local root); our onboarded key signs every call.
            (forwarder.local.ca_cert, self.bundle.keys.supernode_key)
            if self.bundle is not None and forwarder is not None
            else None,
            port=self.settings.supernode_port,
            coordinator_key=self.bundle.coordinator_key_file if self.bundle is not None else None,
            workloads=self.settings.workloads,
            poll_interval_s=self.settings.supernode_poll_interval_s,
            heartbeat_interval_s=self.settings.supernode_heartbeat_interval_s,
        )
        run.children.add(supernode.stop)
        run.supernode = supernode
        self.metrics.watch_supernode(lambda: supernode.process.poll() is None)
        route = (
            f"through the local forwarder {forwarder.address} to the Fleet edge "
            f"{joined.superlink_address}"
            if forwarder is not None
            else f"to {joined.superlink_address}"
        )
        self._say(f"SuperNode started, {route} (log: {supernode.process.log_path})")

    def _start_task_runner(self, stack: ExitStack, run: _Run) -> None:
        """The thread that executes the SuperNode's tasks, each only if the coordinator
        signed an approval of its run (client/federated/task_runner.py)."""
        budget_bytes = self.settings.trainer_memory_mb << 20

        def client_app(message: Message, context: Context) -> Message:
            trainer, app = load_client_app()
            trainer.memory_budget_bytes = budget_bytes
            return app(message, context)

        supernode = run.supernode
        assert supernode is not None
        runner = SiteTaskRunner(
            lambda: supernode.runtime_api_address,
            supernode.task_secret,
            CoordinatorRunCheck(
                self._stub, self.bundle.coordinator_key if self.bundle is not None else None
            ),
            client_app,
            on_refused=self.metrics.run_refused,
            poll_interval_s=self.settings.supernode_poll_interval_s,
        )
        stop = threading.Event()
        # A daemon: a task in progress (torch cannot be interrupted) must not keep a
        # stopping `client join` alive; the SuperNode's end fails that task anyway.
        thread = threading.Thread(target=runner.run, args=(stop,), name="flower-tasks", daemon=True)
        thread.start()

        def stop_tasks() -> None:
            stop.set()
            thread.join(TASK_RUNNER_STOP_WAIT_S)
            if thread.is_alive():
                log.warning("leaving a Flower task unfinished")

        stack.callback(stop_tasks)
        self.task_runner = runner
        if self.settings.preload_client_app:
            threading.Thread(
                target=preload_client_app,
                name="client-app-preload",
                daemon=True,  # an import cannot be interrupted; leaving must not wait
            ).start()

    def _start_ray_worker_step(self, run: _Run) -> None:
        worker = self._start_ray_worker(run.require_joined())
        if worker is not None:
            run.children.add(worker.stop)
        run.ray_worker = worker

    def _start_heartbeat(self, stack: ExitStack, run: _Run) -> None:
        thread = threading.Thread(target=self._heartbeat_loop, args=(run,), name="heartbeat")
        thread.start()

        def stop_heartbeat() -> None:
            run.stop.set()
            thread.join()

        stack.callback(stop_heartbeat)

    # --- the running node -------------------------------------------------------
    def _heartbeat_loop(self, run: _Run) -> None:
        """Every heartbeat interval: tell the coordinator the node lives (a refused
        certificate ends the run: exit 16), and restart the SuperNode or the Ray worker
        if it died (after a backoff, without giving up: their deaths usually follow the
        coordinator's, and they must come back with it). Only a SuperNode the SuperLink
        keeps refusing is given up on: that ends the run. A failure ends the run (sets
        `stop`) and is raised by `run`."""
        joined, supernode = run.require_joined(), run.supernode
        assert supernode is not None
        children: list[Supervised] = [
            ProcessChild(
                "supernode", lambda: supernode.process, supernode.restart, supernode.refusal
            )
        ]
        worker = run.ray_worker
        if worker is not None:
            children.append(ProcessChild("ray-worker", lambda: worker.process, worker.restart))
        supervisor = Supervisor(
            children, SITE_RESTART_POLICY, on_restart=self.metrics.child_restarted
        )
        rejoin = HeadWatch()
        try:
            while not run.stop.wait(joined.heartbeat_interval_s):
                # The heartbeat first: a revoked site's children die refused too, and
                # the refused certificate is the cause to report.
                head_id = self._heartbeat(joined.node_id)
                if worker is not None and rejoin.is_new(head_id):
                    self._rejoin_ray(worker)
                supervisor.check()
                for status in supervisor.status():
                    if status.state is ChildState.FAILED:  # refused: a restart cannot help
                        raise ChildProcessFailedError(
                            f"the Flower SuperNode gave up: {status.detail}; see "
                            f"{supernode.process.log_path}"
                        )
        except Exception as error:
            run.failure = error
            run.stop.set()

    def _start_ray_worker(self, joined: Joined) -> RayWorker | None:
        if not self.settings.ray_enabled:
            return None
        if not joined.ray_address:
            self._say("the coordinator runs without Ray: contributing no compute to pretraining")
            return None
        private = [self.settings.data]
        if self.settings.bundle is not None:
            private.append(self.settings.bundle)
        sandbox = pool_sandbox(self.settings.resolved_state_dir, private)
        worker = RayWorker(
            joined.ray_address,
            self.settings.institution,
            joined.node_id,
            self.settings.gpu,
            self.settings.resolved_state_dir,
            self._ray_token_for_worker(),
            hardware=hardware_labels(self.device),
            tls=self._ray_certificate(joined.ray_address) if joined.ray_tls else None,
            before_start=self.fetch_ray_token if self.bundle else None,
            drain_timeout_s=self.settings.ray_drain_timeout_s,
            port_range=self.settings.ray_port_range,
            sandbox=sandbox,
        )
        self._say(
            f"Ray worker joining {joined.ray_address} as institution:{self.settings.institution} "
            f"(log: {worker.process.log_path}); this machine is now in the consortium's "
            "shared Ray pool, where any member holding the cluster token can run code"
        )
        if sandbox is not None:
            self._say(
                f"the Ray node runs as OS user {sandbox.user.name}, which cannot read this "
                "site's state dir, bundle or data"
            )
        else:
            log.warning(
                "not root: the Ray node runs as this OS user and any pool member's code on "
                "it can read what this user can, this site's keys and data included; join "
                "as root to run it as the OS user %s (docs/security.md)",
                POOL_USER,
            )
        return worker

    def _ray_token_for_worker(self) -> Path | None:
        """Where the Ray worker reads the cluster token: the state dir's copy of the
        coordinator's current one (with a bundle, fetched before each start). Plain text:
        fetched here, once, the token a coordinator's own head takes
        too, which it hands any caller on its loopback control plane; None from one whose
        cluster takes none (a cluster it attached to) or that predates GetRayToken."""
        if self.bundle is not None:
            return self._ray_token_file()
        reply = self._ask_for_ray_token(
            {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION}
        )
        if reply is None:
            return None
        write_ray_token(self._ray_token_file(), reply.token)
        return self._ray_token_file()

    def _ray_token_file(self) -> Path:
        return self.settings.resolved_state_dir / "ray-token"

    def fetch_ray_token(self) -> str | None:
        """The cluster's current token, over mutual TLS, into the state dir (0600), and
        the node's claim for this start (None from a coordinator that issues none). A
        coordinator that does not implement GetRayToken (an older version) leaves the
        bundle's copy in use; any other refusal (say, a revoked institution) raises."""
        if self.bundle is None:
            raise InsecureTransportError("the Ray token comes with a bundle: join with --bundle")
        reply = self._ask_for_ray_token({grpc.StatusCode.UNIMPLEMENTED})
        if reply is None:
            log.info("the coordinator does not hand out Ray tokens: using the bundle's")
            write_ray_token(self._ray_token_file(), read_bundle_file(self.bundle.ray_token))
            return None
        write_ray_token(self._ray_token_file(), reply.token)
        return reply.node_claim or None

    def _ask_for_ray_token(
        self, no_token: set[grpc.StatusCode]
    ) -> nodes_pb2.GetRayTokenResponse | None:
        """GetRayToken, retried; None when the coordinator answers with a status in
        `no_token`; any other refusal (say, a revoked institution) raises."""
        request = nodes_pb2.GetRayTokenRequest(institution=self.settings.institution)

        def ask(timeout_s: float) -> nodes_pb2.GetRayTokenResponse | None:
            # The status is read here, inside the retried call: `call_with_retry` turns
            # every RpcError it sees into a typed ConsortiumError without the status.
            try:
                reply: nodes_pb2.GetRayTokenResponse = self._stub.GetRayToken(
                    request, timeout=timeout_s
                )
            except grpc.RpcError as error:
                if isinstance(error, grpc.Call) and error.code() in no_token:
                    return None
                raise
            return reply

        try:
            return call_with_retry(ask, self.settings.coordinator, self._policy)
        except UnreachableError:
            raise
        except ConsortiumError as error:
            raise type(error)(f"the coordinator refused the Ray token: {error}") from None

    def _ray_certificate(self, ray_address: str) -> RayTls:
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
        csr = pki.make_node_csr(key, self.settings.institution, [node_ip(ray_address)])
        request = nodes_pb2.IssueRayCertificateRequest(
            institution=self.settings.institution, csr_pem=pki.pem(csr)
        )
        response: nodes_pb2.IssueRayCertificateResponse = call_with_retry(
            lambda t: self._stub.IssueRayCertificate(request, timeout=t),
            self.settings.coordinator,
            self._policy,
        )
        # Every join gets a fresh key and certificate: the last join's are replaced.
        pki.write_private_key(tls.key, key, force=True)
        tls.certificate.write_bytes(response.certificate_pem)
        tls.ca_certificate.write_bytes(response.ca_certificate_pem)
        return tls

    def _rejoin_ray(self, worker: RayWorker) -> None:
        """The coordinator's Ray head is a new one: this node's raylet would only find
        out when the new GCS refuses it (about a minute), so join the new head now."""
        log.warning("the coordinator's Ray head restarted; the Ray worker joins the new one")
        try:
            worker.restart()
        except (ConsortiumError, OSError) as error:  # refused a token: the supervisor retries
            log.warning("the Ray worker could not rejoin yet: %s", error)
            return
        self.metrics.child_restarted("ray-worker")

    def _heartbeat(self, node_id: str) -> str | None:
        """The coordinator's current Ray head id ("" without Ray), or None when the
        heartbeat failed."""
        try:
            reply = self._stub.Heartbeat(nodes_pb2.HeartbeatRequest(node_id=node_id), timeout=5)
            self.metrics.heartbeat_sent(ok=True)
            if self._heartbeat_failing:
                log.info("heartbeat restored: the coordinator answers again")
            self._heartbeat_failing = False
            return str(reply.ray_head_id)
        except grpc.RpcError as error:
            # The coordinator may be restarting; keep the SuperNode and try again. One
            # line when it starts failing (the metric counts every failure).
            code = error.code() if isinstance(error, grpc.Call) else None
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # A refused credential (revoked, or replaced by a renewal) is not
                # transient: waiting cannot bring this node back. End with exit 16.
                raise UnauthenticatedError(
                    f"the coordinator refused this site's certificate ({details}): the "
                    "operator revoked or renewed it; ask the operator for a new bundle"
                ) from None
            (log.debug if self._heartbeat_failing else log.warning)(
                "heartbeat failed (%s: %s); retrying at every heartbeat interval",
                code.name if code is not None else "error",
                details,
            )
            self._heartbeat_failing = True
            self.metrics.heartbeat_sent(ok=False)
            return None

    def _leave(self, node_id: str) -> None:
        try:
            self._stub.LeaveNode(
                nodes_pb2.LeaveNodeRequest(node_id=node_id), timeout=LEAVE_TIMEOUT_S
            )
            self._say(f"node {node_id[:12]} left the consortium")
        except grpc.RpcError as error:
            log.warning("could not tell the coordinator that the node left: %s", error)


__all__ = ["JOIN_STEPS", "Joined", "SiteNode", "UnreachableError"]
