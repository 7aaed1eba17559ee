"""The Consortium dashboard: rows of panels as data, turned into Grafana JSON.

Every expression here is queried against a real Prometheus in
tests/integration/test_observability.py, so a panel cannot silently show
"No data" because of a renamed metric. `$__rate_interval` is the one Grafana
variable used; the test substitutes a window for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos

DASHBOARD_UID = "consortium"
DATASOURCE_UID = "prometheus"  # the provisioned data source (build.py writes it)
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
RATE = "$__rate_interval"
JOB = "{{job_name}} ({{job_id}})"
GRID_WIDTH = 24  # Grafana's grid
PANEL_HEIGHT = 8
WIDTHS = {"stat": 4, "timeseries": 8}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: Literal["timeseries", "stat"] = "timeseries"
    stacked: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def q(expr: str, legend: str = "") -> tuple[Query, ...]:
    return (Query(expr, legend),)


ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        (
            Panel(
                "Coordinator up",
                "1 while Prometheus can scrape the coordinator.",
                q('up{job="consortium-coordinator"}', "{{instance}}"),
                kind="stat",
            ),
            Panel(
                "Jobs by state",
                "Jobs in the coordinator's state store.",
                q("sum by (state) (consortium_jobs)", "{{state}}"),
                kind="stat",
            ),
            Panel(
                "Online nodes per institution",
                "Nodes whose heartbeat arrived within the node timeout.",
                q('sum by (institution) (consortium_nodes{state="online"})', "{{institution}}"),
                stacked=True,
            ),
            Panel(
                "Control-plane requests",
                "RPCs per second by gRPC status code.",
                q(f"sum by (code) (rate(consortium_rpc_requests_total[{RATE}]))", "{{code}}"),
                unit="reqps",
            ),
        ),
    ),
    Row(
        "Training progress",
        (
            Panel(
                "Held-out accuracy",
                "Accuracy of each recent job's latest global model on the held-out split.",
                q("consortium_job_eval_accuracy_ratio", JOB),
                unit="percentunit",
            ),
            Panel(
                "Held-out loss",
                "Loss of each recent job's latest global model on the held-out split.",
                q("consortium_job_eval_loss", JOB),
            ),
            Panel(
                "Rounds",
                "Rounds completed against rounds planned, per recent job.",
                (
                    Query("consortium_job_rounds_completed", f"{JOB} completed"),
                    Query("consortium_job_rounds_planned", f"{JOB} planned"),
                ),
            ),
            Panel(
                "Round duration",
                "Median and 90th percentile time between consecutive rounds' ends.",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (le) "
                        f"(rate(consortium_round_duration_seconds_bucket[{RATE}])))",
                        "p50",
                    ),
                    Query(
                        "histogram_quantile(0.9, sum by (le) "
                        f"(rate(consortium_round_duration_seconds_bucket[{RATE}])))",
                        "p90",
                    ),
                ),
                unit="s",
            ),
        ),
    ),
    Row(
        "Federation health",
        (
            Panel(
                "Participants in the last round",
                "Updates aggregated in each recent job's last round.",
                q("consortium_job_last_round_participants", JOB),
            ),
            Panel(
                "Updates accepted and rejected",
                "Updates per interval: accepted into aggregates, and refused by reason.",
                (
                    Query(f"sum(increase(consortium_updates_accepted_total[{RATE}]))", "accepted"),
                    Query(
                        f"sum by (reason) (increase(consortium_updates_rejected_total[{RATE}]))",
                        "rejected: {{reason}}",
                    ),
                ),
            ),
            Panel(
                "Dropouts",
                "Replies rounds were short of their job's min_clients, per interval.",
                q(f"sum(increase(consortium_round_dropouts_total[{RATE}]))", "dropouts"),
            ),
            Panel(
                "Heartbeat age",
                "Seconds since each institution's newest heartbeat (nodes that have not left).",
                q("consortium_institution_heartbeat_age_seconds", "{{institution}}"),
                unit="s",
            ),
            Panel(
                "SuperNodes up",
                "1 while a node's Flower SuperNode process runs.",
                q("consortium_client_supernode_up", "{{institution}} {{instance}}"),
            ),
        ),
    ),
    Row(
        "Compute sharing",
        (
            Panel(
                "Compute contributed and consumed",
                "Shared pretraining compute in device-seconds per second (GPUs, or CPU "
                "slots), by institution and device.",
                (
                    Query(
                        "sum by (institution, device) "
                        f"(rate(consortium_compute_contributed_seconds_total[{RATE}]))",
                        "{{institution}} {{device}} contributed",
                    ),
                    Query(
                        "sum by (institution, device) "
                        f"(rate(consortium_compute_consumed_seconds_total[{RATE}]))",
                        "{{institution}} {{device}} consumed",
                    ),
                ),
            ),
            Panel(
                "Node CPU",
                "CPU cores busy in each institution's node processes.",
                q(
                    "sum by (institution) "
                    f"(rate(consortium_client_node_cpu_seconds_total[{RATE}]))",
                    "{{institution}}",
                ),
                stacked=True,
            ),
            Panel(
                "Node memory",
                "Resident memory of each institution's node processes.",
                q(
                    "sum by (institution) (consortium_client_node_resident_memory_bytes)",
                    "{{institution}}",
                ),
                unit="bytes",
            ),
            Panel(
                "Local training throughput",
                "Examples trained per second at each institution.",
                q(
                    "sum by (institution) "
                    f"(rate(consortium_client_training_examples_total[{RATE}]))",
                    "{{institution}}",
                ),
            ),
            Panel(
                "Local training time",
                "Share of wall time each institution spent training locally.",
                q(
                    "sum by (institution) "
                    f"(rate(consortium_client_training_seconds_total[{RATE}]))",
                    "{{institution}}",
                ),
                unit="percentunit",
            ),
        ),
    ),
    Row(
        "Security",
        (
            Panel(
                "Authentication refusals",
                "Refused connections or calls per interval, by channel and reason.",
                q(
                    f"sum by (channel, reason) (increase(consortium_auth_refusals_total[{RATE}]))",
                    "{{channel}}: {{reason}}",
                ),
            ),
            Panel(
                "SuperNode key changes",
                "SuperNode keys the coordinator changed at the SuperLink per interval to "
                "match onboarding: removed_unknown, removed_revoked, restored.",
                q(
                    f"sum by (action) (increase(consortium_supernode_key_changes_total[{RATE}]))",
                    "{{action}}",
                ),
            ),
            Panel(
                "Heartbeats received",
                "Heartbeats per second the coordinator accepted, by institution.",
                q(
                    f"sum by (institution) (rate(consortium_heartbeats_received_total[{RATE}]))",
                    "{{institution}}",
                ),
                unit="reqps",
            ),
        ),
    ),
    Row(
        "Provenance",
        (
            Panel(
                "Log entries",
                "Signed records in the provenance log.",
                q("consortium_provenance_log_entries", "entries"),
            ),
            Panel(
                "Log size",
                "Size of the provenance log file.",
                q("consortium_provenance_log_size_bytes", "size"),
                unit="bytes",
            ),
            Panel(
                "Tree-head age",
                "Seconds since the newest signed tree head (empty before the first).",
                q("consortium_provenance_tree_head_age_seconds", "age"),
                unit="s",
            ),
        ),
    ),
)


def expressions() -> list[str]:
    """Every PromQL expression on the dashboard, in panel order."""
    return [query.expr for row in ROWS for panel in row.panels for query in panel.queries]


def _panel(panel: Panel, panel_id: int, position: GridPos) -> Any:
    builder: Any
    if panel.kind == "stat":
        builder = stat.Panel().graph_mode(common.BigValueGraphMode.NONE)
    else:
        builder = timeseries.Panel()
        if panel.stacked:
            builder = builder.stacking(
                common_builders.StackingConfig().mode(common.StackingMode.NORMAL)
            ).fill_opacity(30)
    builder = (
        builder.id(panel_id)
        .grid_pos(position)
        .title(panel.title)
        .description(panel.description)
        .datasource(DATASOURCE)
        .unit(panel.unit)
    )
    for index, query in enumerate(panel.queries):
        builder = builder.with_target(
            prometheus.Dataquery()
            .ref_id(chr(ord("A") + index))
            .datasource(DATASOURCE)
            .expr(query.expr)
            .legend_format(query.legend)
        )
    return builder


def build_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model; ids count up from 1, rows included."""
    board = (
        dashboard_builders.Dashboard("Consortium")
        .uid(DASHBOARD_UID)
        .description("Coordinator, institutions, federated rounds, compute, security, provenance.")
        .tags(["consortium"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
    )
    next_id, y = 1, 0
    for row in ROWS:
        position = GridPos(x=0, y=y, w=GRID_WIDTH, h=1)
        board = board.with_row(dashboard_builders.Row(row.title).id(next_id).grid_pos(position))
        next_id, y = next_id + 1, y + 1
        x, line_height = 0, 0
        for panel in row.panels:
            width = WIDTHS[panel.kind]
            if x + width > GRID_WIDTH:  # start the next line of this row
                x, y, line_height = 0, y + line_height, 0
            position = GridPos(x=x, y=y, w=width, h=PANEL_HEIGHT)
            board = board.with_panel(_panel(panel, next_id, position))
            next_id, x, line_height = next_id + 1, x + width, PANEL_HEIGHT
        y += line_height
    model: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(board.build()))
    return model
