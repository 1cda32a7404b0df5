"""post-recovery-check against the sandbox cluster, real Redis, PostgreSQL and the real alert bridge."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
from prefect.flow_runs import resume_flow_run

from deployments.bridge import BridgeSettings, create_app
from flows.post_recovery_check import ALERTING, PREVENTION, ROOT_CAUSE, post_recovery_check
from sandbox.http_server import serve_app
from tasks.outcome import Outcome
from tasks.settings import use_settings
from tests.integration import _recovery_fixtures as fx
from tests.integration import runs_fixtures as rf_worker
from tests.integration._recovery_fixtures import worker_pods
from tests.integration.test_mcp_recovery import report_of

pytestmark = pytest.mark.timeout(120)
env = fx.env  # the per-test settings fixture
TOKEN = "t0ken-for-the-bridge-tests"


@pytest.fixture(scope="module")
def bridge():
    """The real alert bridge, served on a free port (heartbeats need no Prefect API)."""
    served = serve_app(create_app(BridgeSettings(token=TOKEN)), name="bridge")
    yield served
    served.stop()


def send_watchdog(bridge_url: str) -> None:
    now = datetime.now(UTC).isoformat()
    body = {
        "version": "4", "groupKey": "{}:{alertname=\"Watchdog\"}", "status": "firing", "receiver": "fd-bridge",
        "groupLabels": {}, "commonLabels": {"alertname": "Watchdog"}, "commonAnnotations": {}, "externalURL": "",
        "truncatedAlerts": 0,
        "alerts": [{"status": "firing", "labels": {"alertname": "Watchdog"}, "annotations": {}, "startsAt": now,
                    "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": "wd0001"}],
    }
    r = httpx.post(f"{bridge_url}/alertmanager", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert r.status_code == 200 and r.json()["heartbeats"] == 1


def consume_once(redis, s, pods):
    """Each worker takes one step and acknowledges it (as FerrumDeck workers do continuously)."""
    for i, pod in enumerate(pods):
        redis.xadd(s.stream, {"job_id": f"w{i}", "run_id": f"wr{i}", "step_id": f"w{i}"})
        for _, batch in redis.xreadgroup(s.group, s.consumer_for_pod(pod), {s.stream: ">"}, count=1):
            redis.xack(s.stream, s.group, *[entry_id for entry_id, _ in batch])


WORKERS, QUEUE, STUCK = "All workers healthy and processing", "Queue depth returning to normal", "No runs stuck in invalid states"


def test_everything_healthy_ticks_the_four_checks_with_evidence(env, cluster, redis, bridge):
    send_watchdog(bridge.url)
    s = env.model_copy(update={"alerting_check": "bridge", "bridge_heartbeat_url": f"{bridge.url}/heartbeat"})
    pods = worker_pods(cluster, s)
    consume_once(redis, s, pods)
    with use_settings(s):
        state = post_recovery_check(return_state=True)
    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.NOTHING_TO_DO and result.actions == []
    by = {c.name: c for c in result.checks}
    assert list(by) == [WORKERS, QUEUE, STUCK, ALERTING] and all(c.ok for c in result.checks)
    assert by[WORKERS].detail == "3 worker pods Ready and consuming"
    assert "lag 0" in by[QUEUE].detail and "last heartbeat alert" in by[ALERTING].detail
    assert result.open_items == [ROOT_CAUSE, PREVENTION]
    # the report shows the checklist once (checks, then what is left to a person), as tables, no stray markup
    md = report_of(state, key="post-recovery-check")
    for item in (WORKERS, QUEUE, STUCK, ALERTING, ROOT_CAUSE, PREVENTION):
        assert md.count(item) == 1, item
    assert "Outcome: nothing_to_do" in md
    assert not [line for line in md.splitlines() if line.startswith("|") and "**" in line]


def test_failures_name_the_pod_the_backlog_the_stuck_run_and_the_missing_heartbeat(env, cluster, redis):
    s = env.model_copy(update={"alerting_check": "bridge"})
    pods = worker_pods(cluster, s)
    consume_once(redis, s, pods)
    bad = pods[0]
    cluster.crash_loop(bad)
    for i in range(5):
        redis.xadd(s.stream, {"job_id": f"j{i}", "run_id": f"r{i}", "step_id": f"j{i}"})
    rf_worker.record_step_running(settings=s, run_id="run_stuck_1", step_id="step_stuck_1",
                             now=datetime.now(UTC) - timedelta(hours=2))
    silent = serve_app(create_app(BridgeSettings(token=TOKEN)), name="bridge-silent")  # never saw a heartbeat
    try:
        s = s.model_copy(update={"bridge_heartbeat_url": f"{silent.url}/heartbeat"})
        fx.wait_for(lambda: bad not in worker_pods(cluster, s), what="crash loop")
        with use_settings(s):
            state = post_recovery_check(max_queue_depth=2, return_state=True)
    finally:
        silent.stop()
    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.NOT_VERIFIED and result.actions == []
    by = {c.name: c for c in result.failed_checks}
    assert list(by) == [WORKERS, QUEUE, STUCK, ALERTING]
    assert bad in by[WORKERS].detail and "lag 5 (threshold 2)" in by[QUEUE].detail
    assert "run_stuck_1" in by[STUCK].detail and "no heartbeat" in by[ALERTING].detail
    assert "Outcome: not_verified" in report_of(state, key="post-recovery-check")


def test_open_human_items_and_a_disabled_alerting_check_do_not_fail_the_run(env, cluster, redis):
    s = env  # FD_ALERTING_CHECK=none in these tests
    consume_once(redis, s, worker_pods(cluster, s))
    state = post_recovery_check(return_state=True)
    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.NOTHING_TO_DO
    assert [c.name for c in result.checks] == [WORKERS, QUEUE, STUCK]
    assert result.open_items == [ALERTING, ROOT_CAUSE, PREVENTION]


def test_interactive_run_asks_the_human_items_through_a_form(env, cluster, redis):
    s = env
    consume_once(redis, s, worker_pods(cluster, s))
    box: dict = {}

    def run() -> None:
        with use_settings(s):
            box["state"] = post_recovery_check(interactive=True, human_timeout_s=60, return_state=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def paused_run():
        with get_client(sync_client=True) as client:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"]))))
        return next((r for r in found if r.name == "post-recovery check"), None)

    flow_run = fx.wait_for(paused_run, timeout=60, what="the flow to pause for input")
    resume_flow_run(flow_run.id, run_input={"root_cause_documented": True, "root_cause_link": "INC-7",
                                             "preventive_measures_identified": True, "notes": "raise memory limit"})
    thread.join(60)
    state = box["state"]
    result = state.result()
    by = {i.item: i for i in result.items}
    assert by[ROOT_CAUSE].ok is True and "INC-7" in by[ROOT_CAUSE].evidence
    assert by[PREVENTION].ok is True and result.operator_notes == "raise memory limit"
    assert by[ALERTING].ok is None and result.open_items == [ALERTING]  # FD_ALERTING_CHECK=none: open, not ticked
    assert result.outcome is Outcome.NOTHING_TO_DO
    assert "raise memory limit" in report_of(state, key="post-recovery-check")


def test_a_transient_kubernetes_error_is_retried_and_a_persistent_one_fails_after_reporting(env, cluster, redis):
    s = env
    consume_once(redis, s, worker_pods(cluster, s))
    cluster.fail_api(500, count=1, path_contains="/pods")
    result = post_recovery_check()
    assert result.checks[0].name == WORKERS and result.checks[0].ok  # the observe task failed once (HTTP 500),
    # was retried, then saw 3 pods
    cluster.fail_api(500, count=50, path_contains="/pods")
    try:
        state = post_recovery_check(return_state=True)
    finally:
        cluster.clear_faults()
    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.FAILED and "500" in (result.error or "") and result.checks == []
    assert "Outcome: failed" in report_of(state, key="post-recovery-check")
