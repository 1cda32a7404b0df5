"""The Prometheus alert rules: the alerts the triggers route, their labels, and promtool's unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.alerts import HEARTBEAT_ALERTS, ROUTED_ALERTS
from sandbox.observability import (
    DEMO,
    PRODUCTION,
    ObservabilityError,
    alertmanager_config,
    duration,
    parse_duration,
    profile_rules,
    prometheus_config,
    rule_metric_names,
)

RULES_DIR = Path(__file__).resolve().parents[2] / "deployments" / "prometheus"
RULES = RULES_DIR / "ferrumdeck-alerts.yaml"
RULE_TESTS = RULES_DIR / "ferrumdeck-alerts.test.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install --no-install-recommends prometheus)"
)


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "an alert is defined twice"
    return {rule["alert"]: rule for rule in rules}


def test_rules_produce_exactly_the_routed_alerts_and_a_heartbeat():
    names = set(alert_rules())
    assert names >= ROUTED_ALERTS
    assert names - ROUTED_ALERTS == {"FerrumDeckHeartbeat"}
    assert "FerrumDeckHeartbeat" in HEARTBEAT_ALERTS  # the bridge records it instead of forwarding it


@pytest.mark.parametrize("name", sorted(ROUTED_ALERTS))
def test_each_alert_has_for_severity_team_and_runbook(name):
    rule = alert_rules()[name]
    assert rule.get("for"), f"{name} has no for:"
    assert rule["labels"]["team"] == "ferrumdeck"
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert rule["annotations"]["runbook_url"].startswith("https://")
    assert rule["annotations"]["summary"]


def test_heartbeat_is_always_firing_and_routed_to_the_team():
    rule = alert_rules()["FerrumDeckHeartbeat"]
    assert rule["expr"].strip() == "vector(1)"
    assert rule["labels"]["team"] == "ferrumdeck"


def test_labels_the_flows_need_survive_aggregation():
    """The crash/hang flows take `pod`, failover takes `provider`/`model`: the rules must keep those labels."""
    rules = alert_rules()
    for name in ("WorkerCrashLooping", "WorkerHung"):
        assert "pod" in rules[name]["expr"]
    assert "by (namespace, provider, model)" in rules["LLMProviderErrors"]["expr"]


def test_promtool_tests_cover_every_alert_firing_and_not_firing():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alert_rules()) <= fires
    assert quiet >= ROUTED_ALERTS


@needs_promtool
def test_promtool_check_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    out = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULES_DIR, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path):
    """The promtool tests bite: the same tests against rules with loosened thresholds fail, per alert."""
    text = RULES.read_text()
    mutated = text.replace("> 300", "> 3000").replace("> 0.5", "> 0.95").replace("> 120", "> 12000")
    assert mutated != text
    (tmp_path / RULES.name).write_text(mutated)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    out = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    for name in ("WorkerHung", "LLMProviderErrors", "QueueBacklog"):
        assert f"alertname: {name}" in out.stdout + out.stderr


def promtool_test(tmp_path: Path, rules: str, tests: dict) -> subprocess.CompletedProcess:
    (tmp_path / "rules.yaml").write_text(rules)
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], **tests}))
    return subprocess.run([PROMTOOL, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


@needs_promtool
def test_queue_backlog_needs_undelivered_steps(tmp_path):
    """Without its `<` filter (steps the group has not delivered), a quiet stream would look years behind."""
    text = RULES.read_text()
    mutated = text.replace("< on (stream) group_left", "or on (stream)")
    assert mutated != text
    (tmp_path / RULES.name).write_text(mutated)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    out = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "alertname: QueueBacklog" in out.stdout + out.stderr


def test_every_metric_the_rules_use_is_documented_in_the_header():
    """The header says who serves each metric; the rules use exactly those (plus Prometheus' own `up`)."""
    text = RULES.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    documented = set(re.findall(r"#\s+([a-z_]+)\{", header)) | {"up"}
    used = rule_metric_names(text)
    assert used == documented
    assert "redis_stream_group_lag" not in used  # Debian's redis_exporter 1.45 does not serve it
    assert used >= {"kube_pod_container_status_waiting_reason", "redis_stream_group_consumer_idle_seconds",
                    "ferrumdeck_llm_requests_total", "probe_success"}


def test_rule_metric_names_leaves_out_labels_functions_and_keywords():
    rules = yaml.safe_dump({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": (
        'max by (pod, consumer) (rate(foo_total{job="x", a=~"b|c"}[5m])) > on (pod) group_left (node) '
        'label_replace(bar_seconds, "pod", "$1", "consumer", "(.+)") and sum without (x) (baz) unless vector(1)'
    )}]}]})
    assert rule_metric_names(rules) == {"foo_total", "bar_seconds", "baz"}


def test_durations():
    assert [parse_duration(d) for d in ("5m", "1m30s", "500ms", "2h")] == [300, 90, 0.5, 7200]
    assert [duration(s) for s in (0.5, 1, 90, 0)] == ["500ms", "1s", "90s", "0s"]
    with pytest.raises(ValueError):
        parse_duration("5 minutes")


def demo_alerts(**names: str) -> dict[str, dict]:
    groups = yaml.safe_load(profile_rules(RULES.read_text(), DEMO, **names))["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_demo_profile_shortens_for_and_thresholds_and_names_the_deployment():
    production = alert_rules()
    demo = demo_alerts(stream="fd-demo:ab12:queue:steps")
    assert set(demo) == set(production)
    for name, rule in demo.items():
        if "for" in production[name]:
            assert parse_duration(rule["for"]) == min(parse_duration(production[name]["for"]), DEMO.rule_for_s)
        assert rule["labels"] == production[name]["labels"] and rule["annotations"] == production[name]["annotations"]
    assert re.search(r"idle_seconds\{[^}]*\}\) > 2\n", demo["WorkerHung"]["expr"])
    assert re.search(r"\) > 5\n", demo["QueueBacklog"]["expr"])
    assert "> 300" not in demo["WorkerHung"]["expr"] and "> 120" not in demo["QueueBacklog"]["expr"]
    assert "[10s]" in demo["LLMProviderErrors"]["expr"] and "[5m]" not in demo["LLMProviderErrors"]["expr"]
    for name in ("WorkerHung", "QueueBacklog"):
        assert 'stream="fd-demo:ab12:queue:steps"' in demo[name]["expr"] and "fd:queue:steps" not in demo[name]["expr"]
    assert alert_rules() == production  # the rules file keeps the production values


def test_production_profile_keeps_the_rules_file_values():
    rules = yaml.safe_load(profile_rules(RULES.read_text(), PRODUCTION))
    assert rules["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_profile_rules_refuses_rules_it_cannot_shorten():
    with pytest.raises(ObservabilityError, match="WorkerHung"):
        profile_rules(RULES.read_text().replace("> 300", "> 600"), DEMO)


def test_describe_says_what_the_demo_shortens():
    text = DEMO.describe()
    for part in ("scrape every 1s", "for: at most 5s", "WorkerHung after 2s idle (rules: 300s)",
                 "QueueBacklog at 5s behind (rules: 120s)"):
        assert part in text


@needs_promtool
def test_demo_rules_pass_promtool_check(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(profile_rules(RULES.read_text(), DEMO, stream="fd-demo:x:queue:steps"))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def annotations(alert: str, *, pod: str, value: str = "") -> dict[str, str]:
    """An alert's annotations rendered for ``pod`` (the two templates these tests need)."""
    out = {}
    for key, text in alert_rules()[alert]["annotations"].items():
        text = text.replace("{{ $labels.pod }}", pod).replace("{{ $labels.consumer }}", pod)
        out[key] = text.replace("{{ $value | humanizeDuration }}", value)
    return out


@needs_promtool
def test_demo_rules_detect_a_hang_and_a_crash_within_seconds(tmp_path):
    """The demo's detection bound, checked by promtool: a crash-loop fires 5 s after it shows, a hang after
    2 s idle + 5 s; neither fires earlier."""
    tests = {"evaluation_interval": "1s", "tests": [{
        "interval": "1s",
        "input_series": [
            {"series": 'kube_pod_container_status_waiting_reason{namespace="ferrumdeck", pod="worker-a", '
                       'container="worker", reason="CrashLoopBackOff"}', "values": "_x2 1x20"},
            {"series": 'redis_stream_group_consumer_idle_seconds{stream="fd:queue:steps", group="workers", '
                       'consumer="worker-h"}', "values": "0+1x20"},
            {"series": 'redis_stream_group_consumer_messages_pending{stream="fd:queue:steps", group="workers", '
                       'consumer="worker-h"}', "values": "5x20"},
            {"series": 'kube_pod_status_ready{namespace="ferrumdeck", pod="worker-h", condition="true"}',
             "values": "1x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "6s", "alertname": "WorkerCrashLooping", "exp_alerts": []},
            {"eval_time": "7s", "alertname": "WorkerCrashLooping",
             "exp_alerts": [{"exp_labels": {"namespace": "ferrumdeck", "pod": "worker-a", "severity": "critical",
                                            "team": "ferrumdeck"},
                             "exp_annotations": annotations("WorkerCrashLooping", pod="worker-a")}]},
            {"eval_time": "7s", "alertname": "WorkerHung", "exp_alerts": []},
            {"eval_time": "8s", "alertname": "WorkerHung",
             "exp_alerts": [{"exp_labels": {"pod": "worker-h", "consumer": "worker-h", "severity": "critical",
                                            "team": "ferrumdeck"},
                             "exp_annotations": annotations("WorkerHung", pod="worker-h", value="8s")}]},
        ],
    }]}
    out = promtool_test(tmp_path, profile_rules(RULES.read_text(), DEMO), tests)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alertmanager_config_keeps_the_routes_and_points_at_the_bridge(tmp_path):
    text = (RULES_DIR / "alertmanager.yaml").read_text()
    config = alertmanager_config(text, DEMO, bridge_url="http://127.0.0.1:9/", token_file=tmp_path / "token")
    original = yaml.safe_load(text)
    assert [r["matchers"] for r in config["route"]["routes"]] == [r["matchers"] for r in original["route"]["routes"]]
    assert all(r["group_wait"] == "0s" and r["group_interval"] == "1s" for r in config["route"]["routes"])
    [bridge] = [r for r in config["receivers"] if r["name"] == "ferrumdeck-bridge"]
    [hook] = bridge["webhook_configs"]
    assert hook["url"] == "http://127.0.0.1:9/alertmanager" and hook["send_resolved"] is True
    assert hook["http_config"]["authorization"] == {"type": "Bearer", "credentials_file": str(tmp_path / "token")}
    production = alertmanager_config(text, PRODUCTION, bridge_url=None, token_file=None)
    assert production["route"] == original["route"]  # production timings untouched
    assert "webhook_configs" not in [r for r in production["receivers"] if r["name"] == "ferrumdeck-bridge"][0]


def test_prometheus_config_scrapes_the_sandbox_and_the_exporters_as_the_rules_expect(tmp_path):
    config = prometheus_config(DEMO, rule_file=tmp_path / "r.yaml", alertmanager="127.0.0.1:1",
                               sandbox_metrics="127.0.0.1:2", redis_exporter="127.0.0.1:3",
                               blackbox_exporter="127.0.0.1:4", probe_urls=["http://127.0.0.1:5/health"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"kube-state-metrics", "ferrumdeck", "redis", "blackbox-mcp"}  # blackbox-mcp: MCPServerDown
    assert jobs["kube-state-metrics"]["honor_labels"] is True
    assert jobs["blackbox-mcp"]["params"] == {"module": ["http_2xx"]}
    assert config["global"]["scrape_interval"] == "1s" and config["global"]["evaluation_interval"] == "1s"
    assert config["alerting"]["alertmanagers"][0]["static_configs"] == [{"targets": ["127.0.0.1:1"]}]
