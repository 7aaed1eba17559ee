"""The dashboard and alerts as code: ids, layout, data source, freshness, runbooks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from deploy.grafana.build import DASHBOARD_FILE, DATASOURCES_FILE, main, stale_files
from deploy.grafana.dashboard import DATASOURCE_UID, RATE, build_dashboard, expressions

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
OPERATIONS = REPO / "docs" / "operations.md"
ALERT_FORM = re.compile(r"^(?P<query>.+?)\s*(==|!=|>=|<=|>|<)\s*-?[\d.]+$")
METRIC = re.compile(r"\b(consortium_[a-z_]+?)(?:_bucket|_count|_sum)?\b")


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    panels = list(board["panels"])
    for panel in board["panels"]:
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return panels


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in all_panels(build_dashboard())]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_committed_dashboard_and_provisioning_are_current() -> None:
    assert stale_files() == [], "run: python -m deploy.grafana.build"
    assert json.loads(DASHBOARD_FILE.read_text()) == build_dashboard()


def test_check_mode_fails_on_a_stale_dashboard(tmp_path: Path, monkeypatch: Any) -> None:
    stale = tmp_path / "consortium.json"
    stale.write_text("{}\n")
    monkeypatch.setattr("deploy.grafana.build.DASHBOARD_FILE", stale)
    assert main(["--check"]) == 1


def test_every_query_uses_the_provisioned_data_source() -> None:
    assert f"uid: {DATASOURCE_UID}" in DATASOURCES_FILE.read_text()
    for panel in all_panels(build_dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)) and all(ref_ids), panel["title"]
        assert all(t["datasource"]["uid"] == DATASOURCE_UID for t in panel["targets"])


def test_panels_fit_the_grid_without_overlapping() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in all_panels(build_dashboard()):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_expressions_use_no_grafana_variable_but_the_rate_interval() -> None:
    for expr in expressions():
        assert set(re.findall(r"\$\w+", expr)) <= {RATE}, expr


def test_every_alert_is_a_threshold_with_severity_and_runbook() -> None:
    docs = OPERATIONS.read_text()
    for rule in alert_rules():
        assert ALERT_FORM.match(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert f"\n### {rule['alert']}\n" in docs, f"no runbook section for {rule['alert']}"


def test_every_metric_on_the_dashboard_and_in_alerts_is_documented() -> None:
    docs = OPERATIONS.read_text()
    used = {m for expr in expressions() for m in METRIC.findall(expr)}
    used |= {m for rule in alert_rules() for m in METRIC.findall(rule["expr"])}
    missing = sorted(name for name in used if f"`{name}`" not in docs)
    assert missing == [], f"metrics missing from docs/operations.md: {missing}"
