"""worker-hang-recovery end to end: sandbox cluster + real Redis + PostgreSQL, hangs set up directly."""

from __future__ import annotations

import pytest
from prefect.variables import Variable

from flows.worker_hang import worker_hang_recovery
from tasks import kube
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import (
    Producer,
    ReplacementConsumer,
    deletions,
    queue_state,
    run_status,
    seed_pending,
    wait_for_workers,
    worker_pods,
)

pytestmark = pytest.mark.timeout(120)
env = fx.env  # the per-test settings fixture

FAST = {"samples": 3, "sample_interval_s": 0.15, "min_idle_ms": 100, "verify_samples": 4, "verify_interval_s": 0.2}


def test_hung_worker_is_replaced_its_entries_recovered_consumer_removed_and_lag_falls(env, cluster, redis):
    s = env
    a, b, c = worker_pods(cluster, s)
    held = seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=4, tag="h")
    busy = seed_pending(redis, s, consumer=s.consumer_for_pod(b), n=2, tag="b")  # busy: CPU 250m, not hung
    cluster.hang(a)
    with ReplacementConsumer(cluster, s, known=[a, b, c]) as consumer:
        with Producer(s):  # the queue keeps growing while nobody takes new work
            result = worker_hang_recovery(dry_run=False, evict=True, **FAST)
        fx.wait_for(lambda: all(f["job_id"] in consumer.acked for f in held), what="requeued entries processed")

    assert [v.pod for v in result.decision.hung] == [a] and result.decision.lag_growing
    assert deletions(cluster) == [a]
    assert [r.subresource for r in cluster.requests if r.name == a and r.method == "POST"] == ["eviction"]
    out = result.outcomes[0]
    assert out.replacement and out.replacement not in (a, b, c) and out.requeued == 4 and out.consumer_deleted
    state = queue_state(redis, s)
    assert s.consumer_for_pod(a) not in state["consumers"]
    assert sorted(p[0] for p in state["pending"] if p[1] == b) == sorted(f["entry_id"] for f in busy)
    assert result.lag_falling is True and "falling" in result.report
    assert run_status(s, [held[0]["run_id"]])[held[0]["run_id"]] == ("running", None)  # step requeued: left
    verdict_b = next(v for v in result.decision.verdicts if v.pod == b)
    assert not verdict_b.hung and "busy" in verdict_b.reason


def test_no_action_when_the_lag_is_not_growing(env, cluster, redis):
    s = env
    a, *_ = worker_pods(cluster, s)
    seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=2, tag="n")
    cluster.hang(a)
    before = queue_state(redis, s)
    result = worker_hang_recovery(pod=a, dry_run=False, **FAST)
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
    result = worker_hang_recovery(dry_run=False, require_lag_growth=False, **FAST)
    assert sorted(v.pod for v in result.decision.hung) == hung
    assert sorted(deletions(cluster)) == sorted(hung[:3])
    refused = [o for o in result.outcomes if o.refused]
    assert [o.pod for o in refused] == [hung[3]] and "budget" in refused[0].refused
    pending_of_4th = [p for p in queue_state(redis, s)["pending"] if p[1] == s.consumer_for_pod(hung[3])]
    assert len(pending_of_4th) == 2  # the refused pod keeps its entries: nothing half-done
    assert "budget" in result.report


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
    assert "min_healthy_workers=1" in result.outcomes[0].refused
    assert deletions(cluster) == [] and worker_pods(cluster, s) == [only] and queue_state(redis, s) == before
    assert list(redis.scan_iter(match=f"{s.state_prefix}:cooldown:*")) == []  # no budget/cooldown spent


def test_dry_run_and_kill_switch_change_nothing(env, cluster, redis):
    s = env
    a, *_ = worker_pods(cluster, s)
    seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=3, tag="d")
    cluster.hang(a)
    before, pods_before = queue_state(redis, s), worker_pods(cluster, s, ready_only=False)
    dry = worker_hang_recovery(pod=a, dry_run=True, require_lag_growth=False, **FAST)
    assert "dry run: would delete the pod" in dry.report and "requeue 3 entries" in dry.report
    Variable.set(s.kill_switch_variable, True, overwrite=True)
    try:
        paused = worker_hang_recovery(pod=a, dry_run=False, require_lag_growth=False, **FAST)
    finally:
        Variable.unset(s.kill_switch_variable)
    assert "kill switch" in paused.outcomes[0].refused and "kill switch" in paused.report
    assert queue_state(redis, s) == before and worker_pods(cluster, s, ready_only=False) == pods_before
    assert deletions(cluster) == []
