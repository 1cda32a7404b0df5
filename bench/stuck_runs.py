"""Benchmark: the project's find + fail of stuck runs vs the raw single ``UPDATE ... RETURNING`` (PostgreSQL).

    python -m bench.stuck_runs --runs 1000000 --stuck 10000

Creates its own database (dropped afterwards), builds two equal copies of a ``runs`` table (``stuck`` runs
running for over 30 minutes scattered through the table, 1% recently started running runs, the rest finished),
then times on copy A the project's ``find_stuck_runs`` (keyset pages over the (status, started_at) index) plus
``fail_runs`` (guarded ``UPDATE ... RETURNING`` per batch), and on copy B the runbook's raw one-statement UPDATE.
Each side starts alike (both copies vacuumed, analysed and in the OS cache, its own copy loaded into shared
buffers right before it runs), alternates which side goes first, and
puts the failed runs back for the next. The last line is JSON: runs, stuck, project_s and raw_s (medians),
slowdown_vs_raw (geometric mean of the per-round project_s / raw_s, which cancels the order effect; target
<= 1.5) and median_ratio (median project_s / median raw_s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from pydantic import SecretStr

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
    """Same start for each side: both copies vacuumed, analysed and in the OS cache; with ``checkpoint``, the
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
    """Load one copy into shared buffers right before its side runs (both copies do not fit at once)."""
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
    parser.add_argument("--rounds", type=int, default=6, help="rounds on the same copies (even: both orders)")
    parser.add_argument(
        "--no-checkpoint", dest="checkpoint", action="store_false", help="do not CHECKPOINT before each side"
    )
    args = parser.parse_args(argv)
    if not 0 < args.stuck <= args.runs:
        parser.error("need 0 < --stuck <= --runs")

    name = f"fd_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        base = Settings(database_url=SecretStr(url))
        if args.batch_size:
            base = base.model_copy(update={"runs_batch_size": args.batch_size})
        project = base.model_copy(update={"runs_table": "runs_a", "steps_table": "steps_a"})
        raw = base.model_copy(update={"runs_table": "runs_b", "steps_table": "steps_b"})
        engine = db_engine(project)
        t0 = time.perf_counter()
        for s in (project, raw):
            runs.create_schema(settings=s)
            _build(engine, s.runs_table, n=args.runs, stuck=args.stuck)
        build_s = time.perf_counter() - t0

        raw_sql = sa.text(
            f"UPDATE {raw.runs_table} SET status = 'failed', "
            """error = '{"code": "WORKER_TIMEOUT", "message": "Worker did not respond"}'::jsonb, """
            "completed_at = now() WHERE status = 'running' AND started_at < :cutoff RETURNING id"
        )

        def run_project() -> tuple[float, float, list[str]]:
            _settle(engine, (project.runs_table, raw.runs_table), checkpoint=args.checkpoint)
            _into_buffers(engine, project.runs_table)
            cutoff = datetime.now(UTC) - timedelta(minutes=args.older_than_minutes)
            t0 = time.perf_counter()
            found = runs.find_stuck_runs(settings=project, cutoff=cutoff)
            t1 = time.perf_counter()
            failed = runs.fail_runs(settings=project, run_ids=found, cutoff=cutoff)
            t2 = time.perf_counter()
            return t1 - t0, t2 - t0, failed.changed

        def run_raw() -> tuple[float, list[str]]:
            _settle(engine, (project.runs_table, raw.runs_table), checkpoint=args.checkpoint)
            _into_buffers(engine, raw.runs_table)
            cutoff = datetime.now(UTC) - timedelta(minutes=args.older_than_minutes)
            t0 = time.perf_counter()
            with engine.begin() as conn:
                ids = conn.execute(raw_sql, {"cutoff": cutoff}).scalars().all()
            return time.perf_counter() - t0, ids

        rounds: list[tuple[float, float, float]] = []
        for i in range(args.rounds):
            if i % 2 == 0:  # alternate which side goes first
                find_s, project_s, changed = run_project()
                raw_s, raw_ids = run_raw()
            else:
                raw_s, raw_ids = run_raw()
                find_s, project_s, changed = run_project()
            if len(changed) != args.stuck or sorted(changed) != sorted(raw_ids):
                raise SystemExit(
                    f"mismatch: project failed {len(changed)}, raw {len(raw_ids)}, want {args.stuck}"
                )
            rounds.append((project_s, find_s, raw_s))
            print(
                json.dumps(
                    {
                        "round": i + 1,
                        "project_s": round(project_s, 4),
                        "find_s": round(find_s, 4),
                        "raw_s": round(raw_s, 4),
                    }
                ),
                flush=True,
            )
            if i + 1 < args.rounds:
                _reset(engine, project.runs_table, changed)
                _reset(engine, raw.runs_table, raw_ids)

        project_s = statistics.median(r[0] for r in rounds)
        raw_s = statistics.median(r[2] for r in rounds)
        # rounds alternate which side goes first: the geometric mean of the per-round ratios cancels the
        # advantage of going first
        slowdown = statistics.geometric_mean(r[0] / r[2] for r in rounds)
        result = {
            "runs": args.runs,
            "stuck": args.stuck,
            "project_s": round(project_s, 4),
            "project_find_s": round(statistics.median(r[1] for r in rounds), 4),
            "raw_s": round(raw_s, 4),
            "slowdown_vs_raw": round(slowdown, 3),
            "median_ratio": round(project_s / raw_s, 3),
            "rounds": args.rounds,
            "checkpoint_before_each_side": args.checkpoint,
            "batch_size": project.runs_batch_size,
            "build_s": round(build_s, 1),
        }
    finally:
        reset_connections()
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
