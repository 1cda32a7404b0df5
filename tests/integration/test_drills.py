"""Drills end to end on the whole stack: a real `prefect server start`, the sandbox FerrumDeck under load, the
alert bridge, `fd-recovery serve` and each detection path in front of them — the drill posts the alert
(direct), the direct watcher sees the fault (watch), or the real Prometheus, Alertmanager and exporters do
(prometheus); the prefect.yaml trigger starts the recovery flow in the runner; its typed outcome is read from
the run, and the state that matters (pods, pending lists, DLQ, step rows) is asserted.

One stack for the module (starting it costs ~30-60 s on 2 cores), switched between detection paths with
``Stack.set_detection``; every wait polls with a deadline.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from deployments.alerts import AlertmanagerWebhook
from sandbox.drills import (
    DrillError,
    FlowRuns,
    RunOutcome,
    account,
    alertmanager_body,
    consumer_step_ids,
    detection_bounds,
    judge,
    orphaned_consumers,
    post_alert,
    run_drill,
    step_rows,
    summarize,
    table,
)
from sandbox.observability import missing_packages
from sandbox.stack import Stack, StackError, wait_until
from tasks.connections import db_engine
from tasks.runs import tables

pytestmark = pytest.mark.timeout(420)

needs_prometheus = pytest.mark.skipif(
    bool(missing_packages()), reason=f"not installed: {' '.join(missing_packages())} (Debian; .ci/run installs them)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack.start(state_dir=tmp_path_factory.mktemp("stack"), load_rate_per_s=5.0, detect="direct")
    children = list(s._children)
    components: list = []
    try:
        yield s
    finally:
        if s.observability is not None:
            components = list(s.observability.components.values())
        s.stop()
    # stopping leaves nothing of ours running: the server, the runner and the detection loop have exited
    assert all(c.popen.poll() is not None for c in children)
    assert all(c.popen.poll() is not None for c in components)
    assert s.watcher is None and s.observability is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{s.api_url}/health", timeout=2)


def worker_pod_names(stack: Stack) -> set[str]:
    s = stack.flow_settings
    return {p["metadata"]["name"] for p in stack.services.cluster.pods(namespace=s.namespace, selector=s.worker_selector)}


def consumers(stack: Stack) -> set[str]:
    s = stack.flow_settings
    return {c["name"] for c in stack.services.redis.xinfo_consumers(s.stream, s.group)}


def assert_timeline(result) -> None:
    """Fault -> detection -> run started -> verified outcome -> healthy, in that order."""
    assert result.detect_s is not None and result.start_s is not None and result.mttr_s is not None
    assert 0 <= result.detect_s <= result.start_s <= result.mttr_s <= result.healthy_s


# ------------------------------------------------------------------------------------------ pure


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


def run(outcome: str | None, *, role: str = "recovery", ended: float = 5.0, detect: float = 1.0,
        failing: list[str] | None = None, deployment: str = "worker-crash-recovery") -> RunOutcome:
    return RunOutcome(deployment=deployment, id=str(uuid.uuid4()), name="r", role=role, outcome=outcome,
                      state="Completed" if outcome in ("recovered", "nothing_to_do") else "Failed",
                      cause="why", failing_subflows=failing or [], detected_by="watch", detect_s=detect,
                      created_s=detect + 0.1, started_s=detect + 0.3, ended_s=ended)


def test_a_recovery_is_judged_by_its_typed_outcome() -> None:
    assert judge(run("recovered")) == (None, None)
    problem, note = judge(run("not_verified"))
    assert problem and "not_verified" in problem and note is None
    problem, _ = judge(run(None))
    assert problem and "no typed result" in problem


def test_a_follow_up_triage_whose_only_failure_is_its_own_post_check_is_a_note_not_a_problem() -> None:
    early = run("not_verified", role="follow-up", deployment="worker-failure-triage",
                failing=["post-recovery-check : not_verified"])
    problem, note = judge(early)
    assert problem is None and note and "judged by the system state" in note
    # a recovery that triage ran and that failed is a problem, post-check or not
    bad = run("partial", role="follow-up", deployment="worker-failure-triage",
              failing=["worker-crash-recovery worker-1: not_verified", "post-recovery-check : not_verified"])
    problem, note = judge(bad)
    assert problem and "worker-crash-recovery worker-1" in problem and note is None
    # Failed with no subflow to blame (triage's own error) is a problem too
    assert judge(run("failed", role="follow-up", deployment="worker-failure-triage"))[0]


def test_timings_come_from_the_verified_runs() -> None:
    # poison: three crash recoveries; MTTR is the last verified one, detection and start the first's
    s = summarize([run("recovered", detect=0.5, ended=6.0), run("recovered", detect=7.0, ended=12.0),
                   run("recovered", detect=13.0, ended=18.5)])
    assert s["recovered"] and s["mttr_s"] == 18.5 and s["detect_s"] == 0.5 and s["start_s"] == 0.8
    assert s["detected_by"] == "watch" and not s["problems"]
    # one run acted but could not verify: not recovered, no MTTR
    s = summarize([run("recovered", ended=6.0), run("not_verified", ended=9.0)])
    assert not s["recovered"] and s["mttr_s"] is None
    # nothing verified anything: not a recovery
    s = summarize([run("nothing_to_do")])
    assert not s["recovered"] and s["problems"]
    assert not summarize([])["recovered"]


def test_the_detection_bound_is_computed_from_the_rules_and_alertmanager_config() -> None:
    from sandbox.observability import DEMO

    production, demo = detection_bounds(), detection_bounds(DEMO)
    # WorkerCrashLooping: scrape 30 s + evaluation 30 s + for: 1m + group_wait 5s
    assert production["WorkerCrashLooping"] == {"condition_s": 0.0, "scrape_s": 30, "evaluation_s": 30,
                                                "for_s": 60.0, "group_wait_s": 5.0, "bound_s": 125.0}
    assert production["WorkerHung"]["condition_s"] == 300 and production["WorkerHung"]["for_s"] == 120
    assert production["LLMProviderErrors"]["condition_s"] == 150  # half of the 5m window failing
    assert set(production) == set(demo) == {"WorkerCrashLooping", "WorkerHung", "LLMProviderErrors", "MCPServerDown",
                                            "QueueBacklog", "RunsStuck"}
    for bound in (*production.values(), *demo.values()):
        assert bound["bound_s"] == round(sum(v for k, v in bound.items() if k != "bound_s"), 2)
    assert demo["WorkerCrashLooping"]["bound_s"] <= 7 and demo["WorkerHung"]["condition_s"] == DEMO.hang_idle_s


# ------------------------------------------------------------------------------------------ direct


def test_crash_drill_recovers_the_50_held_steps_through_alert_trigger_and_runner(stack: Stack) -> None:
    stack.set_detection("direct")
    before = worker_pod_names(stack)
    result = run_drill(stack, "crash", say=lambda _m: None)

    assert result.ok, result.problems
    assert result.detect == result.detected_by == "direct"
    [recovery] = result.recovery_runs()
    assert recovery.deployment == "worker-crash-recovery" and recovery.state == "Completed"
    assert recovery.outcome == "recovered"  # read from the run's typed result, not its state name
    assert recovery.detection_from == "http://prometheus.sandbox"  # the drill's own alert
    assert_timeline(result)
    assert result.checks["held_by_crashed_worker"] >= 40  # a full batch, less at most one flush of 10
    assert result.checks["held_completed_by_others"] == result.checks["held_by_crashed_worker"]
    assert result.steps.lost == 0 and result.steps.total >= 150
    assert result.steps.completed == result.steps.total - result.steps.queued - result.steps.in_flight
    # the crash-looping pod was replaced by a new one and its consumer is gone from the group
    assert recovery.pod in before and recovery.pod not in worker_pod_names(stack)
    assert recovery.pod not in consumers(stack)
    assert "crash" in table([result]) and "recovered" in table([result])


def test_mcp_drill_restarts_the_server_and_tool_steps_work_again(stack: Stack) -> None:
    """The watcher does not see an MCP server whose pods run but whose /health fails: the drill falls back to
    posting MCPServerDown itself, and says so (one MCP drill per module: the restart has a 5-minute cooldown)."""
    stack.set_detection("watch")
    result = run_drill(stack, "mcp_outage", say=lambda _m: None)

    assert result.ok, result.problems
    assert result.detect == "watch" and result.detected_by == "direct"
    [recovery] = result.recovery_runs()
    assert recovery.outcome == "recovered" and recovery.detection_from == "http://prometheus.sandbox"
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


def test_a_failed_run_still_gives_its_typed_result(stack: Stack) -> None:
    """A verification that fails ends the run Failed; the drill reads its outcome from the result it carries."""
    s = stack.flow_settings
    t = tables(s)
    stuck = f"run_stuck_{uuid.uuid4().hex[:8]}"
    with db_engine(s).begin() as conn:  # a run `running` for 2 hours: "no stuck runs" cannot be ticked
        conn.execute(sa.insert(t.runs).values(id=stuck, status="running",
                                              started_at=datetime.now(UTC) - timedelta(hours=2)))
    try:
        runs = FlowRuns(stack)
        dep = stack.deployments["post-recovery-check"]
        created = httpx.post(f"{stack.api_url}/deployments/{dep}/create_flow_run", timeout=10, json={}).json()
        run = runs.wait_final(created["id"], timeout_s=60)
        value, why = runs.typed_result(run["id"])
    finally:
        with db_engine(s).begin() as conn:
            conn.execute(sa.update(t.runs).where(t.runs.c.id == stuck).values(status="completed"))
    assert run["state"]["type"] == "FAILED"
    assert value is not None, why
    assert value.outcome.value == "not_verified"
    failed = [c for c in value.checks if not c.ok]
    assert [c.name for c in failed] == ["No runs stuck in invalid states"] and stuck in failed[0].detail


# ------------------------------------------------------------------------------------------ accounting


def _ghost_step(stack: Stack) -> tuple[str, str, str]:
    """A step pending under a consumer whose pod never existed; (ghost consumer, step id, entry id)."""
    s, client = stack.flow_settings, stack.services.redis
    ghost, step_id, run_id = f"ghost-{uuid.uuid4().hex[:6]}", f"step_ghost_{uuid.uuid4().hex[:8]}", "run_ghost"
    t = tables(s)
    with db_engine(s).begin() as conn:
        conn.execute(sa.insert(t.runs).values(id=f"{run_id}_{step_id}", status="queued"))
        conn.execute(sa.insert(t.steps).values(id=step_id, run_id=f"{run_id}_{step_id}", status="queued",
                                               kind="llm", attempts=0))
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
    return ghost, step_id, entry_id


def test_accounting_counts_a_step_held_by_a_consumer_without_pod_as_lost(stack: Stack, monkeypatch) -> None:
    """The drills' 'lost' must be able to say no — with its own scan: even if the product's locate_steps
    claimed the step was safely dead-lettered, the drill still sees it pending under a ghost."""
    import tasks.queue
    from tasks.queue import StepLocation

    stack.set_detection("direct")  # the watcher would (rightly) recover the ghost's entry
    monkeypatch.setattr(tasks.queue, "locate_steps", lambda *, settings, step_ids, **_: {
        i: StepLocation(step_id=i, where="dlq", entry_id="0-1") for i in step_ids})
    s, client = stack.flow_settings, stack.services.redis
    ghost, step_id, entry_id = _ghost_step(stack)
    try:
        acc = account(stack, [step_id])
        assert acc.lost == 1 and acc.completed == 0 and acc.in_flight == 0 and acc.dead_lettered == 0
        assert ghost in acc.lost_samples[0]
        assert orphaned_consumers(stack).get(ghost) == 1
        assert consumer_step_ids(stack, ghost) == [step_id]
    finally:
        client.xack(s.stream, s.group, entry_id)
        client.xgroup_delconsumer(s.stream, s.group, ghost)
        t = tables(s)
        with db_engine(s).begin() as conn:
            conn.execute(sa.update(t.steps).where(t.steps.c.id == step_id).values(status="completed"))
    assert account(stack, [step_id]).completed == 1
    assert step_rows(stack, [step_id])[step_id][0] == "completed"


def test_accounting_a_failed_step_needs_its_error_and_an_entry_nowhere_is_lost(stack: Stack) -> None:
    s = stack.flow_settings
    t = tables(s)
    ids = {k: f"step_acct_{k}_{uuid.uuid4().hex[:6]}" for k in ("silent", "failed", "nowhere", "dlq")}
    with db_engine(s).begin() as conn:
        conn.execute(sa.insert(t.runs).values(id=f"run_{ids['silent']}", status="failed"))
        conn.execute(sa.insert(t.steps), [
            {"id": ids[k], "run_id": f"run_{ids['silent']}", "status": status, "kind": "llm", "attempts": 1,
             "error": error}
            for k, status, error in (("silent", "failed", None), ("failed", "failed", {"code": "LLM_UNAVAILABLE"}),
                                     ("nowhere", "running", None), ("dlq", "running", None))
        ])
    dlq_entry = stack.services.redis.xadd(s.dlq_stream, {"job_id": ids["dlq"], "step_id": ids["dlq"], "deliveries": "3"})
    try:
        acc = account(stack, ids.values())
        assert (acc.total, acc.failed, acc.dead_lettered, acc.lost) == (4, 1, 1, 2)
        samples = " ".join(acc.lost_samples)
        assert f"{ids['silent']}: failed with no error recorded" in samples and f"{ids['nowhere']}: nowhere" in samples
    finally:
        stack.services.redis.xdel(s.dlq_stream, dlq_entry)
        with db_engine(s).begin() as conn:
            conn.execute(sa.update(t.steps).where(t.steps.c.id.in_(list(ids.values()))).values(status="completed"))


# ------------------------------------------------------------------------------------------ the watcher


def test_crash_drill_detected_by_the_watcher(stack: Stack) -> None:
    stack.set_detection("watch")
    assert stack.watcher is not None and stack.observability is None
    result = run_drill(stack, "crash", say=lambda _m: None)

    assert result.ok, result.problems
    assert result.detect == result.detected_by == "watch"
    [recovery] = result.recovery_runs()
    assert recovery.outcome == "recovered" and recovery.detection_from == "watcher"
    assert recovery.detection.startswith("ferrumdeck.pod.crash-looping ferrumdeck.pod.")
    assert_timeline(result)
    assert result.detect_s < 5  # a watch event, not a scrape + for: + group_wait
    assert recovery.pod not in worker_pod_names(stack) and recovery.pod not in consumers(stack)
    assert result.steps.lost == 0


def test_hang_drill_detected_by_the_watcher(stack: Stack) -> None:
    stack.set_detection("watch")
    result = run_drill(stack, "hang", say=lambda _m: None)

    assert result.ok, result.problems
    assert result.detected_by == "watch"
    [recovery] = result.recovery_runs()
    assert recovery.deployment == "worker-hang-recovery" and recovery.outcome == "recovered"
    assert recovery.detection.startswith("ferrumdeck.consumer.hung ")
    assert_timeline(result)
    assert result.checks["hung_pod_replaced"] and result.steps.lost == 0


# ------------------------------------------------------------------------------------------ Prometheus


@needs_prometheus
def test_crash_drill_detected_by_prometheus_through_alertmanager(stack: Stack) -> None:
    stack.set_detection("prometheus")
    assert stack.observability is not None and stack.watcher is None
    assert not stack.observability.problems()
    result = run_drill(stack, "crash", say=lambda _m: None)

    assert result.ok, result.problems
    assert result.detect == result.detected_by == "prometheus"
    [recovery] = result.recovery_runs()
    assert recovery.outcome == "recovered"
    # the alert came from the real Prometheus (its generatorURL), through the real Alertmanager
    assert recovery.detection == "ferrumdeck.alert.firing ferrumdeck.alert.WorkerCrashLooping"
    assert recovery.detection_from and recovery.detection_from != "http://prometheus.sandbox"
    assert_timeline(result)
    assert result.detect_s >= 1  # at least a scrape and the demo profile's for:
    assert result.steps.lost == 0


# ------------------------------------------------------------------------------------------ misc


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
    with pytest.raises(ValueError, match="detect must be one of"):
        Stack.start(state_dir=tmp_path / "new", detect="carrier-pigeon")


@pytest.mark.skipif(
    shutil.which("prometheus-alertmanager") is None and shutil.which("alertmanager") is None,
    reason="Alertmanager not installed (Debian: apt-get install prometheus-alertmanager; .ci/run installs it)",
)
def test_an_alert_posted_to_real_alertmanager_recovers_the_crashed_pod(stack: Stack, tmp_path) -> None:
    """The whole alert path: Alertmanager's API -> its webhook -> the bridge -> Prefect event -> the
    prefect.yaml trigger -> `worker-crash-recovery` in the runner -> DELETE of the pod at the cluster API."""
    from tests.e2e.test_alertmanager import Alertmanager

    stack.set_detection("direct")  # nothing else sees the crash: the recovery comes from this alert
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
