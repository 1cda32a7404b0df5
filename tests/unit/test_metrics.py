"""Our own metrics: what a concluded run records, the outcome event, the state read at scrape time, how they are
served, and the recovery system's alert rules (promtool) over exactly the metrics we serve."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from tasks import metrics
from tasks.metrics import REGISTRY, StateCollector, record_run, refusal_reason
from tasks.outcome import ActionStatus, Outcome, RecoveryResult
from tasks.report import OUTCOME_EVENT, outcome_event, targets
from tasks.settings import Settings

RULES_DIR = Path(__file__).resolve().parents[2] / "deployments" / "prometheus"
RULES = RULES_DIR / "recovery-system-alerts.yaml"
RULE_TESTS = RULES_DIR / "recovery-system-alerts.test.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install --no-install-recommends prometheus)"
)
S = ActionStatus


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- refusal reasons, from the guard's own messages -------------------------------------------------------

class FakeRedis:
    def __init__(self, *, free: bool) -> None:
        self.free = free

    def set(self, *args, **kwargs) -> bool:
        return self.free

    def ttl(self, key: str) -> int:
        return 42

    def delete(self, *keys: str) -> int:
        return 0


def guard_refusal(mocker, *, paused: bool = False, cooling: bool = False, budget_room: bool = True) -> str:
    """The message ``Refused`` carries when the real ``guard.authorize`` says no (Prefect and Redis faked)."""
    from tasks import guard
    from tasks.errors import Refused

    mocker.patch.object(guard, "kill_switch_engaged", return_value=paused)
    mocker.patch.object(guard, "redis_client", return_value=FakeRedis(free=not cooling))
    mocker.patch.object(guard, "_spend", return_value=budget_room)
    settings = Settings()
    with pytest.raises(Refused) as refused:
        guard.authorize(action="delete-pod", target="worker-1", settings=settings,
                        budget=guard.pod_deletion_budget(settings))
    return str(refused.value)


def test_refusal_reasons_follow_the_guards_messages(mocker):
    assert refusal_reason(guard_refusal(mocker, paused=True)) == "kill_switch"
    assert refusal_reason(guard_refusal(mocker, cooling=True)) == "cooldown"
    assert refusal_reason(guard_refusal(mocker, budget_room=False)) == "budget"
    assert refusal_reason("approval rejected by alice: too many pods") == "approval"
    assert refusal_reason("no approval within 600 s (FD_APPROVAL_TIMEOUT_S): nothing changed") == "approval"
    assert refusal_reason("would leave 0 Ready workers (minimum 1)") == "safety"
    assert refusal_reason("") == "safety"


# --- one concluded run ------------------------------------------------------------------------------------

def crash_result(flow: str) -> RecoveryResult:
    result = RecoveryResult(flow=flow, title="Worker crash recovery")
    result.act("delete-pod", "worker-a", S.DONE)
    result.act("delete-pod", "worker-b", S.REFUSED, detail="budget `fd-budget-pod-deletions` exhausted (3 per 3600s)")
    result.act("recover-entries", "worker-a", S.DONE, count=12)
    result.act("remove-consumer", "worker-a", S.UNCHANGED)
    result.check("replacement Ready", True, target="worker-a")
    return result


def test_record_run_counts_the_outcome_actions_refusals_duration_and_last_run():
    flow = "unit-metrics-crash"
    result = crash_result(flow)
    assert result.outcome is Outcome.PARTIAL
    now = datetime(2026, 11, 27, 21, 0, tzinfo=UTC)
    record_run(result, started=now - timedelta(seconds=12.5), now=now)
    record_run(result, started=now - timedelta(seconds=400), now=now)
    assert value("ferrumdeck_recovery_runs_total", flow=flow, outcome="partial") == 2
    assert value("ferrumdeck_recovery_runs_total", flow=flow, outcome="recovered") == 0
    assert value("ferrumdeck_recovery_actions_total", flow=flow, kind="delete-pod", result="done") == 2
    assert value("ferrumdeck_recovery_actions_total", flow=flow, kind="delete-pod", result="refused") == 2
    assert value("ferrumdeck_recovery_actions_total", flow=flow, kind="recover-entries", result="done") == 2
    assert value("ferrumdeck_recovery_actions_total", flow=flow, kind="remove-consumer", result="unchanged") == 2
    assert value("ferrumdeck_recovery_guard_refusals_total", flow=flow, reason="budget") == 2
    assert value("ferrumdeck_recovery_guard_refusals_total", flow=flow, reason="kill_switch") == 0
    assert value("ferrumdeck_recovery_duration_seconds_count", flow=flow, outcome="partial") == 2
    assert value("ferrumdeck_recovery_duration_seconds_sum", flow=flow, outcome="partial") == pytest.approx(412.5)
    assert value("ferrumdeck_recovery_duration_seconds_bucket", flow=flow, outcome="partial", le="20.0") == 1
    assert value("ferrumdeck_recovery_last_run_timestamp_seconds", flow=flow) == now.timestamp()


def test_a_run_without_a_start_time_is_counted_without_a_duration():
    flow = "unit-metrics-nostart"
    record_run(RecoveryResult(flow=flow, title="t"))
    assert value("ferrumdeck_recovery_runs_total", flow=flow, outcome="nothing_to_do") == 1
    assert value("ferrumdeck_recovery_duration_seconds_count", flow=flow, outcome="nothing_to_do") == 0


def test_alert_to_start_is_observed_from_the_triggering_event(mocker):
    started = datetime(2026, 11, 27, 21, 0, 3, 500000, tzinfo=UTC)
    mocker.patch.object(metrics, "triggering_event_time", return_value=started - timedelta(seconds=2.5))
    assert metrics.observe_alert_to_start(flow="unit-a2s", flow_run_id="r1", started=started) == 2.5
    assert value("ferrumdeck_recovery_alert_to_start_seconds_count", flow="unit-a2s") == 1
    assert value("ferrumdeck_recovery_alert_to_start_seconds_bucket", flow="unit-a2s", le="5.0") == 1
    assert value("ferrumdeck_recovery_alert_to_start_seconds_bucket", flow="unit-a2s", le="2.0") == 0


def test_a_run_no_trigger_started_observes_nothing(mocker):
    mocker.patch.object(metrics, "triggering_event_time", return_value=None)
    sleep = mocker.patch.object(metrics.time, "sleep")
    assert metrics.observe_alert_to_start(flow="unit-a2s-none", flow_run_id="r", started=datetime.now(UTC),
                                          wait_s=5, interval_s=1) is None
    assert sleep.call_count >= 3  # it waited for Prefect's event store, then gave up
    assert value("ferrumdeck_recovery_alert_to_start_seconds_count", flow="unit-a2s-none") == 0


# --- the outcome event --------------------------------------------------------------------------------------

def test_outcome_event_labels_the_flow_outcome_and_target_and_relates_the_run():
    result = crash_result("worker-crash-recovery")
    event = outcome_event(result, flow_run_id="0f9c", flow_run_name="crash worker-a")
    assert event["event"] == OUTCOME_EVENT
    assert event["resource"] == {
        "prefect.resource.id": "ferrumdeck.recovery.worker-crash-recovery",
        "prefect.resource.name": "Worker crash recovery",
        "ferrumdeck.flow": "worker-crash-recovery", "ferrumdeck.outcome": "partial",
        "ferrumdeck.target": "worker-a, worker-b", "ferrumdeck.dry-run": "false",
    }
    assert event["related"] == [{"prefect.resource.id": "prefect.flow-run.0f9c", "prefect.resource.role": "flow-run",
                                 "prefect.resource.name": "crash worker-a"}]
    assert event["payload"]["cause"] == result.cause() and event["payload"]["flow_run_id"] == "0f9c"
    assert event["payload"]["actions"] == {"done": 2, "refused": 1, "unchanged": 1}
    assert event["payload"]["checks"] == {"passed": 1, "failed": 0}


def test_targets_fall_back_to_checks_then_a_dash_and_hide_credentials():
    checked = RecoveryResult(flow="f", title="t")
    checked.check("healthy", False, target="mcp-server")
    assert targets(checked) == "mcp-server"
    assert targets(RecoveryResult(flow="f", title="t")) == "-"
    many = RecoveryResult(flow="f", title="t")
    for i in range(8):
        many.act("delete-pod", f"worker-{i}", S.DONE)
    many.act("probe", "http://user:secret@mcp/health", S.DONE)
    assert targets(many) == "worker-0, worker-1, worker-2, worker-3, worker-4 (+4 more)"
    assert "secret" not in outcome_event(many, flow_run_id=None)["resource"]["ferrumdeck.target"]
    assert outcome_event(many, flow_run_id=None)["related"] == []


# --- the state read at scrape time --------------------------------------------------------------------------

class FakePrefect:
    """The few sync client calls the collector makes."""

    def __init__(self, *, paused: object = None, limits: dict | None = None, fail: bool = False,
                 sweep_ended: datetime | None = None) -> None:
        self.paused, self.limits, self.fail, self.calls = paused, limits or {}, fail, 0
        self.sweep_ended, self.run_queries = sweep_ended, []

    def __enter__(self) -> FakePrefect:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def read_variable_by_name(self, name: str):
        self.calls += 1
        if self.fail:
            raise httpx.ConnectError("Prefect down")
        return None if self.paused is None else SimpleNamespace(value=self.paused)

    def read_flow_runs(self, **query):
        self.run_queries.append(query)
        return [SimpleNamespace(end_time=self.sweep_ended)] if self.sweep_ended else []

    def read_global_concurrency_limit_by_name(self, name: str):
        from prefect.exceptions import ObjectNotFound

        if name not in self.limits:
            raise ObjectNotFound(http_exc=Exception(name))
        return self.limits[name]


def scrape(collector: StateCollector) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_state_reads_the_kill_switch_and_the_budgets_left_with_decay():
    settings = Settings(budget_prefix="fd-b", pod_deletions_per_hour=3, failovers_per_15_min=1)
    spent = SimpleNamespace(active_slots=3, slot_decay_per_second=3 / 3600,
                            updated=datetime.now(UTC) - timedelta(minutes=25))  # 25 min: one slot decayed
    ended = datetime(2026, 11, 27, 21, 0, 30, tzinfo=UTC)
    fake = FakePrefect(paused="true", limits={"fd-b-pod-deletions": spent}, sweep_ended=ended)
    m = scrape(StateCollector(lambda: settings, client=lambda: fake))
    assert m[("ferrumdeck_recovery_heartbeat_timestamp_seconds", ())] == ended.timestamp()
    [query] = fake.run_queries
    assert query["flow_filter"].name.any_ == ["queue-sweep"] and query["limit"] == 1
    assert {t.value for t in query["flow_run_filter"].state.type.any_} == {"COMPLETED", "FAILED"}
    assert m[("ferrumdeck_recovery_kill_switch_engaged", ())] == 1
    assert m[("ferrumdeck_recovery_budget_remaining", (("budget", "pod-deletions"),))] == 1
    assert m[("ferrumdeck_recovery_budget_limit", (("budget", "pod-deletions"),))] == 3
    assert m[("ferrumdeck_recovery_budget_remaining", (("budget", "llm-failover"),))] == 1  # never used: all free
    assert m[("ferrumdeck_recovery_state_up", ())] == 1
    exhausted = SimpleNamespace(active_slots=3, slot_decay_per_second=3 / 3600, updated=datetime.now(UTC))
    m = scrape(StateCollector(lambda: settings, client=lambda: FakePrefect(limits={"fd-b-pod-deletions": exhausted})))
    assert m[("ferrumdeck_recovery_budget_remaining", (("budget", "pod-deletions"),))] == 0
    assert m[("ferrumdeck_recovery_kill_switch_engaged", ())] == 0  # no variable: off
    assert ("ferrumdeck_recovery_heartbeat_timestamp_seconds", ()) not in m  # no sweep finished yet: absent


def test_state_answers_a_scrape_when_prefect_does_not_and_caches_reads():
    fake = FakePrefect(fail=True)
    collector = StateCollector(Settings, client=lambda: fake, cache_s=60)
    m = scrape(collector)
    assert m == {("ferrumdeck_recovery_state_up", ()): 0.0}
    list(collector.collect())
    assert fake.calls == 1  # the second scrape within cache_s was served from the cache


# --- serving ------------------------------------------------------------------------------------------------

def test_exposition_and_the_asgi_app_serve_the_registry(mocker):
    mocker.patch.object(metrics, "enable_state_metrics")  # no Prefect in unit tests
    record_run(RecoveryResult(flow="unit-served", title="t"))
    body, content_type = metrics.exposition("text/plain")
    assert content_type.startswith("text/plain")
    assert b'ferrumdeck_recovery_runs_total{flow="unit-served",outcome="nothing_to_do"} 1.0' in body
    _, openmetrics = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert openmetrics.startswith("application/openmetrics-text")

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=metrics.metrics_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://fd") as client:
            return await client.get("/metrics")

    r = asyncio.run(get())
    assert r.status_code == 200 and 'flow="unit-served"' in r.text
    assert r.headers["content-type"].startswith("text/plain")


def test_start_metrics_server_serves_get_metrics(mocker):
    mocker.patch.object(metrics, "enable_state_metrics")
    server = metrics.start_metrics_server(0, host="127.0.0.1")
    try:
        r = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5)
    finally:
        server.shutdown()
    assert r.status_code == 200 and "ferrumdeck_recovery_runs_total" in r.text


# --- every metric name we serve (the rules and the dashboard may name only these) -------------------------

_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
             "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}


def served_metric_names() -> set[str]:
    """Sample names of the recovery's registry (state gauges included) and of the bridge's."""
    from deployments.bridge import BridgeMetrics

    families = list(REGISTRY.collect())
    state = StateCollector(Settings, client=lambda: FakePrefect(paused=True, sweep_ended=datetime.now(UTC)))
    families += list(state.collect()) + list(BridgeMetrics().registry.collect())
    return {f.name + suffix for f in families for suffix in _SUFFIXES[f.type]}


def test_served_names_cover_what_the_issue_asks_for():
    names = served_metric_names()
    assert {
        "ferrumdeck_recovery_runs_total", "ferrumdeck_recovery_actions_total", "ferrumdeck_recovery_guard_refusals_total",
        "ferrumdeck_recovery_budget_remaining", "ferrumdeck_recovery_kill_switch_engaged",
        "ferrumdeck_recovery_duration_seconds_bucket", "ferrumdeck_recovery_alert_to_start_seconds_bucket",
        "ferrumdeck_bridge_requests_total", "ferrumdeck_bridge_events_forwarded_total",
        "ferrumdeck_bridge_events_rejected_total",
    } <= names


# --- the recovery system's own alert rules ----------------------------------------------------------------

def system_rules() -> dict[str, dict]:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    return {r["alert"]: r for r in rules}


def test_system_rules_cover_the_issue_and_page_a_person_not_the_bridge():
    rules = system_rules()
    assert set(rules) == {"RecoveryFailing", "RecoveryKillSwitchOn", "RecoveryBudgetExhausted",
                          "RecoveryBridgeRejecting", "RecoveryRunnerNoHeartbeat", "RecoveryAlertingNoHeartbeat",
                          "RecoverySystemDown", "RecoveryDetectionBlind"}
    for name, rule in rules.items():
        assert rule["labels"]["team"] == "ferrumdeck-recovery", name  # team=ferrumdeck would start a triage
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook_url"].startswith("https://")
    assert rules["RecoveryKillSwitchOn"]["for"] == "1h"


def test_system_rules_use_only_metrics_we_serve_prometheus_up_and_the_detection_sources():
    from sandbox.observability import RULES as DETECTION_RULES
    from sandbox.observability import rule_metric_names

    used = rule_metric_names(RULES.read_text())
    # RecoveryDetectionBlind reads the sources of the recovery alerts (and the redis exporter's own redis_up)
    sources = rule_metric_names(Path(DETECTION_RULES).read_text()) | {"redis_up"}
    assert used - {"up"} <= served_metric_names() | sources
    header = "\n".join(line for line in RULES.read_text().splitlines() if line.startswith("#"))
    assert all(name in header for name in used)  # the header says who serves each


@needs_promtool
def test_promtool_checks_and_tests_the_system_rules():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULES_DIR, capture_output=True,
                           text=True, timeout=60)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_promtool_tests_cover_every_system_alert_firing_and_quiet():
    fires, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == quiet == set(system_rules())


@needs_promtool
@pytest.mark.parametrize(("original", "mutated", "alert"), [
    ("> 600\n", "> 6000\n", "RecoveryRunnerNoHeartbeat"),
    ("for: 1h", "for: 2h", "RecoveryKillSwitchOn"),
    ("remaining) == 0", "remaining) == 1", "RecoveryBudgetExhausted"),
    ('status!~"2.."', 'status=~"5.."', "RecoveryBridgeRejecting"),
    ("> 900", "> 9000", "RecoveryAlertingNoHeartbeat"),
    ("offset 30m", "offset 1m", "RecoveryFailing"),
])
def test_promtool_tests_catch_a_wrong_rule(tmp_path, original, mutated, alert):
    text = RULES.read_text()
    assert original in text
    (tmp_path / RULES.name).write_text(text.replace(original, mutated))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    out = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and f"alertname: {alert}" in out.stdout + out.stderr


def test_alertmanager_pages_a_person_for_the_system_alerts_and_sends_the_rest_to_the_bridge():
    """Checked by Debian's amtool against the shipped alertmanager.yaml (real route matching, not a re-parse)."""
    amtool = shutil.which("amtool")
    assert amtool, "amtool (Debian prometheus-alertmanager) is needed: make peers"
    config = RULES_DIR / "alertmanager.yaml"

    def receiver(**labels: str) -> str:
        out = subprocess.run([amtool, "config", "routes", "test", f"--config.file={config}",
                              *(f"{k}={v}" for k, v in labels.items())], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    for alert in system_rules():
        assert receiver(team="ferrumdeck-recovery", alertname=alert) == "ferrumdeck-recovery-oncall", alert
    assert receiver(team="ferrumdeck", alertname="WorkerCrashLooping", pod="worker-1") == "ferrumdeck-bridge"
