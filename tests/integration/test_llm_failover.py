"""llm-provider-failover / -failback against the sandbox cluster, real PostgreSQL evidence and the provider stub.

Each test sets the fault up directly: failed LLM steps as rows in a private PostgreSQL table, the provider's
Statuspage stub (``sandbox.llm``) in outage, the workers' Deployment env in the sandbox cluster; the workers'
steps after a switch (what verifies it) are recorded by ``traffic`` once the Deployment names the new model. The
flow runs for real (Prefect test server) and the tests assert the typed outcome and the end state: the
Deployment's env, the pods rolled out, the Prefect Variables, the cooldown/budget, and the published report.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
from tasks.guard import ensure_budget, llm_failover_budget
from tasks.outcome import ActionStatus, Outcome
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


@pytest.fixture
def fo(kube_settings, pg_database_url, llm_stub):
    """Settings for one test: sandbox cluster, private runs tables, stub status pages, private Variables, and a
    private failover budget (the production one, 1 switch per 15 min, under this test's budget prefix)."""
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
    assert llm_failover_budget(s).limit == 1 and llm_failover_budget(s).per_seconds == 900  # production default
    ensure_budget(llm_failover_budget(s))  # created up front, as a deployment would: the guard waits only 2 s
    create_schema(settings=s)
    with use_settings(s):
        yield s
    drop_schema(settings=s)
    for name in (s.llm_active_model_variable, s.llm_healthy_since_variable, s.kill_switch_variable):
        Variable.unset(name)


def seed_llm_steps(settings: Settings, *, model: str, failed: int = 0, ok: int = 0, minutes_ago: float = 1) -> None:
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
    """Put the workers on ``model`` as an earlier failover would have, without the guard (no cooldown spent)."""
    kube.set_deployment_env.fn.__wrapped__(
        settings=settings, deployment="worker", container="worker", name=settings.llm_model_env, value=model,
        dry_run=False,
    )  # no wait for its rollout: the flow reads the Deployment's env, and waits itself when it switches


@contextmanager
def traffic(settings: Settings, *, model: str, ok: int = 5, failed: int = 0) -> Iterator[threading.Thread]:
    """The workers' LLM steps once they run ``model``: as soon as the Deployment's env names it, ``ok``
    completed and ``failed`` failed steps of ``model`` are recorded, started now (after the switch)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            if model_env(settings) == model:
                seed_llm_steps(settings, model=model, failed=failed, ok=ok, minutes_ago=0)
                return
            stop.wait(0.05)  # poll: the switch

    thread = threading.Thread(target=run, name="llm-traffic", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=10)


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

    with traffic(fo, model=BACKUP, ok=6):
        state = llm_provider_failover(dry_run=False, verify_within_s=15, return_state=True)
    result = state.result()

    assert state.is_completed() and result.outcome is Outcome.RECOVERED
    assert (result.decision, result.current, result.target) == ("failover", PRIMARY, BACKUP)
    assert result.switched and result.rollout_complete and result.model_after == BACKUP
    assert result.steps_after.total == 6 and result.steps_after.failed == 0  # only steps after the switch count
    assert [(a.kind, a.target, a.status) for a in result.actions] == [
        ("set-deployment-env", "deployment/worker", ActionStatus.DONE)]
    assert [c.name for c in result.checks if c.ok] == [
        "rollout finished", f"Deployment `worker` has LITELLM_MODEL={BACKUP}", f"LLM steps of `{BACKUP}` succeed"]
    assert model_env(fo) == BACKUP
    assert Variable.get(fo.llm_active_model_variable) == BACKUP
    cluster.wait_until(lambda: set(worker_pod_models(cluster).values()) == {BACKUP}, timeout=15)
    after = worker_pod_models(cluster)
    assert len(after) == 3 and not set(after) & set(before)  # every worker pod replaced by the rollout
    assert cooldown_keys(fo, redis)  # the switch spent its cooldown
    md = report_of(state, "llm-provider-failover")
    assert "18 / 20" in md and "major" in md and f"LITELLM_MODEL={BACKUP}" in md and "Outcome: recovered" in md
    events = recovery_events("ferrumdeck.recovery.llm-failover", started)
    assert [(e.payload["from"], e.payload["to"]) for e in events] == [(PRIMARY, BACKUP)]
    assert events[0].resource.id == "ferrumdeck.deployment.ferrumdeck.worker"


def test_failover_whose_new_model_gets_no_steps_is_not_verified(fo, cluster, llm_stub):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20)
    seed_llm_steps(fo, model=BACKUP, ok=20)  # before the switch: proves nothing about the switched workers

    state = llm_provider_failover(dry_run=False, verify_steps=3, verify_within_s=0.5, return_state=True)

    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.NOT_VERIFIED and result.switched and model_env(fo) == BACKUP
    assert [c.name for c in result.failed_checks] == [f"LLM steps of `{BACKUP}` succeed"]
    assert result.steps_after.total == 0
    assert "only 0 LLM steps" in report_of(state, "llm-provider-failover")


def test_failover_whose_new_model_fails_too_is_not_verified(fo, cluster, llm_stub):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20)

    with traffic(fo, model=BACKUP, ok=2, failed=4):
        state = llm_provider_failover(dry_run=False, verify_steps=6, verify_within_s=15, return_state=True)

    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.NOT_VERIFIED and result.rollout_complete
    assert (result.steps_after.failed, result.steps_after.total) == (4, 6)
    assert [c.name for c in result.failed_checks] == [f"LLM steps of `{BACKUP}` succeed"]
    assert "4/6" in result.failed_checks[0].detail and "67% >= 50%" in result.failed_checks[0].detail


def test_failover_dry_run_changes_nothing_anywhere(fo, cluster, llm_stub, redis):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20)
    pods_before = worker_pod_models(cluster)

    state = llm_provider_failover(dry_run=True, return_state=True)
    result = state.result()

    assert result.outcome is Outcome.DRY_RUN and result.decision == "failover" and result.target == BACKUP
    assert not result.switched and result.checks == []
    assert [(a.kind, a.target, a.status) for a in result.actions] == [
        ("set-deployment-env", "deployment/worker", ActionStatus.DRY_RUN)]
    assert model_env(fo) == PRIMARY
    assert worker_pod_models(cluster) == pods_before
    assert Variable.get(fo.llm_active_model_variable) is None
    assert cooldown_keys(fo, redis) == []


def test_failover_kill_switch_refuses(fo, cluster, llm_stub, redis):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20)
    Variable.set(fo.kill_switch_variable, True, overwrite=True)

    state = llm_provider_failover(dry_run=False, return_state=True)
    result = state.result()

    assert state.is_completed() and result.outcome is Outcome.REFUSED and not result.switched
    assert "kill switch" in result.actions[0].detail
    assert model_env(fo) == PRIMARY
    assert Variable.get(fo.llm_active_model_variable) is None
    assert cooldown_keys(fo, redis) == []
    assert "kill switch" in report_of(state, "llm-provider-failover")


def test_failover_stays_when_evidence_is_below_thresholds(fo, cluster):
    seed_llm_steps(fo, model=PRIMARY, failed=4, ok=6)  # 40% < 50%
    seed_llm_steps(fo, model=PRIMARY, failed=50, minutes_ago=60)  # outside the window
    state = llm_provider_failover(dry_run=False, return_state=True)
    result = state.result()
    assert result.outcome is Outcome.NOTHING_TO_DO and result.decision == "stay" and result.actions == []
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
    assert result.decision == expected
    assert result.outcome is (Outcome.DRY_RUN if expected == "failover" else Outcome.NOTHING_TO_DO)


def test_no_healthy_fallback_leaves_the_model_and_fails_the_run(fo, cluster, llm_stub, redis):
    llm_stub[0].outage("openai")
    llm_stub[0].outage("anthropic")
    state = llm_provider_failover(dry_run=False, return_state=True)
    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.NOT_VERIFIED and result.decision == "no-fallback"
    assert result.actions == [] and [c.name for c in result.failed_checks] == ["a healthy fallback model is available"]
    assert model_env(fo) == PRIMARY and cooldown_keys(fo, redis) == []
    md = report_of(state, "llm-provider-failover")
    assert "no healthy fallback" in md and "a human must decide" in md


def test_unreadable_status_page_is_unknown_not_a_crash(fo, cluster):
    s = fo.model_copy(update={"llm_status_urls": {"openai": "http://127.0.0.1:9/openai/api/v2/status.json"}})
    seed_llm_steps(s, model=PRIMARY, failed=20)
    with use_settings(s):
        state = llm_provider_failover(dry_run=True, return_state=True)
    assert state.result().decision == "failover"  # failures are enough; the dead status page is `unknown`
    assert "unknown" in report_of(state, "llm-provider-failover")


def test_budget_allows_one_switch_per_15_minutes(fo, cluster, llm_stub):
    s = fo.model_copy(update={"target_cooldown_s": 0})  # isolate the budget from the cooldown
    with use_settings(s):
        llm_stub[0].outage("openai")
        seed_llm_steps(s, model=PRIMARY, failed=20, minutes_ago=10)
        with traffic(s, model=BACKUP):
            first = llm_provider_failover(dry_run=False, verify_within_s=15)
        assert first.outcome is Outcome.RECOVERED and model_env(s) == BACKUP

        # then the backup fails too while the primary is back: the budget refuses a second switch
        llm_stub[0].restore("openai")
        llm_stub[0].outage("anthropic")
        seed_llm_steps(s, model=BACKUP, failed=20, minutes_ago=1)
        state = llm_provider_failover(dry_run=False, window_minutes=5, return_state=True)
        second = state.result()
    assert state.is_completed() and second.outcome is Outcome.REFUSED
    assert second.decision == "failover" and second.target == PRIMARY and not second.switched
    assert model_env(s) == BACKUP
    budget = llm_failover_budget(s)
    assert f"budget `{budget.name}` exhausted (1 per 900s)" in second.actions[0].detail


def test_repeated_alert_switches_once(fo, cluster, llm_stub, redis):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20)
    with traffic(fo, model=BACKUP):
        results = [llm_provider_failover(dry_run=False, verify_within_s=15) for _ in range(3)]
    assert [r.outcome for r in results] == [Outcome.RECOVERED, Outcome.NOTHING_TO_DO, Outcome.NOTHING_TO_DO]
    assert [r.decision for r in results] == ["failover", "stay", "stay"]  # already on the healthy backup
    assert model_env(fo) == BACKUP and len(cooldown_keys(fo, redis)) == 1


def test_failover_and_failback_share_the_cooldown(fo, cluster, llm_stub):
    llm_stub[0].outage("openai")
    seed_llm_steps(fo, model=PRIMARY, failed=20, minutes_ago=10)
    with traffic(fo, model=BACKUP):
        assert llm_provider_failover(dry_run=False, verify_within_s=15).outcome is Outcome.RECOVERED
    llm_stub[0].restore("openai")
    back = llm_provider_failback(dry_run=False, healthy_for_minutes=0, window_minutes=5)
    assert back.outcome is Outcome.REFUSED and back.decision == "failback"
    assert "cooldown" in back.actions[0].detail and model_env(fo) == BACKUP  # no flapping


def test_bad_parameters_are_rejected_before_anything_runs(fo, cluster):
    with pytest.raises(Exception, match="less than or equal to 1"):
        llm_provider_failover(dry_run=False, error_rate=1.5)
    with pytest.raises(Exception, match="evidence"):
        llm_provider_failover(dry_run=False, evidence="vibes")
    with pytest.raises(Exception, match="greater than or equal to 1"):
        llm_provider_failover(dry_run=False, verify_steps=0)
    assert model_env(fo) == PRIMARY


# --- failback ------------------------------------------------------------------------------------------------


def test_failback_waits_then_returns_to_the_primary(fo, cluster):
    set_model(fo, BACKUP)
    first = llm_provider_failback(dry_run=False, healthy_for_minutes=30)
    assert first.outcome is Outcome.NOTHING_TO_DO and first.decision == "wait" and first.actions == []
    since = datetime.fromisoformat(Variable.get(fo.llm_healthy_since_variable))
    assert abs((datetime.now(UTC) - since).total_seconds()) < 60
    assert model_env(fo) == BACKUP

    # backdate the memory: the primary has now been healthy for 31 minutes
    Variable.set(
        fo.llm_healthy_since_variable, (datetime.now(UTC) - timedelta(minutes=31)).isoformat(), overwrite=True
    )
    started = datetime.now(UTC)
    with traffic(fo, model=PRIMARY):
        state = llm_provider_failback(dry_run=False, healthy_for_minutes=30, verify_within_s=15, return_state=True)
    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.RECOVERED
    assert result.decision == "failback" and result.switched and result.steps_after.total == 5
    assert model_env(fo) == PRIMARY
    assert Variable.get(fo.llm_active_model_variable) == PRIMARY
    assert Variable.get(fo.llm_healthy_since_variable) is None
    cluster.wait_until(lambda: set(worker_pod_models(cluster).values()) == {PRIMARY}, timeout=15)
    assert "31." in report_of(state, "llm-provider-failback")
    events = recovery_events("ferrumdeck.recovery.llm-failback", started)
    assert [(e.payload["from"], e.payload["to"]) for e in events] == [(BACKUP, PRIMARY)]


def test_failback_forgets_when_the_primary_is_still_down(fo, cluster, llm_stub):
    set_model(fo, BACKUP)
    Variable.set(fo.llm_healthy_since_variable, datetime.now(UTC).isoformat(), overwrite=True)
    llm_stub[0].outage("openai")
    result = llm_provider_failback(dry_run=False, healthy_for_minutes=0)
    assert result.outcome is Outcome.NOTHING_TO_DO and result.decision == "primary-unhealthy"
    assert result.actions == [] and not result.switched
    assert Variable.get(fo.llm_healthy_since_variable) is None
    assert model_env(fo) == BACKUP


def test_failback_dry_run_changes_nothing(fo, cluster, redis):
    set_model(fo, BACKUP)
    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    Variable.set(fo.llm_healthy_since_variable, old, overwrite=True)
    state = llm_provider_failback(dry_run=True, healthy_for_minutes=30, return_state=True)
    result = state.result()
    assert result.outcome is Outcome.DRY_RUN and result.decision == "failback" and not result.switched
    assert model_env(fo) == BACKUP and cooldown_keys(fo, redis) == []
    assert Variable.get(fo.llm_healthy_since_variable) == old
    assert Variable.get(fo.llm_active_model_variable) is None


def test_failback_on_primary_is_a_noop(fo, cluster):
    result = llm_provider_failback(dry_run=False)
    assert result.outcome is Outcome.NOTHING_TO_DO and result.decision == "on-primary"
    assert result.actions == [] and model_env(fo) == PRIMARY


def test_failback_kill_switch_refuses_the_switch(fo, cluster):
    set_model(fo, BACKUP)
    Variable.set(fo.kill_switch_variable, True, overwrite=True)
    state = llm_provider_failback(dry_run=False, healthy_for_minutes=0, return_state=True)
    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.REFUSED and result.decision == "failback"
    assert not result.switched and model_env(fo) == BACKUP
    assert Variable.get(fo.llm_healthy_since_variable) is not None  # remembered: it fails back once allowed
    assert "kill switch" in report_of(state, "llm-provider-failback")
