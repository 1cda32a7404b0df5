"""The queue's pure decisions: what a sweep takes, dead-letters or leaves; which DLQ entries a replay picks."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.dlq_replay import build_filter
from flows.queue_sweep import build_policy
from tasks.queue import (
    PendingEntry,
    QueueError,
    QueueSnapshot,
    ReplayFilter,
    SweepPolicy,
    SweepResult,
    decide,
    matches_replay,
    pick_samples,
)

POLICY = SweepPolicy(min_idle_ms=300_000, max_deliveries=3, dead_consumers=["w-dead"])


def entry(**kw) -> PendingEntry:
    base = {"entry_id": "1-0", "consumer": "w-live", "idle_ms": 0, "deliveries": 1}
    return PendingEntry(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "action"),
    [
        ({"idle_ms": 299_999}, "leave"),  # a live worker below the runbook's 5 minutes
        ({"idle_ms": 300_000}, "requeue"),  # exactly at the threshold
        ({"consumer": "w-dead", "idle_ms": 0}, "requeue"),  # dead owner: at once
        ({"idle_ms": 400_000, "deliveries": 3}, "dead_letter"),
        ({"idle_ms": 400_000, "deliveries": 1, "attempts": 2}, "dead_letter"),  # 3 across requeues
        ({"idle_ms": 400_000, "deliveries": 1, "attempts": 1}, "requeue"),
        ({"consumer": "w-dead", "exists": False}, "orphan"),
        ({"idle_ms": 10, "deliveries": 7}, "leave"),  # a live worker's last try is not taken from it
        ({"idle_ms": 10, "exists": False}, "leave"),
    ],
)
def test_decide_table(kw, action):
    assert decide(entry(**kw), POLICY).action == action


def test_claim_strategy_claims_instead_of_requeueing():
    policy = SweepPolicy(strategy="claim", dead_consumers=["w-dead"])
    assert decide(entry(consumer="w-dead"), policy).action == "claim"
    assert decide(entry(consumer="w-dead", deliveries=3), policy).action == "dead_letter"


def test_reasons_say_why():
    assert "dead" in decide(entry(consumer="w-dead"), POLICY).reason
    assert "delivered 3 times" in decide(entry(idle_ms=400_000, deliveries=3), POLICY).reason
    assert "may still be working" in decide(entry(), POLICY).reason


@given(
    idle=st.integers(0, 10**9),
    deliveries=st.integers(1, 20),
    attempts=st.integers(0, 20),
    dead=st.booleans(),
    exists=st.booleans(),
    min_idle=st.integers(0, 10**9),
    max_deliveries=st.integers(1, 10),
)
def test_decide_properties(idle, deliveries, attempts, dead, exists, min_idle, max_deliveries):
    policy = SweepPolicy(min_idle_ms=min_idle, max_deliveries=max_deliveries, dead_consumers=["w-dead"])
    e = entry(
        consumer="w-dead" if dead else "w-live",
        idle_ms=idle,
        deliveries=deliveries,
        attempts=attempts,
        exists=exists,
    )
    action = decide(e, policy).action
    # a live owner's entry below the idle threshold is never taken
    if not dead and idle < min_idle:
        assert action == "leave"
    else:
        assert action != "leave"
        if not exists:
            assert action == "orphan"
        else:
            assert (action == "dead_letter") == (attempts + deliveries >= max_deliveries)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"strategy": "claim", "claim_consumer": "w-dead", "dead_consumers": ["w-dead"]}, "dead_consumers"),
        ({"dead_consumers": ["ok", " "]}, "empty name"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"min_idle_ms": -1}, "min_idle_ms"),
        ({"strategy": "bogus"}, "strategy"),
    ],
)
def test_build_policy_rejects_bad_combinations(kw, message):
    args = {
        "min_idle_ms": 1,
        "max_deliveries": 3,
        "dead_consumers": [],
        "strategy": "requeue",
        "claim_consumer": "c",
    }
    with pytest.raises(QueueError, match=message):
        build_policy(**{**args, **kw})


def test_replay_filter_requires_a_choice():
    with pytest.raises(QueueError, match="replay_all"):
        build_filter(ids=None, job_ids=[" "], reason_contains="", min_age_ms=0, replay_all=False)
    assert build_filter(
        ids=None, job_ids=None, reason_contains=None, min_age_ms=0, replay_all=True
    ).replay_all


def test_matches_replay_every_filter_must_match():
    fields = {
        "job_id": "s1",
        "reason": "delivered 3 times",
        "error": "Max retries exceeded",
        "dead_lettered_at_ms": "1000",
    }
    now = 61_000
    assert matches_replay(fields, "5-0", ReplayFilter(job_ids=frozenset({"s1"})), now_ms=now)
    assert not matches_replay(fields, "5-0", ReplayFilter(job_ids=frozenset({"s2"})), now_ms=now)
    assert matches_replay(fields, "5-0", ReplayFilter(reason_contains="MAX RETRIES"), now_ms=now)
    assert matches_replay(fields, "5-0", ReplayFilter(min_age_ms=60_000), now_ms=now)
    assert not matches_replay(fields, "5-0", ReplayFilter(min_age_ms=60_001), now_ms=now)
    assert not matches_replay(fields, "5-0", ReplayFilter(ids=frozenset({"6-0"})), now_ms=now)
    both = ReplayFilter(job_ids=frozenset({"s1"}), reason_contains="timeout")
    assert not matches_replay(fields, "5-0", both, now_ms=now)
    # a hand-written DLQ entry (runbook: job_id + error only) is aged by its entry id
    assert matches_replay({"job_id": "s1"}, "1000-0", ReplayFilter(min_age_ms=60_000), now_ms=now)


def test_sweep_result_merge_adds_counts_and_bounds_samples():
    a = SweepResult(
        dry_run=False,
        scanned=2,
        pages=1,
        decided={"requeue": 2},
        done={"requeued": 2},
        samples=[{"i": i} for i in range(40)],
    )
    b = SweepResult(
        dry_run=False,
        scanned=3,
        pages=1,
        decided={"requeue": 1, "leave": 2},
        done={"requeued": 1},
        samples=[{"i": i} for i in range(40)],
        next_start="(9-0",
    )
    a.merge(b)
    assert (a.scanned, a.pages, a.decided, a.done) == (5, 2, {"requeue": 3, "leave": 2}, {"requeued": 3})
    assert len(a.samples) == 10 and a.next_start == "(9-0" and a.moved == 3  # 10 per kind


def test_samples_keep_every_kind():
    rows = [{"decision": "requeue", "status": "requeued"}] * 100 + [
        {"decision": "dead_letter", "status": "dead_lettered"}
    ]
    picked = pick_samples(rows)
    assert len(picked) == 11 and picked[-1]["decision"] == "dead_letter"
    many = [{"decision": f"d{i}"} for i in range(80)]
    assert len(pick_samples(many)) == 50


def test_snapshot_require_group_explains():
    snap = QueueSnapshot(stream="s", group="g", dlq_stream="d", stream_exists=False, group_exists=False)
    with pytest.raises(QueueError, match="stream `s` does not exist"):
        snap.require_group()
    snap = QueueSnapshot(stream="s", group="g", dlq_stream="d", stream_exists=True, group_exists=False)
    with pytest.raises(QueueError, match="consumer group `g`"):
        snap.require_group()
