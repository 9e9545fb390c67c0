"""Alert rules and the Grafana dashboard are valid and use only metrics the services export."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, contract_metrics, metrics_in, require_tool, run, series_names

PROM = DEPLOY / "observability" / "prometheus"
DASHBOARD = DEPLOY / "observability" / "grafana" / "infermesh.json"


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_metric_table_of_the_architecture_doc_parses_into_names_and_types() -> None:
    metrics = contract_metrics()
    assert metrics["infermesh_request_duration_seconds"] == "histogram"
    assert metrics["infermesh_gpu_memory_free_bytes"] == "gauge"
    assert len(metrics) >= 12


def test_promql_metric_extraction_ignores_labels_functions_and_groupings() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, target) (rate(a_bucket{service="router"}[5m])))'
        " > on (target) group_left max by (target) (b)"
    )
    assert metrics_in(expr) == {"a_bucket", "b"}


def test_alert_rules_pass_promtool_check() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    proc = run([promtool, "check", "rules", str(PROM / "alerts.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    proc = run([promtool, "test", "rules", "alerts.test.yml"], cwd=PROM)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_config_passes_promtool_check() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    proc = run([promtool, "check", "config", "--syntax-only", str(PROM / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_rule_has_an_expression_a_hold_time_a_severity_and_a_summary(
    rules: list[dict[str, Any]],
) -> None:
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"][0].isupper() and rule["expr"].strip()
        assert rule["for"].endswith("m")
        assert rule["labels"]["severity"] in {"page", "warn"}
        assert rule["annotations"]["summary"]


def test_alert_rules_cover_latency_slo_errors_gpu_memory_and_down(
    rules: list[dict[str, Any]],
) -> None:
    by_name = {r["alert"]: " ".join(r["expr"].split()) for r in rules}
    assert "infermesh_target_slo_seconds" in by_name["InfermeshP99LatencyOverSLO"]
    assert "histogram_quantile(0.99" in by_name["InfermeshP99LatencyOverSLO"]
    assert (
        'code!="OK"' in by_name["InfermeshErrorRateHigh"]
        and "> 0.001" in by_name["InfermeshErrorRateHigh"]
    )
    assert "< 0.1" in by_name["InfermeshGPUMemoryLow"]
    assert by_name["InfermeshServiceDown"].startswith("up")


def test_alert_rules_use_only_metrics_from_the_contract(rules: list[dict[str, Any]]) -> None:
    known = series_names(contract_metrics())
    for rule in rules:
        unknown = metrics_in(rule["expr"]) - known
        assert not unknown, f"{rule['alert']}: {unknown}"


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_queries_use_only_metrics_from_the_contract(dashboard: dict[str, Any]) -> None:
    known = series_names(contract_metrics())
    queries = _queries(dashboard)
    assert len(queries) >= 15
    for title, expr in queries:
        unknown = metrics_in(expr) - known
        assert not unknown, f"{title}: {unknown}"


def test_dashboard_has_a_panel_for_each_signal_the_design_names(dashboard: dict[str, Any]) -> None:
    used = {m for _, expr in _queries(dashboard) for m in metrics_in(expr)}
    for metric in (
        "infermesh_request_duration_seconds_bucket",
        "infermesh_requests_total",
        "infermesh_queue_depth",
        "infermesh_batch_size_bucket",
        "infermesh_batch_policy_max_batch_size",
        "infermesh_batch_policy_max_delay_seconds",
        "infermesh_tier_bytes",
        "infermesh_tier_reads_total",
        "infermesh_gpu_memory_used_bytes",
        "infermesh_gpu_memory_free_bytes",
        "infermesh_gpu_utilization_ratio",
    ):
        assert metric in used, metric
    exprs = " ".join(expr for _, expr in _queries(dashboard))
    assert "histogram_quantile(0.50" in exprs and "histogram_quantile(0.99" in exprs


def test_dashboard_panels_have_unique_ids_and_use_the_provisioned_datasource(
    dashboard: dict[str, Any],
) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "infermesh"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    (ds_var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == "prometheus"
