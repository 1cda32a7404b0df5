"""worker-crash-recovery end to end: sandbox cluster + real Redis + real PostgreSQL, faults set up directly.

Assertions are on the typed result (outcome, actions, per-pod checks) and on the systems' state (stream, PEL,
DLQ, consumers, runs, pods); a few on the report a person reads.
"""

from __future__ import annotations

import threading

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.variables import Variable

from flows.worker_crash import (
    CONSUMER_EMPTY,
    REPLACEMENT_READING,
    REPLACEMENT_READY,
    WORKERS_READY,
    worker_crash_recovery,
)
from tasks import queue
from tasks.kube_diagnosis import Classification
from tasks.outcome import ActionStatus, Outcome
from tasks.settings import use_settings
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import (
    ReplacementConsumer,
    cooldowns,
    deletions,
    queue_state,
    report_of,
    result_of,
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


def out_of(result):
    (out,) = result.targets
    return out


def kinds(result) -> list[tuple[str, str, ActionStatus]]:
    return [(x.kind, x.target, x.status) for x in result.actions]


def test_crash_recovers_at_once_dead_letters_poison_settles_runs_and_replaces_the_pod(env, cluster, redis, mocker):
    s = env
    a, b, crashed, busy = crash_scene(cluster, redis, s)
    idle_before = {p["message_id"]: p["time_since_delivered"]
                   for p in redis.xpending_range(s.stream, s.group, "-", "+", 100, consumername=a)}
    assert max(idle_before.values()) < 60_000  # far below the runbook's 5 minutes: no waiting involved
    scans = mocker.spy(queue, "scan_pending")

    with ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
        state = worker_crash_recovery(pod=a, dry_run=False, verify_consuming_s=15, return_state=True)
    result = state.result()

    assert state.is_completed() and result.outcome is Outcome.RECOVERED
    assert {(c.name, c.ok) for c in result.checks if c.target == a} == {
        (CONSUMER_EMPTY, True), (REPLACEMENT_READY, True), (REPLACEMENT_READING, True)}
    assert kinds(result)[:3] == [("recover-entries", a, ActionStatus.DONE), ("settle-runs", a, ActionStatus.DONE),
                                 ("delete-pod", a, ActionStatus.DONE)]  # runs settled before the replacement wait
    # the crashed consumer's pending list was read once to decide; recover_consumers' own pass moved the rest
    assert [c.kwargs.get("consumer") for c in scans.call_args_list].count(s.consumer_for_pod(a)) == 2
    poison = crashed[2]
    # Redis: A's PEL empty and its consumer removed; B's 4 entries untouched; 4 copies requeued; poison in DLQ
    qs = queue_state(redis, s)
    assert a not in qs["consumers"]
    assert [p for p in qs["pending"] if p[1] == s.consumer_for_pod(b)] == sorted((f["entry_id"], b, 1) for f in busy)
    assert len(qs["pending"]) == 4
    requeued = [fields for _, fields in qs["stream"] if fields.get("attempts")]
    assert sorted(f["job_id"] for f in requeued) == sorted(f["job_id"] for i, f in enumerate(crashed) if i != 2)
    assert all(f["attempts"] == "1" for f in requeued)
    assert [fields["job_id"] for _, fields in qs["dlq"]] == [poison["job_id"]]
    # PostgreSQL: the poison's run failed (its step is dead-lettered); the requeued ones were left to the workers,
    # and the replacement completed them; B's runs are still B's
    status = run_status(s, [f["run_id"] for f in crashed + busy])
    assert status[poison["run_id"]] == ("failed", "WORKER_TIMEOUT")
    requeued_runs = [f["run_id"] for i, f in enumerate(crashed) if i != 2]
    wait_for(lambda: set(run_status(s, requeued_runs).values()) == {("completed", None)}, what="requeued runs done")
    assert all(status[f["run_id"]] == ("running", None) for f in busy)
    assert out_of(result).runs_retried == []  # nothing was retried through the gateway: the steps were queued
    # Kubernetes: A deleted once, a new Ready worker replaced it, B untouched
    assert deletions(cluster) == [a]
    now = worker_pods(cluster, s)
    assert a not in now and b in now and len(now) == 3
    (out,) = result.targets
    assert out.cause is Classification.CRASH_LOOPING and out.replacement in now and out.consumer_deleted
    assert (out.requeued, out.dead_lettered, out.poison) == (4, 1, [poison["entry_id"]])
    assert out.runs_failed == [poison["run_id"]]
    # the report a person reads: the likely cause, with the poison and the crash log's last line
    md = report_of(state, "worker-crash-recovery")
    assert "Outcome: recovered" in md and "poison entry suspected" in md and poison["entry_id"] in md
    assert "KeyError" in md
    # Prefect events for automations: what was done, about which pod / entry / run
    events = fx.recovery_events(
        [f"ferrumdeck.pod.{a}", f"ferrumdeck.entry.{poison['entry_id']}", f"ferrumdeck.run.{poison['run_id']}"],
        want={"ferrumdeck.recovery.entries-recovered", "ferrumdeck.recovery.pod-deleted",
              "ferrumdeck.recovery.poison-dead-lettered", "ferrumdeck.recovery.run-failed"},
    )
    assert events["ferrumdeck.recovery.entries-recovered"][0]["payload"]["requeued"] == 4
    assert len(events["ferrumdeck.recovery.pod-deleted"]) == 1


def test_node_accepting_no_pods_leaves_the_recovery_not_verified_and_failed(env, cluster, redis):
    s = env
    a, _b, crashed, _busy = crash_scene(cluster, redis, s)
    cluster.set_schedulable(False, selector="app=worker")  # the node takes no new worker pod

    state = worker_crash_recovery(pod=a, dry_run=False, replacement_timeout_s=3, verify_consuming_s=0,
                                  return_state=True)

    assert state.is_failed()
    result = result_of(state)
    assert result.outcome is Outcome.NOT_VERIFIED
    assert [(c.name, c.target) for c in result.failed_checks] == [(REPLACEMENT_READY, a)]
    assert [c.name for c in result.checks if c.ok] == [CONSUMER_EMPTY]  # the entries themselves were recovered
    assert kinds(result)[:3] == [("recover-entries", a, ActionStatus.DONE), ("settle-runs", a, ActionStatus.DONE),
                                 ("delete-pod", a, ActionStatus.DONE)]  # runs settled before the replacement wait
    assert result.targets[0].replacement is None
    pending = [p for p in cluster.pods(selector="app=worker") if p["status"].get("phase") == "Pending"]
    assert pending and all(c["reason"] == "Unschedulable" for p in pending for c in p["status"]["conditions"]
                           if c["type"] == "PodScheduled")
    qs = queue_state(redis, s)
    assert [f["job_id"] for _, f in qs["dlq"]] == [crashed[2]["job_id"]]
    assert len([1 for _, f in qs["stream"] if f.get("attempts")]) == 4
    md = report_of(state, "worker-crash-recovery")
    assert "Outcome: not_verified" in md and REPLACEMENT_READY in md


def test_kubernetes_503_on_the_delete_still_reports_what_it_saw_and_did_and_fails(env, cluster, redis, mocker):
    s = env  # a budget of 3 deletions: the retried 503s (4 attempts) must not spend it
    a, _b, crashed, _busy = crash_scene(cluster, redis, s)
    delete = mocker.patch.object(k8s.CoreV1Api, "delete_namespaced_pod",
                                 side_effect=ApiException(status=503, reason="Service Unavailable"))

    state = worker_crash_recovery(pod=a, dry_run=False, verify_consuming_s=0, return_state=True)

    assert state.is_failed()
    result = result_of(state)
    assert result.outcome is Outcome.FAILED and delete.call_count >= 2  # the temporary 503 was retried
    assert kinds(result)[:3] == [("recover-entries", a, ActionStatus.DONE), ("settle-runs", a, ActionStatus.DONE),
                                 ("delete-pod", a, ActionStatus.FAILED)]
    assert "HTTP 503" in result.actions[2].detail
    assert a in worker_pods(cluster, s, ready_only=False) and deletions(cluster) == []
    assert not any(":delete-pod:" in k for k in cooldowns(redis, s))  # a failed delete gives its cooldown back
    # what it did before the failure stands, and the report says so
    qs = queue_state(redis, s)
    assert [f["job_id"] for _, f in qs["dlq"]] == [crashed[2]["job_id"]]
    md = report_of(state, "worker-crash-recovery")
    assert "Outcome: failed" in md and "Worker pods and their consumers" in md and "recover-entries" in md


def test_a_healthy_busy_workers_entries_are_never_taken(env, cluster, redis):
    s = env
    a, b, _crashed, busy = crash_scene(cluster, redis, s)
    before = queue_state(redis, s)
    result = worker_crash_recovery(pod=b, dry_run=False, verify_consuming_s=0)
    assert result.outcome is Outcome.NOTHING_TO_DO and result.targets == [] and result.actions == []
    assert "healthy" in result.skipped[0].reason
    assert queue_state(redis, s) == before and deletions(cluster) == []
    # and a sweep of every crashed worker takes A's entries but never B's
    with ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
        swept = worker_crash_recovery(dry_run=False, verify_consuming_s=15)
    assert [t.pod for t in swept.targets] == [a] and swept.outcome is Outcome.RECOVERED
    assert sorted(p[0] for p in queue_state(redis, s)["pending"]) == sorted(f["entry_id"] for f in busy)


def test_dry_run_changes_nothing_anywhere(env, cluster, redis):
    s = env
    a, _b, crashed, _busy = crash_scene(cluster, redis, s)
    before, pods_before = queue_state(redis, s), worker_pods(cluster, s, ready_only=False)
    runs_before = run_status(s, [f["run_id"] for f in crashed])
    result = worker_crash_recovery(pod=a, dry_run=True)
    assert result.outcome is Outcome.DRY_RUN and result.checks == []
    assert kinds(result)[:3] == [("recover-entries", a, ActionStatus.DRY_RUN), ("settle-runs", a, ActionStatus.DRY_RUN),
                                 ("delete-pod", a, ActionStatus.DRY_RUN)]
    assert result.actions[0].count == 5 and "would delete" in result.actions[2].detail
    (out,) = result.targets
    assert (out.requeued, out.dead_lettered, out.poison) == (4, 1, [crashed[2]["entry_id"]])
    assert queue_state(redis, s) == before
    assert worker_pods(cluster, s, ready_only=False) == pods_before and deletions(cluster) == []
    assert run_status(s, [f["run_id"] for f in crashed]) == runs_before
    assert list(redis.scan_iter(match=f"{s.state_prefix}:cooldown:*")) == []  # no cooldown spent


def test_kill_switch_stops_every_mutating_step(env, cluster, redis):
    s = env
    a, _b, crashed, _busy = crash_scene(cluster, redis, s)
    before = queue_state(redis, s)
    Variable.set(s.kill_switch_variable, True, overwrite=True)
    try:
        state = worker_crash_recovery(pod=a, dry_run=False, return_state=True)
    finally:
        Variable.unset(s.kill_switch_variable)
    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.REFUSED
    assert kinds(result) == [("recover-entries", a, ActionStatus.REFUSED)] and "kill switch" in result.actions[0].detail
    assert queue_state(redis, s) == before and deletions(cluster) == []
    assert run_status(s, [crashed[2]["run_id"]]) == {crashed[2]["run_id"]: ("running", None)}
    assert "kill switch" in report_of(state, "worker-crash-recovery")


def test_the_same_alert_three_times_recovers_the_pod_once(env, cluster, redis):
    s = env
    a, _b, _crashed, _busy = crash_scene(cluster, redis, s)
    with ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
        results = [worker_crash_recovery(pod=a, dry_run=False, verify_consuming_s=15) for _ in range(3)]
    assert deletions(cluster) == [a]
    qs = queue_state(redis, s)
    assert len([1 for _, f in qs["stream"] if f.get("attempts")]) == 4  # requeued once, not 3 times
    assert len(qs["dlq"]) == 1
    with get_client(sync_client=True) as client:
        named = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"recover {a}"])))
    assert len(named) == 3  # templated run names: "recover <pod>"
    assert results[0].outcome is Outcome.RECOVERED
    for again in results[1:]:  # the pod and its consumer are gone, or the cooldown holds: nothing done twice
        assert again.outcome in (Outcome.NOTHING_TO_DO, Outcome.REFUSED)
        assert all(x.status is ActionStatus.REFUSED for x in again.actions)


def test_three_concurrent_runs_for_the_same_pod_recover_it_once(env, cluster, redis):
    s = env
    a, _b, _crashed, _busy = crash_scene(cluster, redis, s)
    results: list = []

    def run() -> None:
        with use_settings(s):
            results.append(worker_crash_recovery(pod=a, dry_run=False, verify_consuming_s=0, return_state=True))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 3 and deletions(cluster) == [a]
    qs = queue_state(redis, s)
    assert len([1 for _, f in qs["stream"] if f.get("attempts")]) == 4 and len(qs["dlq"]) == 1
    typed = [result_of(state) for state in results]
    # every change is made by one run only (the runs race: the one that moved the entries is not always the one
    # that won the pod's deletion; each action is guarded and idempotent, so nothing is done twice)
    done = [(x.kind, x.target) for r in typed for x in r.actions if x.status is ActionStatus.DONE]
    assert len(done) == len(set(done)) and {("recover-entries", a), ("delete-pod", a)} <= set(done)
    assert sum(t.requeued for r in typed for t in r.targets) == 4
    idle = [r for r in typed if not any(x.status is ActionStatus.DONE for x in r.actions)]
    for r in idle:  # refused by the per-pod cooldown (or found nothing left)
        assert r.outcome in (Outcome.REFUSED, Outcome.NOTHING_TO_DO)
        assert all((x.status is ActionStatus.REFUSED and "cooldown" in x.detail) or x.status is ActionStatus.UNCHANGED
                   for x in r.actions)


def test_a_consumer_whose_pod_is_gone_is_recovered_without_a_pod_action(env, cluster, redis):
    s = env
    ghost = seed_pending(redis, s, consumer="worker-gone-xyz12", n=3, tag="g", redeliver={0: 1})
    result = worker_crash_recovery(dry_run=False, verify_consuming_s=0)
    assert result.outcome is Outcome.RECOVERED
    out = next(t for t in result.targets if t.pod == "worker-gone-xyz12")
    assert out.cause is Classification.GONE and not out.pod_deleted and out.consumer_deleted
    assert out.requeued == 3 and out.dead_lettered == 0 and out.poison == []  # no poison rule for a pod merely gone
    assert not any(x.kind == "delete-pod" for x in result.actions)
    assert {c.name for c in result.checks if c.target == out.pod} == {WORKERS_READY, CONSUMER_EMPTY}
    qs = queue_state(redis, s)
    assert "worker-gone-xyz12" not in qs["consumers"] and qs["pending"] == []
    assert deletions(cluster) == []
    assert run_status(s, [ghost[0]["run_id"]])[ghost[0]["run_id"]] == ("running", None)
