"""Coordinator metrics: `consortium_*` families, units in their names.

Two sources, because two kinds of process do the work:

* `CoordinatorMetrics` holds instruments this process updates itself: RPCs (via
  `RpcMetricsInterceptor`), heartbeats, scheduler runs, auth refusals, compute.
* `StateCollector` (metrics_state.py) reads the state store and the provenance
  log at scrape time, because rounds are run by the ServerApp, a process that
  Flower starts.

`MetricsEndpoint` serves both on `metrics_address`.

Label values of the families that later work increments (auth refusals, update
rejections, compute) are initialised to zero, so dashboards and alerts have a
series to show before the first event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consortium.metrics_http import MetricsServer
from consortium.supervision import ChildState, ChildStatus
from coordinator.observability.state_metrics import StateCollector
from coordinator.settings import CoordinatorSettings
from coordinator.state import StateStore

log = logging.getLogger(__name__)

# Counts a label value outside the fixed set (see `_known`).
OTHER = "other"
# flower_run: Flower runs the coordinator did not approve, whose ServerApp it refused
# to start (coordinator/federated/serverapp_launcher.py).
AUTH_CHANNELS = ("control_plane", "fleet", "ray", "flower_run")
AUTH_REASONS = (
    "no_client_certificate",
    "untrusted_certificate",
    "expired_certificate",  # the rest of this group: refused TLS handshakes (tls_refusals)
    "not_yet_valid_certificate",
    "wrong_certificate_purpose",
    "not_tls",
    "rejected_certificate",  # Ray's TLS: verification failed, reason not logged
    "revoked_certificate",
    "superseded_certificate",  # an institution's certificate from before its renewal
    "unknown_certificate",  # CA-signed, but issued to no member (the coordinator's Ray one)
    "unknown_node",
    "institution_mismatch",
    "not_job_owner",  # an institution acting on another's job
    "unpinned_signing_key",  # a node offering a signing key not pinned at onboarding
    "forbidden_api",  # Fleet edge: a Control/Runtime/other path, not the Fleet API
    "too_many_handshakes",  # Fleet edge: one address's unfinished TLS handshakes, capped
    "too_many_connections",  # Fleet edge: one institution's open connections, capped
    "body_too_large",  # Fleet edge: a request body over MAX_BODY_BYTES (413)
    "request_timeout",  # Fleet edge: no request head within REQUEST_HEAD_TIMEOUT_S
    "claim_reused",  # a Ray node carrying another node's claim (coordinator/ray/claims.py)
    "claim_unknown",  # a Ray node carrying a claim this coordinator never issued
    "missing_token",  # Ray: a request without the cluster token
    "invalid_token",  # Ray: a wrong token (only on the raylet sync stream)
    "unapproved",  # flower_run: a run the coordinator did not start for a job
    "fab_mismatch",  # flower_run: the run's app is not the one approved
    "foreign_runtime_api",  # flower_run: a Runtime API port another local user holds
    OTHER,
)
SCHEDULER_FAILURES = ("start_error", "ended_early")
# What the coordinator changed at the SuperLink to keep its SuperNode keys equal to
# the onboarded, unrevoked ones (coordinator/access/supernode_keys.py).
SUPERNODE_KEY_ACTIONS = ("removed_unknown", "removed_revoked", "restored")
# coordinator serve's runtimes, by supervisor name, and each pretraining run's driver
SUPERVISED_RUNTIMES = ("superlink", "ray-head", "pretrain-driver")

RPC_DURATION_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class CoordinatorMetrics:
    """The in-process instruments, on one registry served at `/metrics`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter(
            "consortium_rpc_requests_total",
            "Control-plane RPCs handled, by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "consortium_rpc_request_duration_seconds",
            "Time to handle a control-plane RPC (a stream: until it ends).",
            ["method"],
            buckets=RPC_DURATION_BUCKETS_S,
            registry=r,
        )
        self.heartbeats = Counter(
            "consortium_heartbeats_received_total",
            "Node heartbeats accepted, by institution.",
            ["institution"],
            registry=r,
        )
        self.runs_started = Counter(
            "consortium_scheduler_runs_started_total",
            "Runs (Flower or Ray) the scheduler started for jobs.",
            registry=r,
        )
        self.runs_failed = Counter(
            "consortium_scheduler_runs_failed_total",
            "Jobs failed for their run: it could not start, or ended before the job.",
            ["reason"],
            registry=r,
        )
        self.runs_resumed = Counter(
            "consortium_scheduler_runs_resumed_total",
            "Runs that ended before their job (a ServerApp that died) and were re-queued to "
            "resume after the job's last committed round.",
            registry=r,
        )
        self.auth_refusals = Counter(
            "consortium_auth_refusals_total",
            "Connections or calls refused by authentication, by channel and reason.",
            ["channel", "reason"],
            registry=r,
        )
        self.supernode_key_changes = Counter(
            "consortium_supernode_key_changes_total",
            "SuperNode keys changed at the SuperLink to match onboarding: removed_unknown "
            "(never onboarded), removed_revoked, restored (onboarded but removed).",
            ["action"],
            registry=r,
        )
        for action in SUPERNODE_KEY_ACTIONS:
            self.supernode_key_changes.labels(action)
        self.child_restarts = Counter(
            "consortium_child_restarts_total",
            "Restarts of a runtime that died (superlink, ray-head), by child.",
            ["child"],
            registry=r,
        )
        for child in SUPERVISED_RUNTIMES:
            self.child_restarts.labels(child)
        ProcessCollector(registry=r)
        for reason in SCHEDULER_FAILURES:
            self.runs_failed.labels(reason)
        for channel in AUTH_CHANNELS:
            for why in AUTH_REASONS:
                self.auth_refusals.labels(channel, why)

    def institution_seen(self, institution: str) -> None:
        """Give the per-institution counters a zero series for a new institution."""
        self.heartbeats.labels(institution)

    def heartbeat(self, institution: str) -> None:
        self.heartbeats.labels(institution).inc()

    def run_started(self) -> None:
        self.runs_started.inc()

    def run_resumed(self) -> None:
        self.runs_resumed.inc()

    def run_failed(self, reason: str) -> None:
        self.runs_failed.labels(_known(reason, SCHEDULER_FAILURES)).inc()

    def auth_refused(self, channel: str, reason: str) -> None:
        self.auth_refusals.labels(
            _known(channel, AUTH_CHANNELS), _known(reason, AUTH_REASONS)
        ).inc()

    def supernode_key_changed(self, action: str) -> None:
        self.supernode_key_changes.labels(_known(action, SUPERNODE_KEY_ACTIONS)).inc()

    def child_restarted(self, child: str) -> None:
        self.child_restarts.labels(_known(child, SUPERVISED_RUNTIMES)).inc()

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


class RuntimeCollector(Collector):
    """`consortium_runtime_up{runtime}`: 1 while a supervised runtime runs, 0 while it
    is restarting or failed; read from the supervisor at scrape time."""

    def __init__(self, status: Callable[[], Iterable[ChildStatus]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "consortium_runtime_up",
            "1 while the coordinator's runtime (superlink, ray-head) runs, else 0 "
            "(restarting, or failed after too many restarts).",
            labels=["runtime"],
        )
        for child in self._status():
            family.add_metric([child.name], 1.0 if child.state is ChildState.RUNNING else 0.0)
        yield family


def _known(value: str, allowed: tuple[str, ...]) -> str:
    """Label values are a fixed set (an open one would multiply series); an
    unexpected value is counted as `other` rather than failing the caller's request."""
    if value in allowed:
        return value
    log.warning("metric label %r is not one of %s; counted as 'other'", value, allowed)
    return OTHER


# --- RPCs ------------------------------------------------------------------


class RpcMetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Counts every control-plane RPC by method and final status code."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:  # gRPC answers UNIMPLEMENTED; method names are caller-chosen
            self._metrics.rpc_requests.labels("unknown", "UNIMPLEMENTED").inc()
            return None
        method = str(handler_call_details.method).rsplit(".", 1)[-1]  # Service/Method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs in our API

    def _record(self, method: str, context: Any, started: float, otherwise: str) -> None:
        # An aborted call raised after setting its code; a call that raised
        # without one is reported by gRPC as UNKNOWN.
        status = context.code()
        code = status.name if isinstance(status, grpc.StatusCode) else otherwise
        self._metrics.rpc_requests.labels(method, code).inc()
        self._metrics.rpc_duration.labels(method).observe(time.perf_counter() - started)

    def _unary(
        self, method: str, behaviour: Callable[[Any, Any], Any]
    ) -> Callable[[Any, Any], Any]:
        def handle(request: Any, context: Any) -> Any:
            started, otherwise = time.perf_counter(), "UNKNOWN"
            try:
                response = behaviour(request, context)
                otherwise = "OK"
                return response
            finally:
                self._record(method, context, started, otherwise)

        return handle

    def _stream(
        self, method: str, behaviour: Callable[[Any, Any], Iterable[Any]]
    ) -> Callable[[Any, Any], Iterator[Any]]:
        def handle(request: Any, context: Any) -> Iterator[Any]:
            started, otherwise = time.perf_counter(), "UNKNOWN"
            try:
                yield from behaviour(request, context)
                otherwise = "OK"
            except GeneratorExit:  # the caller went away and gRPC closed the stream
                otherwise = "CANCELLED"
                raise
            finally:
                self._record(method, context, started, otherwise)

        return handle


class MetricsEndpoint:
    """`/metrics` for the instruments and the state collector; `stop()` ends both."""

    def __init__(
        self,
        metrics: CoordinatorMetrics,
        store: StateStore,
        settings: CoordinatorSettings,
    ) -> None:
        # Institutions known from earlier runs get their zero series at once.
        for node in store.list_nodes():
            metrics.institution_seen(node.institution)
        self._collector = StateCollector(store, settings.node_timeout_s, settings.data_dir)
        metrics.add_collector(self._collector)
        self.server = MetricsServer(
            settings.metrics_address, metrics.registry, settings.metrics_address_file
        )

    def stop(self) -> None:
        self.server.stop()
        self._collector.close()
