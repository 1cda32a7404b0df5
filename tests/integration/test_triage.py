"""worker-failure-triage: observe once, plan (shown always; only that with dry_run), run every planned subflow,
and end with an outcome computed from the subflows' typed results (Failed when any of them failed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from flows.triage import worker_failure_triage
from sandbox.http_server import serve_app
from sandbox.mcp import MCPServer
from tasks.outcome import ActionStatus, Outcome
from tasks.settings import use_settings
from tests.integration import _recovery_fixtures as fx
from tests.integration import runs_fixtures as rf_worker
from tests.integration._recovery_fixtures import (
    ReplacementConsumer,
    deletions,
    queue_state,
    run_status,
    seed_pending,
    worker_pods,
)
from tests.integration.test_incident_timeline import persisting, post_alert, stored, ui
from tests.integration.test_mcp_recovery import report_of

pytestmark = pytest.mark.timeout(150)
env = fx.env  # the per-test settings fixture
CRASH, MCP, CHECK = "worker-crash-recovery", "mcp-server-recovery", "post-recovery-check"
TIMELINE = "incident-timeline"


@pytest.fixture(autouse=True)
def timeline_dir(tmp_path, monkeypatch) -> Path:
    """Triage ends with the incident timeline: its postmortem files go to this test's directory."""
    monkeypatch.setenv("FD_TIMELINE_DIR", str(tmp_path / "incidents"))
    return tmp_path / "incidents"


@pytest.fixture(scope="module")
def sick_mcp():
    """An MCP server a restart does not cure: its /health always answers 503."""

    async def health(request):
        return JSONResponse({"status": "broken"}, status_code=503)

    served = serve_app(Starlette(routes=[Route("/health", health)]), name="mcp-sick-triage")
    yield f"{served.url}/health"
    served.stop()


@flow(name="mcp-server-recovery")
def exploding_mcp_recovery(dry_run: bool = True) -> None:
    """Stands in for mcp-server-recovery: raises before it can return a result."""
    raise RuntimeError("the MCP recovery blew up")


def crashed_worker(cluster, redis, s):
    a, *_ = worker_pods(cluster, s)
    steps = seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=3, tag="t", redeliver={1: 1})
    cluster.crash_loop(a, exit_code=137, reason="OOMKilled")
    fx.wait_for(lambda: a not in worker_pods(cluster, s), what="crash loop")
    return a, steps


def flow_runs(result) -> dict[str, str]:
    """flow name -> final state type of each subflow run triage recorded, read back from the Prefect API."""
    with get_client(sync_client=True) as client:
        return {s.flow: client.read_flow_run(s.flow_run_id).state.type.value for s in result.steps}


def assert_crash_recovered(redis, cluster, s, a, steps) -> None:
    """The crash subflow really acted: entries requeued at once, the poison (delivered twice) dead-lettered."""
    state = queue_state(redis, s)
    assert state["pending"] == [] and [f["job_id"] for _, f in state["dlq"]] == [steps[1]["job_id"]]
    assert deletions(cluster) == [a]
    assert run_status(s, [steps[1]["run_id"]])[steps[1]["run_id"]] == ("failed", "WORKER_TIMEOUT")


def test_dry_run_publishes_the_plan_and_changes_nothing(env, cluster, redis):
    s = env
    a, steps = crashed_worker(cluster, redis, s)
    rf_worker.record_step_running(settings=s, run_id="run_old", step_id="step_old", now=datetime.now(UTC) - timedelta(hours=1))
    mcp = MCPServer()
    served = serve_app(mcp.app(), name="mcp")
    mcp.outage(current_pods=[p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server")])
    before, pods_before = queue_state(redis, s), worker_pods(cluster, s, ready_only=False)
    try:
        with use_settings(s.model_copy(update={"mcp_url": f"{served.url}/health", "mcp_check_interval_s": 0.0})):
            state = worker_failure_triage(dry_run=True, alertname="WorkerCrashLooping", return_state=True)
    finally:
        served.stop()
    result = state.result()
    plan = [(p.flow, p.parameters) for p in result.plan]
    assert plan == [(MCP, {}), (CRASH, {"pod": a}), ("stuck-runs-sweep", {}), (CHECK, {})]
    assert "oom-killed" in result.plan[1].why and result.steps == []
    assert state.is_completed() and result.outcome is Outcome.DRY_RUN
    assert [(x.kind, x.status) for x in result.actions] == [(p[0], ActionStatus.DRY_RUN) for p in plan]
    assert queue_state(redis, s) == before and worker_pods(cluster, s, ready_only=False) == pods_before
    assert deletions(cluster) == [] and run_status(s, ["run_old"]) == {"run_old": ("running", None)}
    assert "Outcome: dry_run" in report_of(state, key="worker-failure-triage")
    assert "| MCP healthy | no |" in report_of(state, key="worker-failure-triage")
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "worker-failure-triage-plan" and "worker-crash-recovery" in (a.data or "") for a in artifact)


def test_runs_the_plan_as_subflows_and_ends_with_the_post_recovery_check(env, cluster, redis):
    s = env
    a, steps = crashed_worker(cluster, redis, s)
    with ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
        state = worker_failure_triage(dry_run=False, check_mcp=False, return_state=True,
                                      subflow_parameters={CRASH: {"verify_consuming_s": 15}})
    result = state.result()
    assert [(st.flow, st.outcome) for st in result.steps] == [(CRASH, Outcome.RECOVERED), (CHECK, Outcome.NOTHING_TO_DO)]
    assert state.is_completed() and result.outcome is Outcome.RECOVERED and result.failing_steps == []
    assert result.steps[0].parameters == {"pod": a, "verify_consuming_s": 15, "dry_run": False}
    assert [(x.kind, x.target, x.status) for x in result.actions] == [(CRASH, f"{CRASH} pod/{a}", ActionStatus.DONE)]
    assert [(c.name, c.ok) for c in result.checks] == [(f"{CRASH} verified", True), (f"{CHECK} verified", True)]
    assert flow_runs(result) == {CRASH: "COMPLETED", CHECK: "COMPLETED"}
    assert_crash_recovered(redis, cluster, s, a, steps)


def test_an_mcp_restart_that_does_not_cure_fails_triage_and_the_rest_still_runs(env, cluster, redis, sick_mcp):
    s = env.model_copy(update={"mcp_url": sick_mcp, "mcp_check_interval_s": 0.0, "rollout_timeout_s": 30.0})
    a, steps = crashed_worker(cluster, redis, s)
    with use_settings(s), ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
        state = worker_failure_triage(dry_run=False, check_llm=False, return_state=True, subflow_parameters={
            MCP: {"attempts": 1, "deadline_s": 0.5}, CRASH: {"verify_consuming_s": 15}})

    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert [p.flow for p in result.plan] == [MCP, CRASH, CHECK]
    # the failing subflow is named, with its own typed outcome and why
    [failing] = result.failing_steps
    assert failing.flow == MCP and failing.outcome is Outcome.NOT_VERIFIED and failing.state == "failed"
    assert "MCP server healthy after the restart" in failing.cause
    # the others still ran after it, and verified: crash recovered, checklist holds
    assert [(st.flow, st.outcome) for st in result.steps[1:]] == [(CRASH, Outcome.RECOVERED), (CHECK, Outcome.NOTHING_TO_DO)]
    assert flow_runs(result) == {MCP: "FAILED", CRASH: "COMPLETED", CHECK: "COMPLETED"}
    assert_crash_recovered(redis, cluster, s, a, steps)
    # one target not verified, the others verified: partial, and the run Failed after its report
    assert result.outcome is Outcome.PARTIAL
    assert [c.ok for c in result.checks] == [False, True, True]
    assert "Outcome: partial" in report_of(state, key="worker-failure-triage")


def test_a_subflow_that_raises_is_recorded_failed_and_the_check_still_runs(env, cluster, redis, sick_mcp, mocker):
    mocker.patch.dict("flows.triage.FLOWS", {MCP: f"{__name__}:exploding_mcp_recovery"})
    s = env.model_copy(update={"mcp_url": sick_mcp, "mcp_check_interval_s": 0.0})
    with use_settings(s):
        state = worker_failure_triage(dry_run=False, check_llm=False, return_state=True)

    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert [st.flow for st in result.steps] == [MCP, CHECK]
    raised, check = result.steps
    assert raised.state == "failed" and raised.outcome is Outcome.FAILED
    assert raised.cause == "RuntimeError: the MCP recovery blew up"
    assert [st.flow for st in result.failing_steps] == [MCP]
    assert check.outcome is Outcome.NOTHING_TO_DO and flow_runs(result) == {MCP: "FAILED", CHECK: "COMPLETED"}
    assert result.outcome is Outcome.FAILED
    assert [(x.kind, x.status) for x in result.actions] == [(MCP, ActionStatus.FAILED)]


def test_stop_on_failure_skips_the_recoveries_after_a_failure_but_still_checks(env, cluster, redis, sick_mcp, mocker):
    mocker.patch.dict("flows.triage.FLOWS", {MCP: f"{__name__}:exploding_mcp_recovery"})
    s = env.model_copy(update={"mcp_url": sick_mcp, "mcp_check_interval_s": 0.0})
    a, _steps = crashed_worker(cluster, redis, s)
    before = queue_state(redis, s)
    with use_settings(s):
        state = worker_failure_triage(dry_run=False, check_llm=False, stop_on_failure=True, return_state=True)

    result = state.result(raise_on_failure=False)
    assert state.is_failed() and result.outcome is Outcome.FAILED
    assert [(st.flow, st.state) for st in result.steps] == [(MCP, "failed"), (CRASH, "skipped"), (CHECK, "failed")]
    assert result.steps[1].flow_run_id is None and queue_state(redis, s) == before and deletions(cluster) == []
    assert result.steps[2].outcome is Outcome.NOT_VERIFIED  # the crashed worker is still there, and the check says so
    assert [st.flow for st in result.failing_steps] == [MCP, CHECK]


def test_triage_ends_with_the_incident_timeline_of_its_run(env, cluster, redis, tmp_path, timeline_dir):
    s = env
    since = datetime.now(UTC)
    a, steps = crashed_worker(cluster, redis, s)
    post_alert("WorkerOutOfMemory", pod=a)  # an alert no recovery is routed to: triage's
    stored({"ferrumdeck.alert.firing": 1}, since=since)
    with persisting(tmp_path / "results"), ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
        state = worker_failure_triage(dry_run=False, check_mcp=False, alertname="WorkerOutOfMemory", return_state=True,
                                      subflow_parameters={CRASH: {"verify_consuming_s": 15}, TIMELINE: {"since": since.isoformat()}})

    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.RECOVERED  # the timeline changes no outcome
    assert [st.flow for st in result.steps] == [CRASH, CHECK] and len(result.checks) == 2
    assert_crash_recovered(redis, cluster, s, a, steps)
    tl = result.timeline
    assert tl.outcome is Outcome.NOTHING_TO_DO and tl.link == f"{ui()}/runs/flow-run/{tl.flow_run_id}"
    # the crash recovery's typed counts: 2 requeued at once, the poison dead-lettered, its run failed
    assert (tl.counts.requeued, tl.counts.dead_lettered, tl.counts.runs_failed) == (2, 1, 1)
    assert tl.mttr_s is not None and tl.mttr_s > 0 and tl.summary.startswith("MTTR ")
    assert Path(tl.markdown_path).parent == timeline_dir
    md = Path(tl.markdown_path).read_text()
    assert md.startswith("# Incident timeline of worker-failure-triage")
    assert "WorkerOutOfMemory firing" in md and f"worker {a} oom-killed" in md
    for st in result.steps:  # every subflow linked, with its outcome
        assert f"{ui()}/runs/flow-run/{st.flow_run_id}" in md and f"| {st.flow}: {st.outcome.value} |" in md
    assert md.index("WorkerOutOfMemory firing") < md.index(f"{CRASH} started") < md.index(f"{CHECK} started")
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(tl.flow_run_id).parent_task_run_id is not None  # a subflow of this triage
    assert f"Incident timeline: {tl.summary}" in report_of(state, key="worker-failure-triage")
