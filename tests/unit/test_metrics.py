"""Metrics of both roles: what the collectors compute from state, files and RPCs."""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter

from client.metrics import TRAINING_LOG, GpuCollector, TrainingCollector, record_training
from consortium.errors import NotFoundError
from consortium.metrics_http import JsonLinesTail, MetricsServer
from consortium.net import split_host_port
from coordinator.data_dir import DataDir
from coordinator.federated.reasons import refused
from coordinator.observability.metrics import CoordinatorMetrics, RpcMetricsInterceptor
from coordinator.observability.state_metrics import StateCollector, summarise_rounds
from coordinator.state import (
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
    RoundRecord,
    SqliteStateStore,
)

NOW_S = 1_000_000.0
NOW_MS = int(NOW_S * 1000)
SPEC = 'name = "j"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = 3\nmin_clients = 3\n'


def rounds(*points: tuple[int, int, int]) -> list[RoundRecord]:
    return [RoundRecord("job", r, participants=p, finished_at_ms=t) for r, p, t in points]


def test_round_summary_skips_the_initial_evaluation_and_measures_between_ends() -> None:
    summary = summarise_rounds(rounds((0, 0, 1_000), (1, 3, 11_000), (2, 2, 16_000)), 3)
    assert summary.completed == 2
    assert summary.accepted == 5
    assert summary.dropouts == 1
    assert summary.durations_s == (10.0, 5.0)
    assert summary.last is not None and summary.last.round == 2


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStateStore]:
    state = SqliteStateStore(tmp_path / "state.db")
    try:
        yield state
    finally:
        state.close()


def scrape(collector: StateCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def node(node_id: str, institution: str, state: NodeState, heartbeat_ms: int) -> NodeRecord:
    return NodeRecord(node_id, institution, "host", "cpu", state, 0, heartbeat_ms)


def test_state_collector_reports_nodes_as_they_are_now(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    store.add_node(node("a", "alpha", NodeState.ONLINE, NOW_MS - 2_000))
    store.add_node(node("b", "alpha", NodeState.ONLINE, NOW_MS - 60_000))  # silent: stale
    store.add_node(node("c", "beta", NodeState.GONE, NOW_MS - 1_000))
    collector = StateCollector(store, 10.0, tmp_path, clock=lambda: NOW_S)
    try:
        got = scrape(collector).get_sample_value
        assert got("consortium_nodes", {"institution": "alpha", "state": "online"}) == 1
        assert got("consortium_nodes", {"institution": "alpha", "state": "stale"}) == 1
        assert got("consortium_nodes", {"institution": "beta", "state": "gone"}) == 1
        assert got("consortium_institution_heartbeat_age_seconds", {"institution": "alpha"}) == 2
        # An institution whose nodes all left is not silent: it has no age series.
        assert got("consortium_institution_heartbeat_age_seconds", {"institution": "beta"}) is None
    finally:
        collector.close()


def test_state_collector_reports_jobs_rounds_and_stalls(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    now_ms = int(time.time() * 1000)
    job = JobRecord("j1", "digits", "federated", SPEC, JobState.QUEUED, 3, created_at_ms=1)
    store.add_job(job)
    store.update_job("j1", state=JobState.RUNNING, started_at_ms=now_ms - 100_000)
    for record in rounds((0, 0, now_ms - 90_000), (1, 3, now_ms - 60_000)):
        metrics = {"eval_accuracy": 0.5}
        store.record_round(replace(record, job_id="j1", metrics=metrics))
    # Two minutes after the last event (the store stamps events with the wall clock).
    collector = StateCollector(store, 10.0, tmp_path, clock=lambda: now_ms / 1000 + 120)
    try:
        got = scrape(collector).get_sample_value
        labels = {"job_id": "j1", "job_name": "digits"}
        assert got("consortium_jobs", {"state": "running"}) == 1
        assert got("consortium_rounds_completed_total") == 1
        assert got("consortium_round_duration_seconds_count") == 1
        assert got("consortium_round_duration_seconds_bucket", {"le": "30.0"}) == 1
        assert got("consortium_job_eval_accuracy_ratio", labels) == 0.5
        assert got("consortium_job_last_round_participants", labels) == 3
        assert got("consortium_job_rounds_planned", labels) == 3
        assert 115 < (got("consortium_job_round_stall_seconds", labels) or 0) <= 121
        assert got("consortium_updates_rejected_total", {"reason": "norm"}) == 0
        assert math.isnan(got("consortium_provenance_tree_head_age_seconds") or 0)  # no log
    finally:
        collector.close()


def append_lines(path: Path, *lines: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")


def test_provenance_metrics_count_records_refusals_and_tree_heads(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    log = DataDir(tmp_path).provenance_log
    updates = [
        {"accepted": True, "reason": ""},
        {"accepted": False, "reason": "bad_signature"},
        {"accepted": False, "reason": "norm"},
    ]
    append_lines(
        log,
        {"kind": "record", "index": 0, "type": "job_started", "body": {}},
        {"kind": "tree_head", "tree_size": 1, "timestamp_ms": NOW_MS - 5_000},
        {"kind": "record", "index": 1, "type": "round", "body": {"updates": updates}},
    )
    collector = StateCollector(store, 10.0, tmp_path, clock=lambda: NOW_S)
    try:
        registry = scrape(collector)
        got = registry.get_sample_value
        assert got("consortium_provenance_log_entries") == 2
        assert got("consortium_provenance_unsigned_entries") == 1
        assert got("consortium_provenance_tree_head_age_seconds") == 5
        assert got("consortium_provenance_log_size_bytes") == log.stat().st_size
        assert got("consortium_updates_rejected_total", {"reason": "bad_signature"}) == 1
        append_lines(log, {"kind": "tree_head", "tree_size": 2, "timestamp_ms": NOW_MS})
        assert got("consortium_provenance_unsigned_entries") == 0
        assert got("consortium_updates_rejected_total", {"reason": "norm"}) == 1  # counted once
    finally:
        collector.close()


def test_refused_federated_pretraining_replies_count_with_the_refused_updates(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    """A refused site's reply is lost for its outer step (coordinator/federated/
    diloco_sites.py); the metric reads the reason back from the step's record."""
    lost = {
        "b/site-2": refused("impersonation", "signed for 'a', node of 'b'"),
        "c/site-3": refused("weight_mismatch", "claims 16 sequences"),
        "d/site-4": "no reply within step_timeout_s=5.0",  # lost, not refused
        "e/site-5": "verification failed: its pseudo-gradient differs",  # counted apart
    }
    append_lines(
        DataDir(tmp_path).provenance_log,
        {"kind": "record", "index": 0, "type": "outer_step", "body": {"workers_lost": lost}},
    )
    collector = StateCollector(store, 10.0, tmp_path, clock=lambda: NOW_S)
    try:
        got = scrape(collector).get_sample_value
        assert got("consortium_updates_rejected_total", {"reason": "impersonation"}) == 1
        assert got("consortium_updates_rejected_total", {"reason": "weight_mismatch"}) == 1
        assert got("consortium_updates_rejected_total", {"reason": "client_error"}) == 0
    finally:
        collector.close()


def test_json_lines_tail_leaves_a_partial_line_and_restarts_on_truncation(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl"
    tail = JsonLinesTail(path)
    assert tail.read_new().lines == []  # no file yet
    path.write_text('{"a": 1}\n{"b": 2')
    assert tail.read_new().lines == [{"a": 1}]
    with path.open("a") as handle:
        handle.write("}\nnot json\n")
    assert tail.read_new().lines == [{"b": 2}]
    path.write_text('{"c": 3}\n')  # shorter: replaced
    again = tail.read_new()
    assert again.restarted and again.lines == [{"c": 3}]


def test_the_training_log_is_the_owners_alone(tmp_path: Path) -> None:
    old = os.umask(0)  # whatever the process's umask
    try:
        record_training(tmp_path, 1.0, 10)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / TRAINING_LOG).stat().st_mode) == 0o600


def test_recorded_training_runs_are_summed_per_institution(tmp_path: Path) -> None:
    record_training(tmp_path, 1.5, 100)
    record_training(tmp_path, 2.5, 50)
    registry = CollectorRegistry()
    registry.register(TrainingCollector("alpha", tmp_path / "training.jsonl"))
    labels = {"institution": "alpha"}
    assert registry.get_sample_value("consortium_client_training_seconds_total", labels) == 4.0
    assert registry.get_sample_value("consortium_client_training_examples_total", labels) == 150
    assert registry.get_sample_value("consortium_client_training_runs_total", labels) == 2


def test_gpu_collector_reads_utilisation_and_memory_through_nvml() -> None:
    nvml = SimpleNamespace(
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=75),
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=2**30, total=2**34),
    )
    registry = CollectorRegistry()
    registry.register(GpuCollector("alpha", 0, nvml, handle=object()))
    labels = {"institution": "alpha", "gpu": "0"}
    assert registry.get_sample_value("consortium_client_gpu_utilization_ratio", labels) == 0.75
    assert registry.get_sample_value("consortium_client_gpu_memory_used_bytes", labels) == 2**30


def test_gpu_collector_is_absent_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_module(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr("client.metrics.importlib.import_module", no_module)
    assert GpuCollector.create("alpha", 0) is None


def test_auth_refusals_count_unexpected_reasons_as_other() -> None:
    metrics = CoordinatorMetrics()
    metrics.auth_refused("control_plane", "unknown_node")
    metrics.auth_refused("control_plane", "made-up")  # must not fail the refused call
    got = metrics.registry.get_sample_value
    for reason in ("unknown_node", "other"):
        labels = {"channel": "control_plane", "reason": reason}
        assert got("consortium_auth_refusals_total", labels) == 1
    assert got("consortium_auth_refusals_total", {"channel": "fleet", "reason": "other"}) == 0


def test_rpc_interceptor_counts_calls_by_method_and_status() -> None:
    metrics = CoordinatorMetrics()

    def get(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return request

    def from_status(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise NotFoundError("not mapped")  # raised without a status: gRPC says UNKNOWN

    handler = grpc.method_handlers_generic_handler(
        "test.v1.Things",
        {
            "Get": grpc.unary_unary_rpc_method_handler(get),
            "Raise": grpc.unary_unary_rpc_method_handler(from_status),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[RpcMetricsInterceptor(metrics)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            channel.unary_unary("/test.v1.Things/Get")(b"x", timeout=5)
            for method, request in (("Get", b"missing"), ("Raise", b"x")):
                with pytest.raises(grpc.RpcError):
                    channel.unary_unary(f"/test.v1.Things/{method}")(request, timeout=5)
    finally:
        server.stop(None).wait()
    got = metrics.registry.get_sample_value
    assert got("consortium_rpc_requests_total", {"method": "Things/Get", "code": "OK"}) == 1
    assert got("consortium_rpc_requests_total", {"method": "Things/Get", "code": "NOT_FOUND"}) == 1
    assert got("consortium_rpc_requests_total", {"method": "Things/Raise", "code": "UNKNOWN"}) == 1


def test_metrics_server_binds_port_zero_writes_its_address_and_cleans_up(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    address_file = tmp_path / "metrics.address"
    server = MetricsServer("127.0.0.1:0", registry, address_file)
    try:
        assert address_file.read_text() == server.address
        assert not server.address.endswith(":0")
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as reply:
            assert reply.status == 200
    finally:
        server.stop()
    assert not address_file.exists()


def test_an_idle_connection_to_metrics_is_closed_and_scrapes_go_on(tmp_path: Path) -> None:
    """prometheus_client's own server kept a thread per connection waiting forever: a
    local user holding a few hundred idle ones made `/metrics` stop answering."""
    registry = CollectorRegistry()
    Counter("consortium_probe_total", "a probe", registry=registry).inc()
    server = MetricsServer("127.0.0.1:0", registry, tmp_path / "metrics.address", 0.5)
    host, port = split_host_port(server.address)
    try:
        with socket.create_connection((host, port), timeout=10) as idle:
            idle.settimeout(10)
            assert idle.recv(1) == b""  # closed by the server, not by this timeout
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as reply:
            assert b"consortium_probe_total 1.0" in reply.read()
    finally:
        server.stop()
    assert not (tmp_path / "metrics.address").exists()
