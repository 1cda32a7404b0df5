"""Consumer-level queue recovery on real Redis: take a dead consumer's entries, delete only empty consumers,
and locate steps (pending / queued / dlq / nowhere)."""

from __future__ import annotations

import pytest
from prefect.variables import Variable

from tasks.errors import Refused
from tasks.queue import (
    delete_empty_consumers,
    delete_empty_consumers_task,
    locate_steps,
    recover_consumers,
    recover_consumers_task,
)
from tests.conftest import REDIS_URL
from tests.integration.queue_fixtures import (
    add_steps,
    deliver,
    dump_keys,
    make_group,
    new_entries,
    pending_ids,
    set_deliveries,
)


def test_recover_consumers_takes_everything_of_the_dead_now_and_nothing_else(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, [f"d-{i}" for i in range(8)])
    dead = deliver(redis, settings, "w-dead", 8)  # idle ~0 ms: taken anyway, the owner is gone
    set_deliveries(redis, settings, "w-dead", dead[:2], 3)
    add_steps(redis, settings, [f"l-{i}" for i in range(3)])
    live = deliver(redis, settings, "w-live", 3)

    dry = recover_consumers(settings=settings, consumers=["w-dead"], dry_run=True)
    assert dry.decided == {"dead_letter": 2, "requeue": 6} and dry.done == {}
    assert len(pending_ids(redis, settings, "w-dead")) == 8

    result = recover_consumers(settings=settings, consumers=["w-dead"], max_deliveries=3, dry_run=False)
    assert result.done == {"dead_lettered": 2, "requeued": 6}
    assert pending_ids(redis, settings) == dict.fromkeys(live, "w-live")
    assert sorted(f["job_id"] for _, f in new_entries(redis, settings)) == [f"d-{i}" for i in range(2, 8)]
    assert sorted(f["job_id"] for _, f in redis.xrange(settings.dlq_stream)) == ["d-0", "d-1"]
    # idempotent: nothing left to take
    assert recover_consumers(settings=settings, consumers=["w-dead"], dry_run=False).done == {}


def test_the_consumer_tasks_refuse_while_the_kill_switch_is_on(settings, redis, key_prefix):
    make_group(redis, settings)
    add_steps(redis, settings, ["k-1", "k-2"])
    deliver(redis, settings, "w-dead", 1)
    deliver(redis, settings, "w-empty", 1)
    redis.xack(settings.stream, settings.group, *pending_ids(redis, settings, "w-empty"))
    before = dump_keys(REDIS_URL, key_prefix)
    Variable.set(settings.kill_switch_variable, True, overwrite=True)
    try:
        with pytest.raises(Refused, match="kill switch"):
            recover_consumers_task(settings=settings, consumers=["w-dead"], dry_run=False)
        with pytest.raises(Refused, match="kill switch"):
            delete_empty_consumers_task(settings=settings, consumers=None, min_idle_ms=0, dry_run=False)
        # a dry run still previews
        preview = delete_empty_consumers_task(settings=settings, consumers=None, min_idle_ms=0, dry_run=True)
    finally:
        Variable.unset(settings.kill_switch_variable)
    assert preview.would_delete == ["w-empty"] and preview.deleted == []
    assert dump_keys(REDIS_URL, key_prefix) == before


def test_consumers_that_own_entries_are_never_deleted(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, ["h-1", "h-2"])
    deliver(redis, settings, "w-holder", 1)
    deliver(redis, settings, "w-empty", 1)
    redis.xack(settings.stream, settings.group, *pending_ids(redis, settings, "w-empty"))
    redis.xgroup_createconsumer(settings.stream, settings.group, "w-never-read")

    dry = delete_empty_consumers(settings=settings, consumers=None, min_idle_ms=0, dry_run=True)
    assert dry.would_delete == ["w-empty", "w-never-read"] and dry.kept == {"w-holder": "kept_pending"}
    busy = delete_empty_consumers(
        settings=settings, consumers=["w-empty"], min_idle_ms=3_600_000, dry_run=False
    )
    assert busy.deleted == [] and busy.kept == {"w-empty": "kept_busy"}

    done = delete_empty_consumers(
        settings=settings, consumers=["w-holder", "w-empty", "w-unknown"], min_idle_ms=0, dry_run=False
    )
    assert done.deleted == ["w-empty"]
    assert done.kept == {"w-holder": "kept_pending", "w-unknown": "skipped_gone"}
    names = {c["name"]: c["pending"] for c in redis.xinfo_consumers(settings.stream, settings.group)}
    assert names == {"w-holder": 1, "w-never-read": 0}


def test_locate_steps_pending_queued_dlq_nowhere(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, ["s-done", "s-pend"])
    deliver(redis, settings, "w-1", 2)
    done_id = redis.xrange(settings.stream, count=1)[0][0]
    redis.xack(settings.stream, settings.group, done_id)
    set_deliveries(redis, settings, "w-1", list(pending_ids(redis, settings)), 2)
    queued = add_steps(redis, settings, ["s-queued"])
    redis.xadd(settings.dlq_stream, {"job_id": "s-dlq", "error": "Max retries exceeded", "deliveries": "3"})

    where = locate_steps(
        settings=settings, step_ids=["s-done", "s-pend", "s-queued", "s-dlq", "s-unknown"], batch_size=1
    )
    assert {k: v.where for k, v in where.items()} == {
        "s-done": "nowhere",
        "s-pend": "pending",
        "s-queued": "queued",
        "s-dlq": "dlq",
        "s-unknown": "nowhere",
    }
    assert (
        where["s-pend"].consumer == "w-1" and where["s-pend"].deliveries == 2 and where["s-pend"].idle_ms >= 0
    )
    assert where["s-queued"].entry_id == queued[0]
    assert where["s-dlq"].deliveries == 3


def test_locate_prefers_the_pending_copy_over_a_dlq_copy(settings, redis):
    make_group(redis, settings)
    redis.xadd(settings.dlq_stream, {"job_id": "s-1", "error": "Max retries exceeded"})
    add_steps(redis, settings, ["s-1"])
    deliver(redis, settings, "w-1", 1)
    assert locate_steps(settings=settings, step_ids=["s-1"])["s-1"].where == "pending"


def test_locate_on_a_missing_stream_says_nowhere(settings):
    assert locate_steps(settings=settings, step_ids=["x"])["x"].where == "nowhere"
