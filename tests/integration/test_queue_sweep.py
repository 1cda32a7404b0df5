"""`queue-sweep` and its tasks on a real Redis: requeue, dead-letter, orphans, claim, guard, dry run, bad input."""

from __future__ import annotations

import json

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.variables import Variable

from flows.queue_sweep import queue_sweep
from tasks.queue import (
    Decision,
    QueueError,
    SweepPolicy,
    apply_decisions,
    inspect_queue,
    scan_pending,
    sweep_pending,
)
from tests.conftest import REDIS_URL
from tests.integration.queue_fixtures import (
    add_steps,
    backdate,
    deliver,
    dump_keys,
    make_group,
    new_entries,
    pending_ids,
    set_deliveries,
)

FIVE_MIN = 300_000


def seed_mixed(redis, settings):
    """A dead worker's backlog, a slow worker's stale entries, poison, an orphan, a busy live worker, a queue."""
    make_group(redis, settings)
    add_steps(redis, settings, [f"dead-{i}" for i in range(20)])
    dead = deliver(redis, settings, "w-dead", 20)
    add_steps(redis, settings, [f"stale-{i}" for i in range(10)])
    stale = deliver(redis, settings, "w-slow", 10)
    backdate(redis, settings, "w-slow", stale, idle_ms=FIVE_MIN + 60_000)
    add_steps(redis, settings, [f"poison-{i}" for i in range(3)], attempts=2)
    poison = deliver(redis, settings, "w-dead", 3)
    add_steps(redis, settings, ["orphan-0"])
    orphan = deliver(redis, settings, "w-dead", 1)
    redis.xdel(settings.stream, *orphan)
    add_steps(redis, settings, [f"live-{i}" for i in range(5)])
    live = deliver(redis, settings, "w-live", 5)
    add_steps(redis, settings, [f"queued-{i}" for i in range(4)])
    return {"dead": dead, "stale": stale, "poison": poison, "orphan": orphan, "live": live}


def test_dead_and_stale_entries_are_requeued_and_a_fresh_reader_gets_each_once(active_settings, redis):
    settings = active_settings
    ids = seed_mixed(redis, settings)
    live_before = pending_ids(redis, settings, "w-live")

    out = queue_sweep(dead_consumers=["w-dead"], dry_run=False)

    assert out.outcome == "completed"
    assert out.result.done == {"requeued": 30, "dead_lettered": 3, "orphan_acked": 1}
    # the busy live worker's entries are untouched (same ids, same owner)
    assert pending_ids(redis, settings) == live_before
    # a fresh reader receives every requeued step exactly once, with the attempt count carried forward
    got = redis.xreadgroup(settings.group, "w-fresh", {settings.stream: ">"}, count=1000)
    fields = [f for _, entries in got for _, f in entries]
    jobs = [f["job_id"] for f in fields]
    expected = (
        {f"dead-{i}" for i in range(20)}
        | {f"stale-{i}" for i in range(10)}
        | {f"queued-{i}" for i in range(4)}
    )
    assert sorted(jobs) == sorted(expected)
    requeued = [f for f in fields if not f["job_id"].startswith("queued")]
    assert {f["attempts"] for f in requeued} == {"1"}
    assert all(f["run_id"] == "run-" + f["job_id"] and f["payload"] == '{"k": "v"}' for f in requeued)
    assert redis.xreadgroup(settings.group, "w-fresh", {settings.stream: ">"}, count=1000) == []
    # a second sweep finds nothing more to take
    again = queue_sweep(dead_consumers=["w-dead"], dry_run=False)
    assert (
        again.result.moved == 0 and again.result.decided.get("leave") == 5 + 34
    )  # live + the fresh reader's
    assert len(ids["dead"]) == 20


def test_poison_entries_land_in_the_dlq_once_with_all_fields(settings, redis):
    make_group(redis, settings)
    originals = add_steps(redis, settings, ["p-1", "p-2"])
    add_steps(redis, settings, ["p-3"], attempts=2)
    ids = deliver(redis, settings, "w-dead", 3)
    set_deliveries(redis, settings, "w-dead", ids[:2], 3)
    policy = SweepPolicy(dead_consumers=["w-dead"])

    page = scan_pending(settings=settings)
    decided = [(e, Decision("dead_letter", "test: poison")) for e in page]
    first = apply_decisions(settings=settings, decided=decided, policy=policy)
    second = apply_decisions(settings=settings, decided=decided, policy=policy)  # a concurrent sweep, late

    assert [status for *_, status, _ in first] == ["dead_lettered"] * 3
    assert [status for *_, status, _ in second] == ["skipped_gone"] * 3
    dlq = redis.xrange(settings.dlq_stream)
    assert len(dlq) == 3
    by_job = {f["job_id"]: f for _, f in dlq}
    p1 = by_job["p-1"]
    assert p1["error"] == "Max retries exceeded"
    assert p1["original_id"] == originals[0] and p1["original_stream"] == settings.stream
    assert p1["run_id"] == "run-p-1" and p1["step_id"] == "p-1"
    assert p1["deliveries"] == "3" and p1["last_consumer"] == "w-dead" and p1["reason"] == "test: poison"
    assert int(p1["dead_lettered_at_ms"]) > 0
    assert json.loads(p1["fields"]) == {
        "job_id": "p-1",
        "run_id": "run-p-1",
        "step_id": "p-1",
        "payload": '{"k": "v"}',
    }
    assert by_job["p-3"]["deliveries"] == "3"  # 2 earlier attempts + 1 delivery of this copy
    assert pending_ids(redis, settings) == {}
    assert redis.xlen(settings.stream) == 3  # nothing requeued


def test_the_sweep_dead_letters_at_max_deliveries(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, ["a"], attempts=2)
    add_steps(redis, settings, ["b"], attempts=1)
    deliver(redis, settings, "w-dead", 2)
    result = sweep_pending(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)
    assert result.done == {"dead_lettered": 1, "requeued": 1}
    assert [f["job_id"] for _, f in redis.xrange(settings.dlq_stream)] == ["a"]
    assert [(f["job_id"], f["attempts"]) for _, f in new_entries(redis, settings)] == [("b", "2")]


def test_orphans_are_acknowledged_not_retried(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, [f"o-{i}" for i in range(6)])
    ids = deliver(redis, settings, "w-dead", 6)
    redis.xdel(settings.stream, *ids[:4])
    result = sweep_pending(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)
    assert result.done == {"orphan_acked": 4, "requeued": 2}
    assert pending_ids(redis, settings) == {}
    assert sorted(f["job_id"] for _, f in new_entries(redis, settings)) == ["o-4", "o-5"]
    assert redis.xlen(settings.dlq_stream) == 0


def test_a_late_ack_or_a_reclaim_makes_the_move_a_no_op(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, ["x", "y", "z"])
    ids = deliver(redis, settings, "w-slow", 3)
    backdate(redis, settings, "w-slow", ids, idle_ms=FIVE_MIN + 1)
    policy = SweepPolicy()
    page = scan_pending(settings=settings)
    decided = [(e, Decision("requeue", "stale")) for e in page]
    redis.xack(settings.stream, settings.group, ids[0])  # the slow worker finishes after all
    redis.xclaim(settings.stream, settings.group, "w-other", 0, [ids[1]])  # another worker takes it over
    outcomes = apply_decisions(settings=settings, decided=decided, policy=policy)
    assert [status for *_, status, _ in outcomes] == ["skipped_gone", "skipped_busy", "requeued"]
    assert [f["job_id"] for _, f in new_entries(redis, settings)] == ["z"]
    assert pending_ids(redis, settings) == {ids[1]: "w-other"}


def test_claim_strategy_hands_entries_to_the_named_consumer(active_settings, redis):
    settings = active_settings
    make_group(redis, settings)
    add_steps(redis, settings, ["c-1", "c-2"])
    ids = deliver(redis, settings, "w-dead", 2)
    out = queue_sweep(dead_consumers=["w-dead"], strategy="claim", claim_consumer="new-worker", dry_run=False)
    assert out.result.done == {"claimed": 2}
    rows = redis.xpending_range(settings.stream, settings.group, "-", "+", 10)
    assert [(r["message_id"], r["consumer"], r["times_delivered"]) for r in rows] == [
        (ids[0], "new-worker", 2),
        (ids[1], "new-worker", 2),
    ]
    own = redis.xreadgroup(settings.group, "new-worker", {settings.stream: "0"}, count=10)
    assert [f["job_id"] for _, entries in own for _, f in entries] == ["c-1", "c-2"]
    assert new_entries(redis, settings) == []


def test_max_entries_caps_a_run(active_settings, redis):
    settings = active_settings
    make_group(redis, settings)
    add_steps(redis, settings, [f"m-{i}" for i in range(30)])
    deliver(redis, settings, "w-dead", 30)
    out = queue_sweep(dead_consumers=["w-dead"], batch_size=10, max_entries=15, dry_run=False)
    assert out.result.done == {"requeued": 15} and out.result.cap_reached
    assert len(pending_ids(redis, settings, "w-dead")) == 15
    assert "Cap reached" in out.markdown


def test_dry_run_and_kill_switch_leave_every_key_byte_for_byte(active_settings, redis, key_prefix):
    settings = active_settings
    seed_mixed(redis, settings)
    before = dump_keys(REDIS_URL, key_prefix)

    dry = queue_sweep(dead_consumers=["w-dead"], delete_idle_consumers_ms=0, dry_run=True)
    assert dry.outcome == "dry run"
    assert dry.result.decided == {"requeue": 30, "dead_letter": 3, "orphan": 1, "leave": 5}
    assert dry.result.done == {} and "w-dead" not in (dry.cleanup.would_delete if dry.cleanup else [])
    assert "Nothing changed" in dry.markdown and "would" in dry.markdown
    assert dump_keys(REDIS_URL, key_prefix) == before

    Variable.set(settings.kill_switch_variable, True, overwrite=True)
    try:
        paused = queue_sweep(dead_consumers=["w-dead"], delete_idle_consumers_ms=0, dry_run=False)
    finally:
        Variable.unset(settings.kill_switch_variable)
    assert "kill switch" in paused.outcome and paused.result.done == {}
    assert dump_keys(REDIS_URL, key_prefix) == before


def test_report_artifact_has_before_after_counts_and_samples(active_settings, redis):
    from prefect.artifacts import Artifact

    settings = active_settings
    seed_mixed(redis, settings)
    out = queue_sweep(dead_consumers=["w-dead"], dry_run=False)
    artifact = Artifact.get("queue-sweep")
    assert artifact is not None and artifact.data == out.markdown
    md = out.markdown
    for part in ("## Observed", "## Decided", "## Done", "## Verified", "Before", "After", "dead_lettered"):
        assert part in md
    assert "| dead-0 |" in md.replace("`", "")  # the sample table names the steps moved
    assert f"Pending {out.before.pending} -> {out.after.pending}" in md
    assert out.before.pending == 39 and out.after.pending == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_idle_ms": -1},
        {"max_deliveries": 0},
        {"strategy": "steal"},
        {"batch_size": 0},
        {"max_entries": 0},
    ],
)
def test_bad_parameters_fail_before_touching_redis(active_settings, redis, key_prefix, kwargs):
    seed_mixed(redis, active_settings)
    before = dump_keys(REDIS_URL, key_prefix)
    with pytest.raises(ParameterTypeError):
        queue_sweep(dry_run=False, dead_consumers=["w-dead"], **kwargs)
    assert dump_keys(REDIS_URL, key_prefix) == before


def test_dead_claim_consumer_is_refused_clearly(active_settings, redis, key_prefix):
    seed_mixed(redis, active_settings)
    before = dump_keys(REDIS_URL, key_prefix)
    with pytest.raises(QueueError, match="claim_consumer `w-dead` is listed in dead_consumers"):
        queue_sweep(strategy="claim", claim_consumer="w-dead", dead_consumers=["w-dead"], dry_run=False)
    assert dump_keys(REDIS_URL, key_prefix) == before


def test_a_missing_stream_or_group_is_a_clear_error_and_creates_nothing(active_settings, redis, key_prefix):
    with pytest.raises(QueueError, match=f"stream `{active_settings.stream}` does not exist"):
        queue_sweep(dry_run=False)
    assert dump_keys(REDIS_URL, key_prefix) == {}
    add_steps(redis, active_settings, ["a"])
    with pytest.raises(QueueError, match=f"consumer group `{active_settings.group}` does not exist"):
        queue_sweep(dry_run=False)
    assert redis.xlen(active_settings.stream) == 1 and redis.xinfo_groups(active_settings.stream) == []


def test_inspect_queue_snapshot(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, [f"i-{i}" for i in range(6)])
    deliver(redis, settings, "w-a", 3)
    deliver(redis, settings, "w-b", 1)
    redis.xadd(settings.dlq_stream, {"job_id": "old", "error": "Max retries exceeded"})
    snap = inspect_queue(settings=settings)
    assert (snap.length, snap.lag, snap.pending, snap.entries_read, snap.dlq_length) == (6, 2, 4, 4, 1)
    assert {c.name: c.pending for c in snap.consumers} == {"w-a": 3, "w-b": 1}
    assert snap.pending_of("w-a") == 3 and snap.pending_of("nobody") == 0
    assert snap.last_delivered_id == redis.xrange(settings.stream)[3][0]
    assert all(c.idle_ms >= 0 for c in snap.consumers)
