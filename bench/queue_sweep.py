"""Benchmark: recover a dead consumer's pending list (~5% poison) — the project vs a raw redis-py loop.

    python -m bench.queue_sweep --entries 100000 [--flow]

Both run in this process on fresh, identical copies of the data under a key prefix of their own (deleted
afterwards): the project's task code (``tasks.queue.sweep_pending``: the guard's kill-switch check, then paged
Lua scan + one atomic Lua step per batch) and the naive anchor (XAUTOCLAIM COUNT 1000, then XADD + XACK per
entry in one MULTI per batch). The guard reads a Prefect Variable, so a Prefect API is reached once before
the timings (a temporary local server when none is configured; its start-up is not timed, the check is).
``--flow`` also times the whole ``queue-sweep`` flow (under a temporary local Prefect server) on a third
copy, including its verification. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import uuid
from typing import Any

import redis

from tasks.guard import kill_switch_engaged
from tasks.queue import SweepPolicy, sweep_pending
from tasks.settings import Settings

DEAD = "dead-worker"
SEED_CHUNK = 10_000


def rss_mb() -> float:
    """Current resident set size of this process in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak RSS since the last ``reset_peak_rss()`` (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark so the next measurement covers only what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def seed(client: redis.Redis, settings: Settings, *, entries: int, poison_every: int = 20) -> int:
    """A stream whose every entry was delivered to the dead consumer; every 20th has failed twice before."""
    client.delete(settings.stream, settings.dlq_stream)
    client.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)
    poison = 0
    for base in range(0, entries, SEED_CHUNK):
        with client.pipeline(transaction=False) as pipe:
            for i in range(base, min(base + SEED_CHUNK, entries)):
                fields = {
                    "job_id": f"step-{i}",
                    "run_id": f"run-{i // 10}",
                    "step_id": f"step-{i}",
                    "payload": "{}",
                }
                if i % poison_every == 0:
                    fields["attempts"] = "2"
                    poison += 1
                pipe.xadd(settings.stream, fields)
            pipe.execute()
        client.xreadgroup(settings.group, DEAD, {settings.stream: ">"}, count=SEED_CHUNK)
    return poison


def raw_loop(client: redis.Redis, settings: Settings, *, max_deliveries: int = 3) -> dict[str, int]:
    """The naive anchor: XAUTOCLAIM pages, then XADD (stream or DLQ) + XACK per entry in one MULTI."""
    moved = {"requeued": 0, "dead_lettered": 0, "orphan_acked": 0}
    cursor = "0-0"
    while True:
        cursor, claimed, deleted = client.xautoclaim(
            settings.stream, settings.group, "raw-claimer", 0, start_id=cursor, count=1000
        )
        with client.pipeline(transaction=True) as pipe:
            for entry_id, fields in claimed:
                total = int(fields.get("attempts", 0)) + 1
                if total >= max_deliveries:
                    pipe.xadd(
                        settings.dlq_stream,
                        {
                            "job_id": fields.get("job_id", ""),
                            "error": "Max retries exceeded",
                            "original_id": entry_id,
                        },
                    )
                    moved["dead_lettered"] += 1
                else:
                    pipe.xadd(settings.stream, {**fields, "attempts": str(total)})
                    moved["requeued"] += 1
                pipe.xack(settings.stream, settings.group, entry_id)
            if deleted:
                pipe.xack(settings.stream, settings.group, *deleted)
                moved["orphan_acked"] += len(deleted)
            pipe.execute()
        if cursor == "0-0":
            return moved


def check(client: redis.Redis, settings: Settings, *, entries: int, poison: int) -> None:
    """Both recoveries must leave the same state: nothing pending, poison in the DLQ, the rest requeued."""
    pending = client.xpending(settings.stream, settings.group)["pending"]
    dlq = client.xlen(settings.dlq_stream)
    length = client.xlen(settings.stream)
    if pending or dlq != poison or length != 2 * entries - poison:
        raise SystemExit(f"wrong result: pending={pending} dlq={dlq} xlen={length} (entries={entries})")


def run_flow(settings: Settings, *, batch_size: int) -> float:
    """Time the whole `queue-sweep` flow (acting) under a temporary local Prefect server."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    from flows.queue_sweep import queue_sweep
    from tasks.outcome import Outcome
    from tasks.settings import use_settings

    with prefect_test_harness(server_startup_timeout=60), use_settings(settings):
        started = time.perf_counter()
        result = queue_sweep(dead_consumers=[DEAD], batch_size=batch_size, max_entries=10_000_000, dry_run=False)
        elapsed = time.perf_counter() - started
    if result.outcome is not Outcome.RECOVERED:
        raise SystemExit(f"queue-sweep ended {result.outcome}: {result.cause()}")
    return elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--redis-url", default=os.environ.get("FD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--flow", action="store_true", help="also time the whole queue-sweep flow")
    args = parser.parse_args(argv)

    prefix = f"fdbench:{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=args.redis_url,
        stream=f"{prefix}:steps",
        dlq_stream=f"{prefix}:dlq",
        state_prefix=f"{prefix}:state",
    )
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    out: dict[str, Any] = {"entries": args.entries, "batch_size": args.batch_size}
    try:
        if kill_switch_engaged(settings=settings):  # reaches the Prefect API once (not timed)
            raise SystemExit(f"the kill switch `{settings.kill_switch_variable}` is on: the sweep would be refused")
        poison = seed(client, settings, entries=args.entries)
        rss_before = rss_mb()
        reset_peak_rss()
        started = time.perf_counter()
        result = sweep_pending(
            settings=settings,
            policy=SweepPolicy(dead_consumers=[DEAD]),
            batch_size=args.batch_size,
            dry_run=False,
        )
        project_s = time.perf_counter() - started
        out["project_rss_growth_mb"] = round(max(0.0, peak_rss_mb() - rss_before), 1)
        check(client, settings, entries=args.entries, poison=poison)
        out["project_done"] = result.done

        seed(client, settings, entries=args.entries)
        started = time.perf_counter()
        raw_done = raw_loop(client, settings)
        raw_s = time.perf_counter() - started
        check(client, settings, entries=args.entries, poison=poison)
        out["raw_done"] = raw_done

        out.update(
            project_s=round(project_s, 3),
            raw_s=round(raw_s, 3),
            speedup_vs_raw=round(raw_s / project_s, 2),
            project_entries_per_s=round(args.entries / project_s),
            raw_entries_per_s=round(args.entries / raw_s),
        )
        if args.flow:
            seed(client, settings, entries=args.entries)
            out["flow_s"] = round(run_flow(settings, batch_size=args.batch_size), 3)
            check(client, settings, entries=args.entries, poison=poison)
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
