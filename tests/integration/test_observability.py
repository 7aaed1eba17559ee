"""A real Prometheus scrapes a real coordinator and two real clients through a
federated job; every dashboard and alert expression then returns data.

Needs the `prometheus` and `promtool` binaries (Debian package `prometheus`;
.ci/run installs it). Prometheus is started here with its own config, storage in
tmp and a free loopback port, and stopped with everything else.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from consortium.net import reserve_free_port
from consortium.proto.v1 import jobs_pb2
from coordinator.cli.remote import Remote
from deploy.grafana.dashboard import RATE, expressions
from tests.conftest import Processes
from tests.helpers import (
    join_site,
    online_nodes,
    run_to_end,
    start_coordinator,
    wait_for,
    write_partitions,
)

JOB = """\
name = "observed"
model = "digits-cnn"
dataset = "digits"
rounds = 2
min_clients = 2
local_epochs = 1
seed = 5
"""
REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DEPLOY_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
INSTITUTIONS = ["alpha-hospital", "beta-university"]
# Wide enough to hold many 1 s scrapes, so rate() and increase() have samples.
QUERY_WINDOW = "1m"
# `<query> <op> <threshold>`, the one form alert expressions take.
ALERT_FORM = re.compile(r"^(?P<query>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>-?[\d.]+)$")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, (
        f"`{name}` is not installed; install the Debian package `prometheus` "
        "(apt-get install prometheus), as .ci/run does"
    )
    return path


@dataclass
class Stack:
    prometheus_url: str
    config: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            reply = json.load(response)
        assert reply["status"] == "success", (expr, reply)
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def has_data(self, expr: str) -> bool:
        return bool(self.query(expr))


def prometheus_config(coordinator: str, clients: list[str]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "consortium-coordinator", "static_configs": [{"targets": [coordinator]}]},
            {"job_name": "consortium-client", "static_configs": [{"targets": clients}]},
        ],
    }


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def start_clients(processes: Processes, root: Path, coordinator: str) -> list[Path]:
    """Two `client join` processes; returns their metrics.address files. They join
    without the Ray pool: no dashboard or alert expression reads a Ray node (the
    coordinator's Ray head runs, so its runtime's metrics are scraped and must not fire)."""
    files = []
    for name, site in zip(INSTITUTIONS, write_partitions(root, INSTITUTIONS), strict=True):
        join_site(
            processes,
            f"client-{name}",
            site,
            root / name,
            coordinator=coordinator,
            institution=name,
        )
        files.append(root / name / "metrics.address")
    return files


def start_prometheus(processes: Processes, root: Path, config: dict[str, Any]) -> Stack:
    config_file = root / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    listen = f"127.0.0.1:{reserve_free_port()}"
    child = processes.start(
        "prometheus",
        tool("prometheus"),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={root / 'tsdb'}",
        f"--web.listen-address={listen}",
    )
    stack = Stack(f"http://{listen}", config_file)

    def ready() -> bool:
        if child.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{child.log_tail(40)}")
        return http_ok(f"{stack.prometheus_url}/-/ready")

    wait_for("Prometheus", ready)
    return stack


def run_job(coordinator: str, processes: Processes) -> None:
    with Remote(coordinator) as remote:
        wait_for(
            "two online nodes",
            lambda: online_nodes(remote.list_nodes()) == 2,
        )
        final = run_to_end(remote, JOB, processes)
        assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("observability")
    processes = Processes(root / "logs")
    try:
        data_dir = root / "coordinator"
        coordinator = start_coordinator(processes, data_dir, ray=True)
        client_files = start_clients(processes, root, coordinator)
        wait_for("client metrics endpoints", lambda: all(f.exists() for f in client_files))
        config = prometheus_config(
            (data_dir / "metrics.address").read_text().strip(),
            [f.read_text().strip() for f in client_files],
        )
        stack = start_prometheus(processes, root, config)
        run_job(coordinator, processes)
        # Scrapes after the job ended, and enough of them for every rate() window.
        wait_for(
            "a scrape showing the finished job",
            lambda: stack.query('consortium_jobs{state="succeeded"} == 1') != [],
        )
        wait_for(
            "ten scrapes of every target",
            lambda: len(stack.query(f"count_over_time(up[{QUERY_WINDOW}]) >= 10")) == 3,
        )
        yield stack
    finally:
        processes.stop_all()


def with_window(expr: str) -> str:
    return expr.replace(RATE, QUERY_WINDOW)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_dashboard_expression_returns_data(stack: Stack) -> None:
    empty = [expr for expr in expressions() if not stack.has_data(with_window(expr))]
    assert empty == [], "dashboard expressions with no data:\n" + "\n".join(empty)


def test_every_alert_query_returns_data(stack: Stack) -> None:
    empty = []
    for rule in alert_rules():
        form = ALERT_FORM.match(rule["expr"])
        assert form is not None, f"{rule['alert']}: expr is not `<query> <op> <threshold>`"
        if not stack.has_data(form["query"]):
            empty.append(f"{rule['alert']}: {form['query']}")
    assert empty == [], "alert queries with no data:\n" + "\n".join(empty)


def test_alert_rules_load_and_evaluate_cleanly(stack: Stack) -> None:
    with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {rule["alert"] for rule in alert_rules()}
    assert {name: rule["health"] for name, rule in loaded.items() if rule["health"] != "ok"} == {}
    firing = [name for name, rule in loaded.items() if rule["state"] == "firing"]
    assert firing == [], "alerts firing on a healthy federation"


def test_coordinator_metrics_describe_the_finished_job(stack: Stack) -> None:
    assert stack.value('consortium_jobs{state="succeeded"}') == 1
    assert stack.value("consortium_rounds_completed_total") == 2
    assert stack.value("consortium_round_duration_seconds_count") == 2
    assert stack.value("consortium_updates_accepted_total") == 4
    assert stack.value("consortium_round_dropouts_total") == 0
    assert stack.value("consortium_job_last_round_participants") == 2
    assert stack.value("consortium_job_rounds_completed") == 2
    assert stack.value("consortium_job_round_stall_seconds") == 0
    assert 0.2 < stack.value("consortium_job_eval_accuracy_ratio") <= 1  # above chance
    assert stack.value('sum(consortium_nodes{state="online"})') == 2
    assert stack.value("consortium_scheduler_runs_started_total") == 1
    assert stack.value('sum(consortium_rpc_requests_total{method="Jobs/SubmitJob"})') == 1


def test_client_metrics_show_both_nodes_alive(stack: Stack) -> None:
    up = stack.query("consortium_client_supernode_up")
    assert {s["metric"]["institution"]: s["value"][1] for s in up} == {
        name: "1" for name in INSTITUTIONS
    }
    heartbeats = stack.query('consortium_client_heartbeats_sent_total{result="ok"} > 0')
    assert len(heartbeats) == 2
    assert len(stack.query("consortium_client_node_cpu_seconds_total > 0")) == 2
    for series in stack.query("consortium_client_heartbeat_age_seconds"):
        assert float(series["value"][1]) < 30, series
    assert len(stack.query("consortium_heartbeats_received_total > 0")) == 2


def test_promtool_accepts_configs_and_rules(stack: Stack) -> None:
    for argv in (
        ["check", "config", str(DEPLOY_CONFIG)],
        ["check", "config", str(stack.config)],
        ["check", "rules", str(ALERTS)],
    ):
        done = subprocess.run(
            [tool("promtool"), *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"promtool {' '.join(argv)}:\n{done.stdout}{done.stderr}"


def test_metrics_endpoint_closes_and_its_address_file_goes_on_stop(
    processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "coordinator"
    start_coordinator(processes, data_dir)
    address = (data_dir / "metrics.address").read_text().strip()
    assert http_ok(f"http://{address}/metrics")
    processes.stop_all()
    assert not (data_dir / "metrics.address").exists()
    assert not http_ok(f"http://{address}/metrics")
