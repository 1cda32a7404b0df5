"""The stuck-run policy, pure: every branch, run-level aggregation, and invariants (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.queue import StepLocation
from tasks.runs import RunRow, StepRow
from tasks.stuck_policy import (
    Decision,
    decide,
    decision_rows,
    grouped,
    owner_is_live,
    plan,
    step_requeued,
    verify_failed,
    verify_sweep,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(i: str) -> RunRow:
    return RunRow(id=i, status="running", started_at=T0)


def step(i: str, run_id: str, attempts: int = 0, status: str = "running") -> StepRow:
    return StepRow(id=i, run_id=run_id, status=status, attempts=attempts)


def loc(step_id: str, where: str, consumer: str | None = None, idle_ms: int | None = None) -> StepLocation:
    return StepLocation(step_id=step_id, where=where, consumer=consumer, idle_ms=idle_ms, deliveries=1)


def one(location: StepLocation | None, attempts: int = 0, status: str = "running", **kw):
    locations = {"s1": location} if location is not None else {}
    [d] = decide(runs=[run("r1")], steps={"r1": [step("s1", "r1", attempts, status)]}, locations=locations, **kw)
    return d


def test_pending_with_a_recent_owner_is_left():
    d = one(loc("s1", "pending", "w-1", idle_ms=1_000))
    assert d.decision == Decision.LEAVE and "live owner w-1" in d.reason and d.retry_steps == []


def test_pending_with_a_long_idle_owner_is_left_for_the_queue_sweep():
    d = one(loc("s1", "pending", "w-1", idle_ms=600_000))
    assert d.decision == Decision.LEAVE_FOR_QUEUE_SWEEP and "queue sweep" in d.reason


def test_live_consumers_given_decide_liveness_not_idle_time():
    busy_but_dead = one(loc("s1", "pending", "w-dead", idle_ms=10), live_consumers=["w-live"])
    idle_but_live = one(loc("s1", "pending", "w-live", idle_ms=10**7), live_consumers=["w-live"])
    assert busy_but_dead.decision == Decision.LEAVE_FOR_QUEUE_SWEEP
    assert idle_but_live.decision == Decision.LEAVE


def test_min_idle_ms_is_the_liveness_threshold():
    assert one(loc("s1", "pending", "w", idle_ms=999), min_idle_ms=1000).decision == Decision.LEAVE
    assert (
        one(loc("s1", "pending", "w", idle_ms=1000), min_idle_ms=1000).decision
        == Decision.LEAVE_FOR_QUEUE_SWEEP
    )


def test_queued_step_is_left_for_a_worker():
    assert one(loc("s1", "queued")).decision == Decision.LEAVE


def test_nowhere_is_retried_until_retries_are_exhausted():
    d = one(loc("s1", "nowhere"), attempts=1, max_step_retries=3)
    assert d.decision == Decision.RETRY and d.retry_steps == ["s1"] and "retry 2/3" in d.reason
    assert one(None, attempts=0).decision == Decision.RETRY  # no location at all counts as nowhere
    d = one(loc("s1", "nowhere"), attempts=3, max_step_retries=3)
    assert d.decision == Decision.FAIL and "exhausted" in d.reason and d.retry_steps == []


def test_dead_lettered_step_fails_the_run():
    d = one(loc("s1", "dlq"))
    assert d.decision == Decision.FAIL and "dead-lettered" in d.reason


def test_action_fail_fails_even_a_live_run():
    assert one(loc("s1", "pending", "w", idle_ms=1), action="fail").decision == Decision.FAIL


def test_action_retry_never_fails():
    assert one(loc("s1", "dlq"), action="retry").decision == Decision.LEAVE
    assert one(loc("s1", "nowhere"), attempts=9, action="retry").decision == Decision.LEAVE
    assert one(loc("s1", "nowhere"), action="retry").decision == Decision.RETRY


def test_run_without_unfinished_steps_is_failed_in_auto_left_in_retry():
    [d] = decide(runs=[run("r1")], steps={}, locations={})
    assert d.decision == Decision.FAIL and "no unfinished step" in d.reason
    [d] = decide(runs=[run("r1")], steps={}, locations={}, action="retry")
    assert d.decision == Decision.LEAVE


def test_run_takes_the_most_careful_step_decision():
    steps = {"r1": [step("a", "r1"), step("b", "r1"), step("c", "r1")]}
    locations = {"a": loc("a", "nowhere"), "b": loc("b", "dlq"), "c": loc("c", "pending", "w", idle_ms=1)}
    [d] = decide(runs=[run("r1")], steps=steps, locations=locations)
    assert d.decision == Decision.LEAVE and "(step c of 3)" in d.reason
    del locations["c"]
    steps["r1"] = steps["r1"][:2]
    [d] = decide(runs=[run("r1")], steps=steps, locations=locations)
    assert d.decision == Decision.FAIL  # a dead-lettered step: retrying the other cannot save the run
    locations["b"] = loc("b", "nowhere")
    [d] = decide(runs=[run("r1")], steps=steps, locations=locations)
    assert d.decision == Decision.RETRY and d.retry_steps == ["a", "b"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown action"):
        decide(runs=[], steps={}, locations={}, action="delete")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decide(runs=[], steps={}, locations={}, max_step_retries=-1)


def test_runs_may_be_given_as_ids_or_rows():
    out = decide(runs=["r1", run("r2")], steps={}, locations={})
    assert [(d.run_id, d.decision) for d in out] == [("r1", Decision.FAIL), ("r2", Decision.FAIL)]


def test_owner_without_consumer_is_not_live():
    assert not owner_is_live(consumer=None, idle_ms=0, live_consumers=None, min_idle_ms=10)


def test_a_lost_step_is_retried_until_its_lost_retries_are_spent_then_its_run_fails():
    """Issue 11: `queued` in the database, nowhere in the queue: the gateway answers 409 and attempts never rise.
    The 409s the sweep counted (lost_retries) count against max_step_retries, so the decision converges."""
    lost = loc("s1", "nowhere")
    seen = [one(lost, attempts=0, status="queued", max_step_retries=3, lost_retries={"s1": n}) for n in range(5)]
    assert [d.decision for d in seen] == [Decision.RETRY] * 3 + [Decision.FAIL] * 2
    assert "lost" in seen[0].reason and "retry 1/3" in seen[0].reason
    assert "'already queued' 3 time(s)" in seen[3].reason and "exhausted (3/3)" in seen[3].reason
    # attempts the gateway counted and lost retries add up
    assert one(lost, attempts=2, status="queued", lost_retries={"s1": 1}).decision == Decision.FAIL
    # counts of other steps do not matter; action=retry still never fails
    assert one(lost, status="queued", lost_retries={"other": 9}).decision == Decision.RETRY
    assert one(lost, status="queued", lost_retries={"s1": 3}, action="retry").decision == Decision.LEAVE


def test_plan_splits_decisions_into_work():
    steps = {"r1": [step("a", "r1")], "r2": [step("b", "r2"), step("c", "r2")], "r3": [step("d", "r3")]}
    locations = {"d": loc("d", "pending", "w", idle_ms=1)}
    out = plan(decide(runs=[run("r1"), run("r2"), run("r3"), run("r4")], steps=steps, locations=locations))
    assert out.to_fail == ["r4"] and out.left == ["r3"]
    assert out.to_retry == [("r1", "a"), ("r2", "b"), ("r2", "c")]
    assert out.counts == {"retry": 2, "leave": 1, "fail": 1}


def test_decision_rows_are_bounded_and_put_actions_first():
    runs_ = [run(f"r{i}") for i in range(30)]
    steps = {f"r{i}": [step(f"s{i}", f"r{i}")] for i in range(29)}  # r29 has no step: fail
    locations = {f"s{i}": loc(f"s{i}", "queued") for i in range(29)}
    rows = decision_rows(decide(runs=runs_, steps=steps, locations=locations), locations, limit=5)
    assert len(rows) == 5 and rows[0]["run"] == "r29" and rows[0]["decision"] == "fail"
    assert all(isinstance(v, str) for row in rows for v in row.values())  # no Python reprs in cells


def test_grouped_checks_count_and_sample_and_separate_what_failed():
    checks = grouped("x", [(f"t{i}", i != 3, f"e{i}") for i in range(30)], limit=2)
    assert [(c.ok, c.target) for c in checks] == [(True, "x"), (False, "x (not verified)")]
    assert checks[0].detail == "29/30: t0, t1 (+27 more)" and checks[1].detail == "1/30 not: e3: t3"
    same = grouped("x", [("a", False, "why"), ("b", False, "why"), ("c", False, "other")])
    assert [c.detail for c in same] == ["3/3 not: why: a, b; other: c"]  # grouped by reason
    assert [c.ok for c in grouped("x", [("a", True, "")])] == [True]
    assert grouped("x", []) == []


def test_a_retried_step_is_verified_queued_or_taken_by_a_worker():
    assert step_requeued(where="queued", step_status="queued")[0]
    assert step_requeued(where="pending", step_status="running")[0]
    assert step_requeued(where="nowhere", step_status="completed") == (True, "already completed by a worker")
    ok, why = step_requeued(where="nowhere", step_status="queued")
    assert not ok and why.startswith("lost")
    assert not step_requeued(where="dlq", step_status="running")[0]
    assert not step_requeued(where="nowhere", step_status=None)[0]


def test_verify_sweep_checks_every_touched_target_against_its_decision():
    work = plan(decide(
        runs=[run("r_fail"), run("r_gone"), run("r_retry"), run("r_lost"), run("r_left")],
        steps={"r_retry": [step("s_retry", "r_retry")], "r_lost": [step("s_lost", "r_lost", status="queued")],
               "r_left": [step("s_left", "r_left")]},
        locations={"s_left": loc("s_left", "queued")}))
    assert work.to_fail == ["r_fail", "r_gone"] and work.left == ["r_left"]
    checks = verify_sweep(
        plan=work, failed=["r_fail"],
        run_status={"r_fail": "failed", "r_gone": "completed", "r_retry": "running", "r_lost": "running",
                    "r_left": "running"},
        retried={"s_retry": "retried", "s_lost": "already_queued"},
        step_where={"s_retry": "queued", "s_lost": "nowhere"}, step_status={"s_retry": "queued", "s_lost": "queued"},
        lost_retries={"s_lost": 1}, max_step_retries=3)
    by_target = {c.target: c for c in checks}
    assert by_target["runs decided `fail` are failed (or finished meanwhile)"].detail.startswith("2/2")
    assert by_target["retried steps are queued or taken by a worker"].detail.startswith("1/2: s_retry")
    bad = by_target["retried steps are queued or taken by a worker (not verified)"]
    assert not bad.ok and bad.detail.startswith("1/2 not: lost") and bad.detail.endswith(": s_lost")
    assert "lost retry 1/3 counted" in bad.detail
    assert by_target["runs left alone are unchanged"].ok
    # a run the fail said it changed but that still reads `running` is not verified
    again = verify_sweep(plan=work, failed=["r_fail"], run_status={"r_fail": "running", "r_gone": "running"},
                         retried={}, step_where={}, step_status={}, lost_retries={}, max_step_retries=3)
    assert [c.ok for c in again if c.name.startswith("runs decided")] == [False]
    assert not next(c for c in again if c.name == "runs left alone are unchanged").ok  # r_left vanished
    # a retried step whose run ended meanwhile needs no queue entry
    ended = verify_sweep(plan=work, failed=[], run_status={"r_retry": "completed"}, retried={"s_retry": "already_queued"},
                         step_where={}, step_status={"s_retry": "running"}, lost_retries={}, max_step_retries=3)
    assert [(c.ok, c.detail) for c in ended if c.name.startswith("retried")] == [(True, "1/1: s_retry")]


def test_verify_failed_checks_every_run_and_the_sample_read_back():
    ok = verify_failed(failed=["a", "b", "c"], still_running=[], sample_status={"a": "failed"})
    assert [(c.ok, c.detail) for c in ok] == [(True, "3/3: a, b, c")] and "1 of the sample read `failed`" in ok[0].name
    bad = verify_failed(failed=["a", "b", "c"], still_running=["c"], sample_status={"a": "failed", "b": "running"})
    assert [(c.ok, c.detail) for c in bad] == [
        (True, "1/3: a"), (False, "2/3 not: reads `running`: b; still `running`: c")]


WHERE = st.sampled_from(["pending", "queued", "dlq", "nowhere", None])


@st.composite
def scenarios(draw):
    n = draw(st.integers(0, 6))
    runs, steps, locations = [], {}, {}
    for i in range(n):
        rid = f"r{i}"
        runs.append(run(rid))
        steps[rid] = []
        for j in range(draw(st.integers(0, 3))):
            sid = f"{rid}s{j}"
            steps[rid].append(step(sid, rid, draw(st.integers(0, 5)), draw(st.sampled_from(["running", "queued"]))))
            where = draw(WHERE)
            if where is not None:
                locations[sid] = loc(
                    sid, where, draw(st.sampled_from(["w1", "w2"])), draw(st.integers(0, 10**6))
                )
    lost = {sid: draw(st.integers(0, 3)) for group in steps.values() for sid in (s.id for s in group)}
    return runs, steps, locations, lost


@given(scenarios(), st.sampled_from(["auto", "fail", "retry"]), st.integers(0, 4), st.booleans())
def test_invariants(scenario, action, max_retries, with_live):
    runs, steps, locations, lost = scenario
    live = ["w1"] if with_live else None
    out = decide(
        runs=runs,
        steps=steps,
        locations=locations,
        action=action,
        max_step_retries=max_retries,
        live_consumers=live,
        lost_retries=lost,
    )
    assert [d.run_id for d in out] == [r.id for r in runs]
    for d in out:
        assert bool(d.retry_steps) == (d.decision == Decision.RETRY)
        assert d.reason
        if action == "fail":
            assert d.decision == Decision.FAIL
        if action == "retry":
            assert d.decision != Decision.FAIL
        for sid in d.retry_steps:  # only steps nowhere in the queue with retries left are retried
            s = next(x for x in steps[d.run_id] if x.id == sid)
            assert sid not in locations or locations[sid].where == "nowhere"
            assert s.attempts + lost.get(sid, 0) < max_retries  # lost retries count: no retrying forever
        # never retry or leave-for-sweep while a live owner holds a step of the run (no double work)
        if action != "fail" and any(
            sid in locations
            and locations[sid].where == "pending"
            and (live is None or locations[sid].consumer in live)
            and (live is not None or locations[sid].idle_ms < 300_000)
            for sid in (x.id for x in steps[d.run_id])
        ):
            assert d.decision == Decision.LEAVE
