"""Benchmark: every flow's work on a production-sized FerrumDeck and on an empty one, side by side.

    python -m bench.scale [--backlog 1000000 --dlq 1000000 --pending 10000 --consumers 50 --runs 10000000
                           --stuck 10000 --repeats 3]

Seeds, in keys and a database of its own (a private ``redis-server`` on a free port unless ``--redis-url``; a
PostgreSQL database created and dropped), two FerrumDecks that differ only in their history:

- ``large``: ``--backlog`` undelivered steps, ``--dlq`` dead-lettered steps (spread over the last 29 days, written
  the way a DLQ built before the indexes existed was: by hand, unindexed), ``--pending`` entries held by
  ``--consumers`` live workers, a ``runs`` table of ``--runs`` runs of which ``--stuck`` are stuck (INSERT ...
  SELECT generate_series, indexes built after the load), a step row per stuck run;
- ``small``: none of that history;

and, in both, the same designed cases: three crashed consumers holding 50 entries each (one poison), 100 stuck
runs (the oldest) whose steps are pending with a live worker, queued deep in the backlog, dead-lettered deep in
the DLQ or nowhere (25 each), a step to retry. Then it builds the queue indexes of the large one once (timed:
``index_build_s``, the one-off cost of an existing history; afterwards the sweep keeps them current) and times,
``--repeats`` times alternately on small and large, each flow's work:

- ``idle_queue_sweep``: the whole `queue-sweep` flow with nothing to take (live workers' entries fresh);
- ``crash_recovery``: a crash recovery of one consumer holding 50 entries, task path (read its entries, poison
  to the DLQ and the rest requeued, consumer removed, its runs settled through the stuck-runs policy, the
  consumer re-read) — not the wait for a replacement pod;
- ``stuck_runs_sweep``: the whole `stuck-runs-sweep` flow (acting) on the 100 stuck runs (a stub gateway
  re-enqueues: XADD + the step row marked queued, as FerrumDeck's does; between repeats the runs are put back
  to ``running`` and the lost steps get fresh ids, untimed);
- ``post_recovery_check``: the whole flow (alerting check off) against the sandbox Kubernetes API;
- ``retry_step``: the whole `retry-step` flow (acting) on a step that is nowhere;
- ``inspect_lag_unknown``: ``inspect_queue`` after an undelivered entry was deleted (Redis reports the lag
  unknown), each sample the median of 21 calls (one takes about a millisecond); the first count after the lag
  became unknown is reported apart (``lag_first_count_s``).

Flows run in-process under a temporary Prefect server. Each timing counts the Redis round trips of this process
(a client hook: one per command or pipeline) and the peak RSS growth (VmHWM reset before each). The last line
printed is JSON: per case ``s_small``, ``s_large`` (medians), ``growth = s_large / s_small``, round trips, RSS
growth; the one-off costs; the seeding times; the targets and whether they were met.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from bench.queue_sweep import peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402
from sandbox.scratch import scratch_database  # noqa: E402
from tasks import queue, runs  # noqa: E402
from tasks.connections import db_engine, redis_client, reset_connections  # noqa: E402
from tasks.settings import Settings, use_settings  # noqa: E402

CHUNK = 10_000
PLACES = ("pending", "queued", "dlq", "nowhere")
PER_PLACE = 25
CRASH_ENTRIES = 50
API_KEY = "bench-gateway-key"
TARGETS = {"growth": 1.5, "idle_queue_sweep_s": 1.0, "crash_recovery_s": 2.0, "stuck_runs_sweep_s": 3.0,
           "rss_growth_mb": 150.0}


# ------------------------------------------------------------------------------------------ plumbing


class RoundTrips:
    """Requests this process sends to Redis: one per command, one per pipeline (a client-side hook)."""

    count = 0

    @classmethod
    def install(cls) -> None:
        real = redis.connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, check_health: bool = True) -> Any:
            cls.count += 1
            return real(self, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]


@contextmanager
def private_redis(url: str | None) -> Iterator[str]:
    """The given Redis, or a redis-server of our own on a free port (no persistence), stopped afterwards."""
    if url:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.TemporaryDirectory(prefix="fd-scale-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)
        workdir.cleanup()


@contextmanager
def private_database() -> Iterator[str]:
    """A PostgreSQL database of our own (psycopg URL), dropped afterwards with our pooled connections closed."""
    with scratch_database(prefix="fd_scale") as url:
        try:
            yield url
        finally:
            reset_connections()


def stub_gateway() -> Any:
    """FerrumDeck's retry API as its own side effects only: mark the step queued (attempts + 1) and XADD it.
    (The sandbox gateway also scans the stream for the step on every call: FerrumDeck's cost, not ours.)"""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from sandbox.http_server import BackgroundApp
    from tasks.connections import redis_client
    from tasks.settings import get_settings

    def retry(request: Request) -> JSONResponse:
        s = get_settings()
        run_id, step_id = request.path_params["run_id"], request.path_params["step_id"]
        t = runs.tables(s).steps
        with db_engine(s).begin() as conn:
            conn.execute(sa.update(t).where(t.c.id == step_id).values(status="queued", attempts=t.c.attempts + 1))
        entry = redis_client(s).xadd(s.stream, {"job_id": step_id, "run_id": run_id, "step_id": step_id})
        return JSONResponse({"run_id": run_id, "step_id": step_id, "entry_id": entry}, status_code=202)

    routes = [Route("/v1/runs/{run_id}/steps/{step_id}/retry", retry, methods=["POST"])]
    return BackgroundApp(Starlette(routes=routes))


# ------------------------------------------------------------------------------------------- seeding


@dataclass
class Env:
    """One FerrumDeck: its settings, what was seeded and the designed cases' ids."""

    name: str
    settings: Settings
    live: list[str] = field(default_factory=list)
    stuck: dict[str, list[str]] = field(default_factory=dict)  # place -> run ids
    nowhere_steps: dict[str, str] = field(default_factory=dict)  # run id -> its current lost step id
    seed_s: dict[str, float] = field(default_factory=dict)
    sacrifice_id: str = ""  # an undelivered entry deleted to make the lag unknown
    expected_lag: int = 0


def _fields(step: str, run: str) -> dict[str, str]:
    return {"job_id": step, "run_id": run, "step_id": step, "payload": '{"agent":"bench","input":"..."}'}


def _dlq_fields(step: str, run: str, at_ms: int, stream: str) -> dict[str, str]:
    original = _fields(step, run)
    return {"job_id": step, "error": "Max retries exceeded", "run_id": run, "step_id": step,
            "reason": "delivered 3 times (max 3); owner `w-gone` is dead", "original_id": f"{at_ms - 5000}-0",
            "original_stream": stream, "deliveries": "3", "last_consumer": "w-gone",
            "dead_lettered_at_ms": str(at_ms), "fields": json.dumps(original)}


def spread(total: int) -> dict[int, int]:
    """Positions (among ``total``) of the PER_PLACE designed entries, evenly spread: position -> number."""
    return {(j * total) // PER_PLACE + total // PER_PLACE // 2: j for j in range(PER_PLACE)}


def seed_queue(env: Env, client: redis.Redis, *, backlog: int, dlq: int, pending: int, consumers: int) -> None:
    """The stream, group, pending lists, backlog and DLQ (pipelined, CHUNK commands per round trip)."""
    s = env.settings
    t0 = time.perf_counter()
    client.xgroup_create(s.stream, s.group, id="$", mkstream=True)
    env.live = [f"w-live-{i}" for i in range(consumers)]  # the same fleet in both: only the history differs
    designed_pending = [(f"st_pending_{i}", f"run_stuck_pending_{i}") for i in range(PER_PLACE)]
    crash = {k: [(f"st_crash_{k}_{i}", f"run_crash_{k}_{i}") for i in range(CRASH_ENTRIES)] for k in range(3)}
    with client.pipeline(transaction=False) as pipe:
        for i in range(pending):
            pipe.xadd(s.stream, _fields(f"st_bg_p_{i}", f"run_bg_p_{i}"))
            if len(pipe) >= CHUNK:
                pipe.execute()
        for step, run in designed_pending + [e for k in crash for e in crash[k]]:
            pipe.xadd(s.stream, _fields(step, run))
        pipe.execute()
    for name in env.live:
        if pending:
            client.xreadgroup(s.group, name, {s.stream: ">"}, count=pending // consumers)
        else:
            client.xgroup_createconsumer(s.stream, s.group, name)
    client.xreadgroup(s.group, "w-designed", {s.stream: ">"}, count=PER_PLACE)
    for k in crash:
        got = client.xreadgroup(s.group, f"w-crash-{k}", {s.stream: ">"}, count=CRASH_ENTRIES)
        first = got[0][1][0][0]
        client.xclaim(s.stream, s.group, f"w-crash-{k}", 0, [first], retrycount=2, justid=True)  # the poison
    env.seed_s["pending"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    designed = spread(backlog + PER_PLACE)
    with client.pipeline(transaction=False) as pipe:
        for i in range(backlog + PER_PLACE):
            if i in designed:  # spread through the backlog
                n = designed[i]
                pipe.xadd(s.stream, _fields(f"st_queued_{n}", f"run_stuck_queued_{n}"))
            else:
                pipe.xadd(s.stream, _fields(f"st_bg_q_{i}", f"run_bg_q_{i}"))
            if len(pipe) >= CHUNK:
                pipe.execute()
        pipe.xadd(s.stream, _fields("st_sacrifice", "run_sacrifice"))  # deleted to make the lag unknown
        env.sacrifice_id = pipe.execute()[-1]
        pipe.xadd(s.stream, _fields("st_after_sacrifice", "run_after_sacrifice"))
        pipe.execute()
    env.seed_s["backlog"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    start, end = now - 29 * 86_400_000, now - 3_600_000
    total = dlq + PER_PLACE
    step_ms = max(1, (end - start) // max(total, 1))
    designed = spread(total)
    with client.pipeline(transaction=False) as pipe:
        for i in range(total):
            at = start + i * step_ms
            if i in designed:
                n = designed[i]
                fields = _dlq_fields(f"st_dlq_{n}", f"run_stuck_dlq_{n}", at, s.stream)
            else:
                fields = _dlq_fields(f"st_bg_d_{i}", f"run_bg_d_{i}", at, s.stream)
            pipe.xadd(s.dlq_stream, fields, id=f"{at}-0")
            if len(pipe) >= CHUNK:
                pipe.execute()
        pipe.execute()
    env.seed_s["dlq"] = time.perf_counter() - t0


def seed_runs(env: Env, *, n: int, stuck: int) -> None:
    """The runs and steps tables: ``n`` background runs (``stuck`` of them stuck) and the designed runs."""
    s = env.settings
    runs.create_schema(settings=s)
    engine = db_engine(s)
    r, st = s.runs_table, s.steps_table
    t0 = time.perf_counter()
    if n:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP INDEX IF EXISTS "ix_{r}_status_started_at"'))
            conn.execute(sa.text(f'ALTER TABLE "{r}" DROP CONSTRAINT IF EXISTS "{r}_pkey"'))
            every = max(1, n // max(stuck, 1))
            conn.execute(sa.text(f"""
                INSERT INTO "{r}" (id, status, started_at, completed_at, agent_version_id)
                SELECT 'run_' || lpad(g::text, 9, '0'),
                       CASE WHEN g % :every = 0 AND g / :every <= :stuck THEN 'running'
                            WHEN g % 100 = 1 THEN 'running'
                            WHEN g % 10 = 3 THEN 'failed' ELSE 'completed' END,
                       CASE WHEN g % :every = 0 AND g / :every <= :stuck
                                 THEN now() - interval '31 minutes' - (g % 86400) * interval '1 second'
                            WHEN g % 100 = 1 THEN now() - (g % 600) * interval '1 second'
                            ELSE now() - interval '1 day' - (g % 8640000) * interval '1 second' END,
                       CASE WHEN g % 100 = 1 OR (g % :every = 0 AND g / :every <= :stuck) THEN NULL
                            ELSE now() - interval '1 hour' END,
                       'av_' || (g % 7)
                FROM generate_series(1, :n) AS g"""), {"n": n, "every": every, "stuck": stuck})
            conn.execute(sa.text(f'ALTER TABLE "{r}" ADD PRIMARY KEY (id)'))
            conn.execute(sa.text(f'CREATE INDEX "ix_{r}_status_started_at" ON "{r}" (status, started_at, id)'))
            conn.execute(sa.text(f"""
                INSERT INTO "{st}" (id, run_id, status, kind, attempts, started_at)
                SELECT 'st_' || substr(id, 5), id, 'running', 'llm', 0, started_at FROM "{r}"
                WHERE status = 'running' AND started_at < now() - interval '30 minutes'"""))
    env.seed_s["runs"] = time.perf_counter() - t0
    now = datetime.now(UTC)
    run_rows: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    for p, place in enumerate(PLACES):  # the 100 oldest stuck runs, their steps in every place
        env.stuck[place] = []
        for i in range(PER_PLACE):
            run_id = f"run_stuck_{place}_{i}"
            step_id = f"st_{place}_{i}" if place != "nowhere" else f"st_nowhere_{i}_r0"
            env.stuck[place].append(run_id)
            if place == "nowhere":
                env.nowhere_steps[run_id] = step_id
            started = now - timedelta(days=2, seconds=p * PER_PLACE + i)
            run_rows.append({"id": run_id, "status": "running", "started_at": started})
            step_rows.append({"id": step_id, "run_id": run_id, "status": "running", "attempts": 0,
                              "started_at": started})
    for k in range(3):
        for i in range(CRASH_ENTRIES):
            started = now - timedelta(minutes=2)
            run_rows.append({"id": f"run_crash_{k}_{i}", "status": "running", "started_at": started})
            step_rows.append({"id": f"st_crash_{k}_{i}", "run_id": f"run_crash_{k}_{i}", "status": "running",
                              "attempts": 0, "started_at": started})
    run_rows.append({"id": "run_retry", "status": "running", "started_at": now - timedelta(minutes=5)})
    t = runs.tables(s)
    with engine.begin() as conn:
        conn.execute(sa.insert(t.runs), run_rows)
        conn.execute(sa.insert(t.steps), step_rows)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'VACUUM ANALYZE "{r}"'))
        conn.execute(sa.text(f'VACUUM ANALYZE "{st}"'))
    env.seed_s["runs"] = time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- cases


def refresh_pending(env: Env, client: redis.Redis) -> None:
    """Every pending entry fresh again (XCLAIM to its own owner, IDLE 0, JUSTID: no delivery counted): the live
    workers are working on them, so an idle sweep has nothing to take. Untimed."""
    s = env.settings
    for c in client.xinfo_consumers(s.stream, s.group):
        start = "-"
        while True:
            rows = client.xpending_range(s.stream, s.group, start, "+", 1000, consumername=c["name"])
            if not rows:
                break
            client.xclaim(s.stream, s.group, c["name"], 0, [r["message_id"] for r in rows], idle=0, justid=True)
            if len(rows) < 1000:
                break
            start = "(" + rows[-1]["message_id"]


def case_idle_sweep(env: Env, k: int) -> Callable[[], None]:
    from flows.queue_sweep import queue_sweep

    refresh_pending(env, redis_client(env.settings))

    def run() -> None:
        state = queue_sweep(dry_run=False, return_state=True)
        record_run(state)
        out = state.result()
        if not out.idle:
            raise SystemExit(f"{env.name}: the idle queue-sweep was not idle: {out.outcome} {out.actions}")

    return run


def case_crash(env: Env, k: int) -> Callable[[], None]:
    from tasks.recovery import read_consumer_entries, recover_worker_entries, settle_worker_runs

    s, consumer = env.settings, f"w-crash-{k}"

    def run() -> None:
        entries = read_consumer_entries.fn(settings=s, consumer=consumer)
        poison = [e for e in entries if e.total_deliveries >= s.poison_min_deliveries][:1]
        moved = recover_worker_entries.fn(settings=s, pod=f"{consumer}-{uuid.uuid4().hex[:4]}", consumer=consumer,
                                          entries=entries, poison=poison, reason="bench: crashed",
                                          max_deliveries=3, dry_run=False)
        queue.delete_empty_consumers(settings=s, consumers=[consumer], min_idle_ms=0, dry_run=False)
        settled = settle_worker_runs.fn(settings=s, run_ids=sorted({e.run_id for e in entries}),
                                        live_consumers=env.live + ["w-designed"], dry_run=False)
        left = queue.inspect_queue(settings=s).pending_of(consumer)
        if len(entries) != CRASH_ENTRIES or moved.moved != CRASH_ENTRIES or left or len(settled.failed) != 1:
            raise SystemExit(f"{env.name}: crash recovery of {consumer}: {len(entries)} read, {moved.summary()}, "
                             f"{left} left, settled {settled.summary()}")

    return run


def case_stuck_runs(env: Env, k: int) -> Callable[[], None]:
    from flows.stuck_runs import stuck_runs_sweep

    s = env.settings
    reset_stuck(env, k)
    refresh_pending(env, redis_client(s))

    def run() -> None:
        state = stuck_runs_sweep(max_runs=100, dry_run=False, return_state=True)
        record_run(state)
        out = state.result(raise_on_failure=False)
        want = {"leave": 2 * PER_PLACE, "fail": PER_PLACE, "retry": PER_PLACE}
        if out.found != 100 or {k: v for k, v in out.decisions.items() if v} != want or len(out.retried) != PER_PLACE:
            raise SystemExit(f"{env.name}: stuck-runs-sweep {out.outcome}: found {out.found}, {out.decisions}, "
                             f"retried {len(out.retried)}: {out.cause()}")

    return run


def reset_stuck(env: Env, k: int) -> None:
    """The 100 designed runs running again; each lost step replaced by a fresh one (the last was retried)."""
    s = env.settings
    t = runs.tables(s)
    every = [r for place in PLACES for r in env.stuck[place]]
    with db_engine(s).begin() as conn:
        conn.execute(sa.update(t.runs).where(t.runs.c.id.in_(every))
                     .values(status="running", error=None, completed_at=None))
        if k:
            old = list(env.nowhere_steps.values())
            conn.execute(sa.update(t.steps).where(t.steps.c.id.in_(old)).values(status="completed"))
            rows = []
            for run_id in env.stuck["nowhere"]:
                env.nowhere_steps[run_id] = f"st_nowhere_{run_id.rsplit('_', 1)[1]}_r{k}"
                rows.append({"id": env.nowhere_steps[run_id], "run_id": run_id, "status": "running", "attempts": 0,
                             "started_at": datetime.now(UTC) - timedelta(days=2)})
            conn.execute(sa.insert(t.steps), rows)


def case_post_check(env: Env, k: int) -> Callable[[], None]:
    from flows.post_recovery_check import post_recovery_check

    def run() -> None:
        state = post_recovery_check(alerting="none", return_state=True)
        record_run(state)
        out = state.result(raise_on_failure=False)
        if len(out.items) != 6:
            raise SystemExit(f"{env.name}: post-recovery-check: {out.outcome} {out.cause()}")

    return run


def case_retry_step(env: Env, k: int) -> Callable[[], None]:
    from flows.stuck_runs import retry_step

    s = env.settings
    step_id = f"st_retry_{k}"
    t = runs.tables(s)
    with db_engine(s).begin() as conn:
        conn.execute(sa.insert(t.steps), [{"id": step_id, "run_id": "run_retry", "status": "failed", "attempts": 0}])

    def run() -> None:
        state = retry_step(run_id="run_retry", step_id=step_id, dry_run=False, return_state=True)
        record_run(state)
        out = state.result(raise_on_failure=False)
        if not out.changed or out.where_after != "queued":
            raise SystemExit(f"{env.name}: retry-step {out.outcome}: {out.where_before} -> {out.where_after}: "
                             f"{out.cause()}")

    return run


LAG_CALLS = 21  # inspect_queue takes about a millisecond: each sample is the median of this many calls


def lag_sample(env: Env, *, calls: int = LAG_CALLS) -> dict[str, float]:
    """``inspect_queue`` with the lag unknown, ``calls`` times: the median call's seconds and round trips, and
    the peak RSS growth (one call on this loaded machine is at the mercy of the scheduler: the median is robust)."""
    times, trips = [], []
    rss0 = rss_mb()
    reset_peak_rss()
    for _ in range(calls):
        got = measure(env, case_lag_unknown(env))
        times.append(got["s"])
        trips.append(got["trips"])
    s = statistics.median(times)
    return {"s": s, "run_s": s, "trips": statistics.median(trips), "rss": max(0.0, peak_rss_mb() - rss0)}


def case_lag_unknown(env: Env, k: int = 0) -> Callable[[], None]:
    s = env.settings

    def run() -> None:
        snap = queue.inspect_queue(settings=s)
        if not snap.lag_counted or snap.lag != env.expected_lag:
            raise SystemExit(f"{env.name}: lag {snap.lag} (counted {snap.lag_counted}), expected {env.expected_lag}")

    return run


def make_lag_unknown(env: Env, client: redis.Redis) -> None:
    """Delete an undelivered entry (the runbook's manual XDEL of a step): Redis now reports the lag unknown."""
    s = env.settings
    ldi = client.xinfo_groups(s.stream)[0]["last-delivered-id"]
    client.xdel(s.stream, env.sacrifice_id)
    # the truth to compare with, counted apart (inside Redis, 10 000 entries a call)
    script = client.register_script(
        "local got = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', 10000) "
        "if #got == 0 then return {0, ''} end return {#got, got[#got][1]}")
    env.expected_lag, after = 0, ldi
    while True:
        n, last = script(keys=[s.stream], args=[after])
        env.expected_lag += n
        if n < 10_000:
            break
        after = last
    if client.xinfo_groups(s.stream)[0]["lag"] is not None:
        raise SystemExit(f"{env.name}: Redis still knows the lag")


CASES: dict[str, Callable[[Env, int], Callable[[], None]]] = {
    "idle_queue_sweep": case_idle_sweep,
    "crash_recovery": case_crash,
    "stuck_runs_sweep": case_stuck_runs,
    "post_recovery_check": case_post_check,
    "retry_step": case_retry_step,
}


def warm_up(envs: dict[str, Env]) -> None:
    """One untimed pass of the repeatable flows (first-call costs of this process: imports, clients, scripts)."""
    from flows.stuck_runs import stuck_runs_sweep
    from tasks import queue_scripts

    for env in envs.values():
        client = redis_client(env.settings)
        for name in dir(queue_scripts):
            if name.isupper() and not name.startswith("_"):
                client.script_load(getattr(queue_scripts, name))
        with use_settings(env.settings):
            case_idle_sweep(env, 0)()
            case_post_check(env, 0)()
            stuck_runs_sweep(max_runs=100, dry_run=True)
            queue.locate_steps(settings=env.settings, step_ids=["warm-up"])


_RUNS: list[Any] = []  # flow run ids of the measured call, read back for Prefect's own start -> end time


def record_run(state: Any) -> None:
    _RUNS.append(state.state_details.flow_run_id)


def run_seconds(flow_run_id: Any) -> float:
    """The flow run's duration as the Prefect server recorded it (start -> end; the engine's teardown after the
    final state, e.g. joining its heartbeat thread, is not in it)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    return (run.end_time - run.start_time).total_seconds()


def measure(env: Env, fn: Callable[[], None]) -> dict[str, float]:
    """Time one call (settings in force), its Redis round trips and its peak RSS growth; for a flow, also the
    run's own start -> end as Prefect recorded it (``run_s``)."""
    _RUNS.clear()
    with use_settings(env.settings):
        rss0 = rss_mb()
        reset_peak_rss()
        trips0 = RoundTrips.count
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        got = {"s": elapsed, "trips": RoundTrips.count - trips0, "rss": max(0.0, peak_rss_mb() - rss0)}
    got["run_s"] = run_seconds(_RUNS[0]) if _RUNS else elapsed
    return got


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--dlq", type=int, default=1_000_000)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--consumers", type=int, default=50)
    parser.add_argument("--runs", type=int, default=10_000_000)
    parser.add_argument("--stuck", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis-url", default=None, help="use this Redis (default: a private redis-server)")
    args = parser.parse_args(argv)
    RoundTrips.install()
    hexid = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from deployments.inprocess_runner import NO_HEARTBEATS
    from sandbox.kube import SandboxCluster

    # the flows run as `fd-recovery serve` runs them: without Prefect's flow-run heartbeats
    with private_redis(args.redis_url) as redis_url, private_database() as db_url, \
            prefect_test_harness(server_startup_timeout=120), temporary_settings(updates=NO_HEARTBEATS), \
            SandboxCluster.start(port=0) as cluster, stub_gateway() as gateway:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        envs: dict[str, Env] = {}
        for name in ("small", "large"):
            prefix = f"fdscale:{hexid}:{name}"
            envs[name] = Env(name=name, settings=Settings(
                redis_url=SecretStr(redis_url), stream=f"{prefix}:steps", dlq_stream=f"{prefix}:dlq",
                state_prefix=f"{prefix}:state", database_url=SecretStr(db_url), runs_table=f"runs_{name}",
                steps_table=f"steps_{name}", gateway_url=gateway.url, gateway_api_key=SecretStr(API_KEY),
                kubeconfig=cluster.kubeconfig, namespace="ferrumdeck", alerting_check="none",
                kill_switch_variable=f"fd_scale_paused_{hexid}", budget_prefix=f"fd-scale-{hexid}"))
        big = {"backlog": args.backlog, "dlq": args.dlq, "pending": args.pending, "consumers": args.consumers}
        try:
            for name, env in envs.items():
                sizes = big if name == "large" else {"backlog": 0, "dlq": 0, "pending": 0, "consumers": args.consumers}
                seed_queue(env, client, **sizes)
                seed_runs(env, n=args.runs if name == "large" else 0, stuck=args.stuck)
                print(json.dumps({"seeded": name, "seconds": {k: round(v, 1) for k, v in env.seed_s.items()}}),
                      flush=True)
            one_off: dict[str, Any] = {}
            for name, env in envs.items():  # the one-off index build of an existing history
                t0 = time.perf_counter()
                built = queue.refresh_indexes(settings=env.settings, max_calls=10**6)
                one_off[f"index_build_s_{name}"] = round(time.perf_counter() - t0, 3)
                one_off[f"index_build_calls_{name}"] = built.calls
            print(json.dumps({"one_off": one_off}), flush=True)
            info = client.info("memory")
            one_off["redis_used_memory_mb"] = round(info["used_memory"] / 2**20, 1)
            for name, env in envs.items():  # what the indexes cost in Redis memory (MEMORY USAGE, sampled)
                keys = queue.index_keys(env.settings)
                found = [k for k in client.scan_iter(match=f"{keys.tail_bucket_prefix}*", count=1000)]
                found += [keys.dlq_index, keys.tail_buckets]
                used = sum(client.memory_usage(k, samples=50) or 0 for k in found)
                one_off[f"index_memory_mb_{name}"] = round(used / 2**20, 1)
            warm_up(envs)
            samples: dict[str, dict[str, list[dict[str, float]]]] = {c: {"small": [], "large": []} for c in CASES}
            rss_start = rss_mb()
            for k in range(args.repeats):
                for case, build in CASES.items():
                    for name, env in envs.items():
                        with use_settings(env.settings):
                            fn = build(env, k)
                        got = measure(env, fn)
                        samples[case][name].append(got)
                        print(json.dumps({"repeat": k, "case": case, "env": name, "s": round(got["s"], 4),
                                          "run_s": round(got["run_s"], 4), "round_trips": got["trips"],
                                          "rss_growth_mb": round(got["rss"], 1)}), flush=True)
            samples["inspect_lag_unknown"] = {"small": [], "large": []}
            for name, env in envs.items():
                make_lag_unknown(env, client)
                first = measure(env, case_lag_unknown(env))  # counts the tail once, inside Redis
                one_off[f"lag_first_count_s_{name}"] = round(first["s"], 4)
                one_off[f"lag_first_count_round_trips_{name}"] = first["trips"]
            for _ in range(args.repeats):
                for name, env in envs.items():
                    samples["inspect_lag_unknown"][name].append(lag_sample(env))
            result = summarise(samples, one_off, envs, args, rss_start, time.perf_counter() - started)
        finally:
            if args.redis_url:  # not our own server: remove our keys
                for key in client.scan_iter(match=f"fdscale:{hexid}:*", count=10_000):
                    client.unlink(key)
            client.close()
            reset_connections()
    print(json.dumps(result), flush=True)
    return result


def summarise(samples: dict[str, dict[str, list[dict[str, float]]]], one_off: dict[str, Any], envs: dict[str, Env],
              args: argparse.Namespace, rss_start: float, total_s: float) -> dict[str, Any]:
    """Medians per case and env, growth, round trips, RSS, and the targets."""
    cases: dict[str, Any] = {}
    for case, by_env in samples.items():
        small = statistics.median(x["s"] for x in by_env["small"])
        large = statistics.median(x["s"] for x in by_env["large"])
        run_small = statistics.median(x["run_s"] for x in by_env["small"])
        run_large = statistics.median(x["run_s"] for x in by_env["large"])
        cases[case] = {
            "s_small": round(small, 4), "s_large": round(large, 4), "growth": round(large / small, 3),
            "run_s_small": round(run_small, 4), "run_s_large": round(run_large, 4),
            "run_growth": round(run_large / run_small, 3),
            "round_trips_small": int(statistics.median(x["trips"] for x in by_env["small"])),
            "round_trips_large": int(statistics.median(x["trips"] for x in by_env["large"])),
            "rss_growth_mb": round(max(x["rss"] for e in by_env.values() for x in e), 1),
        }
    rss_growth = max(c["rss_growth_mb"] for c in cases.values())
    met = {
        "every_growth_le_1_5": all(c["growth"] <= TARGETS["growth"] for c in cases.values()),
        "idle_queue_sweep_le_1s": cases["idle_queue_sweep"]["s_large"] <= TARGETS["idle_queue_sweep_s"],
        "idle_queue_sweep_run_le_1s": cases["idle_queue_sweep"]["run_s_large"] <= TARGETS["idle_queue_sweep_s"],
        "every_run_growth_le_1_5": all(c["run_growth"] <= TARGETS["growth"] for c in cases.values()),
        "crash_recovery_le_2s": cases["crash_recovery"]["s_large"] <= TARGETS["crash_recovery_s"],
        "stuck_runs_sweep_le_3s": cases["stuck_runs_sweep"]["s_large"] <= TARGETS["stuck_runs_sweep_s"],
        "rss_growth_le_150mb": rss_growth <= TARGETS["rss_growth_mb"],
    }
    return {
        "sizes": {"backlog": args.backlog, "dlq": args.dlq, "pending": args.pending, "consumers": args.consumers,
                  "runs": args.runs, "stuck": args.stuck, "repeats": args.repeats},
        "cases": cases,
        "rss_growth_mb": rss_growth,
        "rss_during_cases_mb": round(rss_mb() - rss_start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "one_off": one_off,
        "seed_s": {name: {k: round(v, 1) for k, v in env.seed_s.items()} for name, env in envs.items()},
        "total_s": round(total_s, 1),
        "targets_met": met,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
