"""The stuck-run policy, pure: every branch, run-level aggregation, and invariants (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.queue import StepLocation
from tasks.runs import RunRow, StepRow
from tasks.stuck_policy import Decision, decide, owner_is_live

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(i: str) -> RunRow:
    return RunRow(id=i, status="running", started_at=T0)


def step(i: str, run_id: str, attempts: int = 0) -> StepRow:
    return StepRow(id=i, run_id=run_id, status="running", attempts=attempts)


def loc(step_id: str, where: str, consumer: str | None = None, idle_ms: int | None = None) -> StepLocation:
    return StepLocation(step_id=step_id, where=where, consumer=consumer, idle_ms=idle_ms, deliveries=1)


def one(location: StepLocation | None, attempts: int = 0, **kw):
    locations = {"s1": location} if location is not None else {}
    [d] = decide(runs=[run("r1")], steps={"r1": [step("s1", "r1", attempts)]}, locations=locations, **kw)
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
            steps[rid].append(step(sid, rid, draw(st.integers(0, 5))))
            where = draw(WHERE)
            if where is not None:
                locations[sid] = loc(
                    sid, where, draw(st.sampled_from(["w1", "w2"])), draw(st.integers(0, 10**6))
                )
    return runs, steps, locations


@given(scenarios(), st.sampled_from(["auto", "fail", "retry"]), st.integers(0, 4), st.booleans())
def test_invariants(scenario, action, max_retries, with_live):
    runs, steps, locations = scenario
    live = ["w1"] if with_live else None
    out = decide(
        runs=runs,
        steps=steps,
        locations=locations,
        action=action,
        max_step_retries=max_retries,
        live_consumers=live,
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
            assert s.attempts < max_retries
        # never retry or leave-for-sweep while a live owner holds a step of the run (no double work)
        if action != "fail" and any(
            sid in locations
            and locations[sid].where == "pending"
            and (live is None or locations[sid].consumer in live)
            and (live is not None or locations[sid].idle_ms < 300_000)
            for sid in (x.id for x in steps[d.run_id])
        ):
            assert d.decision == Decision.LEAVE
