"""worker-failure-triage: observe once, plan (shown always; only that with dry_run), run subflows, end checked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client

from flows.triage import worker_failure_triage
from sandbox.http_server import serve_app
from sandbox.mcp import MCPServer
from tasks import runs
from tasks.settings import use_settings
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import deletions, queue_state, run_status, seed_pending, worker_pods

pytestmark = pytest.mark.timeout(150)
env = fx.env  # the per-test settings fixture


def crashed_worker(cluster, redis, s):
    a, *_ = worker_pods(cluster, s)
    steps = seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=3, tag="t", redeliver={1: 1})
    cluster.crash_loop(a, exit_code=137, reason="OOMKilled")
    fx.wait_for(lambda: a not in worker_pods(cluster, s), what="crash loop")
    return a, steps


def test_dry_run_publishes_the_plan_and_changes_nothing(env, cluster, redis):
    s = env
    a, steps = crashed_worker(cluster, redis, s)
    runs.record_step_running(settings=s, run_id="run_old", step_id="step_old", now=datetime.now(UTC) - timedelta(hours=1))
    mcp = MCPServer()
    served = serve_app(mcp.app(), name="mcp")
    mcp.outage(current_pods=[p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server")])
    before, pods_before = queue_state(redis, s), worker_pods(cluster, s, ready_only=False)
    try:
        with use_settings(s.model_copy(update={"mcp_url": f"{served.url}/health", "mcp_check_interval_s": 0.0})):
            result = worker_failure_triage(dry_run=True, alertname="WorkerCrashLooping")
    finally:
        served.stop()
    plan = [(p.flow, p.parameters) for p in result.plan]
    assert plan == [
        ("mcp-server-recovery", {}),
        ("worker-crash-recovery", {"pod": a}),
        ("stuck-runs-sweep", {}),
        ("post-recovery-check", {}),
    ]
    assert "oom-killed" in result.plan[1].why and result.steps == []
    assert queue_state(redis, s) == before and worker_pods(cluster, s, ready_only=False) == pods_before
    assert deletions(cluster) == [] and run_status(s, ["run_old"]) == {"run_old": ("running", None)}
    assert "plan only (dry run)" in result.report and "MCP healthy | False" in result.report
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "worker-failure-triage-plan" and "worker-crash-recovery" in (a.data or "") for a in artifact)


def test_runs_the_plan_as_subflows_and_ends_with_the_post_recovery_check(env, cluster, redis):
    s = env
    a, steps = crashed_worker(cluster, redis, s)
    result = worker_failure_triage(dry_run=False, check_mcp=False,
                                   subflow_parameters={"worker-crash-recovery": {"verify_consuming_s": 0}})
    assert [(st.flow, st.status) for st in result.steps] == [
        ("worker-crash-recovery", "completed"), ("post-recovery-check", "completed")]
    assert result.steps[0].parameters == {"pod": a, "verify_consuming_s": 0, "dry_run": False}
    assert result.steps[0].summary == "recovered"
    # the crash subflow really acted: entries requeued at once, the poison (delivered twice) dead-lettered
    state = queue_state(redis, s)
    assert state["pending"] == [] and [f["job_id"] for _, f in state["dlq"]] == [steps[1]["job_id"]]
    assert deletions(cluster) == [a]
    assert run_status(s, [steps[1]["run_id"]])[steps[1]["run_id"]] == ("failed", "WORKER_TIMEOUT")
    # and the check ran last, on the recovered system (3 workers Ready again)
    assert "post-recovery-check:" in result.report and "completed" in result.report
