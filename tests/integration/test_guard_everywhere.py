"""Every function that changes a system guards itself: with the kill switch on it raises ``Refused`` and the
systems are byte-for-byte unchanged; with ``dry_run`` they are unchanged too.

One world holds something for every action to change: a Redis stream with a dead consumer's pending entries,
an empty consumer and a DLQ entry; a stuck run whose step is nowhere (PostgreSQL); the sandbox cluster's worker
and MCP Deployments; the sandbox gateway. The cases below must cover ``tasks.guard.GUARDED`` exactly, so a
mutator added tomorrow fails this test until it is guarded and listed here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from prefect.variables import Variable

from tasks import gateway, kube, queue, recovery, runs
from tasks.connections import db_engine
from tasks.errors import Refused
from tasks.guard import GUARDED
from tasks.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration import runs_fixtures as rf
from tests.integration.queue_fixtures import add_steps, backdate, deliver, dump_keys
from tests.integration.runs_fixtures import add_runs, ago

sqlite_url = rf.sqlite_url
gateway_server = rf.gateway_server
gw_settings = rf.gw_settings
runs_settings = rf.runs_settings


@pytest.fixture
def db_url(pg_database_url: str) -> str:
    """PostgreSQL only: the guard does not depend on the database kind."""
    return pg_database_url


def _fn(task: Any) -> Callable[..., Any]:
    return getattr(task, "fn", task)


def _dead_entries(s: Settings) -> list[queue.PendingEntry]:
    return [e for page in queue.iter_pending(settings=s, consumer="w-dead") for e in page]


# action -> how to call it on the world (settings, dry_run)
CASES: dict[str, Callable[[Settings, bool], Any]] = {
    "delete-pod": lambda s, d: _fn(kube.delete_pod)(settings=s, pod=_a_worker_pod(s), dry_run=d),
    "scale-deployment": lambda s, d: _fn(kube.scale_deployment)(
        settings=s, deployment=s.worker_deployment, replicas=4, dry_run=d),
    "set-deployment-env": lambda s, d: _fn(kube.set_deployment_env)(
        settings=s, deployment=s.worker_deployment, container=s.worker_container, name=s.llm_model_env,
        value="openai/gpt-guard-test", dry_run=d),
    "rollout-restart": lambda s, d: _fn(kube.rollout_restart)(settings=s, deployment=s.mcp_deployment, dry_run=d),
    "sweep-pending": lambda s, d: queue.sweep_pending(
        settings=s, policy=queue.SweepPolicy(dead_consumers=["w-dead"]), dry_run=d),
    "recover-consumers": lambda s, d: queue.recover_consumers(settings=s, consumers=["w-dead"], dry_run=d),
    "delete-consumers": lambda s, d: queue.delete_empty_consumers(
        settings=s, consumers=None, min_idle_ms=0, dry_run=d),
    "trim-dlq": lambda s, d: queue.trim_dlq(settings=s, max_age_ms=1, dry_run=d),
    "replay-dlq": lambda s, d: queue.replay_dlq(settings=s, flt=queue.ReplayFilter(replay_all=True), dry_run=d),
    "dead-letter-entries": lambda s, d: queue.dead_letter_pending(
        settings=s, consumer="w-dead", entries=_dead_entries(s), reason="poison", dry_run=d),
    "fail-runs": lambda s, d: runs.fail_runs(settings=s, run_ids=["run_stuck"], cutoff=None, dry_run=d),
    "fail-stuck-runs": lambda s, d: runs.fail_stuck_runs(
        settings=s, cutoff=datetime.now(UTC), limit=10, dry_run=d),
    "recover-worker-entries": lambda s, d: _fn(recovery.recover_worker_entries)(
        settings=s, pod="w-dead", consumer="w-dead", entries=_dead_entries(s), poison=_dead_entries(s)[:1],
        reason="poison", max_deliveries=3, dry_run=d),
    "retry-steps": lambda s, d: gateway.retry_steps(settings=s, targets=[("run_stuck", "st_stuck")], dry_run=d),
}


def _a_worker_pod(s: Settings) -> str:
    return sorted(p.name for p in kube.list_worker_pods.fn(settings=s))[0]


@pytest.fixture
def world(gw_settings: Settings, kube_settings: Settings, redis) -> Settings:
    s = gw_settings.model_copy(update={"kubeconfig": kube_settings.kubeconfig, "namespace": "ferrumdeck",
                                       "target_cooldown_s": 300})
    redis.xgroup_create(s.stream, s.group, id="$", mkstream=True)
    ids = add_steps(redis, s, ["a", "b", "c"])
    deliver(redis, s, "w-dead", 3)
    backdate(redis, s, "w-dead", ids, idle_ms=600_000)
    redis.xgroup_createconsumer(s.stream, s.group, "w-empty")
    redis.xadd(s.dlq_stream, {"job_id": "old", "run_id": "run-old", "error": "Max retries exceeded"})
    add_runs(s, [{"id": "run_stuck", "status": "running", "started_at": ago(90)}])
    rf.add_steps(s, [{"id": "st_stuck", "run_id": "run_stuck", "status": "running", "started_at": ago(89)}])
    return s


def snapshot(s: Settings, cluster) -> dict[str, Any]:
    """Everything an action could change: Redis keys (DUMP: entries, groups, PEL, cooldowns), rows, cluster."""
    t = runs.tables(s)
    with db_engine(s).connect() as conn:
        rows = [tuple(r) for r in conn.execute(sa.select(t.runs).order_by(t.runs.c.id)).all()]
        rows += [tuple(r) for r in conn.execute(sa.select(t.steps).order_by(t.steps.c.id)).all()]
    deployments = {name: (cluster.deployment(name)["spec"], cluster.deployment(name)["metadata"].get("generation"))
                   for name in (s.worker_deployment, s.mcp_deployment)}
    prefix = s.stream.rsplit(":", 1)[0]
    return {"redis": dump_keys(REDIS_URL, prefix), "rows": rows, "deployments": deployments,
            "pods": sorted(p["metadata"]["name"] for p in cluster.pods())}


def test_the_cases_cover_every_guarded_function():
    assert set(CASES) == set(GUARDED)


@pytest.mark.parametrize("action", sorted(CASES))
def test_kill_switch_on_changes_nothing(action: str, world: Settings, cluster):
    before = snapshot(world, cluster)
    Variable.set(world.kill_switch_variable, True, overwrite=True)
    try:
        with pytest.raises(Refused, match="kill switch"):
            CASES[action](world, False)
    finally:
        Variable.unset(world.kill_switch_variable)
    assert snapshot(world, cluster) == before


@pytest.mark.parametrize("action", sorted(CASES))
def test_dry_run_changes_nothing(action: str, world: Settings, cluster):
    before = snapshot(world, cluster)
    CASES[action](world, True)
    assert snapshot(world, cluster) == before


@pytest.mark.parametrize("action", ["delete-pod", "sweep-pending", "fail-runs", "retry-steps"])
def test_the_world_does_change_when_allowed(action: str, world: Settings, cluster):
    """The snapshot sees these actions (so the two tests above could fail)."""
    before = snapshot(world, cluster)
    CASES[action](world, False)
    assert snapshot(world, cluster) != before


def test_a_failed_action_gives_its_cooldown_back(world: Settings, cluster, mocker):
    pod = _a_worker_pod(world)
    cluster.fail_api(status=403, count=1, path_contains=f"/pods/{pod}")
    with pytest.raises(kube.KubeForbidden):
        _fn(kube.delete_pod)(settings=world, pod=pod, dry_run=False)
    assert _fn(kube.delete_pod)(settings=world, pod=pod, dry_run=False).changed
    with pytest.raises(Refused, match="cooldown"):
        _fn(kube.delete_pod)(settings=world, pod=pod, dry_run=False)


def test_an_action_that_changed_nothing_gives_its_cooldown_back(world: Settings, cluster):
    env = {"settings": world, "deployment": world.worker_deployment, "container": world.worker_container,
           "name": world.llm_model_env}
    current = _fn(kube.get_deployment_env)(**env)
    assert _fn(kube.set_deployment_env)(**env, value=current, dry_run=False).changed is False
    assert _fn(kube.set_deployment_env)(**env, value="openai/gpt-guard-test", dry_run=False).changed
    with pytest.raises(Refused, match="cooldown"):
        _fn(kube.set_deployment_env)(**env, value=current, dry_run=False)


def test_a_failed_pod_deletion_refunds_the_budget(world: Settings, cluster):
    pods = sorted(p.name for p in kube.list_worker_pods.fn(settings=world))
    budget = world.pod_deletions_per_hour
    for _ in range(budget):  # each attempt fails: none may spend the budget
        cluster.fail_api(status=403, count=1, path_contains=f"/pods/{pods[0]}")
        with pytest.raises(kube.KubeForbidden):
            _fn(kube.delete_pod)(settings=world, pod=pods[0], dry_run=False)
    assert _fn(kube.delete_pod)(settings=world, pod=pods[1], dry_run=False).changed
