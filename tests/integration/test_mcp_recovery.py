"""mcp-server-recovery against the sandbox cluster and the real MCP stub (``sandbox.mcp``) over HTTP.

The stub's outage ends only when a new Ready mcp-server pod appears (it follows the cluster's pod events),
exactly like a real restart; so "recovered" here means the flow's rollout restart really replaced the pod.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.variables import Variable
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from flows.mcp_recovery import mcp_server_recovery
from sandbox.http_server import serve_app
from sandbox.mcp import MCPServer
from tasks.outcome import ActionStatus, Outcome
from tasks.settings import Settings, use_settings


@pytest.fixture(scope="module")
def mcp_stub(sandbox_cluster):
    server = MCPServer()
    sandbox_cluster.add_listener(server.on_pod_event)
    served = serve_app(server.app(), name="mcp-test")
    yield server, served.url
    server.restore()
    served.stop()


@pytest.fixture(scope="module")
def always_sick():
    """An MCP server that a restart does not cure (its /health always answers 503)."""

    async def health(request):
        return JSONResponse({"status": "broken"}, status_code=503)

    served = serve_app(Starlette(routes=[Route("/health", health)]), name="mcp-sick")
    yield served.url
    served.stop()


@pytest.fixture
def ms(kube_settings, mcp_stub, cluster):
    server, url = mcp_stub
    server.restore()
    s = kube_settings.model_copy(
        update={"mcp_url": f"{url}/health", "mcp_check_interval_s": 0.01, "rollout_timeout_s": 30.0}
    )
    with use_settings(s):
        yield s
    Variable.unset(s.kill_switch_variable)


def mcp_pods(cluster) -> set[str]:
    return {p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server")}


def rollout_state(cluster) -> tuple:
    """The mcp-server Deployment's generation, template annotations and ReplicaSets: a rollout restart changes all."""
    d = cluster.deployment("mcp-server")
    sets = sorted(r["metadata"]["name"] for r in cluster.replicasets() if r["metadata"]["name"].startswith("mcp-server-"))
    return d["metadata"].get("generation"), d["spec"]["template"]["metadata"].get("annotations"), sets


def outage(cluster, server: MCPServer) -> None:
    server.outage(current_pods=mcp_pods(cluster))


def report_of(state, key: str = "mcp-server-recovery") -> str:
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


def mcp_restart_events(since: datetime, timeout: float = 15.0) -> list:
    """``ferrumdeck.recovery.mcp-restart`` events stored since ``since`` (stored asynchronously: poll)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    deadline = time.monotonic() + timeout
    while True:
        occurred = EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(minutes=1))
        flt = EventFilter(event=EventNameFilter(name=["ferrumdeck.recovery.mcp-restart"]), occurred=occurred)
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=flt, limit=50).events
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.2)  # poll


def test_healthy_server_is_a_noop_and_says_so(ms, cluster, mcp_stub):
    before = mcp_pods(cluster)
    state = mcp_server_recovery(dry_run=False, attempts=3, return_state=True)
    result = state.result()
    assert result.outcome is Outcome.NOTHING_TO_DO and result.healthy_before and not result.restarted
    assert result.actions == [] and [c.ok for c in result.checks] == [True]
    assert mcp_pods(cluster) == before
    assert cluster.deployment("mcp-server")["spec"]["template"]["metadata"].get("annotations") in (None, {})
    md = report_of(state)
    assert "nothing to do" in md and "3/3 checks ok" in md


def test_outage_is_cured_by_a_rollout_restart(ms, cluster, mcp_stub):
    server, _ = mcp_stub
    before = mcp_pods(cluster)
    outage(cluster, server)
    started = datetime.now(UTC)

    state = mcp_server_recovery(dry_run=False, attempts=3, deadline_s=15, return_state=True)
    result = state.result()

    assert state.is_completed()
    assert result.outcome is Outcome.RECOVERED and result.restarted and result.rollout_complete and result.healthy_after
    assert not server.down and server.restarts_seen >= 1
    cluster.wait_until(lambda: mcp_pods(cluster) and not (mcp_pods(cluster) & before), timeout=15)
    annotations = cluster.deployment("mcp-server")["spec"]["template"]["metadata"]["annotations"]
    assert "kubectl.kubernetes.io/restartedAt" in annotations
    md = report_of(state)
    assert "0/3 checks ok" in md and "HTTP 503" in md and "Outcome: recovered" in md
    events = mcp_restart_events(started)
    assert len(events) == 1 and events[0].resource.id == "ferrumdeck.deployment.ferrumdeck.mcp-server"


def test_dry_run_restarts_nothing(ms, cluster, mcp_stub):
    server, _ = mcp_stub
    before = mcp_pods(cluster)
    generation = cluster.deployment("mcp-server")["metadata"].get("generation")
    outage(cluster, server)

    state = mcp_server_recovery(dry_run=True, attempts=2, return_state=True)

    assert state.result().outcome is Outcome.DRY_RUN and not state.result().restarted
    assert mcp_pods(cluster) == before and server.down
    assert cluster.deployment("mcp-server")["metadata"].get("generation") == generation
    assert [(a.kind, a.target, a.status) for a in state.result().actions] == [
        ("rollout-restart", "deployment/mcp-server", ActionStatus.DRY_RUN)]
    assert "rollout-restart | deployment/mcp-server | dry_run" in report_of(state)


def test_kill_switch_refuses_the_restart(ms, cluster, mcp_stub):
    server, _ = mcp_stub
    before = mcp_pods(cluster)
    outage(cluster, server)
    Variable.set(ms.kill_switch_variable, True, overwrite=True)

    state = mcp_server_recovery(dry_run=False, attempts=1, return_state=True)

    assert state.is_completed() and state.result().outcome is Outcome.REFUSED
    assert mcp_pods(cluster) == before and server.down
    assert "kill switch" in report_of(state)


def test_alert_storm_restarts_once(ms, cluster, mcp_stub):
    server, _ = mcp_stub
    outage(cluster, server)
    first = mcp_server_recovery(dry_run=False, attempts=1, deadline_s=15)
    assert first.outcome is Outcome.RECOVERED
    # what a restart changes: the Deployment's template (restartedAt) and generation, and a new ReplicaSet (its
    # pods may still be rolling when the first run has verified health, so they are not compared)
    after_first = rollout_state(cluster)

    # the same alert fires twice more; the server is sick again but within the cooldown nothing restarts
    outage(cluster, server)
    again = [mcp_server_recovery(dry_run=False, attempts=1) for _ in range(2)]
    assert [r.outcome for r in again] == [Outcome.REFUSED, Outcome.REFUSED]
    assert all("cooldown" in r.actions[0].detail for r in again)
    assert rollout_state(cluster) == after_first


def test_restart_that_does_not_help_fails_the_run_after_reporting(ms, cluster, always_sick):
    s = ms.model_copy(update={"mcp_url": f"{always_sick}/health"})
    with use_settings(s):
        state = mcp_server_recovery(dry_run=False, attempts=2, deadline_s=0.5, return_state=True)
    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.NOT_VERIFIED and result.restarted
    assert [c.name for c in result.failed_checks] == ["MCP server healthy after the restart"]
    assert "Outcome: not_verified" in report_of(state)


def test_nothing_listening_is_unhealthy(ms, cluster):
    s = ms.model_copy(update={"mcp_url": "http://127.0.0.1:9/health"})
    with use_settings(s):
        state = mcp_server_recovery(dry_run=True, attempts=2, return_state=True)
    result = state.result()
    assert not result.healthy_before and result.outcome is Outcome.DRY_RUN
    assert "ConnectError" in report_of(state)


def test_bad_parameters_are_rejected(ms):
    with pytest.raises(Exception, match="less than or equal to 20"):
        mcp_server_recovery(dry_run=False, attempts=50)
    assert isinstance(ms, Settings)
