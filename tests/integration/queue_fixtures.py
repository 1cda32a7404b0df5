"""Helpers that build real consumer-group states on Redis for the queue tests (no mocks, no sleeping)."""

from __future__ import annotations

from collections.abc import Iterable

import redis as redis_lib

from tasks.settings import Settings


def make_group(redis: redis_lib.Redis, settings: Settings) -> None:
    redis.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)


def add_steps(
    redis: redis_lib.Redis, settings: Settings, job_ids: Iterable[str], *, attempts: int | None = None
) -> list[str]:
    """XADD one entry per job id, with the fields FerrumDeck workers read; returns the entry ids."""
    with redis.pipeline(transaction=False) as pipe:
        for job in job_ids:
            fields = {"job_id": job, "run_id": f"run-{job}", "step_id": job, "payload": '{"k": "v"}'}
            if attempts is not None:
                fields["attempts"] = str(attempts)
            pipe.xadd(settings.stream, fields)
        return pipe.execute()


def deliver(redis: redis_lib.Redis, settings: Settings, consumer: str, count: int) -> list[str]:
    """XREADGROUP `>` as ``consumer``: the next ``count`` entries become its pending entries."""
    got = redis.xreadgroup(settings.group, consumer, {settings.stream: ">"}, count=count)
    return [entry_id for _, entries in got for entry_id, _ in entries]


def backdate(redis: redis_lib.Redis, settings: Settings, consumer: str, ids: list[str], idle_ms: int) -> None:
    """Make pending entries look idle for ``idle_ms`` (XCLAIM ... IDLE, same owner, JUSTID keeps the count)."""
    for i in range(0, len(ids), 500):
        redis.xclaim(
            settings.stream, settings.group, consumer, 0, ids[i : i + 500], idle=idle_ms, justid=True
        )


def set_deliveries(
    redis: redis_lib.Redis, settings: Settings, consumer: str, ids: list[str], count: int
) -> None:
    redis.xclaim(settings.stream, settings.group, consumer, 0, ids, retrycount=count, justid=True)


def pending_ids(redis: redis_lib.Redis, settings: Settings, consumer: str | None = None) -> dict[str, str]:
    """Every pending entry id -> owner (optionally of one consumer)."""
    rows = redis.xpending_range(settings.stream, settings.group, "-", "+", 100_000, consumername=consumer)
    return {r["message_id"]: r["consumer"] for r in rows}


def job_of(redis: redis_lib.Redis, settings: Settings, ids: Iterable[str]) -> list[str]:
    with redis.pipeline(transaction=False) as pipe:
        for i in ids:
            pipe.xrange(settings.stream, min=i, max=i)
        return [found[0][1]["job_id"] for found in pipe.execute() if found]


def new_entries(redis: redis_lib.Redis, settings: Settings) -> list[tuple[str, dict[str, str]]]:
    """Entries a fresh reader would get with `>`: after the group's last-delivered-id."""
    group = next(g for g in redis.xinfo_groups(settings.stream) if g["name"] == settings.group)
    return redis.xrange(settings.stream, min="(" + group["last-delivered-id"], max="+")


def dump_keys(redis_url: str, prefix: str) -> dict[bytes, bytes]:
    """Byte-exact serialisation (DUMP: entries, groups, PEL, delivery counts) of every key under a prefix."""
    raw = redis_lib.Redis.from_url(redis_url)
    try:
        return {k: raw.dump(k) for k in sorted(raw.scan_iter(match=f"{prefix}:*", count=1000))}
    finally:
        raw.close()
