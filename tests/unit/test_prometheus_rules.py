"""The Prometheus alert rules: the alerts the triggers route, their labels, and promtool's unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.alerts import HEARTBEAT_ALERTS, ROUTED_ALERTS

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
    mutated = text.replace("> 300", "> 3000").replace("> 0.5", "> 0.95").replace("> 1000", "> 100000")
    assert mutated != text
    (tmp_path / RULES.name).write_text(mutated)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    out = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    for name in ("WorkerHung", "LLMProviderErrors", "QueueBacklog"):
        assert f"alertname: {name}" in out.stdout + out.stderr
