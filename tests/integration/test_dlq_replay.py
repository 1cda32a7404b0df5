"""`dlq-replay` on real Redis: chosen entries go back to the stream once, attempts reset, DLQ emptied of them."""

from __future__ import annotations

import json

import pytest
from prefect.artifacts import Artifact
from prefect.exceptions import ParameterTypeError
from prefect.variables import Variable

from flows.dlq_replay import dlq_replay
from tasks.errors import Refused
from tasks.outcome import ActionStatus, Outcome
from tasks.queue import QueueError, ReplayFilter, SweepPolicy, replay_dlq, sweep_pending
from tests.conftest import REDIS_URL
from tests.integration.queue_fixtures import add_steps, deliver, dump_keys, make_group, new_entries


def systems(key_prefix: str) -> dict[bytes, bytes]:
    """Every key of this test (DUMP, byte-exact) but the recovery's own telemetry outbox (``tasks.events``)."""
    return {k: v for k, v in dump_keys(REDIS_URL, key_prefix).items() if b":events:outbox" not in k}


def dead_letter(redis, settings, jobs, *, group=True):
    """Put real poison entries in the DLQ through the sweep (so the DLQ fields are the project's own)."""
    if group:
        make_group(redis, settings)
    add_steps(redis, settings, jobs, attempts=2)
    deliver(redis, settings, "w-dead", len(jobs))
    sweep_pending(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)
    assert redis.xlen(settings.dlq_stream) == len(jobs)


def test_replay_by_job_id_moves_exactly_those_back_with_attempts_reset(active_settings, redis):
    settings = active_settings
    dead_letter(redis, settings, ["a", "b", "c"])

    out = dlq_replay(job_ids=["a", "c"], dry_run=False)

    assert out.outcome is Outcome.RECOVERED and out.replay.done == {"replayed": 2}
    assert [(a.kind, a.status, a.count) for a in out.actions] == [("replay", ActionStatus.DONE, 2)]
    [check] = out.checks
    assert check.ok and check.target == "replayed" and "2/2 sampled" in check.detail
    fresh = redis.xreadgroup(settings.group, "w-fresh", {settings.stream: ">"}, count=10)
    fields = [f for _, entries in fresh for _, f in entries]
    assert sorted(f["job_id"] for f in fields) == ["a", "c"]
    a = next(f for f in fields if f["job_id"] == "a")
    assert a == {"job_id": "a", "run_id": "run-a", "step_id": "a", "payload": '{"k": "v"}', "attempts": "0"}
    assert [f["job_id"] for _, f in redis.xrange(settings.dlq_stream)] == ["b"]
    md = Artifact.get("dlq-replay").data
    assert "## Verified" in md and "DLQ 3 -> 1" in md and "Outcome: recovered" in md
    # a second run finds nothing: never replayed twice, and says there was nothing to do
    again = dlq_replay(job_ids=["a", "c"], dry_run=False)
    assert again.outcome is Outcome.NOTHING_TO_DO and again.replay.done == {} and [(a.status, a.count) for a in again.actions] == [(ActionStatus.UNCHANGED, 0)]
    assert redis.xlen(settings.stream) == 5


def test_replay_by_ids_reason_and_age(settings, redis):
    dead_letter(redis, settings, ["a", "b", "c"])
    redis.xadd(
        settings.dlq_stream, {"job_id": "manual", "error": "Max retries exceeded"}
    )  # the runbook's by hand
    dlq = redis.xrange(settings.dlq_stream)
    by_ids = replay_dlq(settings=settings, flt=ReplayFilter(ids=frozenset({dlq[1][0]})), dry_run=False)
    assert by_ids.done == {"replayed": 1}
    assert [f["job_id"] for _, f in new_entries(redis, settings)] == ["b"]

    young = replay_dlq(settings=settings, flt=ReplayFilter(min_age_ms=3_600_000), dry_run=False)
    assert young.matched == 0 and young.done == {}

    rest = replay_dlq(settings=settings, flt=ReplayFilter(replay_all=True), max_entries=1, dry_run=False)
    assert rest.done == {"replayed": 1} and rest.cap_reached  # "a", the oldest
    by_reason = replay_dlq(
        settings=settings, flt=ReplayFilter(reason_contains="delivered 3 times"), dry_run=False
    )
    assert by_reason.done == {"replayed": 1}  # "c": the hand-written entry has no such reason
    manual = replay_dlq(settings=settings, flt=ReplayFilter(job_ids=frozenset({"manual"})), dry_run=False)
    assert manual.done == {"replayed": 1}
    assert redis.xlen(settings.dlq_stream) == 0
    tail = new_entries(redis, settings)
    assert sorted(f["job_id"] for _, f in tail) == ["a", "b", "c", "manual"]
    assert tail[-1][1] == {"job_id": "manual", "attempts": "0"}


def test_replay_dry_run_changes_nothing(active_settings, redis, key_prefix):
    dead_letter(redis, active_settings, ["a", "b"])
    before = systems(key_prefix)
    out = dlq_replay(replay_all=True)  # dry run is the default
    assert out.outcome is Outcome.DRY_RUN and out.replay.matched == 2 and out.replay.done == {}
    assert [(a.kind, a.status, a.count) for a in out.actions] == [("replay", ActionStatus.DRY_RUN, 2)]
    assert [r["status"] for r in out.replay.samples] == ["would_replay", "would_replay"]
    assert systems(key_prefix) == before


def test_kill_switch_refuses_the_replay_and_changes_nothing(active_settings, redis, key_prefix):
    settings = active_settings
    dead_letter(redis, settings, ["a", "b"])
    before = systems(key_prefix)
    Variable.set(settings.kill_switch_variable, True, overwrite=True)
    try:
        state = dlq_replay(replay_all=True, dry_run=False, return_state=True)
        with pytest.raises(Refused, match="kill switch"):
            replay_dlq(settings=settings, flt=ReplayFilter(replay_all=True), dry_run=False)
    finally:
        Variable.unset(settings.kill_switch_variable)
    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.REFUSED and result.replay is None
    assert [(a.kind, a.status) for a in result.actions] == [("replay", ActionStatus.REFUSED)]
    assert systems(key_prefix) == before


def test_an_empty_dlq_or_no_match_is_nothing_to_do(active_settings, redis):
    settings = active_settings
    make_group(redis, settings)
    empty = dlq_replay(replay_all=True, dry_run=False)
    assert empty.outcome is Outcome.NOTHING_TO_DO and empty.replay is None and empty.actions == []
    dead_letter(redis, settings, ["a"], group=False)
    none = dlq_replay(job_ids=["zzz"], dry_run=False)
    # the DLQ index knows no entry of `zzz`: no DLQ entry is even read
    assert none.outcome is Outcome.NOTHING_TO_DO and none.replay.scanned == 0 and none.replay.matched == 0
    assert redis.xlen(settings.dlq_stream) == 1


def test_replay_keeps_original_fields_of_an_entry(settings, redis):
    dead_letter(redis, settings, ["x"])
    dlq_fields = redis.xrange(settings.dlq_stream)[0][1]
    assert json.loads(dlq_fields["fields"])["attempts"] == "2"
    replay_dlq(settings=settings, flt=ReplayFilter(job_ids=frozenset({"x"})), dry_run=False)
    ((_, fields),) = new_entries(redis, settings)
    assert fields["attempts"] == "0" and fields["payload"] == '{"k": "v"}'


def test_replay_without_a_choice_or_with_bad_bounds_fails_before_touching_redis(
    active_settings, redis, key_prefix
):
    dead_letter(redis, active_settings, ["a"])
    before = systems(key_prefix)
    with pytest.raises(QueueError, match="replay_all"):
        dlq_replay(dry_run=False)
    with pytest.raises(ParameterTypeError):
        dlq_replay(min_age_ms=-5, dry_run=False)
    with pytest.raises(ParameterTypeError):
        dlq_replay(replay_all=True, max_entries=0, dry_run=False)
    assert systems(key_prefix) == before


def test_replay_into_a_missing_stream_fails_the_run_and_changes_nothing(active_settings, redis):
    redis.xadd(active_settings.dlq_stream, {"job_id": "a", "error": "Max retries exceeded"})
    state = dlq_replay(replay_all=True, dry_run=False, return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_failed() and result.outcome is Outcome.FAILED and "does not exist" in result.error
    assert result.actions == []
    assert redis.xlen(active_settings.dlq_stream) == 1 and not redis.exists(active_settings.stream)
