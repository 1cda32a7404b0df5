"""The sandbox FerrumDeck's workers and faults behave like the real thing, so the drills measure real failures.

Real parts only: the sandbox Kubernetes API server (read and changed through the official client), real Redis
(stream, group, pending lists), a real PostgreSQL runs database, the MCP / Statuspage stubs over HTTP.
Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from sandbox.kube import SandboxCluster
from sandbox.services import SandboxServices
from sandbox.worker import StepBook
from tasks.connections import db_engine
from tasks.queue import recover_consumers
from tasks.runs import drop_schema, llm_failures_by_model, tables
from tasks.settings import Settings
from tests.polling import wait_for

NS = "ferrumdeck"



@pytest.fixture
def services(cluster: SandboxCluster, kube_settings: Settings, pg_database_url: str) -> Iterator[SandboxServices]:
    """The living sandbox on the (reset) session cluster, this test's own stream and runs tables."""
    suffix = uuid.uuid4().hex[:8]
    base = kube_settings.model_copy(update={"runs_table": f"sbx_runs_{suffix}", "steps_table": f"sbx_steps_{suffix}"})
    svc = SandboxServices.start(settings=base, cluster=cluster, database_url=pg_database_url, step_ms=10)
    try:
        svc.wait_for_workers(3, timeout_s=10)
        yield svc
    finally:
        svc.stop()
        drop_schema(settings=svc.settings)


@pytest.fixture
def core(services: SandboxServices) -> Iterator[k8s.CoreV1Api]:
    """The official Kubernetes client, configured from the sandbox's kubeconfig."""
    api = k8s_config.new_client_from_config(config_file=services.settings.kubeconfig)
    try:
        yield k8s.CoreV1Api(api)
    finally:
        api.close()


# --- helpers reading the state that matters ---------------------------------------------------------------


def group_info(svc: SandboxServices) -> dict[str, Any]:
    s = svc.settings
    return next(g for g in svc.redis.xinfo_groups(s.stream) if g["name"] == s.group)


def drained(svc: SandboxServices) -> bool:
    info = group_info(svc)
    return info["pending"] == 0 and info["lag"] == 0


def pending_of(svc: SandboxServices, consumer: str) -> list[dict[str, Any]]:
    s = svc.settings
    return svc.redis.xpending_range(s.stream, s.group, min="-", max="+", count=10_000, consumername=consumer)


def step_rows(svc: SandboxServices, step_ids: list[str]) -> dict[str, dict[str, Any]]:
    steps = tables(svc.settings).steps
    with db_engine(svc.settings).connect() as conn:
        rows = conn.execute(sa.select(steps).where(steps.c.id.in_(step_ids))).mappings().all()
    return {r["id"]: dict(r) for r in rows}


def run_statuses(svc: SandboxServices, run_ids: list[str]) -> dict[str, str]:
    runs = tables(svc.settings).runs
    with db_engine(svc.settings).connect() as conn:
        rows = conn.execute(sa.select(runs.c.id, runs.c.status).where(runs.c.id.in_(run_ids))).all()
    return dict(rows)


def pod_obj(core: k8s.CoreV1Api, name: str) -> k8s.V1Pod:
    return core.read_namespaced_pod(name, NS)


def is_ready(pod: k8s.V1Pod) -> bool:
    conditions = pod.status.conditions or []
    return pod.status.phase == "Running" and any(c.type == "Ready" and c.status == "True" for c in conditions)


def crash_looping(pod: k8s.V1Pod) -> bool:
    for cs in pod.status.container_statuses or []:
        waiting = cs.state.waiting if cs.state else None
        if cs.restart_count > 0 or (waiting is not None and waiting.reason == "CrashLoopBackOff"):
            return True
    return False


def worker_holding(svc: SandboxServices, at_least: int) -> str | None:
    for pod, worker in svc.pool.running().items():
        if worker.held >= at_least:
            return pod
    return None


# --- tests -------------------------------------------------------------------------------------------


def test_workers_consume_under_pod_names_and_record_runs(services: SandboxServices, core: k8s.CoreV1Api) -> None:
    pods = [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app=worker").items]
    assert sorted(services.pool.running()) == sorted(pods)

    added = services.backlog(60, tool_every=3)
    wait_for(lambda: drained(services), what="the backlog to drain")

    rows = step_rows(services, [a.step_id for a in added])
    assert {r["status"] for r in rows.values()} == {"completed"}
    assert all(r["completed_at"] is not None for r in rows.values())
    steps = tables(services.settings).steps
    with db_engine(services.settings).connect() as conn:  # SQL NULL, not a JSON null, for "no error"
        no_error = conn.execute(sa.select(sa.func.count()).where(steps.c.error.is_(None))).scalar_one()
    assert no_error == 60
    llm = [r for r in rows.values() if r["kind"] == "llm"]
    assert len(llm) == 40 and {r["model"] for r in llm} == {"openai/gpt-4o"}  # the pods' LITELLM_MODEL
    assert set(run_statuses(services, [a.run_id for a in added]).values()) == {"completed"}
    s = services.settings
    consumers = {c["name"] for c in services.redis.xinfo_consumers(s.stream, s.group)}
    assert consumers and consumers <= set(pods)  # a worker pod's name is its consumer name
    assert sum(w.completed for w in services.pool.all().values()) == 60
    assert services.mcp.calls == 20


def test_crash_leaves_in_flight_entries_pending_and_the_pod_crash_looping(
    services: SandboxServices, core: k8s.CoreV1Api
) -> None:
    added = services.backlog(400)
    pod = wait_for(lambda: worker_holding(services, 25), what="a worker holding a batch")

    held = services.crash(pod)

    assert held >= 10  # the worker died in the middle of its batch (COUNT 50)
    wait_for(lambda: crash_looping(pod_obj(core, pod)), what="the pod to crash-loop")
    assert not is_ready(pod_obj(core, pod))
    # the other workers finish everything else; the dead pod's entries stay pending under its name
    wait_for(lambda: group_info(services)["pending"] == held and group_info(services)["lag"] == 0, timeout=20,
             what="the other workers to drain the rest")
    entries = pending_of(services, pod)
    assert len(entries) == held and all(e["times_delivered"] == 1 for e in entries)
    assert services.pool.worker(pod) is not None and not services.pool.worker(pod).alive
    rows = step_rows(services, [a.step_id for a in added])
    unfinished = [r for r in rows.values() if r["status"] != "completed"]
    assert len(unfinished) == held  # nothing else lost, nothing done twice


def test_deleted_pod_stops_its_worker_and_the_replacement_consumes(
    services: SandboxServices, core: k8s.CoreV1Api
) -> None:
    before = set(services.pool.running())
    old = sorted(before)[0]
    old_worker = services.pool.worker(old)

    core.delete_namespaced_pod(old, NS)

    wait_for(lambda: not old_worker.alive, what="the deleted pod's worker to stop")
    new = wait_for(lambda: set(services.pool.running()) - before, what="a worker for the replacement pod")
    (replacement,) = new
    assert is_ready(pod_obj(core, replacement))
    done_by_old = old_worker.completed

    added = services.backlog(300)  # 6 batches of 50 for 3 workers: each takes some
    wait_for(lambda: drained(services), timeout=20, what="the backlog to drain")

    assert services.pool.worker(replacement).completed > 0  # the replacement's worker consumes
    assert old_worker.completed == done_by_old and not old_worker.alive  # the deleted one never again
    assert pending_of(services, old) == []
    assert old not in services.pool.running()
    rows = step_rows(services, [a.step_id for a in added])
    assert {r["status"] for r in rows.values()} == {"completed"}


def test_hang_keeps_its_entries_with_zero_progress_while_the_pod_stays_ready(
    services: SandboxServices, core: k8s.CoreV1Api
) -> None:
    services.backlog(400)
    pod = wait_for(lambda: worker_holding(services, 25), what="a worker holding a batch")

    worker = services.hang(pod)

    wait_for(lambda: worker.state == "hung", what="the worker to hang")
    held, completed = len(pending_of(services, pod)), worker.completed
    assert held >= 10
    wait_for(lambda: group_info(services)["pending"] == held and group_info(services)["lag"] == 0, timeout=20,
             what="the healthy workers to drain the rest")
    assert len(pending_of(services, pod)) == held  # its entries stay with it
    assert worker.completed == completed and worker.alive  # alive, but no progress
    pod_now = pod_obj(core, pod)
    assert is_ready(pod_now) and not crash_looping(pod_now)  # Kubernetes sees nothing wrong
    metrics = k8s.CustomObjectsApi(core.api_client).get_namespaced_custom_object(
        "metrics.k8s.io", "v1beta1", NS, "pods", pod
    )
    usage = metrics["containers"][0]["usage"]["cpu"]
    assert usage in ("0", "0m", "0n") or usage.endswith("n") and int(usage[:-1]) < 5_000_000  # ~0 CPU


def test_poison_entry_crashes_whichever_worker_takes_it(services: SandboxServices, core: k8s.CoreV1Api) -> None:
    (poison,) = services.poison()

    first = wait_for(lambda: services.pool.crashed(), what="a worker to take the poison")
    (victim,) = first
    wait_for(lambda: crash_looping(pod_obj(core, victim)), what="the victim pod to crash-loop")
    entries = pending_of(services, victim)
    assert [e["message_id"] for e in entries] == [poison.entry_id] and entries[0]["times_delivered"] == 1
    assert step_rows(services, [poison.step_id])[poison.step_id]["status"] == "running"  # it died mid-step

    # requeue it (the queue recovery's path: attempts carried forward): the next taker dies too
    recovered = recover_consumers(settings=services.settings, consumers=[victim], max_deliveries=3, dry_run=False)
    assert recovered.done.get("requeued") == 1
    second = wait_for(lambda: services.pool.crashed() - first, what="another worker to take the poison")
    (victim2,) = second
    (entry,) = pending_of(services, victim2)
    fields = services.redis.xrange(services.settings.stream, entry["message_id"], entry["message_id"])[0][1]
    assert fields["step_id"] == poison.step_id and fields["attempts"] == "1"  # deliveries keep growing
    wait_for(lambda: crash_looping(pod_obj(core, victim2)), what="the second victim to crash-loop")


def test_llm_outage_fails_llm_steps_with_the_provider_error_and_a_major_status_page(
    services: SandboxServices,
) -> None:
    status = services.settings.llm_status_urls
    assert httpx.get(status["openai"]).json()["status"]["indicator"] == "none"
    services.llm_outage("openai")
    since = datetime.now(UTC) - timedelta(seconds=5)

    added = services.backlog(30)
    wait_for(lambda: drained(services), what="the steps to be tried and acknowledged")

    rows = step_rows(services, [a.step_id for a in added])
    assert {r["status"] for r in rows.values()} == {"failed"}
    assert {json.dumps(r["error"], sort_keys=True) for r in rows.values()} == {
        json.dumps({"code": "LLM_PROVIDER_ERROR", "model": "openai/gpt-4o", "provider": "openai",
                    "message": "openai API error: 503 Service Unavailable"}, sort_keys=True)
    }
    assert set(run_statuses(services, [a.run_id for a in added]).values()) == {"failed"}
    counts = llm_failures_by_model(settings=services.settings, since=since)
    assert counts["openai/gpt-4o"]["failed"] == counts["openai/gpt-4o"]["total"] == 30
    page = httpx.get(status["openai"]).json()
    assert page["status"]["indicator"] == "major"
    assert httpx.get(status["anthropic"]).json()["status"]["indicator"] == "none"

    services.llm_restore("openai")
    later = services.backlog(10)
    wait_for(lambda: drained(services), what="later steps")
    assert {r["status"] for r in step_rows(services, [a.step_id for a in later]).values()} == {"completed"}


def test_failover_env_change_gives_new_workers_the_backup_model(
    services: SandboxServices, core: k8s.CoreV1Api
) -> None:
    services.llm_outage("openai")
    apps = k8s.AppsV1Api(core.api_client)
    backup = "anthropic/claude-sonnet-4-20250514"
    apps.patch_namespaced_deployment(
        "worker", NS,
        {"spec": {"template": {"spec": {"containers": [{"name": "worker", "env": [
            {"name": "LITELLM_MODEL", "value": backup}]}]}}}},
    )
    wait_for(lambda: len(services.pool.running()) == 3
             and {w.model for w in services.pool.running().values()} == {backup},
             timeout=15, what="the rolled-out workers on the backup model")

    added = services.backlog(20)
    wait_for(lambda: drained(services), what="the steps")
    rows = step_rows(services, [a.step_id for a in added])
    assert {(r["status"], r["model"]) for r in rows.values()} == {("completed", backup)}


def test_mcp_outage_fails_health_and_tool_steps_until_the_deployment_is_restarted(
    services: SandboxServices, core: k8s.CoreV1Api
) -> None:
    health = services.settings.mcp_url
    assert httpx.get(health).status_code == 200
    services.mcp_outage()

    assert httpx.get(health).status_code == 503
    added = services.backlog(20, tool_every=2)
    wait_for(lambda: drained(services), what="the steps")
    rows = step_rows(services, [a.step_id for a in added])
    by_kind = {k: {r["status"] for r in rows.values() if r["kind"] == k} for k in ("llm", "tool")}
    assert by_kind == {"llm": {"completed"}, "tool": {"failed"}}  # LLM steps still work
    assert {r["error"]["code"] for r in rows.values() if r["kind"] == "tool"} == {"MCP_UNAVAILABLE"}
    assert httpx.get(health).status_code == 503  # still down: nothing restarted it

    # kubectl rollout restart deployment mcp-server
    k8s.AppsV1Api(core.api_client).patch_namespaced_deployment(
        "mcp-server", NS,
        {"spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": datetime.now(UTC).isoformat()}}}}},
    )
    wait_for(lambda: httpx.get(health).status_code == 200, timeout=15, what="MCP healthy after the restart")
    later = services.backlog(10, tool_every=1)
    wait_for(lambda: drained(services), what="later tool steps")
    assert {r["status"] for r in step_rows(services, [a.step_id for a in later]).values()} == {"completed"}


def test_a_database_error_leaves_the_batch_pending_and_the_worker_goes_on(
    services: SandboxServices, mocker
) -> None:
    real = StepBook.finished
    failed_once: list[str] = []

    def flaky(self: StepBook, *, outcomes: list) -> None:
        if not failed_once:
            failed_once.append(outcomes[0].step.entry_id)
            raise sa.exc.OperationalError("UPDATE steps", {}, ConnectionError("server closed the connection"))
        real(self, outcomes=outcomes)

    mocker.patch.object(StepBook, "finished", flaky)  # inject one transient database failure
    services.backlog(120)

    wait_for(lambda: group_info(services)["lag"] == 0 and any(w.errors for w in services.pool.all().values()),
             what="the failure and the rest of the backlog")
    (victim,) = [w for w in services.pool.all().values() if w.errors]
    wait_for(lambda: group_info(services)["pending"] == len(pending_of(services, victim.pod)), timeout=15,
             what="everything but the failed batch acknowledged")
    held = pending_of(services, victim.pod)
    assert failed_once[0] in {e["message_id"] for e in held}  # not acknowledged: its results were not saved
    assert victim.alive and victim.state == "running" and "OperationalError" in (victim.last_error or "")
