"""The Grafana dashboard (deployments/grafana/ferrumdeck-recovery.json): every query names only metrics we serve,
and every metric we serve is on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from sandbox.observability import rule_metric_names
from tests.unit.test_metrics import served_metric_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deployments" / "grafana" / "ferrumdeck-recovery.json"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana's ``label_values(metric, label)``) selects."""
    expr = re.sub(r"label_values\(\s*([^,()]+),\s*\w+\s*\)", r"\1", expr)  # label_values(metric, label)
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
    return rule_metric_names(yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "r", "expr": expr}]}]}))


def test_every_query_names_only_metrics_we_serve():
    served = served_metric_names()
    board = dashboard()
    assert queries(board)
    for expr in queries(board):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= served, f"{expr!r} names {names - served}, which we do not serve"


def test_the_check_catches_a_metric_we_do_not_serve():
    assert metric_names('sum by (flow) (rate(ferrumdeck_recovery_runz_total{flow=~"$flow"}[$__rate_interval]))') == {
        "ferrumdeck_recovery_runz_total"}
    assert "ferrumdeck_recovery_runz_total" not in served_metric_names()
    assert metric_names("label_values(ferrumdeck_recovery_runs_total, flow)") == {"ferrumdeck_recovery_runs_total"}


def test_every_metric_we_serve_is_on_the_dashboard():
    shown = {name for expr in queries(dashboard()) for name in metric_names(expr)}
    families = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_count")
                for n in served_metric_names() if not n.endswith(("_created", "_sum"))}
    missing = {f for f in families if not any(s.startswith(f) for s in shown)}
    assert missing == set()


def test_panels_are_well_formed():
    board = dashboard()
    assert board["uid"] == "ferrumdeck-recovery" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    [datasource] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["name"] == "datasource" and datasource["query"] == "prometheus"


@pytest.mark.parametrize("panel_title", ["Kill switch", "Budget left", "Alert to recovery start (p50, p95)",
                                         "Alert events forwarded and rejected", "Needs a person (range)"])
def test_the_issue_s_questions_have_a_panel(panel_title):
    assert panel_title in {p["title"] for p in dashboard()["panels"]}
