"""Nothing is lost: 10 000 steps, live workers ACKing while two sweeps run at once on real Redis.

At the end every job id must be in exactly one place: acknowledged by a worker (XACK returned 1), pending
with a live owner, readable as new by a fresh reader, or the DLQ.
"""

from __future__ import annotations

import threading
from collections import Counter

from tasks.queue import SweepPolicy, sweep_pending
from tests.integration.queue_fixtures import (
    add_steps,
    backdate,
    deliver,
    job_of,
    make_group,
    new_entries,
    pending_ids,
)

N = 10_000
LIVE = {"w-live", "w-reader"}


def test_two_concurrent_sweeps_and_live_acks_lose_nothing_and_duplicate_nothing(settings, redis):
    make_group(redis, settings)
    jobs = [f"job-{i}" for i in range(N)]
    # 4 000 held by a dead worker (every 10th has failed twice already), 2 000 by a slow worker that is stale
    # but still ACKs late, 2 000 by a busy live worker, 2 000 not delivered yet.
    for base in range(0, 4000, 10):
        add_steps(redis, settings, jobs[base : base + 9])
        add_steps(redis, settings, jobs[base + 9 : base + 10], attempts=2)
    dead = deliver(redis, settings, "w-dead", 4000)
    add_steps(redis, settings, jobs[4000:6000])
    slow = deliver(redis, settings, "w-slow", 2000)
    backdate(redis, settings, "w-slow", slow, idle_ms=600_000)
    add_steps(redis, settings, jobs[6000:8000])
    busy = deliver(redis, settings, "w-live", 2000)
    add_steps(redis, settings, jobs[8000:])
    assert len(dead) == 4000 and len(slow) == 2000 and len(busy) == 2000

    acked: list[str] = []  # job ids whose XACK returned 1: processed and acknowledged
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    id_to_job = dict(zip(dead + slow + busy, jobs[:8000], strict=True))

    def ack_each(ids: list[str]) -> None:
        with redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xack(settings.stream, settings.group, entry_id)
            results = pipe.execute()
        with lock:
            acked.extend(id_to_job[i] for i, n in zip(ids, results, strict=True) if n == 1)

    def slow_worker() -> None:  # finishes its stale entries late, racing the sweeps
        try:
            for i in range(0, 1000, 20):
                ack_each(slow[i : i + 20])
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    def live_workers() -> None:  # the busy worker ACKs half its entries; a reader consumes new ones
        try:
            for i in range(0, 1000, 50):
                ack_each(busy[i : i + 50])
            processed = 0
            while not stop.is_set() and processed < 3000:
                got = redis.xreadgroup(
                    settings.group, "w-reader", {settings.stream: ">"}, count=100, block=20
                )
                entries = [(eid, f) for _, batch in got for eid, f in batch]
                if not entries:
                    continue
                with lock:
                    id_to_job.update((eid, f["job_id"]) for eid, f in entries)
                ack_each([eid for eid, _ in entries[: len(entries) // 2]])  # the rest stays pending with it
                processed += len(entries)
        except BaseException as e:
            errors.append(e)

    policy = SweepPolicy(min_idle_ms=300_000, max_deliveries=3, dead_consumers=["w-dead"])
    results = []

    def sweep() -> None:
        try:
            results.append(sweep_pending(settings=settings, policy=policy, batch_size=250, dry_run=False))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (slow_worker, live_workers, sweep, sweep)]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join(timeout=60)
    stop.set()
    for t in threads[:2]:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    pending = pending_ids(redis, settings)
    assert set(pending.values()) <= LIVE, "only live workers may still own entries"
    places = (
        acked
        + job_of(redis, settings, pending)
        + [f["job_id"] for _, f in new_entries(redis, settings)]
        + [f["job_id"] for _, f in redis.xrange(settings.dlq_stream)]
    )
    counts = Counter(places)
    assert set(counts) == set(jobs), f"lost: {len(set(jobs) - set(counts))}"
    duplicated = {j: c for j, c in counts.items() if c != 1}
    assert not duplicated, (
        f"{len(duplicated)} job ids in more than one place, e.g. {list(duplicated.items())[:5]}"
    )

    # both sweeps really ran and together moved every dead/stale entry not ACKed in time, each exactly once
    moved = Counter()
    for r in results:
        moved.update(r.done)
    assert (
        len(results) == 2
        and moved["requeued"]
        + moved["dead_lettered"]
        + len([j for j in acked if int(j.split("-")[1]) in range(4000, 6000)])
        == 6000
    )
    assert moved["dead_lettered"] == redis.xlen(settings.dlq_stream) == 400
