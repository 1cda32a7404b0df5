"""llm-provider-failover / -failback against the sandbox cluster, real PostgreSQL evidence and the provider stub.

Each test sets the fault up directly: failed LLM steps as rows in a private PostgreSQL table, the provider's
Statuspage stub (``sandbox.llm``) in outage, the workers' Deployment env in the sandbox cluster. The flow runs
for real (Prefect test server) and the tests assert the end state: the Deployment's env, the pods rolled out,
the Prefect Variables, the cooldown/budget, and the published report.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.variables import Variable
from pydantic import SecretStr

from flows.llm_failover import llm_provider_failback, llm_provider_failover
from sandbox.http_server import serve_app
from sandbox.llm import LLMProviders
from tasks import kube
from tasks.connections import db_engine
from tasks.guard import Budget, ensure_budget, llm_failover_budget
from tasks.runs import create_schema, drop_schema, tables
from tasks.settings import Settings, use_settings

PRIMARY = "openai/gpt-4o"
BACKUP = "anthropic/claude-sonnet-4-20250514"


@pytest.fixture(scope="module")
def llm_stub():
    providers = LLMProviders()
    served = serve_app(providers.app(), name="llm-test")
    yield providers, served.url
    served.stop()


@pytest.fixture(autouse=True)
def budget(monkeypatch) -> Budget:
    """A fresh failover budget per test: the production one (`fd-budget-llm-failover`, 1 per 15 min) under a
    private name, so the tests of one session do not spend each other's slot."""
    private = Budget(name=f"fd-test-llm-failover-{uuid.uuid4().hex[:8]}", limit=1, per_seconds=900)
    assert llm_failover_budget(Settings()).limit == private.limit  # the production default is 1 per 15 min
    monkeypatch.setattr("flows.llm_failover.llm_failover_budget", lambda settings: private)
    ensure_budget(private)  # created up front, as a deployment would: the guard's acquisition waits only 2 s
    return private


@pytest.fixture
def fo(kube_settings, pg_database_url, llm_stub):
    """Settings for one test: sandbox cluster, private runs tables, stub status pages, private Variables."""
    providers, url = llm_stub
    providers.restore()
    tag = uuid.uuid4().hex[:8]
    s = kube_settings.model_copy(
        update={
            "database_url": SecretStr(pg_database_url),
            "runs_table": f"runs_fo_{tag}",
            "steps_table": f"steps_fo_{tag}",
            "llm_fallback_models": [PRIMARY, BACKUP],
            "llm_status_urls": {p: f"{url}/{p}/api/v2/status.json" for p in ("openai", "anthropic")},
            "llm_active_model_variable": f"fd_active_model_{tag}",
            "llm_healthy_since_variable": f"fd_healthy_since_{tag}",
            "llm_failover_min_samples": 10,
            "llm_failover_error_rate": 0.5,
            "llm_failure_window_minutes": 15,
            "rollout_timeout_s": 30.0,
        }
    )
    create_schema(settings=s)
    with use_settings(s):
        yield s
    drop_schema(settings=s)
    for name in (s.llm_active_model_variable, s.llm_healthy_since_variable, s.kill_switch_variable):
        Variable.unset(name)


def seed_llm_steps(settings: Settings, *, model: str, failed: int, ok: int = 0, minutes_ago: float = 1) -> None:
    """LLM step rows as the workers leave them: ``failed`` failed and ``ok`` completed, set-based insert."""
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    rows = [
        {
            "id": f"step-{uuid.uuid4().hex}",
            "run_id": f"run-{uuid.uuid4().hex}",
            "status": "failed" if i < failed else "completed",
            "kind": "llm",
            "model": model,
            "attempts": 0,
            "started_at": at,
            "completed_at": at,
            "error": {"code": "LLM_PROVIDER_ERROR", "model": model} if i < failed else None,
        }
        for i in range(failed + ok)
    ]
    if rows:
        with db_engine(settings).begin() as conn:
            conn.execute(sa.insert(tables(settings).steps), rows)


def model_env(settings: Settings) -> str | None:
    return kube.get_deployment_env.fn(
        settings=settings, deployment="worker", container="worker", name=settings.llm_model_env
    )


def set_model(settings: Settings, model: str) -> None:
    kube.set_deployment_env.fn(
        settings=settings, deployment="worker", container="worker", name=settings.llm_model_env, value=model,
        dry_run=False,
    )  # no wait for its rollout: the flow reads the Deployment's env, and waits itself when it switches


def worker_pod_models(cluster) -> dict[str, str | None]:
    """LITELLM_MODEL of every live (not terminating) worker pod."""
    out = {}
    for pod in cluster.pods(selector="app=worker"):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        env = pod["spec"]["containers"][0].get("env") or []
        out[pod["metadata"]["name"]] = next((e.get("value") for e in env if e["name"] == "LITELLM_MODEL"), None)
    return out


def report_of(state, key: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            ),
            limit=1,
        )
    assert artifacts, f"no `{key}` report for this flow run"
    return artifacts[0].data


def recovery_events(name: str, since: datetime, *, at_least: int = 1, timeout: float = 15.0) -> list:
    """Events ``name`` the Prefect server stored since ``since`` (stored asynchronously: poll with a deadline)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    deadline = time.monotonic() + timeout
    while True:
        until = datetime.now(UTC) + timedelta(minutes=1)
        flt = EventFilter(event=EventNameFilter(name=[name]), occurred=EventOccurredFilter(since=since, until=until))
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=flt, limit=50).events
        if len(events) >= at_least or time.monotonic() > deadline:
            return events
        time.sleep(0.2)  # poll


def cooldown_keys(settings: Settings, redis) -> list[str]:
    return list(redis.scan_iter(match=f"{settings.state_prefix}:cooldown:*"))


# --- failover ------------------------------------------------------------------------------------------------


def test_failover_on_failures_and_status_switches_model_and_rolls_out(fo, cluster, llm_stub, redis):
    providers, _ = llm_stub
    providers.outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=18, ok=2)
    seed_llm_steps(fo, model=BACKUP, failed=0, ok=5)
    before = worker_pod_models(cluster)
    assert set(before.values()) == {PRIMARY}
    started = datetime.now(UTC)

    state = llm_provider_failover(dry_run=False, return_state=True)
    result = state.result()

    assert (result.action, result.current, result.target) == ("failover", PRIMARY, BACKUP)
    assert result.changed and result.rollout_complete and result.verified
    assert model_env(fo) == BACKUP
    assert Variable.get(fo.llm_active_model_variable) == BACKUP
    cluster.wait_until(lambda: set(worker_pod_models(cluster).values()) == {BACKUP}, timeout=15)
    after = worker_pod_models(cluster)
    assert len(after) == 3 and not set(after) & set(before)  # every worker pod replaced by the rollout
    assert cooldown_keys(fo, redis)  # the switch spent its cooldown
    md = report_of(state, "llm-provider-failover")
    assert "**failover**" in md and "18 / 20" in md and "major" in md and f"LITELLM_MODEL={BACKUP}" in md
    assert "OK" in md
    events = recovery_events("ferrumdeck.recovery.llm-failover", started)
    assert [(e.payload["from"], e.payload["to"]) for e in events] == [(PRIMARY, BACKUP)]
    assert events[0].resource.id == "ferrumdeck.deployment.ferrumdeck.worker"


def test_failover_dry_run_changes_nothing_anywhere(fo, cluster, llm_stub, redis):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20)
    pods_before = worker_pod_models(cluster)

    state = llm_provider_failover(dry_run=True, return_state=True)
    result = state.result()

    assert result.action == "failover" and result.target == BACKUP and not result.changed
    assert model_env(fo) == PRIMARY
    assert worker_pod_models(cluster) == pods_before
    assert Variable.get(fo.llm_active_model_variable) is None
    assert cooldown_keys(fo, redis) == []
    assert "dry run: would set-llm-model deployment/worker" in report_of(state, "llm-provider-failover")


def test_failover_kill_switch_refuses(fo, cluster, llm_stub):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20)
    Variable.set(fo.kill_switch_variable, True, overwrite=True)

    state = llm_provider_failover(dry_run=False, return_state=True)

    assert state.is_completed() and not state.result().changed
    assert model_env(fo) == PRIMARY
    md = report_of(state, "llm-provider-failover")
    assert "kill switch" in md and "Outcome: **refused**" in md


def test_failover_stays_when_evidence_is_below_thresholds(fo, cluster):
    seed_llm_steps(fo, model=PRIMARY, failed=4, ok=6)  # 40% < 50%
    seed_llm_steps(fo, model=PRIMARY, failed=50, minutes_ago=60)  # outside the window
    state = llm_provider_failover(dry_run=False, return_state=True)
    result = state.result()
    assert result.action == "stay" and not result.changed
    assert model_env(fo) == PRIMARY
    assert "4 / 10" in report_of(state, "llm-provider-failover")


@pytest.mark.parametrize(
    ("evidence", "status_down", "failures", "expected"),
    [
        ("status", True, 0, "failover"),  # the status page alone is enough
        ("failures", True, 0, "stay"),  # status pages ignored
        ("both", True, 0, "stay"),  # needs both
        ("both", True, 20, "failover"),
        ("any", False, 20, "failover"),  # failures alone are enough
    ],
)
def test_evidence_modes_decide(fo, cluster, llm_stub, evidence, status_down, failures, expected):
    if status_down:
        llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=failures)
    result = llm_provider_failover(dry_run=True, evidence=evidence)
    assert result.action == expected


def test_no_healthy_fallback_leaves_the_model_and_says_so(fo, cluster, llm_stub):
    llm_stub[0].outage("openai")
    llm_stub[0].outage("anthropic")
    state = llm_provider_failover(dry_run=False, return_state=True)
    assert state.result().action == "no-fallback"
    assert model_env(fo) == PRIMARY
    md = report_of(state, "llm-provider-failover")
    assert "no healthy fallback" in md and "a human must decide" in md


def test_unreadable_status_page_is_unknown_not_a_crash(fo, cluster):
    s = fo.model_copy(update={"llm_status_urls": {"openai": "http://127.0.0.1:9/openai/api/v2/status.json"}})
    seed_llm_steps(s, model=PRIMARY, failed=20)
    with use_settings(s):
        state = llm_provider_failover(dry_run=True, return_state=True)
    assert state.result().action == "failover"  # failures are enough; the dead status page is `unknown`
    assert "unknown" in report_of(state, "llm-provider-failover")


def test_budget_allows_one_switch_per_15_minutes(fo, cluster, llm_stub, budget):
    s = fo.model_copy(update={"target_cooldown_s": 0})  # isolate the budget from the cooldown
    with use_settings(s):
        llm_stub[0].outage("openai")
        seed_llm_steps(s, model=PRIMARY, failed=20, minutes_ago=10)
        first = llm_provider_failover(dry_run=False)
        assert first.changed and model_env(s) == BACKUP

        # then the backup fails too while the primary is back: the budget refuses a second switch
        llm_stub[0].restore("openai")
        llm_stub[0].outage("anthropic")
        seed_llm_steps(s, model=BACKUP, failed=20, minutes_ago=1)
        state = llm_provider_failover(dry_run=False, window_minutes=5, return_state=True)
        second = state.result()
    assert second.action == "failover" and second.target == PRIMARY and not second.changed
    assert "budget" in second.verdict
    assert model_env(s) == BACKUP
    assert f"budget `{budget.name}` exhausted (1 per 900s)" in report_of(state, "llm-provider-failover")


def test_repeated_alert_switches_once(fo, cluster, llm_stub):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20)
    results = [llm_provider_failover(dry_run=False) for _ in range(3)]
    assert [r.changed for r in results] == [True, False, False], [r.verdict for r in results]
    assert [r.action for r in results] == ["failover", "stay", "stay"]  # already on the healthy backup
    assert model_env(fo) == BACKUP


def test_bad_parameters_are_rejected_before_anything_runs(fo, cluster):
    with pytest.raises(Exception, match="less than or equal to 1"):
        llm_provider_failover(dry_run=False, error_rate=1.5)
    with pytest.raises(Exception, match="evidence"):
        llm_provider_failover(dry_run=False, evidence="vibes")
    assert model_env(fo) == PRIMARY


# --- failback ------------------------------------------------------------------------------------------------


def test_failback_waits_then_returns_to_the_primary(fo, cluster):
    set_model(fo, BACKUP)
    first = llm_provider_failback(dry_run=False, healthy_for_minutes=30)
    assert first.action == "wait" and not first.changed
    since = datetime.fromisoformat(Variable.get(fo.llm_healthy_since_variable))
    assert abs((datetime.now(UTC) - since).total_seconds()) < 60
    assert model_env(fo) == BACKUP

    # backdate the memory: the primary has now been healthy for 31 minutes
    Variable.set(
        fo.llm_healthy_since_variable, (datetime.now(UTC) - timedelta(minutes=31)).isoformat(), overwrite=True
    )
    state = llm_provider_failback(dry_run=False, healthy_for_minutes=30, return_state=True)
    result = state.result()
    assert result.action == "failback" and result.changed and result.verified
    assert model_env(fo) == PRIMARY
    assert Variable.get(fo.llm_active_model_variable) == PRIMARY
    assert Variable.get(fo.llm_healthy_since_variable) is None
    cluster.wait_until(lambda: set(worker_pod_models(cluster).values()) == {PRIMARY}, timeout=15)
    md = report_of(state, "llm-provider-failback")
    assert "**failback**" in md and "31." in md


def test_failback_forgets_when_the_primary_is_still_down(fo, cluster, llm_stub):
    set_model(fo, BACKUP)
    Variable.set(fo.llm_healthy_since_variable, datetime.now(UTC).isoformat(), overwrite=True)
    llm_stub[0].outage("openai")
    result = llm_provider_failback(dry_run=False, healthy_for_minutes=0)
    assert result.action == "primary-unhealthy" and not result.changed
    assert Variable.get(fo.llm_healthy_since_variable) is None
    assert model_env(fo) == BACKUP


def test_failback_dry_run_changes_nothing(fo, cluster):
    set_model(fo, BACKUP)
    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    Variable.set(fo.llm_healthy_since_variable, old, overwrite=True)
    state = llm_provider_failback(dry_run=True, healthy_for_minutes=30, return_state=True)
    assert state.result().action == "failback" and not state.result().changed
    assert model_env(fo) == BACKUP
    assert Variable.get(fo.llm_healthy_since_variable) == old
    assert "dry run" in report_of(state, "llm-provider-failback")


def test_failback_on_primary_is_a_noop(fo, cluster):
    result = llm_provider_failback(dry_run=False)
    assert result.action == "on-primary" and not result.changed and model_env(fo) == PRIMARY


def test_failback_kill_switch_refuses_the_switch(fo, cluster):
    set_model(fo, BACKUP)
    Variable.set(fo.kill_switch_variable, True, overwrite=True)
    state = llm_provider_failback(dry_run=False, healthy_for_minutes=0, return_state=True)
    assert state.result().action == "failback" and not state.result().changed
    assert model_env(fo) == BACKUP
    assert "kill switch" in report_of(state, "llm-provider-failback")
