"""scale-workers against the sandbox cluster and real Redis; the drain test uses the living sandbox workers.

The sandbox workers (``sandbox.services``) are threads bound to the cluster's worker pods: scaling the
Deployment up really adds consumers, and the backlog really drains through XREADGROUP/XACK.
"""

from __future__ import annotations

import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.variables import Variable
from pydantic import SecretStr

from flows.scale_workers import ScaleError, drain_progress, scale_workers
from tasks.queue import QueueError
from tasks.runs import drop_schema
from tasks.settings import Settings, use_settings


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

    state = scale_workers(
        replicas=5, drain_target=0, timeout_s=30, sample_interval_s=0.1, scale_back=True, dry_run=False,
        return_state=True,
    )
    out = state.result()

    assert (out.previous, out.target, out.scaled) == (3, 5, True)
    assert out.ready_after_scale == 5
    assert out.initial_backlog > 0 and out.drained and out.final_backlog == 0
    assert len(out.samples) >= 2 and out.samples[0].backlog > 0 and out.samples[-1].backlog == 0
    backlogs = [x.backlog for x in out.samples]
    assert backlogs == sorted(backlogs, reverse=True)  # no new work arrives: the backlog only falls
    consumers = {c["name"] for c in redis.xinfo_consumers(s.stream, s.group)}
    assert len(consumers) >= 5  # the two added pods' workers consumed too (a pod's name is its consumer)
    assert out.scaled_back and replicas(cluster) == 3
    info = redis.xinfo_groups(s.stream)[0]
    assert info["pending"] == 0 and info["lag"] == 0  # every step delivered and acknowledged
    progress = artifacts_of(state, "scale-workers-drain")
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0
    md = report_of(state)
    assert "from 3 to 5" in md and "drained" in md and "scaled back from 5 to 3" in md


def test_replicas_are_capped_at_max_replicas(sw, cluster):
    state = scale_workers(replicas=50, drain_target=0, timeout_s=5, sample_interval_s=0.05, dry_run=False,
                          return_state=True)
    out = state.result()
    assert out.capped and out.target == 6 and out.requested == 50
    assert replicas(cluster) == 6
    cluster.wait_until(lambda: len([p for p in cluster.pods(selector="app=worker")
                                    if not p["metadata"].get("deletionTimestamp")]) == 6, timeout=15)
    assert "capped at FD_MAX_REPLICAS=6" in report_of(state)


def test_dry_run_changes_nothing(sw, cluster, redis):
    pods = {p["metadata"]["name"] for p in cluster.pods(selector="app=worker")}
    state = scale_workers(replicas=5, dry_run=True, return_state=True)
    out = state.result()
    assert not out.scaled and out.previous == 3 and out.target == 5
    assert replicas(cluster) == 3
    assert {p["metadata"]["name"] for p in cluster.pods(selector="app=worker")} == pods
    assert list(redis.scan_iter(match=f"{sw.state_prefix}:*")) == []
    assert not artifacts_of(state, "scale-workers-drain")
    assert "dry run: would scale deployment/worker" in report_of(state)


def test_kill_switch_refuses(sw, cluster):
    Variable.set(sw.kill_switch_variable, True, overwrite=True)
    state = scale_workers(replicas=5, dry_run=False, return_state=True)
    assert not state.result().scaled and replicas(cluster) == 3
    assert "kill switch" in report_of(state)


def test_below_min_healthy_workers_is_refused_before_any_change(sw, cluster):
    s = sw.model_copy(update={"min_healthy_workers": 2})
    with use_settings(s):
        state = scale_workers(replicas=1, dry_run=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(ScaleError, match="FD_MIN_HEALTHY_WORKERS=2"):
        state.result()
    assert replicas(cluster) == 3


def test_missing_stream_is_a_clear_error_before_scaling(kube_settings, cluster):
    s = kube_settings.model_copy(update={"stream": f"{kube_settings.stream}-missing"})
    with use_settings(s):
        state = scale_workers(replicas=5, dry_run=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(QueueError, match="does not exist"):
        state.result()
    assert replicas(cluster) == 3


def test_not_drained_in_time_keeps_the_extra_workers(sw, cluster, redis):
    with redis.pipeline(transaction=False) as pipe:
        for i in range(50):
            pipe.xadd(sw.stream, {"job_id": f"s{i}", "run_id": f"r{i}", "step_id": f"s{i}"})
        pipe.execute()
    state = scale_workers(replicas=4, drain_target=0, timeout_s=0.3, sample_interval_s=0.05, scale_back=True,
                          dry_run=False, return_state=True)
    out = state.result()
    assert out.scaled and out.drained is False and out.final_backlog == 50
    assert not out.scaled_back and "did not drain" in out.scale_back_note
    assert replicas(cluster) == 4
    progress = artifacts_of(state, "scale-workers-drain")
    assert float(progress[0].data) == 0.0
    md = report_of(state)
    assert "NOT drained" in md and "Outcome: **not drained**" in md


def test_already_at_target_only_watches(sw, cluster):
    out = scale_workers(replicas=3, drain_target=0, timeout_s=5, sample_interval_s=0.05, dry_run=False)
    assert not out.scaled and out.drained and out.verdict is None
    assert replicas(cluster) == 3


def test_drain_progress_math():
    assert drain_progress(initial=100, current=100, target=0) == 0.0
    assert drain_progress(initial=100, current=50, target=0) == 50.0
    assert drain_progress(initial=100, current=0, target=0) == 100.0
    assert drain_progress(initial=100, current=150, target=0) == 0.0
    assert drain_progress(initial=5, current=5, target=10) == 100.0
    assert isinstance(Settings().scale_up_replicas, int)
