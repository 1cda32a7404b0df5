"""`make demo` (interim): a dead worker's backlog recovered by the `queue-sweep` flow, on a real local Redis.

Seeds a stream of its own (key prefix `fd-demo:<random>` on FD_REDIS_URL) with: a crashed worker's pending
entries, a slow worker's stale entries, poison entries that already failed twice, an orphan (entry trimmed
away), a busy live worker's fresh entries and a few not yet delivered. Then runs `queue-sweep` under a
temporary Prefect server, prints its report and a one-line summary, and deletes its keys.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")

from tasks.connections import redis_client  # noqa: E402
from tasks.settings import Settings, use_settings  # noqa: E402

DEAD, SLOW, LIVE = "worker-7f9c-dead", "worker-2b1d-slow", "worker-5a8e-live"


def seed(settings: Settings, *, backlog: int = 2000) -> dict[str, int]:
    """Build the scenario with the same commands FerrumDeck's workers use (XADD, XREADGROUP)."""
    client = redis_client(settings)
    client.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)

    def add(jobs: list[str], attempts: int | None = None) -> None:
        with client.pipeline(transaction=False) as pipe:
            for job in jobs:
                fields = {"job_id": job, "run_id": f"run_{job.split('_')[1]}", "step_id": job, "payload": "{}"}
                if attempts is not None:
                    fields["attempts"] = str(attempts)
                pipe.xadd(settings.stream, fields)
            pipe.execute()

    def deliver(consumer: str, count: int) -> list[str]:
        got = client.xreadgroup(settings.group, consumer, {settings.stream: ">"}, count=count)
        return [entry_id for _, entries in got for entry_id, _ in entries]

    poison = backlog // 20
    add([f"stp_{i:05d}" for i in range(backlog - poison)])
    add([f"stp_{i:05d}" for i in range(backlog - poison, backlog)], attempts=2)  # failed twice already
    deliver(DEAD, backlog)
    add([f"stp_{i:05d}" for i in range(backlog, backlog + 50)])
    slow = deliver(SLOW, 50)
    client.xclaim(settings.stream, settings.group, SLOW, 0, slow, idle=6 * 60_000, justid=True)  # 6 min idle
    add(["stp_orphan"])
    orphan = deliver(DEAD, 1)
    client.xdel(settings.stream, *orphan)  # trimmed away while pending
    add([f"stp_{i:05d}" for i in range(backlog + 50, backlog + 60)])
    deliver(LIVE, 10)
    add([f"stp_{i:05d}" for i in range(backlog + 60, backlog + 80)])
    return {"backlog": backlog, "poison": poison, "stale": 50, "orphans": 1, "live": 10, "queued": 20}


def main() -> int:
    base = Settings()
    prefix = f"fd-demo:{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(
        update={
            "stream": f"{prefix}:queue:steps",
            "dlq_stream": f"{prefix}:queue:dlq",
            "state_prefix": f"{prefix}:recovery",
        }
    )
    client = redis_client(settings)
    try:
        seeded = seed(settings)
        print(
            f"Seeded `{settings.stream}`: {DEAD} crashed holding {seeded['backlog'] + 1} entries "
            f"({seeded['poison']} already failed twice, 1 trimmed away), {SLOW} idle 6 min on {seeded['stale']}, "
            f"{LIVE} busy with {seeded['live']}, {seeded['queued']} not delivered yet.\n",
            flush=True,
        )
        from prefect.testing.utilities import prefect_test_harness

        from flows.queue_sweep import queue_sweep

        print("Starting a temporary Prefect server ...", flush=True)
        with prefect_test_harness(server_startup_timeout=90), use_settings(settings):
            started = time.perf_counter()
            out = queue_sweep(dead_consumers=[DEAD], delete_idle_consumers_ms=0, dry_run=False)
            took = time.perf_counter() - started
        print(out.markdown)
        done = out.result.done
        print(
            f"queue-sweep {out.outcome} in {took:.1f}s: scanned {out.result.scanned}, requeued "
            f"{done.get('requeued', 0)}, dead-lettered {done.get('dead_lettered', 0)}, orphans acked "
            f"{done.get('orphan_acked', 0)}, left {out.result.decided.get('leave', 0)} with live workers; "
            f"pending {out.before.pending} -> {out.after.pending}, DLQ {out.before.dlq_length} -> "
            f"{out.after.dlq_length}; consumers deleted: {', '.join(out.cleanup.deleted) if out.cleanup else '-'}",
            flush=True,
        )
        ok = out.after.pending == seeded["live"] and out.after.dlq_length == seeded["poison"]
        return 0 if ok else 1
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    sys.exit(main())
