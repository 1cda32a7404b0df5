"""The pure scaling policy: capping, the healthy-minimum safety rule, backlog and drain progress."""

from tasks.scale_policy import DrainSample, backlog, drain_progress, plan_scale, sample_rows


def _plan(requested: int, current: int = 3, min_healthy: int = 1, max_replicas: int = 6):
    return plan_scale(deployment="worker", requested=requested, current=current, min_healthy=min_healthy,
                      max_replicas=max_replicas)


def test_plan_scales_to_the_request():
    plan = _plan(5)
    assert (plan.target, plan.capped, plan.scale, plan.refused) == (5, False, True, None)
    assert "from 3 to 5" in plan.reason


def test_plan_caps_at_max_replicas():
    plan = _plan(50)
    assert (plan.target, plan.capped, plan.scale) == (6, True, True)
    assert "capped at FD_MAX_REPLICAS=6" in plan.reason


def test_plan_at_target_only_watches():
    plan = _plan(3)
    assert (plan.target, plan.scale, plan.refused) == (3, False, None)
    capped = _plan(9, current=6)
    assert (capped.target, capped.capped, capped.scale) == (6, True, False)


def test_plan_below_the_healthy_minimum_is_refused():
    plan = _plan(1, min_healthy=2)
    assert plan.refused and "FD_MIN_HEALTHY_WORKERS=2" in plan.refused
    assert (plan.scale, plan.target) == (False, 3)  # nothing changes
    assert _plan(2, min_healthy=2).refused is None  # exactly the minimum is allowed


def test_backlog_counts_lag_and_pending():
    assert backlog(lag=5, pending=3) == 8
    assert backlog(lag=None, pending=3) == 3


def test_drain_progress_math():
    assert drain_progress(initial=100, current=100, target=0) == 0.0
    assert drain_progress(initial=100, current=50, target=0) == 50.0
    assert drain_progress(initial=100, current=0, target=0) == 100.0
    assert drain_progress(initial=100, current=150, target=0) == 0.0
    assert drain_progress(initial=5, current=5, target=10) == 100.0


def test_sample_rows_keep_the_first_and_last_samples():
    samples = [DrainSample(second=i, lag=None if i == 0 else i, pending=0, backlog=i) for i in range(40)]
    rows = sample_rows(samples, limit=10)
    assert [r["second"] for r in rows] == [0, 1, 2, 3, 4, 35, 36, 37, 38, 39]
    assert rows[0]["lag"] == "unknown"
    assert len(sample_rows(samples[:10], limit=10)) == 10
