"""worker-crash-recovery end to end: sandbox cluster + real Redis + real PostgreSQL, faults set up directly."""

from __future__ import annotations

import threading

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.variables import Variable

from flows.worker_crash import worker_crash_recovery
from tasks.settings import use_settings
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import (
    deletions,
    queue_state,
    run_status,
    seed_pending,
    wait_for,
    worker_pods,
)

pytestmark = pytest.mark.timeout(120)
env = fx.env  # the per-test settings fixture


def crash_scene(cluster, redis, s):
    """Worker A crash-loops holding 5 fresh entries (one delivered 3 times: poison); worker B is healthy and
    busy with 4 fresh entries. Every entry's run is `running` in PostgreSQL."""
    a, b, _c = worker_pods(cluster, s)
    crashed = seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=5, tag="a", redeliver={2: 2})
    busy = seed_pending(redis, s, consumer=s.consumer_for_pod(b), n=4, tag="b")
    cluster.crash_loop(a, exit_code=1, reason="Error", logs=["Traceback (most recent call last):", "KeyError: 'payload'"])
    wait_for(lambda: a not in worker_pods(cluster, s), what=f"{a} not Ready")
    return a, b, crashed, busy


def test_crash_recovers_at_once_dead_letters_poison_settles_runs_and_replaces_the_pod(env, cluster, redis):
    s = env
    a, b, crashed, busy = crash_scene(cluster, redis, s)
    idle_before = {p["message_id"]: p["time_since_delivered"]
                   for p in redis.xpending_range(s.stream, s.group, "-", "+", 100, consumername=a)}
    assert max(idle_before.values()) < 60_000  # far below the runbook's 5 minutes: no waiting involved

    result = worker_crash_recovery(pod=a, dry_run=False, verify_consuming_s=0)

    poison = crashed[2]
    # Redis: A's PEL empty and its consumer removed; B's 4 entries untouched; 4 copies requeued; poison in DLQ
    state = queue_state(redis, s)
    assert a not in state["consumers"]
    assert [p for p in state["pending"] if p[1] == s.consumer_for_pod(b)] == sorted(
        (f["entry_id"], b, 1) for f in busy)
    assert len(state["pending"]) == 4
    requeued = [fields for _, fields in state["stream"] if fields.get("attempts")]
    assert sorted(f["job_id"] for f in requeued) == sorted(f["job_id"] for i, f in enumerate(crashed) if i != 2)
    assert all(f["attempts"] == "1" for f in requeued)
    assert [fields["job_id"] for _, fields in state["dlq"]] == [poison["job_id"]]
    # PostgreSQL: the poison's run failed (its step is dead-lettered); the requeued ones left to the workers
    status = run_status(s, [f["run_id"] for f in crashed + busy])
    assert status[poison["run_id"]] == ("failed", "WORKER_TIMEOUT")
    assert all(status[f["run_id"]] == ("running", None) for i, f in enumerate(crashed) if i != 2)
    assert all(status[f["run_id"]] == ("running", None) for f in busy)
    # Kubernetes: A deleted once, a new Ready worker replaced it, B untouched
    assert deletions(cluster) == [a]
    now = worker_pods(cluster, s)
    assert a not in now and b in now and len(now) == 3
    out = result.targets[0]
    assert out.replacement in now and out.consumer_deleted and out.dead_lettered == [poison["entry_id"]]
    # report: cause, poison, counts
    assert "poison entry suspected" in result.report and poison["entry_id"] in result.report
    assert "KeyError" in result.report and "4 entries requeued at once" in result.report
    # Prefect events for automations: what was done, about which pod / entry / run
    events = fx.recovery_events(
        [f"ferrumdeck.pod.{a}", f"ferrumdeck.entry.{poison['entry_id']}", f"ferrumdeck.run.{poison['run_id']}"],
        want={"ferrumdeck.recovery.entries-recovered", "ferrumdeck.recovery.pod-deleted",
              "ferrumdeck.recovery.poison-dead-lettered", "ferrumdeck.recovery.run-failed"},
    )
    assert events["ferrumdeck.recovery.entries-recovered"][0]["payload"]["requeued"] == 4
    assert len(events["ferrumdeck.recovery.pod-deleted"]) == 1


def test_a_healthy_busy_workers_entries_are_never_taken(env, cluster, redis):
    s = env
    a, b, _crashed, busy = crash_scene(cluster, redis, s)
    before = queue_state(redis, s)
    result = worker_crash_recovery(pod=b, dry_run=False, verify_consuming_s=0)
    assert result.targets == [] and "healthy" in result.skipped[0]["reason"]
    assert queue_state(redis, s) == before and deletions(cluster) == []
    # and a sweep of every crashed worker takes A's entries but never B's
    worker_crash_recovery(dry_run=False, verify_consuming_s=0)
    assert sorted(p[0] for p in queue_state(redis, s)["pending"]) == sorted(f["entry_id"] for f in busy)


def test_dry_run_changes_nothing_anywhere(env, cluster, redis):
    s = env
    a, _b, crashed, _busy = crash_scene(cluster, redis, s)
    before, pods_before = queue_state(redis, s), worker_pods(cluster, s, ready_only=False)
    runs_before = run_status(s, [f["run_id"] for f in crashed])
    result = worker_crash_recovery(pod=a, dry_run=True)
    assert queue_state(redis, s) == before
    assert worker_pods(cluster, s, ready_only=False) == pods_before and deletions(cluster) == []
    assert run_status(s, [f["run_id"] for f in crashed]) == runs_before
    assert list(redis.scan_iter(match=f"{s.state_prefix}:*")) == []  # no cooldown spent
    assert "would be requeued" in result.report and "would delete" in result.report
    assert "4 entries would be requeued at once, 1 would be dead-lettered" in result.report


def test_kill_switch_stops_every_mutating_step(env, cluster, redis):
    s = env
    a, _b, crashed, _busy = crash_scene(cluster, redis, s)
    before = queue_state(redis, s)
    Variable.set(s.kill_switch_variable, True, overwrite=True)
    try:
        result = worker_crash_recovery(pod=a, dry_run=False)
    finally:
        Variable.unset(s.kill_switch_variable)
    assert queue_state(redis, s) == before and deletions(cluster) == []
    assert run_status(s, [crashed[2]["run_id"]]) == {crashed[2]["run_id"]: ("running", None)}
    assert result.targets[0].refused and "kill switch" in result.report


def test_the_same_alert_three_times_recovers_the_pod_once(env, cluster, redis):
    s = env
    a, _b, crashed, _busy = crash_scene(cluster, redis, s)
    results = [worker_crash_recovery(pod=a, dry_run=False, verify_consuming_s=0) for _ in range(3)]
    assert deletions(cluster) == [a]
    state = queue_state(redis, s)
    assert len([1 for _, f in state["stream"] if f.get("attempts")]) == 4  # requeued once, not 3 times
    assert len(state["dlq"]) == 1
    with get_client(sync_client=True) as client:
        named = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"recover {a}"])))
    assert len(named) == 3  # templated run names: "recover <pod>"
    second, third = results[1], results[2]
    for r in (second, third):
        assert r.targets == [] or r.targets[0].refused
        assert "cooldown" in r.report or "nothing to recover" in r.report


def test_three_concurrent_runs_for_the_same_pod_recover_it_once(env, cluster, redis):
    s = env
    a, _b, _crashed, _busy = crash_scene(cluster, redis, s)
    results: list = []

    def run() -> None:
        with use_settings(s):
            results.append(worker_crash_recovery(pod=a, dry_run=False, verify_consuming_s=0))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 3 and deletions(cluster) == [a]
    state = queue_state(redis, s)
    assert len([1 for _, f in state["stream"] if f.get("attempts")]) == 4 and len(state["dlq"]) == 1
    acted = [r for r in results if r.targets and not r.targets[0].refused]
    assert len(acted) == 1 and acted[0].targets[0].requeued == 4


def test_a_consumer_whose_pod_is_gone_is_recovered_without_a_pod_action(env, cluster, redis):
    s = env
    ghost = seed_pending(redis, s, consumer="worker-gone-xyz12", n=3, tag="g", redeliver={0: 1})
    result = worker_crash_recovery(dry_run=False, verify_consuming_s=0)
    out = next(t for t in result.targets if t.pod == "worker-gone-xyz12")
    assert out.cause == "pod-gone" and out.pod_action == "none" and out.consumer_deleted
    assert out.requeued == 3 and out.dead_lettered == []  # the poison rule is for crashed processes only
    state = queue_state(redis, s)
    assert "worker-gone-xyz12" not in state["consumers"] and state["pending"] == []
    assert deletions(cluster) == []
    assert run_status(s, [ghost[0]["run_id"]])[ghost[0]["run_id"]] == ("running", None)
