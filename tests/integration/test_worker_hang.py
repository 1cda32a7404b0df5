"""worker-hang-recovery end to end: sandbox cluster + real Redis + PostgreSQL, hangs set up directly.

Assertions are on the typed result (outcome, actions, per-pod checks) and on the systems' state.
"""

from __future__ import annotations

import pytest
from prefect.variables import Variable

from flows.worker_hang import CONSUMER_EMPTY, LAG_FALLING, REPLACEMENT_READY, worker_hang_recovery
from tasks import kube
from tasks.outcome import ActionStatus, Outcome
from tasks.settings import use_settings
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import (
    Producer,
    ReplacementConsumer,
    cooldowns,
    deletions,
    queue_state,
    report_of,
    result_of,
    run_status,
    seed_pending,
    wait_for_workers,
    worker_pods,
)

pytestmark = pytest.mark.timeout(120)
env = fx.env  # the per-test settings fixture

FAST = {"samples": 3, "sample_interval_s": 0.15, "min_idle_ms": 100, "verify_samples": 4, "verify_interval_s": 0.2}


def kinds(result) -> list[tuple[str, str, ActionStatus]]:
    return [(x.kind, x.target, x.status) for x in result.actions]


def test_hung_worker_is_replaced_its_entries_recovered_consumer_removed_and_lag_falls(env, cluster, redis):
    s = env
    a, b, c = worker_pods(cluster, s)
    held = seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=4, tag="h")
    busy = seed_pending(redis, s, consumer=s.consumer_for_pod(b), n=2, tag="b")  # busy: CPU 250m, not hung
    cluster.hang(a)
    with ReplacementConsumer(cluster, s, known=[a, b, c]) as consumer:
        with Producer(s):  # the queue keeps growing while nobody takes new work
            state = worker_hang_recovery(dry_run=False, evict=True, return_state=True, **FAST)
        fx.wait_for(lambda: all(f["job_id"] in consumer.acked for f in held), what="requeued entries processed")
    result = state.result()

    assert state.is_completed() and result.outcome is Outcome.RECOVERED
    assert [v.pod for v in result.decision.hung] == [a] and result.decision.lag_growing
    assert {(ch.name, ch.ok) for ch in result.checks if ch.target == a} == {
        (REPLACEMENT_READY, True), (CONSUMER_EMPTY, True), (LAG_FALLING, True)}
    assert kinds(result)[:3] == [("evict-pod", a, ActionStatus.DONE), ("recover-entries", a, ActionStatus.DONE),
                                 ("delete-consumer", s.consumer_for_pod(a), ActionStatus.DONE)]
    assert deletions(cluster) == [a]
    assert [r.subresource for r in cluster.requests if r.name == a and r.method == "POST"] == ["eviction"]
    (out,) = result.workers
    assert out.replacement and out.replacement not in (a, b, c) and out.requeued == 4 and out.consumer_deleted
    qs = queue_state(redis, s)
    assert s.consumer_for_pod(a) not in qs["consumers"]
    assert sorted(p[0] for p in qs["pending"] if p[1] == b) == sorted(f["entry_id"] for f in busy)
    assert result.lag_falling is True
    # the requeued steps were processed by the replacement; nothing was retried or failed on top
    assert set(run_status(s, [f["run_id"] for f in held]).values()) == {("completed", None)}
    verdict_b = next(v for v in result.decision.verdicts if v.pod == b)
    assert not verdict_b.hung and "busy" in verdict_b.reason


def test_hang_recovery_whose_lag_does_not_fall_is_not_verified_and_fails(env, cluster, redis):
    s = env
    a, *_ = worker_pods(cluster, s)
    seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=3, tag="nf")
    cluster.hang(a)
    # new work keeps coming and no worker reads it: the lag only grows (and any lag is above normal here)
    with use_settings(s.model_copy(update={"post_check_max_queue_depth": 0})), Producer(s, every_s=0.02):
        state = worker_hang_recovery(pod=a, dry_run=False, return_state=True, **FAST)

    assert state.is_failed()
    result = result_of(state)
    assert result.outcome is Outcome.NOT_VERIFIED and result.lag_falling is False
    assert [(ch.name, ch.target) for ch in result.failed_checks] == [(LAG_FALLING, a)]
    assert {ch.name for ch in result.checks if ch.ok} == {REPLACEMENT_READY, CONSUMER_EMPTY}
    assert deletions(cluster) == [a] and result.workers[0].requeued == 3
    assert "Outcome: not_verified" in report_of(state, "worker-hang-recovery")


def test_no_action_when_the_lag_is_not_growing(env, cluster, redis):
    s = env
    a, *_ = worker_pods(cluster, s)
    seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=2, tag="n")
    cluster.hang(a)
    before = queue_state(redis, s)
    result = worker_hang_recovery(pod=a, dry_run=False, **FAST)
    assert result.outcome is Outcome.NOTHING_TO_DO and result.actions == [] and result.checks == []
    assert result.decision.hung == [] and "lag is not growing" in result.decision.verdicts[0].reason
    assert deletions(cluster) == [] and queue_state(redis, s) == before


def test_budget_allows_three_deletions_then_refuses_the_fourth(env, cluster, redis):
    s = env
    kube.scale_deployment.fn(settings=s, deployment="worker", replicas=5, max_replicas=20, dry_run=False)
    pods = wait_for_workers(cluster, s, 5)
    hung = pods[:4]
    for i, pod in enumerate(hung):
        seed_pending(redis, s, consumer=s.consumer_for_pod(pod), n=2, tag=f"q{i}")
        cluster.hang(pod)
    with ReplacementConsumer(cluster, s, known=pods):  # the replacements take the requeued work: the lag falls
        state = worker_hang_recovery(dry_run=False, require_lag_growth=False, return_state=True, **FAST)
    result = result_of(state)
    assert sorted(v.pod for v in result.decision.hung) == hung
    assert sorted(deletions(cluster)) == sorted(hung[:3])
    refused = [x for x in result.actions if x.status is ActionStatus.REFUSED]
    assert [(x.kind, x.target) for x in refused] == [("delete-pod", hung[3])] and "budget" in refused[0].detail
    pending_of_4th = [p for p in queue_state(redis, s)["pending"] if p[1] == s.consumer_for_pod(hung[3])]
    assert len(pending_of_4th) == 2  # the refused pod keeps its entries: nothing half-done
    # three replaced and verified, one refused: partial, which ends the run Failed after its report
    assert result.outcome is Outcome.PARTIAL and state.is_failed()
    assert "budget" in report_of(state, "worker-hang-recovery")


def test_refuses_to_take_the_last_healthy_worker(env, cluster, redis):
    s = env
    kube.scale_deployment.fn(settings=s, deployment="worker", replicas=1, max_replicas=20, dry_run=False)
    cluster.wait_until(lambda: len(worker_pods(cluster, s, ready_only=False)) == 1, timeout=15)
    (only,) = worker_pods(cluster, s)
    seed_pending(redis, s, consumer=s.consumer_for_pod(only), n=3, tag="l")
    cluster.hang(only)
    before = queue_state(redis, s)
    cluster.clear_requests()
    result = worker_hang_recovery(pod=only, dry_run=False, require_lag_growth=False, **FAST)
    assert [v.pod for v in result.decision.hung] == [only]
    assert result.outcome is Outcome.REFUSED and kinds(result) == [("delete-pod", only, ActionStatus.REFUSED)]
    assert "min_healthy_workers=1" in result.actions[0].detail
    assert deletions(cluster) == [] and worker_pods(cluster, s) == [only] and queue_state(redis, s) == before
    assert cooldowns(redis, s) == []  # no budget/cooldown spent


def test_dry_run_and_kill_switch_change_nothing(env, cluster, redis):
    s = env
    a, *_ = worker_pods(cluster, s)
    seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=3, tag="d")
    cluster.hang(a)
    before, pods_before = queue_state(redis, s), worker_pods(cluster, s, ready_only=False)
    dry = worker_hang_recovery(pod=a, dry_run=True, require_lag_growth=False, **FAST)
    assert dry.outcome is Outcome.DRY_RUN and dry.checks == []
    assert kinds(dry) == [("delete-pod", a, ActionStatus.DRY_RUN), ("recover-entries", a, ActionStatus.DRY_RUN)]
    assert "would delete the pod" in dry.actions[0].detail and dry.actions[1].count == 3
    Variable.set(s.kill_switch_variable, True, overwrite=True)
    try:
        paused = worker_hang_recovery(pod=a, dry_run=False, require_lag_growth=False, **FAST)
    finally:
        Variable.unset(s.kill_switch_variable)
    assert paused.outcome is Outcome.REFUSED and kinds(paused) == [("delete-pod", a, ActionStatus.REFUSED)]
    assert "kill switch" in paused.actions[0].detail
    assert queue_state(redis, s) == before and worker_pods(cluster, s, ready_only=False) == pods_before
    assert deletions(cluster) == [] and cooldowns(redis, s) == []
