"""The queue's pure decisions: what a sweep takes, dead-letters or leaves; which DLQ entries a replay picks."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.dlq_replay import build_filter
from flows.queue_sweep import build_policy, policy_text
from tasks.queue import (
    ConsumerInfo,
    DlqRetention,
    Move,
    MoveCheck,
    PendingEntry,
    QueueError,
    QueueSnapshot,
    ReplayFilter,
    ReplayResult,
    SweepPolicy,
    SweepResult,
    consumers_to_delete,
    decide,
    matches_replay,
    move_counts,
    pick_samples,
    replay_moves,
    retention_due,
    sweep_moves,
)
from tasks.queue import _cursor as sweep_cursor

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


def test_move_counts_name_each_kind_of_move_done_or_previewed():
    done = SweepResult(dry_run=False, decided={"requeue": 3, "dead_letter": 1, "leave": 9},
                       done={"requeued": 2, "skipped_gone": 1, "dead_lettered": 1, "orphan_acked": 0})
    assert move_counts(done) == {"requeue": 2, "dead-letter": 1}  # skipped and zero counts are not moves
    preview = SweepResult(dry_run=True, decided={"requeue": 3, "orphan": 1, "claim": 2, "leave": 9})
    assert move_counts(preview) == {"requeue": 3, "ack-orphan": 1, "claim": 2}
    assert move_counts(SweepResult(dry_run=False, decided={"leave": 5})) == {}


def test_consumers_to_delete_only_idle_ones_that_own_nothing_after_the_sweep():
    snap = QueueSnapshot(stream="s", group="g", dlq_stream="d", stream_exists=True, group_exists=True, consumers=[
        ConsumerInfo(name="empty-idle", pending=0, idle_ms=7_200_000),
        ConsumerInfo(name="empty-busy", pending=0, idle_ms=10),
        ConsumerInfo(name="dead", pending=4, idle_ms=7_200_000),
        ConsumerInfo(name="dead-fresh", pending=4, idle_ms=10),
        ConsumerInfo(name="stale", pending=2, idle_ms=7_200_000),
        ConsumerInfo(name="holder", pending=2, idle_ms=3_600_000),
    ])
    policy = SweepPolicy(min_idle_ms=5_000_000, dead_consumers=["dead", "dead-fresh"])
    assert consumers_to_delete(snap, min_idle_ms=3_600_000, policy=policy, swept=True) == [
        "dead", "empty-idle", "stale"]  # "holder" is idle below the sweep's limit: its entries stay
    # the sweep did not run to the end (dry run, cap, refusal): only consumers that already own nothing
    assert consumers_to_delete(snap, min_idle_ms=3_600_000, policy=policy, swept=False) == ["empty-idle"]
    assert consumers_to_delete(snap, min_idle_ms=0, policy=policy, swept=False) == ["empty-busy", "empty-idle"]


def test_moves_to_verify_are_the_moved_sample_rows():
    rows = [
        {"entry_id": "1-0", "consumer": "w", "decision": "requeue", "status": "requeued", "new_id": "9-0"},
        {"entry_id": "2-0", "consumer": "w", "decision": "requeue", "status": "skipped_gone", "new_id": ""},
        {"entry_id": "3-0", "consumer": "w", "decision": "orphan", "status": "orphan_acked", "new_id": ""},
        {"entry_id": "4-0", "consumer": "w", "decision": "requeue"},  # a dry run's row
    ]
    assert sweep_moves(rows) == [Move("requeued", "1-0", "w", "9-0"), Move("orphan_acked", "3-0", "w", "")]
    replay_rows = [{"dlq_id": "5-0", "status": "replayed", "new_id": "9-1"},
                   {"dlq_id": "6-0", "status": "skipped_gone", "new_id": ""},
                   {"dlq_id": "7-0", "status": "would_replay", "new_id": ""}]
    assert replay_moves(replay_rows) == [Move("replayed", "5-0", "", "9-1", "dlq"),
                                         Move("skipped_gone", "6-0", "", "", "dlq")]


def test_a_move_check_holds_only_when_something_was_checked_and_all_held():
    assert MoveCheck(status="requeued", checked=3, held=3).ok
    assert not MoveCheck(status="requeued", checked=3, held=2).ok
    assert not MoveCheck(status="requeued").ok


def test_a_replay_says_whether_it_changed_anything():
    assert not ReplayResult(dry_run=False, matched=2, done={"skipped_gone": 2}).changed
    assert ReplayResult(dry_run=False, matched=2, done={"replayed": 1, "skipped_gone": 1}).replayed == 1


def test_report_samples_are_a_few_rows_per_kind():
    rows = [{"decision": "requeue", "status": "requeued", "i": i} for i in range(30)]
    rows += [{"decision": "dead_letter", "status": "dead_lettered", "i": i} for i in range(3)]
    picked = pick_samples(rows, per_kind=2, limit=10)
    assert [(r["decision"], r["i"]) for r in picked] == [
        ("requeue", 0), ("requeue", 1), ("dead_letter", 0), ("dead_letter", 1)]


def test_policy_text_names_the_rules():
    text = policy_text(SweepPolicy(min_idle_ms=300_000, dead_consumers=["w-b", "w-a"]), 15)
    assert "300000 ms" in text and "(w-a, w-b)" in text and "at most 15 moves" in text


DAY_MS = 86_400_000


def test_retention_is_due_from_the_snapshot_alone():
    base = {"stream": "s", "group": "g", "dlq_stream": "d", "stream_exists": True, "group_exists": True}
    now = 1_738_281_600_000
    old = QueueSnapshot(**base, dlq_length=3, dlq_oldest_id=f"{now - 31 * DAY_MS}-0", server_ms=now)
    young = QueueSnapshot(**base, dlq_length=3, dlq_oldest_id=f"{now - 29 * DAY_MS}-5", server_ms=now)
    edge = QueueSnapshot(**base, dlq_length=3, dlq_oldest_id=f"{now - 30 * DAY_MS}-0", server_ms=now)
    assert retention_due(old, max_age_ms=30 * DAY_MS, max_length=0)
    assert not retention_due(young, max_age_ms=30 * DAY_MS, max_length=0)
    assert not retention_due(edge, max_age_ms=30 * DAY_MS, max_length=0)  # exactly at the limit: kept
    assert not retention_due(old, max_age_ms=0, max_length=0)  # 0: keep all
    assert retention_due(young, max_age_ms=30 * DAY_MS, max_length=2)  # over the length limit
    assert not retention_due(young, max_age_ms=30 * DAY_MS, max_length=3)
    assert not retention_due(QueueSnapshot(**base), max_age_ms=30 * DAY_MS, max_length=2)  # empty DLQ


def test_a_retention_step_says_what_it_trimmed_and_why():
    out = DlqRetention(dry_run=False, max_age_ms=30 * DAY_MS, max_length=100, trimmed=3, by_age=2, by_length=1,
                       first_ms=1_700_000_000_000, last_ms=1_700_000_060_000, job_ids=["a", "b", "c"], more=True)
    assert out.changed
    text = out.summary()
    assert text.startswith("trimmed 3 (2 older than 30 days, 1 beyond 100 entries); dead-lettered 2023-11-14 22:13")
    assert "steps a, b, c" in text and "the next sweep goes on" in text
    preview = DlqRetention(dry_run=True, max_age_ms=DAY_MS, max_length=0, trimmed=1, by_age=1, job_ids=["x"])
    assert not preview.changed and preview.summary().startswith("would trim 1 (1 older than 1 day)")
    assert DlqRetention(dry_run=False, max_age_ms=DAY_MS, max_length=0).summary() == (
        "trimmed nothing: no entry over the limit")


def test_a_sweep_cursor_names_its_phase():
    assert sweep_cursor("-") == (0, "-")
    assert sweep_cursor("(5-1") == (0, "(5-1")  # a plain id: the first phase
    assert sweep_cursor("2|(7-0") == (2, "(7-0") and sweep_cursor("1|-") == (1, "-")
