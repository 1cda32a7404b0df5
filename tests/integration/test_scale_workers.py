"""scale-workers against the sandbox cluster and real Redis; the drain test uses the living sandbox workers.

The sandbox workers (``sandbox.services``) are threads bound to the cluster's worker pods: scaling the
Deployment up really adds consumers, and the backlog really drains through XREADGROUP/XACK.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.variables import Variable
from pydantic import SecretStr

from flows.scale_workers import scale_workers
from tasks.outcome import ActionStatus, Outcome
from tasks.runs import drop_schema
from tasks.settings import use_settings
from tests.polling import wait_for


def replicas(cluster) -> int:
    return cluster.deployment("worker")["spec"]["replicas"]


def artifacts_of(state, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            ),
        )


def scale_events(since: datetime, *, at_least: int) -> list:
    """``ferrumdeck.recovery.scale-workers`` events stored since ``since`` (stored asynchronously: wait for them)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    def stored() -> list | None:
        occurred = EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(minutes=1))
        flt = EventFilter(event=EventNameFilter(name=["ferrumdeck.recovery.scale-workers"]), occurred=occurred)
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=flt, limit=50).events
        return events if len(events) >= at_least else None

    return wait_for(stored, timeout=15, interval=0.2, what=f"{at_least} scale-workers events")


def report_of(state) -> str:
    found = artifacts_of(state, "scale-workers")
    assert found, "no scale-workers report for this flow run"
    return found[0].data


@pytest.fixture
def sw(kube_settings, cluster, redis):
    """Sandbox cluster + a private stream with the workers' group (no consumers)."""
    s = kube_settings.model_copy(update={"max_replicas": 6, "min_healthy_workers": 1, "rollout_timeout_s": 30.0})
    redis.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    with use_settings(s):
        yield s
    Variable.unset(s.kill_switch_variable)


@pytest.fixture
def services(kube_settings, cluster, pg_database_url):
    """The living sandbox: worker threads following the cluster's pods, consuming the real stream."""
    from sandbox.services import SandboxServices

    tag = uuid.uuid4().hex[:8]
    base = kube_settings.model_copy(
        update={
            "runs_table": f"runs_sw_{tag}",
            "steps_table": f"steps_sw_{tag}",
            "database_url": SecretStr(pg_database_url),
            "max_replicas": 6,
            "rollout_timeout_s": 30.0,
        }
    )
    svc = SandboxServices.start(settings=base, cluster=cluster, step_ms=10.0, batch=10)
    try:
        svc.wait_for_workers(3, timeout_s=15)
        with use_settings(svc.settings):
            yield svc
    finally:
        svc.stop()
        drop_schema(settings=svc.settings)


def test_scale_up_watch_drain_and_scale_back(services, cluster, redis):
    s = services.settings
    services.backlog(800)  # ~2.7 s of work for 3 workers at 10 ms a step
    started = datetime.now(UTC)

    state = scale_workers(
        replicas=5, drain_target=0, timeout_s=30, sample_interval_s=0.1, scale_back=True, dry_run=False,
        return_state=True,
    )
    out = state.result()

    assert state.is_completed() and out.outcome is Outcome.RECOVERED
    assert (out.previous, out.target, out.scaled) == (3, 5, True)
    assert out.ready_after_scale == 5
    assert out.initial_backlog > 0 and out.drained and out.final_backlog == 0
    assert len(out.samples) >= 2 and out.samples[0].backlog > 0 and out.samples[-1].backlog == 0
    backlogs = [x.backlog for x in out.samples]
    assert backlogs == sorted(backlogs, reverse=True)  # no new work arrives: the backlog only falls
    consumers = {c["name"] for c in redis.xinfo_consumers(s.stream, s.group)}
    assert len(consumers) >= 5  # the two added pods' workers consumed too (a pod's name is its consumer)
    assert out.scaled_back and replicas(cluster) == 3
    assert [(a.kind, a.status, a.detail) for a in out.actions] == [
        ("scale-deployment", ActionStatus.DONE, "3 -> 5 replicas"),
        ("scale-deployment", ActionStatus.DONE, "scale back 5 -> 3 replicas"),
    ]
    assert [c.name for c in out.checks if c.ok] == [
        "5 workers rolled out", "backlog drained to 0", "scaled back to 3 replicas"]
    info = redis.xinfo_groups(s.stream)[0]
    assert info["pending"] == 0 and info["lag"] == 0  # every step delivered and acknowledged
    progress = artifacts_of(state, "scale-workers-drain")
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0
    events = scale_events(started, at_least=2)
    assert sorted((e.payload["from"], e.payload["to"]) for e in events) == [(3, 5), (5, 3)]
    assert "Outcome: recovered" in report_of(state)


def test_replicas_are_capped_at_max_replicas(sw, cluster):
    state = scale_workers(replicas=50, drain_target=0, timeout_s=5, sample_interval_s=0.05, dry_run=False,
                          return_state=True)
    out = state.result()
    assert out.outcome is Outcome.RECOVERED  # the empty queue is drained at once
    assert out.capped and out.target == 6 and out.requested == 50
    assert replicas(cluster) == 6
    cluster.wait_until(lambda: len([p for p in cluster.pods(selector="app=worker")
                                    if not p["metadata"].get("deletionTimestamp")]) == 6, timeout=15)
    assert "capped at FD_MAX_REPLICAS=6" in report_of(state)


def test_dry_run_changes_nothing(sw, cluster, redis):
    pods = {p["metadata"]["name"] for p in cluster.pods(selector="app=worker")}
    state = scale_workers(replicas=5, dry_run=True, return_state=True)
    out = state.result()
    assert out.outcome is Outcome.DRY_RUN
    assert not out.scaled and out.previous == 3 and out.target == 5
    assert [(a.kind, a.target, a.status) for a in out.actions] == [
        ("scale-deployment", "deployment/worker", ActionStatus.DRY_RUN)]
    assert replicas(cluster) == 3
    assert {p["metadata"]["name"] for p in cluster.pods(selector="app=worker")} == pods
    assert list(redis.scan_iter(match=f"{sw.state_prefix}:cooldown:*")) == []
    assert not artifacts_of(state, "scale-workers-drain")


def test_kill_switch_refuses(sw, cluster):
    Variable.set(sw.kill_switch_variable, True, overwrite=True)
    state = scale_workers(replicas=5, dry_run=False, return_state=True)
    out = state.result()
    assert state.is_completed() and out.outcome is Outcome.REFUSED
    assert not out.scaled and replicas(cluster) == 3
    assert "kill switch" in out.actions[0].detail
    assert not artifacts_of(state, "scale-workers-drain")  # refused: the drain is not watched


def test_below_min_healthy_workers_is_refused_before_any_change(sw, cluster):
    s = sw.model_copy(update={"min_healthy_workers": 2})
    with use_settings(s):
        state = scale_workers(replicas=1, dry_run=False, return_state=True)
    out = state.result()
    assert state.is_completed() and out.outcome is Outcome.REFUSED  # a safety rule said no
    assert [(a.kind, a.status) for a in out.actions] == [("scale-deployment", ActionStatus.REFUSED)]
    assert "FD_MIN_HEALTHY_WORKERS=2" in out.actions[0].detail
    assert replicas(cluster) == 3


def test_missing_stream_is_a_clear_error_before_scaling(kube_settings, cluster):
    s = kube_settings.model_copy(update={"stream": f"{kube_settings.stream}-missing"})
    with use_settings(s):
        state = scale_workers(replicas=5, dry_run=False, return_state=True)
    assert state.is_failed()
    out = state.result(raise_on_failure=False)
    assert out.outcome is Outcome.FAILED and out.actions == []
    assert out.error.startswith("QueueError") and "does not exist" in out.error
    assert replicas(cluster) == 3
    assert "does not exist" in report_of(state)  # the report is published for a failed run too


def test_not_drained_in_time_keeps_the_extra_workers(sw, cluster, redis):
    with redis.pipeline(transaction=False) as pipe:
        for i in range(50):
            pipe.xadd(sw.stream, {"job_id": f"s{i}", "run_id": f"r{i}", "step_id": f"s{i}"})
        pipe.execute()
    state = scale_workers(replicas=4, drain_target=0, timeout_s=0.3, sample_interval_s=0.05, scale_back=True,
                          dry_run=False, return_state=True)
    assert state.is_failed()
    out = state.result(raise_on_failure=False)
    assert out.outcome is Outcome.NOT_VERIFIED
    assert out.scaled and out.drained is False and out.final_backlog == 50
    assert [c.name for c in out.failed_checks] == ["backlog drained to 0"]
    assert not out.scaled_back and [a.detail for a in out.actions] == ["3 -> 4 replicas"]  # no scale back
    assert replicas(cluster) == 4
    progress = artifacts_of(state, "scale-workers-drain")
    assert float(progress[0].data) == 0.0
    md = report_of(state)
    assert "Outcome: not_verified" in md and "backlog 50 -> 50" in md and "the extra workers stay" in md


def test_already_at_target_only_watches(sw, cluster):
    state = scale_workers(replicas=3, drain_target=0, timeout_s=5, sample_interval_s=0.05, dry_run=False,
                          return_state=True)
    out = state.result()
    assert out.outcome is Outcome.NOTHING_TO_DO and not out.scaled and out.drained
    assert out.actions == [] and [c.ok for c in out.checks] == [True]
    assert replicas(cluster) == 3


def test_already_at_target_but_not_draining_is_not_verified(sw, cluster, redis):
    redis.xadd(sw.stream, {"job_id": "s1", "run_id": "r1", "step_id": "s1"})
    state = scale_workers(replicas=3, drain_target=0, timeout_s=0.2, sample_interval_s=0.05, dry_run=False,
                          return_state=True)
    assert state.is_failed() and state.result(raise_on_failure=False).outcome is Outcome.NOT_VERIFIED
    assert replicas(cluster) == 3
