"""Costs that do not grow with history: the DLQ and tail indexes, DLQ retention, and the lag Redis cannot say.

A step is found in the DLQ without the DLQ being read (every command Redis runs is watched with MONITOR on a
private redis-server), the same commands whether the DLQ holds 20 or 5 000 entries; retention trims exactly
what is over the limit, in bounded steps, and the DLQ index follows every trim, replay and dead-letter
(``assert_index_matches``: the index and the DLQ say the same); the lag is right when Redis reports it unknown,
counted inside Redis (no entry travels to the client) and kept up to date from what was delivered since.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis as redis_lib

from sandbox.scratch import free_port
from tasks import queue
from tasks.connections import redis_client
from tasks.queue import (
    ReplayFilter,
    SweepPolicy,
    index_keys,
    locate_steps,
    replay_dlq,
    sweep_pending,
    trim_dlq,
)
from tasks.settings import Settings
from tests.integration.queue_fixtures import add_steps, deliver, make_group, new_entries

DAY_MS = 86_400_000


# ------------------------------------------------------------------------------------------ helpers


def now_ms(redis: redis_lib.Redis) -> int:
    seconds, micros = redis.time()
    return seconds * 1000 + micros // 1000


def dead_letter(redis: redis_lib.Redis, settings: Settings, jobs: list[str]) -> None:
    """Real poison entries in the DLQ through the project's own dead-letter step (indexed as they are written)."""
    add_steps(redis, settings, jobs, attempts=2)
    deliver(redis, settings, "w-dead", len(jobs))
    sweep_pending(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)


def dlq_by_hand(redis: redis_lib.Redis, settings: Settings, job: str, *, at_ms: int | None = None) -> str:
    """The runbook's manual `XADD fd:queue:dlq * job_id <id> error ...` (optionally at a chosen time)."""
    fields = {"job_id": job, "error": "Max retries exceeded"}
    return redis.xadd(settings.dlq_stream, fields, id=f"{at_ms}-0" if at_ms else "*")


def assert_index_matches(redis: redis_lib.Redis, settings: Settings) -> None:
    """The DLQ index and the DLQ say the same: each entry is indexed under its job id, nothing else is."""
    queue.refresh_indexes(settings=settings)  # takes in what was written by hand since
    want: dict[str, set[str]] = {}
    for entry_id, fields in redis.xrange(settings.dlq_stream):
        want.setdefault(fields["job_id"], set()).add(entry_id)
    got = {job: set(ids.split()) for job, ids in redis.hgetall(index_keys(settings).dlq_index).items()}
    assert got == want


# ------------------------------------------------------------------- a private redis-server, watched


@pytest.fixture
def private_redis(tmp_path) -> Iterator[str]:
    """A redis-server of this test's own (MONITOR sees only our commands); stopped afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis_lib.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:  # poll
        try:
            client.ping()
            break
        except redis_lib.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)  # poll
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


class Monitor:
    """Every command the server runs (Lua's included) while the block runs, as argument lists."""

    def __init__(self, url: str) -> None:
        self.client = redis_lib.Redis.from_url(url, decode_responses=True)
        self.commands: list[list[str]] = []
        self.sources: list[str] = []  # "lua" for a command a script ran, "tcp" for one a client sent
        self._ready = threading.Event()
        self._marker = "monitor-stop-marker"

    def __enter__(self) -> Monitor:
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def _listen(self) -> None:
        with self.client.monitor() as m:
            self._ready.set()
            for event in m.listen():
                args = event["command"].split(" ")  # our keys and ids hold no spaces
                if args[-1:] == [self._marker]:
                    return
                self.commands.append(args)
                self.sources.append(event["client_type"])

    def __exit__(self, *exc: object) -> None:
        self.client.echo(self._marker)
        self._thread.join(timeout=10)
        self.client.close()

    def on(self, key: str, *, source: str | None = None) -> list[list[str]]:
        return [c for c, src in zip(self.commands, self.sources, strict=True)
                if len(c) > 1 and c[1] == key and source in (None, src)]


@pytest.fixture
def watched(private_redis: str, key_prefix: str) -> Iterator[Settings]:
    s = Settings(redis_url=private_redis, stream=f"{key_prefix}:steps", dlq_stream=f"{key_prefix}:dlq",
                 state_prefix=f"{key_prefix}:state")
    yield s
    redis_client(s).flushall()


def _dlq_reads(commands: list[list[str]], dlq: str, last_id: str) -> list[list[str]]:
    """Reads of the DLQ that could transfer entries other than the one asked for: anything but XRANGE of one id,
    or the index's catch-up read after the DLQ's last id (which returns nothing)."""
    heavy = []
    for c in commands:
        verb = c[0].upper()
        if verb in ("EXISTS", "XINFO"):
            continue  # O(1): XINFO STREAM without FULL
        if verb == "XRANGE" and len(c) >= 4 and (c[2] == c[3] or c[2] == f"({last_id}"):
            continue
        heavy.append(c)
    return heavy


@pytest.mark.parametrize("size", [20, 5000])
def test_a_step_in_the_dlq_is_found_without_reading_the_dlq(watched, size):
    s = watched
    redis = redis_client(s)
    make_group(redis, s)
    dead_letter(redis, s, [f"d-{i}" for i in range(size)])
    dlq_by_hand(redis, s, "by-hand")  # written by someone else: indexed by the next lookup, once
    add_steps(redis, s, [f"q-{i}" for i in range(size)])  # a backlog too
    locate_steps(settings=s, step_ids=["warm-up"])  # scripts loaded; the hand-written entry indexed
    last_id = redis.xrevrange(s.dlq_stream, count=1)[0][0]
    wanted = [f"d-{size // 2}", "by-hand"]
    target = redis.hget(index_keys(s).dlq_index, wanted[0])

    with Monitor(s.redis_url.get_secret_value()) as seen:
        where = locate_steps(settings=s, step_ids=wanted)

    assert where[wanted[0]].where == "dlq" and where[wanted[0]].entry_id == target
    assert where["by-hand"].where == "dlq" and where[wanted[0]].deliveries == 3
    on_dlq = seen.on(s.dlq_stream)
    assert seen.on(s.dlq_stream, source="tcp") == []  # the client itself never reads the DLQ
    assert _dlq_reads(on_dlq, s.dlq_stream, last_id) == []
    assert [c for c in on_dlq if c[0].upper() == "XRANGE" and c[2] == c[3]] == [
        ["XRANGE", s.dlq_stream, target, target], ["XRANGE", s.dlq_stream, last_id, last_id]]
    # nor the backlog: the tail is read only after the index's cursor (nothing new), and by id
    on_stream = [c for c in seen.on(s.stream) if c[0].upper() == "XRANGE"]
    assert all(c[2] == c[3] or c[2].startswith("(") and len(c) == 6 for c in on_stream)
    assert len(seen.commands) < 40  # the same handful of commands for 20 or 5 000 entries


def test_a_step_in_the_backlog_is_found_by_id_and_a_delivered_one_is_not_queued(settings, redis):
    make_group(redis, settings)
    ids = add_steps(redis, settings, [f"b-{i}" for i in range(50)])
    assert locate_steps(settings=settings, step_ids=["b-40"])["b-40"].where == "queued"
    assert locate_steps(settings=settings, step_ids=["b-40"])["b-40"].entry_id == ids[40]
    deliver(redis, settings, "w-1", 45)  # b-0 .. b-44 now pending
    where = locate_steps(settings=settings, step_ids=["b-40", "b-45", "b-49"])
    assert {k: v.where for k, v in where.items()} == {"b-40": "pending", "b-45": "queued", "b-49": "queued"}
    redis.xack(settings.stream, settings.group, ids[40])
    redis.xdel(settings.stream, ids[49])  # deleted by hand: never reported from the index
    where = locate_steps(settings=settings, step_ids=["b-40", "b-49"])
    assert {k: v.where for k, v in where.items()} == {"b-40": "nowhere", "b-49": "nowhere"}
    # entries added and delivered between two lookups are found pending all the same (indexed once, on arrival)
    add_steps(redis, settings, ["c-0", "c-1"])
    deliver(redis, settings, "w-2", 10)
    where = locate_steps(settings=settings, step_ids=["c-1", "zz"])
    assert (where["c-1"].where, where["c-1"].consumer, where["zz"].where) == ("pending", "w-2", "nowhere")
    # a group moved back (XGROUP SETID): acknowledged entries are queued again
    redis.xgroup_setid(settings.stream, settings.group, ids[9])
    assert locate_steps(settings=settings, step_ids=["b-10"])["b-10"].where == "pending"  # still in the PEL
    redis.xack(settings.stream, settings.group, ids[10])
    assert locate_steps(settings=settings, step_ids=["b-10"])["b-10"].where == "queued"


def test_buckets_nothing_waits_in_are_dropped_and_a_group_moved_back_rebuilds(settings, redis, monkeypatch):
    monkeypatch.setattr(queue, "TAIL_BUCKET_MS", 10)  # one bucket per 10 ms of entry time
    make_group(redis, settings)
    base = now_ms(redis)
    ids = [redis.xadd(settings.stream, {"job_id": f"t-{i}", "step_id": f"t-{i}"}, id=f"{base + 10 * i}-0")
           for i in range(6)]  # entries 10 ms apart: one bucket each
    queue.refresh_indexes(settings=settings)
    keys = index_keys(settings)
    assert redis.zcard(keys.tail_buckets) == 6
    deliver(redis, settings, "w-1", 5)
    redis.xack(settings.stream, settings.group, ids[0], ids[1], ids[3])
    out = queue.refresh_indexes(settings=settings)
    # dropped: the oldest buckets, wholly delivered with nothing pending, up to the first that still holds t-2
    assert out.pruned == 2 and redis.zcard(keys.tail_buckets) == 4
    assert sorted(redis.scan_iter(match=f"{keys.tail_bucket_prefix}*")) == sorted(
        keys.tail_bucket_prefix + b for b in redis.zrange(keys.tail_buckets, 0, -1))
    assert redis.hget(keys.tail_meta, "floor") == f"{((base + 10) // 10 + 1) * 10 - 1}-18446744073709551615"
    where = locate_steps(settings=settings, step_ids=["t-1", "t-2", "t-4", "t-5"])
    assert {k: v.where for k, v in where.items()} == {"t-1": "nowhere", "t-2": "pending", "t-4": "pending",
                                                      "t-5": "queued"}
    # the group moved back before the floor: rebuilt, the acknowledged t-0 and t-1 are queued again
    redis.xgroup_setid(settings.stream, settings.group, "0-0")
    where = locate_steps(settings=settings, step_ids=["t-0", "t-1", "t-2", "t-3"])
    assert {k: v.where for k, v in where.items()} == {"t-0": "queued", "t-1": "queued", "t-2": "pending",
                                                      "t-3": "queued"}


# ------------------------------------------------------------------------------------------ retention


def test_retention_trims_only_what_is_over_the_age_limit_and_the_index_follows(settings, redis):
    make_group(redis, settings)
    now = now_ms(redis)
    for job, days in (("d40", 40), ("d35", 35), ("d31", 31)):
        dlq_by_hand(redis, settings, job, at_ms=now - days * DAY_MS)
    dlq_by_hand(redis, settings, "d30-", at_ms=now - 30 * DAY_MS + 60_000)  # a minute younger than the limit
    dlq_by_hand(redis, settings, "d1", at_ms=now - DAY_MS)
    dead_letter(redis, settings, ["fresh-0", "fresh-1"])
    assert_index_matches(redis, settings)

    dry = trim_dlq(settings=settings, max_age_ms=30 * DAY_MS, dry_run=True)
    assert (dry.trimmed, dry.by_age, dry.changed) == (3, 3, False) and redis.xlen(settings.dlq_stream) == 7

    out = trim_dlq(settings=settings, max_age_ms=30 * DAY_MS, dry_run=False)

    assert (out.trimmed, out.by_age, out.by_length, out.more) == (3, 3, 0, False)
    assert out.job_ids == ["d40", "d35", "d31"] and out.last_id == f"{now - 31 * DAY_MS}-0"
    kept = [f["job_id"] for _, f in redis.xrange(settings.dlq_stream)]
    assert kept == ["d30-", "d1", "fresh-0", "fresh-1"]
    assert_index_matches(redis, settings)
    where = locate_steps(settings=settings, step_ids=["d40", "d30-"])
    assert (where["d40"].where, where["d30-"].where) == ("nowhere", "dlq")
    assert queue.verify_trim(settings=settings, retention=out).ok
    again = trim_dlq(settings=settings, max_age_ms=30 * DAY_MS, dry_run=False)
    assert again.trimmed == 0 and not again.changed


def test_retention_by_length_in_bounded_steps_keeps_the_newest(settings, redis):
    make_group(redis, settings)
    dead_letter(redis, settings, [f"l-{i}" for i in range(25)])
    dlq_by_hand(redis, settings, "l-hand")

    first = trim_dlq(settings=settings, max_age_ms=0, max_length=6, max_entries=15, batch_size=4, dry_run=False)
    assert (first.trimmed, first.by_length, first.more) == (15, 15, True)  # bounded: the next run goes on
    assert redis.xlen(settings.dlq_stream) == 11
    assert_index_matches(redis, settings)
    rest = trim_dlq(settings=settings, max_age_ms=0, max_length=6, dry_run=False)
    assert (rest.trimmed, rest.more) == (5, False)
    assert [f["job_id"] for _, f in redis.xrange(settings.dlq_stream)] == [f"l-{i}" for i in range(20, 25)] + ["l-hand"]
    assert_index_matches(redis, settings)


def test_replay_and_dead_letter_again_keep_the_index_consistent(settings, redis):
    make_group(redis, settings)
    dead_letter(redis, settings, ["a", "b", "c"])
    hand = dlq_by_hand(redis, settings, "h")
    assert_index_matches(redis, settings)

    out = replay_dlq(settings=settings, flt=ReplayFilter(job_ids=frozenset({"b", "h"})), dry_run=False)

    assert out.done == {"replayed": 2} and out.scanned == 2  # found through the index: no other entry read
    assert_index_matches(redis, settings)
    assert sorted(f["job_id"] for _, f in new_entries(redis, settings)) == ["b", "h"]
    where = locate_steps(settings=settings, step_ids=["a", "b", "h"])
    assert {k: v.where for k, v in where.items()} == {"a": "dlq", "b": "queued", "h": "queued"}
    # the replayed copies fail again (3 deliveries): dead-lettered anew, indexed under their new DLQ entries
    copies = deliver(redis, settings, "w-dead", 2)
    redis.xclaim(settings.stream, settings.group, "w-dead", 0, copies, retrycount=3, justid=True)
    sweep_pending(settings=settings, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)
    assert_index_matches(redis, settings)
    assert locate_steps(settings=settings, step_ids=["b"])["b"].where == "dlq"
    assert hand not in {i for i, _ in redis.xrange(settings.dlq_stream)}
    # an entry deleted by hand is forgotten by the index at its next lookup, never reported
    (a_id,) = [i for i, f in redis.xrange(settings.dlq_stream) if f["job_id"] == "a"]
    redis.xdel(settings.dlq_stream, a_id)
    assert locate_steps(settings=settings, step_ids=["a"])["a"].where == "nowhere"
    assert redis.hget(index_keys(settings).dlq_index, "a") is None


# ---------------------------------------------------------------------------------------------- lag


def test_the_unknown_lag_is_counted_inside_redis_and_kept_up_to_date(watched):
    s = watched
    redis = redis_client(s)
    make_group(redis, s)
    ids = add_steps(redis, s, [f"s{i}" for i in range(3000)])
    deliver(redis, s, "w-1", 1000)
    redis.xdel(s.stream, ids[2000])  # deleted after the last-delivered id: Redis cannot say the lag
    assert redis.xinfo_groups(s.stream)[0]["lag"] is None

    with Monitor(s.redis_url.get_secret_value()) as seen:
        snap = queue.inspect_queue(settings=s)
    assert snap.lag == 1999 and snap.lag_counted
    # one script call: the client sends no command on the stream itself, the counting happens inside Redis
    assert seen.on(s.stream, source="tcp") == []
    assert [c[0] for c in seen.on(s.stream, source="lua") if c[0] == "XRANGE"] == ["XRANGE"] * 3  # 1000 a page
    # later calls read only what was delivered since, however long the tail
    deliver(redis, s, "w-1", 300)
    add_steps(redis, s, [f"n{i}" for i in range(50)])
    with Monitor(s.redis_url.get_secret_value()) as seen:
        snap = queue.inspect_queue(settings=s)
    assert snap.lag == 1999 - 300 + 50
    reads = [c for c in seen.on(s.stream) if c[0] == "XRANGE"]
    assert len(reads) == 1 and reads[0][-2:] == ["COUNT", "1000"]  # one page: the 300 delivered since
    # a removal meanwhile makes it count again: still right
    redis.xdel(s.stream, ids[2500])
    assert queue.inspect_queue(settings=s).lag == 1999 - 300 + 50 - 1
    redis.xreadgroup(s.group, "w-1", {s.stream: ">"}, count=10_000)
    assert queue.inspect_queue(settings=s).lag == 0


def test_an_idle_index_refresh_is_one_call_and_writes_nothing(settings, redis):
    make_group(redis, settings)
    add_steps(redis, settings, ["x"])
    dead_letter(redis, settings, ["y"])
    queue.refresh_indexes(settings=settings)
    state = {k: redis.dump(k) for k in redis.scan_iter(match=f"{settings.state_prefix}:*")}
    out = queue.refresh_indexes(settings=settings)
    assert (out.calls, out.tail, out.dlq, out.behind) == (1, 0, 0, False)
    assert {k: redis.dump(k) for k in redis.scan_iter(match=f"{settings.state_prefix}:*")} == state
