"""`queue-sweep` and its tasks on a real Redis: requeue, dead-letter, orphans, claim, guard, dry run, bad input,
and what the run verified (typed outcomes, actions with counts, checks) against the stream, PEL and DLQ."""

from __future__ import annotations

import json

import pytest
from prefect.artifacts import Artifact
from prefect.exceptions import ParameterTypeError
from prefect.variables import Variable

import flows.queue_sweep as queue_sweep_module
import tasks.queue as queue
from flows.queue_sweep import queue_sweep
from tasks.errors import Refused
from tasks.outcome import ActionStatus, Outcome
from tasks.queue import (
    Move,
    QueueError,
    SweepPolicy,
    dead_letter_pending,
    inspect_queue,
    scan_pending,
    sweep_pending,
    verify_moves,
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

def systems(key_prefix: str) -> dict[bytes, bytes]:
    """Every key of this test (DUMP, byte-exact) but the recovery's own telemetry outbox (``tasks.events``)."""
    return {k: v for k, v in dump_keys(REDIS_URL, key_prefix).items() if b":events:outbox" not in k}


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


def moves(result) -> dict[str, tuple[ActionStatus, int | None]]:
    """The run's actions as kind -> (status, count)."""
    return {a.kind: (a.status, a.count) for a in result.actions}


def report_md() -> str:
    artifact = Artifact.get("queue-sweep")
    assert artifact is not None
    return artifact.data


def test_dead_and_stale_entries_are_requeued_and_a_fresh_reader_gets_each_once(active_settings, redis):
    settings = active_settings
    ids = seed_mixed(redis, settings)
    live_before = pending_ids(redis, settings, "w-live")

    out = queue_sweep(dead_consumers=["w-dead"], dry_run=False)

    assert out.outcome is Outcome.RECOVERED
    assert out.sweep.done == {"requeued": 30, "dead_lettered": 3, "orphan_acked": 1}
    done = ActionStatus.DONE
    assert moves(out) == {"requeue": (done, 30), "dead-letter": (done, 3), "ack-orphan": (done, 1)}
    assert {c.target: c.ok for c in out.checks} == {
        "requeued": True, "dead_lettered": True, "orphan_acked": True, "w-dead": True}
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
    # a second sweep finds nothing more to take: nothing to do, nothing acted on
    again = queue_sweep(dead_consumers=["w-dead"], dry_run=False)
    assert again.outcome is Outcome.NOTHING_TO_DO and again.actions == [] and again.checks == []
    assert again.sweep.moved == 0 and again.sweep.decided == {"leave": 5 + 34}  # live + the fresh reader's
    assert len(ids["dead"]) == 20


def test_an_idle_sweep_is_nothing_to_do_and_reads_no_pending_list(active_settings, redis, mocker):
    settings = active_settings
    make_group(redis, settings)
    add_steps(redis, settings, ["q-1", "q-2"])
    scan = mocker.spy(queue, "scan_pending")

    out = queue_sweep(dead_consumers=["w-dead"], dry_run=False)

    assert out.outcome is Outcome.NOTHING_TO_DO and out.actions == [] and out.checks == []
    assert out.sweep is None and out.after is None and scan.call_count == 0  # one inspect, nothing else
    assert redis.xlen(settings.stream) == 2 and redis.xlen(settings.dlq_stream) == 0


def test_poison_entries_land_in_the_dlq_once_with_all_fields(settings, redis):
    make_group(redis, settings)
    originals = add_steps(redis, settings, ["p-1", "p-2"])
    add_steps(redis, settings, ["p-3"], attempts=2)
    ids = deliver(redis, settings, "w-dead", 3)
    set_deliveries(redis, settings, "w-dead", ids[:2], 3)

    page = scan_pending(settings=settings)
    kw = {"settings": settings, "consumer": "w-dead", "entries": page, "reason": "test: poison", "dry_run": False}
    first = dead_letter_pending(**kw)
    second = dead_letter_pending(**kw)  # a concurrent sweep, late

    assert list(first.values()) == ["dead_lettered"] * 3
    assert list(second.values()) == ["skipped_gone"] * 3
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


def test_a_late_ack_or_a_reclaim_makes_the_move_a_no_op(settings, redis, mocker):
    make_group(redis, settings)
    add_steps(redis, settings, ["x", "y", "z"])
    ids = deliver(redis, settings, "w-slow", 3)
    backdate(redis, settings, "w-slow", ids, idle_ms=FIVE_MIN + 1)
    real_scan = queue.scan_pending

    def scan_then_race(**kwargs):
        page = real_scan(**kwargs)  # the sweep decided on this page; then, before it acts:
        redis.xack(settings.stream, settings.group, ids[0])  # the slow worker finishes after all
        redis.xclaim(settings.stream, settings.group, "w-other", 0, [ids[1]])  # another worker takes it over
        return page

    mocker.patch.object(queue, "scan_pending", side_effect=scan_then_race)
    result = sweep_pending(settings=settings, policy=SweepPolicy(), dry_run=False)
    assert result.decided == {"requeue": 3}
    assert result.done == {"skipped_gone": 1, "skipped_busy": 1, "requeued": 1}
    assert [r["status"] for r in result.samples] == ["skipped_gone", "skipped_busy", "requeued"]
    assert [f["job_id"] for _, f in new_entries(redis, settings)] == ["z"]
    assert pending_ids(redis, settings) == {ids[1]: "w-other"}


def test_claim_strategy_hands_entries_to_the_named_consumer(active_settings, redis):
    settings = active_settings
    make_group(redis, settings)
    add_steps(redis, settings, ["c-1", "c-2"])
    ids = deliver(redis, settings, "w-dead", 2)
    out = queue_sweep(dead_consumers=["w-dead"], strategy="claim", claim_consumer="new-worker", dry_run=False)
    assert out.outcome is Outcome.RECOVERED and out.sweep.done == {"claimed": 2}
    assert moves(out) == {"claim": (ActionStatus.DONE, 2)} and all(c.ok for c in out.checks)
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
    assert out.sweep.done == {"requeued": 15} and out.sweep.cap_reached
    assert out.outcome is Outcome.RECOVERED and moves(out) == {"requeue": (ActionStatus.DONE, 15)}
    assert [c.target for c in out.checks] == ["requeued"]  # w-dead is not empty yet, by design: no such check
    assert len(pending_ids(redis, settings, "w-dead")) == 15
    assert "Cap reached" in report_md()


def test_an_emptied_dead_consumer_is_deleted_and_checked_gone(active_settings, redis):
    settings = active_settings
    seed_mixed(redis, settings)

    out = queue_sweep(dead_consumers=["w-dead"], delete_idle_consumers_ms=0, dry_run=False)

    assert out.outcome is Outcome.RECOVERED
    assert moves(out)["delete-consumers"] == (ActionStatus.DONE, 1) and out.cleanup.deleted == ["w-dead"]
    assert next(c for c in out.checks if c.target == "consumers").ok
    names = {c["name"] for c in redis.xinfo_consumers(settings.stream, settings.group)}
    assert names == {"w-slow", "w-live"}  # the stale worker is not idle (it was just seen): kept


def test_dry_run_and_kill_switch_leave_every_key_byte_for_byte(active_settings, redis, key_prefix):
    settings = active_settings
    seed_mixed(redis, settings)
    before = systems(key_prefix)

    dry = queue_sweep(dead_consumers=["w-dead"], delete_idle_consumers_ms=0, dry_run=True)
    assert dry.outcome is Outcome.DRY_RUN
    assert dry.sweep.decided == {"requeue": 30, "dead_letter": 3, "orphan": 1, "leave": 5}
    assert dry.sweep.done == {} and dry.cleanup is None  # w-dead still owns entries: not proposed
    would = ActionStatus.DRY_RUN
    assert moves(dry) == {"requeue": (would, 30), "dead-letter": (would, 3), "ack-orphan": (would, 1)}
    assert systems(key_prefix) == before

    Variable.set(settings.kill_switch_variable, True, overwrite=True)
    try:
        state = queue_sweep(dead_consumers=["w-dead"], delete_idle_consumers_ms=0, dry_run=False, return_state=True)
        with pytest.raises(Refused, match="kill switch"):
            sweep_pending(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)
    finally:
        Variable.unset(settings.kill_switch_variable)
    paused = state.result()
    assert state.is_completed() and paused.outcome is Outcome.REFUSED
    assert [(a.kind, a.status) for a in paused.actions] == [("sweep-pending", ActionStatus.REFUSED)]
    assert "kill switch" in paused.actions[0].detail and paused.sweep.done == {}
    assert systems(key_prefix) == before


def test_engaging_the_kill_switch_mid_sweep_stops_the_next_batches(active_settings, redis, mocker):
    settings = active_settings
    make_group(redis, settings)
    add_steps(redis, settings, [f"k-{i}" for i in range(250)])
    deliver(redis, settings, "w-dead", 250)
    real = queue_sweep_module.sweep_pages_task

    def batch_then_pause(**kwargs):
        out = real(**kwargs)
        Variable.set(settings.kill_switch_variable, True, overwrite=True)  # the operator pulls the switch
        return out

    batches = mocker.patch.object(queue_sweep_module, "sweep_pages_task", side_effect=batch_then_pause)
    try:  # batch_size 10 x 10 pages per task call: 100 entries per call
        state = queue_sweep(dead_consumers=["w-dead"], batch_size=10, dry_run=False, return_state=True)
    finally:
        Variable.unset(settings.kill_switch_variable)

    assert batches.call_count == 2  # the second call was refused by the guard, the third never made
    result = state.result(raise_on_failure=False)
    assert state.is_failed() and result.outcome is Outcome.PARTIAL
    assert moves(result) == {"requeue": (ActionStatus.DONE, 100), "sweep-pending": (ActionStatus.REFUSED, None)}
    assert "kill switch" in result.actions[-1].detail
    assert [(c.target, c.ok) for c in result.checks] == [("requeued", True)]  # no "w-dead is empty" claim
    assert len(pending_ids(redis, settings, "w-dead")) == 150 and len(new_entries(redis, settings)) == 100


def test_copies_that_vanish_after_the_move_fail_the_run(active_settings, redis, mocker):
    settings = active_settings
    make_group(redis, settings)
    add_steps(redis, settings, [f"v-{i}" for i in range(5)])
    deliver(redis, settings, "w-dead", 5)
    real = queue_sweep_module.sweep_pages_task

    def batch_then_trim(**kwargs):
        out = real(**kwargs)
        redis.xtrim(settings.stream, maxlen=0)  # e.g. a producer trimming the stream with MAXLEN
        return out

    mocker.patch.object(queue_sweep_module, "sweep_pages_task", side_effect=batch_then_trim)
    state = queue_sweep(dead_consumers=["w-dead"], dry_run=False, return_state=True)

    result = state.result(raise_on_failure=False)
    # w-dead was emptied (verified), the requeued copies were not found: partial, and the run Failed
    assert state.is_failed() and result.outcome is Outcome.PARTIAL
    assert moves(result) == {"requeue": (ActionStatus.DONE, 5)}
    assert {c.target: c.ok for c in result.checks} == {"requeued": False, "w-dead": True}
    failed = result.failed_checks[0]
    assert "0/5 sampled" in failed.detail and "no copy" in failed.detail
    assert "Outcome: partial" in report_md()


def test_verify_moves_reads_what_each_move_left_behind(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, ["a", "b", "c"])
    ids = deliver(redis, settings, "w-dead", 3)
    moved = sweep_pending(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)
    new = [r["new_id"] for r in moved.samples]
    redis.xdel(settings.stream, new[1])
    add_steps(redis, settings, ["d"])
    (still,) = deliver(redis, settings, "w-dead", 1)
    in_dlq = redis.xadd(settings.dlq_stream, {"job_id": "e", "error": "Max retries exceeded"})

    checks = verify_moves(settings=settings, moves=[
        Move("requeued", ids[0], "w-dead", new[0]),  # holds
        Move("requeued", ids[1], "w-dead", new[1]),  # its copy is gone
        Move("orphan_acked", still, "w-dead"),  # still pending to its owner
        Move("dead_lettered", ids[2], "w-dead", "1-0"),  # no such DLQ entry
        Move("replayed", in_dlq, "", new[0], "dlq"),  # still in the DLQ
        Move("skipped_gone", "1-1", "", "", "dlq"),  # not in the DLQ: holds
    ])

    got = {c.status: (c.checked, c.held, c.ok) for c in checks}
    assert got == {"requeued": (2, 1, False), "orphan_acked": (1, 0, False), "dead_lettered": (1, 0, False),
                   "replayed": (1, 0, False), "skipped_gone": (1, 1, True)}
    assert checks[0].failures == [f"{ids[1]}: no copy {new[1]}"]
    assert checks[1].failures == [f"{still}: still in place"]


def test_report_artifact_has_before_after_counts_and_samples(active_settings, redis):
    settings = active_settings
    seed_mixed(redis, settings)
    out = queue_sweep(dead_consumers=["w-dead"], dry_run=False)
    md = report_md()
    for part in ("## Observed", "## Decided", "## Done", "## Verified", "Before", "After", "Outcome: recovered"):
        assert part in md
    assert "| dead-0 |" in md  # the sample table names the steps moved
    assert "| requeue | " in md and "| 30 |" in md  # one action per kind of move, with its count
    assert sum("| requeue | owner" in line for line in md.splitlines()) == 2  # a few sample rows, not 30
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
    before = systems(key_prefix)
    with pytest.raises(ParameterTypeError):
        queue_sweep(dry_run=False, dead_consumers=["w-dead"], **kwargs)
    assert systems(key_prefix) == before


def test_dead_claim_consumer_is_refused_clearly(active_settings, redis, key_prefix):
    seed_mixed(redis, active_settings)
    before = systems(key_prefix)
    with pytest.raises(QueueError, match="claim_consumer `w-dead` is listed in dead_consumers"):
        queue_sweep(strategy="claim", claim_consumer="w-dead", dead_consumers=["w-dead"], dry_run=False)
    assert systems(key_prefix) == before


def test_a_missing_stream_or_group_is_a_clear_error_and_creates_nothing(active_settings, redis, key_prefix):
    state = queue_sweep(dry_run=False, return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_failed() and result.outcome is Outcome.FAILED
    assert f"stream `{active_settings.stream}` does not exist" in result.error
    assert "does not exist" in report_md()  # the report is published for a failed run too
    assert systems(key_prefix) == {}
    add_steps(redis, active_settings, ["a"])
    state = queue_sweep(dry_run=False, return_state=True)
    assert state.is_failed()
    assert f"consumer group `{active_settings.group}` does not exist" in state.result(raise_on_failure=False).error
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
