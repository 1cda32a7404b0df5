"""Benchmark: the project's stuck-runs fail vs the raw single ``UPDATE ... RETURNING`` (PostgreSQL).

    python -m bench.stuck_runs --runs 1000000 --stuck 10000

Creates its own database (dropped afterwards), builds three equal copies of a ``runs`` table (``stuck`` runs
running for over 30 minutes scattered through the table, 1% recently started running runs, the rest finished)
and times, each on its own copy, the task functions in-process:

- ``project_s`` — the project's find + fail for ``stuck-runs-sweep action=fail``: ``fail_stuck_runs``, one
  statement that picks the oldest stuck runs and fails them (no ids sent, the changed ids returned);
  ``flow_db_s`` is the flow's whole database work: ``count_stuck_runs`` (observe), that statement (act) and its
  verify: ``still_running`` of the runs it failed (one read of the stuck-run index: none may still be running)
  and ``read_run_statuses`` of a sample of 20 (each must read ``failed``);
- ``auto_project_s`` — the per-run policy path's database work (``action=auto``): ``find_stuck_runs`` (keyset
  pages of ids over the (status, started_at, id) index) plus ``fail_runs`` of those ids (guarded
  ``UPDATE ... WHERE id = ANY(:ids)``); the steps lookup and the queue check it also does are not timed;
  ``auto_verify_s`` is its verifying re-read of every run found (``read_run_statuses``, primary-key lookups);
- ``raw_s`` — the runbook's raw one-statement ``UPDATE ... WHERE status = 'running' AND started_at < cutoff``.

The fails are timed without their guard (``@guarded``: a kill-switch read from the Prefect API, the same
whatever the table size, and the raw side has none): ``__wrapped__`` is the statement alone.

Each side starts alike (all copies vacuumed, analysed and in the OS cache, by default the WAL checkpointed, its
own copy loaded into shared buffers right before it runs); the rounds cycle through every order of the three
sides, and the failed runs are put back for the next round. The last line is JSON: runs, stuck, project_s,
flow_db_s, auto_project_s, auto_verify_s and raw_s (medians); slowdown_vs_raw, flow_db_slowdown_vs_raw and auto_slowdown_vs_raw
(geometric means of the per-round ratios to raw_s, which cancels the order effect; target for slowdown_vs_raw
<= 1.5) and the median ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from pydantic import SecretStr

from sandbox.scratch import scratch_database
from tasks import runs
from tasks.connections import db_engine, reset_connections
from tasks.settings import Settings

ADMIN_URL = os.environ.get("FD_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _build(engine: sa.Engine, table: str, *, n: int, stuck: int) -> None:
    """Fill ``table`` with ``n`` runs, every (n // stuck)-th one stuck (running, started 31+ minutes ago)."""
    every = max(1, n // stuck)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"""
                INSERT INTO {table} (id, status, started_at, completed_at, agent_version_id)
                SELECT 'run_' || lpad(g::text, 9, '0'),
                       CASE WHEN g % :every = 0 AND g / :every <= :stuck THEN 'running'
                            WHEN g % 100 = 1 THEN 'running'
                            WHEN g % 10 = 3 THEN 'failed' ELSE 'completed' END,
                       CASE WHEN g % :every = 0 AND g / :every <= :stuck
                                 THEN now() - interval '31 minutes' - (g % 86400) * interval '1 second'
                            WHEN g % 100 = 1 THEN now() - (g % 600) * interval '1 second'
                            ELSE now() - interval '1 day' - (g % 864000) * interval '1 second' END,
                       CASE WHEN g % 100 = 1 THEN NULL ELSE now() - interval '1 hour' END,
                       'av_' || (g % 7)
                FROM generate_series(1, :n) AS g
                """
            ),
            {"n": n, "every": every, "stuck": stuck},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f"VACUUM ANALYZE {table}"))


def _settle(engine: sa.Engine, tables: tuple[str, ...], *, checkpoint: bool) -> None:
    """Same start for each side: all copies vacuumed, analysed and in the OS cache; with ``checkpoint``, the
    WAL checkpointed and flushed too, so no side pays for writes the other one caused (each pays its own
    full-page images instead, as a sweep right after a checkpoint would)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_prewarm"))
        for table in tables:
            conn.execute(sa.text(f"VACUUM ANALYZE {table}"))
        if checkpoint:
            conn.execute(sa.text("CHECKPOINT"))
            os.sync()  # no write-back of the other side's WAL and pages still under way
        for table in tables:
            for rel in _relations(table):
                conn.execute(sa.text("SELECT pg_prewarm(:rel, 'read')"), {"rel": rel})


def _relations(table: str) -> tuple[str, ...]:
    return (table, f"ix_{table}_status_started_at", f"{table}_pkey")


def _into_buffers(engine: sa.Engine, table: str) -> None:
    """Load one copy into shared buffers right before its side runs (the copies do not all fit at once)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for rel in _relations(table):
            conn.execute(sa.text("SELECT pg_prewarm(:rel)"), {"rel": rel})


def _reset(engine: sa.Engine, table: str, ids: list[str]) -> None:
    """Put the failed runs back to ``running`` for the next round."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE {table} SET status = 'running', error = NULL, completed_at = NULL WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--stuck", type=int, default=10_000)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="runs_batch_size (default: the setting's)"
    )
    parser.add_argument("--older-than-minutes", type=int, default=30)
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds on the same copies (6: each order of the 3 sides once)"
    )
    parser.add_argument(
        "--max-runs",
        type=int,
        default=None,
        help="fail_stuck_runs limit (the sweep's max_runs; default --stuck)",
    )
    parser.add_argument(
        "--no-checkpoint", dest="checkpoint", action="store_false", help="do not CHECKPOINT before each side"
    )
    args = parser.parse_args(argv)
    if not 0 < args.stuck <= args.runs:
        parser.error("need 0 < --stuck <= --runs")

    with contextlib.ExitStack() as cleanup:
        url = cleanup.enter_context(scratch_database(prefix="fd_bench", admin_url=ADMIN_URL))
        cleanup.callback(reset_connections)  # first: our pooled connections closed before the database is dropped
        base = Settings(database_url=SecretStr(url))
        if args.batch_size:
            base = base.model_copy(update={"runs_batch_size": args.batch_size})
        project = base.model_copy(update={"runs_table": "runs_a", "steps_table": "steps_a"})
        raw = base.model_copy(update={"runs_table": "runs_b", "steps_table": "steps_b"})
        auto = base.model_copy(update={"runs_table": "runs_c", "steps_table": "steps_c"})
        copies = tuple(s.runs_table for s in (project, raw, auto))
        engine = db_engine(project)
        t0 = time.perf_counter()
        for s in (project, raw, auto):
            runs.create_schema(settings=s)
            _build(engine, s.runs_table, n=args.runs, stuck=args.stuck)
        build_s = time.perf_counter() - t0
        max_runs = args.max_runs or args.stuck

        raw_sql = sa.text(
            f"UPDATE {raw.runs_table} SET status = 'failed', "
            """error = '{"code": "WORKER_TIMEOUT", "message": "Worker did not respond"}'::jsonb, """
            "completed_at = now() WHERE status = 'running' AND started_at < :cutoff RETURNING id"
        )

        def start(table: str) -> datetime:
            _settle(engine, copies, checkpoint=args.checkpoint)
            _into_buffers(engine, table)
            return datetime.now(UTC) - timedelta(minutes=args.older_than_minutes)

        fail_stuck_runs = runs.fail_stuck_runs.__wrapped__  # the statement, without its guard (see above)
        fail_runs = runs.fail_runs.__wrapped__

        def run_project() -> dict:
            """stuck-runs-sweep action=fail: count (observe), one fail statement (act), re-read (verify)."""
            cutoff = start(project.runs_table)
            t0 = time.perf_counter()
            before = runs.count_stuck_runs(settings=project, cutoff=cutoff)
            t1 = time.perf_counter()
            changed = fail_stuck_runs(settings=project, cutoff=cutoff, limit=max_runs, dry_run=False)
            t2 = time.perf_counter()
            running = runs.still_running(settings=project, run_ids=changed, cutoff=cutoff)
            shown = runs.read_run_statuses(settings=project, run_ids=changed[:20])
            t3 = time.perf_counter()
            if before != args.stuck or len(changed) != before or running or set(shown.values()) != {"failed"}:
                raise SystemExit(f"project: {before} stuck before, failed {len(changed)}, {len(running)} still running")
            return {"s": t2 - t1, "flow_db_s": t3 - t0, "ids": changed}

        def run_auto() -> dict:
            """The per-run policy path's database work: find the ids, fail them by id, re-read them."""
            cutoff = start(auto.runs_table)
            t0 = time.perf_counter()
            found = runs.find_stuck_runs(settings=auto, cutoff=cutoff)
            t1 = time.perf_counter()
            failed = fail_runs(settings=auto, run_ids=found, cutoff=cutoff, dry_run=False)
            t2 = time.perf_counter()
            now = runs.read_run_statuses(settings=auto, run_ids=found)
            t3 = time.perf_counter()
            if set(now.values()) != {"failed"}:
                raise SystemExit(f"auto: read back {set(now.values())}")
            return {"s": t2 - t0, "find_s": t1 - t0, "verify_s": t3 - t2, "ids": failed.changed}

        def run_raw() -> dict:
            cutoff = start(raw.runs_table)
            t0 = time.perf_counter()
            with engine.begin() as conn:
                ids = conn.execute(raw_sql, {"cutoff": cutoff}).scalars().all()
            return {"s": time.perf_counter() - t0, "ids": ids}

        sides = {"project": (run_project, project), "auto": (run_auto, auto), "raw": (run_raw, raw)}
        orders = list(itertools.permutations(sides))  # every order once per 6 rounds: no side always first
        rounds: list[dict[str, dict]] = []
        for i in range(args.rounds):
            got = {name: sides[name][0]() for name in orders[i % len(orders)]}
            want = sorted(got["raw"]["ids"])
            for name, side in got.items():
                if len(side["ids"]) != args.stuck or sorted(side["ids"]) != want:
                    raise SystemExit(
                        f"mismatch: {name} failed {len(side['ids'])}, raw {len(want)}, want {args.stuck}"
                    )
            rounds.append(got)
            print(
                json.dumps(
                    {
                        "round": i + 1,
                        "order": list(got),
                        "project_s": round(got["project"]["s"], 4),
                        "flow_db_s": round(got["project"]["flow_db_s"], 4),
                        "auto_project_s": round(got["auto"]["s"], 4),
                        "raw_s": round(got["raw"]["s"], 4),
                    }
                ),
                flush=True,
            )
            if i + 1 < args.rounds:
                for name, side in got.items():
                    _reset(engine, sides[name][1].runs_table, side["ids"])

        def median(name: str, key: str = "s") -> float:
            return statistics.median(r[name][key] for r in rounds)

        def slowdown(name: str, key: str = "s") -> float:
            # rounds cycle through the orders: the geometric mean of the per-round ratios cancels the
            # advantage of going first
            return statistics.geometric_mean(r[name][key] / r["raw"]["s"] for r in rounds)

        project_s, auto_s, raw_s = median("project"), median("auto"), median("raw")
        result = {
            "runs": args.runs,
            "stuck": args.stuck,
            "project_s": round(project_s, 4),
            "raw_s": round(raw_s, 4),
            "slowdown_vs_raw": round(slowdown("project"), 3),
            "median_ratio": round(project_s / raw_s, 3),
            "flow_db_s": round(median("project", "flow_db_s"), 4),
            "flow_db_slowdown_vs_raw": round(slowdown("project", "flow_db_s"), 3),
            "auto_project_s": round(auto_s, 4),
            "auto_find_s": round(median("auto", "find_s"), 4),
            "auto_verify_s": round(median("auto", "verify_s"), 4),
            "auto_slowdown_vs_raw": round(slowdown("auto"), 3),
            "auto_median_ratio": round(auto_s / raw_s, 3),
            "rounds": args.rounds,
            "checkpoint_before_each_side": args.checkpoint,
            "max_runs": max_runs,
            "batch_size": project.runs_batch_size,
            "build_s": round(build_s, 1),
        }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
