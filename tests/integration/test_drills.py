"""Drills end to end on the whole stack: a real `prefect server start`, the sandbox FerrumDeck under load, the
alert bridge and `fd-recovery serve` — the alert goes through the bridge, the prefect.yaml trigger starts the
recovery flow in the runner, and the state that matters (pods, pending lists, DLQ, step rows) is asserted.

One stack for the module (starting it costs ~30-60 s on 2 cores); every wait polls with a deadline.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest
import sqlalchemy as sa

from deployments.alerts import AlertmanagerWebhook
from sandbox.drills import (
    DrillError,
    account,
    alertmanager_body,
    consumer_step_ids,
    orphaned_consumers,
    post_alert,
    run_drill,
    step_rows,
    table,
)
from sandbox.stack import Stack, StackError, wait_until
from tasks.connections import db_engine
from tasks.runs import tables

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack.start(state_dir=tmp_path_factory.mktemp("stack"), load_rate_per_s=5.0)
    children = list(s._children)
    try:
        yield s
    finally:
        s.stop()
    # stopping leaves nothing of ours running: the server and the runner have exited
    assert all(c.popen.poll() is not None for c in children)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{s.api_url}/health", timeout=2)


def worker_pod_names(stack: Stack) -> set[str]:
    s = stack.flow_settings
    return {p["metadata"]["name"] for p in stack.services.cluster.pods(namespace=s.namespace, selector=s.worker_selector)}


def test_alertmanager_body_is_what_the_bridge_accepts() -> None:
    body = alertmanager_body("WorkerCrashLooping", labels={"pod": "worker-1"})
    parsed = AlertmanagerWebhook.model_validate(body)
    alert = parsed.alerts[0]
    assert parsed.version == "4" and alert.status == "firing"
    assert alert.labels == {"alertname": "WorkerCrashLooping", "team": "ferrumdeck", "namespace": "ferrumdeck",
                            "pod": "worker-1"}
    # the fingerprint follows the labels (as Alertmanager's does): another pod is another alert
    other = alertmanager_body("WorkerCrashLooping", labels={"pod": "worker-2"})["alerts"][0]["fingerprint"]
    assert alert.fingerprint != other


def test_crash_drill_recovers_the_50_held_steps_through_alert_trigger_and_runner(stack: Stack) -> None:
    before = worker_pod_names(stack)
    result = run_drill(stack, "crash", say=lambda _m: None)

    assert result.ok, result.problems
    assert result.recovered and result.mttr_s is not None and result.mttr_s > 0
    assert result.flow_runs and result.flow_runs[0].endswith("(Completed)")
    assert result.checks["held_by_crashed_worker"] >= 40  # a full batch, less at most one flush of 10
    assert result.checks["held_completed_by_others"] == result.checks["held_by_crashed_worker"]
    assert result.steps.lost == 0 and result.steps.total >= 150
    assert result.steps.completed == result.steps.total - result.steps.queued - result.steps.in_flight
    # the crash-looping pod was replaced by a new one and its consumer is gone from the group
    crashed = result.flow_runs[0].split()[1]
    assert crashed in before and crashed not in worker_pod_names(stack)
    s = stack.flow_settings
    assert crashed not in {c["name"] for c in stack.services.redis.xinfo_consumers(s.stream, s.group)}
    assert "crash" in table([result]) and "WorkerCrashLooping" in table([result])


def test_mcp_drill_restarts_the_server_and_tool_steps_work_again(stack: Stack) -> None:
    result = run_drill(stack, "mcp_outage", say=lambda _m: None)

    assert result.ok, result.problems
    assert result.checks["tool_steps_failed_during_outage"] >= 1
    assert result.checks["tool_steps_ok_after_restart"] == 10
    assert httpx.get(stack.flow_settings.mcp_url, timeout=5).status_code == 200
    assert not stack.services.mcp.down and stack.services.mcp.restarts_seen >= 1
    assert result.steps.lost == 0
    # failures are the outage's tool steps, recorded with their error; none of the other steps failed
    steps = tables(stack.flow_settings).steps
    with db_engine(stack.flow_settings).connect() as conn:
        failed = conn.execute(sa.select(steps.c.kind, steps.c.error).where(
            steps.c.status == "failed", steps.c.completed_at >= datetime.fromisoformat(result.fault_at))).all()
    assert len(failed) >= result.checks["tool_steps_failed_during_outage"]
    assert {(kind, (error or {}).get("code")) for kind, error in failed} == {("tool", "MCP_UNAVAILABLE")}


def test_accounting_counts_a_step_held_by_a_consumer_without_pod_as_lost(stack: Stack) -> None:
    """The drills' 'lost' must be able to say no: a step pending under a consumer whose pod never existed."""
    s, client = stack.flow_settings, stack.services.redis
    ghost, step_id, run_id = f"ghost-{uuid.uuid4().hex[:6]}", f"step_ghost_{uuid.uuid4().hex[:8]}", "run_ghost"
    t = tables(s)
    with db_engine(s).begin() as conn:
        conn.execute(sa.insert(t.runs).values(id=run_id, status="queued"))
        conn.execute(sa.insert(t.steps).values(id=step_id, run_id=run_id, status="queued", kind="llm", attempts=0))
    # add it and deliver it to the ghost atomically, so no live worker can take it first
    with client.pipeline(transaction=True) as pipe:
        pipe.xadd(s.stream, {"job_id": step_id, "run_id": run_id, "step_id": step_id, "payload": "{}"})
        pipe.xreadgroup(s.group, ghost, {s.stream: ">"}, count=10_000)
        entry_id, got = pipe.execute()
    others = [(i, f) for _, entries in got for i, f in entries if i != entry_id]
    if others:  # load steps the ghost took along: requeue them as the recoveries do (re-add, then ack)
        with client.pipeline(transaction=True) as pipe:
            for _i, f in others:
                pipe.xadd(s.stream, f)
            pipe.xack(s.stream, s.group, *[i for i, _ in others])
            pipe.execute()
    try:
        acc = account(stack, [step_id])
        assert acc.lost == 1 and acc.completed == 0 and acc.in_flight == 0
        assert ghost in acc.lost_samples[0]
        assert orphaned_consumers(stack).get(ghost) == 1
        assert consumer_step_ids(stack, ghost) == [step_id]
    finally:
        client.xack(s.stream, s.group, entry_id)
        client.xgroup_delconsumer(s.stream, s.group, ghost)
        with db_engine(s).begin() as conn:
            conn.execute(sa.update(t.steps).where(t.steps.c.id == step_id).values(status="completed"))
    assert account(stack, [step_id]).completed == 1
    assert step_rows(stack, [step_id])[step_id][0] == "completed"


def test_bridge_refusal_is_a_drill_error(stack: Stack) -> None:
    token, stack.bridge_token = stack.bridge_token, "wrong-token-wrong-token"
    try:
        with pytest.raises(DrillError, match="401"):
            post_alert(stack, "WorkerHung", labels={"pod": "x"})
    finally:
        stack.bridge_token = token


def test_a_foreign_non_empty_directory_is_never_wiped(tmp_path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StackError, match="refusing"):
        Stack.start(state_dir=tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.skipif(
    shutil.which("prometheus-alertmanager") is None and shutil.which("alertmanager") is None,
    reason="Alertmanager not installed (Debian: apt-get install prometheus-alertmanager; .ci/run installs it)",
)
def test_an_alert_posted_to_real_alertmanager_recovers_the_crashed_pod(stack: Stack, tmp_path) -> None:
    """The whole alert path: Alertmanager's API -> its webhook -> the bridge -> Prefect event -> the
    prefect.yaml trigger -> `worker-crash-recovery` in the runner -> DELETE of the pod at the cluster API."""
    from tests.e2e.test_alertmanager import Alertmanager

    services, cluster = stack.services, stack.services.cluster
    [pod, *_] = services.wait_for_workers(3, timeout_s=60)
    services.crash(pod)
    start = len(cluster.requests)
    am = Alertmanager(workdir=tmp_path, bridge_url=stack.bridge.url, token=stack.bridge_token)
    try:
        am.wait_ready()
        am.post_alert({"alertname": "WorkerCrashLooping", "pod": pod, "namespace": "ferrumdeck"})
        wait_until(
            lambda: any(r.name == pod and r.resource == "pods" and (r.verb == "delete" or r.subresource == "eviction")
                        for r in cluster.requests[start:]),
            timeout_s=180, what=f"the recovery's DELETE of {pod}",
        )
    finally:
        am.stop()
    wait_until(lambda: pod not in worker_pod_names(stack) and len(services.ready_worker_pods()) >= 3,
               timeout_s=120, what=f"a Ready replacement of {pod}")
    # nothing is left pending under the crashed pod's consumer: its entries were recovered
    s = stack.flow_settings
    holding = {c["name"] for c in stack.services.redis.xinfo_consumers(s.stream, s.group) if c["pending"]}
    assert pod not in holding
