"""Faults injected into the queue tasks: a dropped connection is retried (safely), a real error is not."""

from __future__ import annotations

import pytest
import redis as redis_lib

import tasks.queue as queue
from tasks.queue import QueueError, SweepPolicy, sweep_pages_task
from tests.integration.queue_fixtures import add_steps, deliver, make_group, new_entries, pending_ids


def test_a_dropped_connection_is_retried_and_moves_each_entry_once(settings, redis, mocker):
    make_group(redis, settings)
    add_steps(redis, settings, ["r-1", "r-2"])
    deliver(redis, settings, "w-dead", 2)
    real = queue._apply_decisions
    calls = {"n": 0}

    def act_then_drop(**kwargs):
        calls["n"] += 1
        outcome = real(**kwargs)  # the atomic step ran, but the reply is lost on the way back
        if calls["n"] == 1:
            raise QueueError("cannot move pending entries") from redis_lib.ConnectionError("connection reset")
        return outcome

    mocker.patch.object(queue, "_apply_decisions", side_effect=act_then_drop)
    scans = mocker.spy(queue, "scan_pending")
    result = sweep_pages_task(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)

    assert calls["n"] == 1  # the atomic step ran once; its reply was lost
    # the task was retried: it re-read w-dead's list and the idle entries, found nothing left, moved nothing twice
    assert scans.call_count == 3
    assert result.done == {}
    assert sorted(f["job_id"] for _, f in new_entries(redis, settings)) == ["r-1", "r-2"]
    assert pending_ids(redis, settings) == {}


def test_a_redis_error_that_is_not_temporary_is_not_retried(settings, redis, mocker):
    make_group(redis, settings)
    add_steps(redis, settings, ["e-1"])
    deliver(redis, settings, "w-dead", 1)
    scan = mocker.patch.object(queue, "scan_pending", side_effect=QueueError("NOGROUP"))
    with pytest.raises(QueueError, match="NOGROUP"):
        sweep_pages_task(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)
    assert scan.call_count == 1
    assert len(pending_ids(redis, settings)) == 1
