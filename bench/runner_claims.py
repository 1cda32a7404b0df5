"""Exactly-once claims under stress: ``python -m bench.runner_claims --runners 3 --runs 500 --rounds 3``.

Starts a real ``prefect server start`` (SQLite file or a scratch PostgreSQL database, dropped afterwards) and N
runner PROCESSES, each an ``InProcessRunner`` of ``fd-recovery serve`` (its own client, its own claim identity,
the production poll interval) serving one deployment of a flow that only counts itself. Each round creates M
flow runs while the runners are held back, then releases the runners at once: all M are due together (an alert
storm) and every runner sees them in its first poll. It waits until every run is final and stays final,
then counts executions twice: from each run's STATE HISTORY (Running states) and from the flow body itself (a
Redis counter per run). ``--claim pending-only`` runs the runner's previous claim (propose Pending, nothing
else) for comparison. Last line: one JSON object per database with ``executed_twice`` (must be 0),
``never_executed``, the execution histogram and timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from prefect import flow
from prefect.runtime import flow_run as current_run

from sandbox.scratch import free_port, scratch_database

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = os.environ.get("FD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DEPLOYMENT = "claims"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
_redis: dict[str, redis.Redis] = {}


@flow(name="fd-bench-claims", persist_result=False)
def counted(redis_url: str, prefix: str, work_ms: int = 0) -> None:
    """Count this execution of this flow run in Redis (an independent check of the state history)."""
    client = _redis.get(redis_url) or _redis.setdefault(redis_url, redis.Redis.from_url(redis_url))
    client.incr(f"{prefix}:exec:{current_run.id}")
    if work_ms:
        time.sleep(work_ms / 1000)  # the flow's "work"


def _pending_only_runner() -> type:
    """The runner as it claimed before the claim store: propose Pending and run it if accepted."""
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Pending

    from deployments.inprocess_runner import InProcessRunner

    class PendingOnlyRunner(InProcessRunner):
        def _claim(self, client: Any, flow_run: Any) -> bool:
            try:
                result = client.set_flow_run_state(flow_run.id, Pending())
            except Exception:
                return False
            if result.status != SetStateStatus.ACCEPT or not result.state.is_pending():
                return False
            flow_run.state = result.state
            return True

    return PendingOnlyRunner


def _runner_process(index: int, options: dict[str, Any], ready: Any, go: Any, stop: Any) -> None:
    """One serve process: an InProcessRunner of the bench deployment, polling while ``go`` is set, until ``stop``."""
    from deployments.inprocess_runner import InProcessRunner
    from tasks.settings import Settings

    cls = _pending_only_runner() if options["claim"] == "pending-only" else InProcessRunner
    deployment = counted.to_deployment(name=DEPLOYMENT, parameters={
        "redis_url": options["redis_url"], "prefix": options["prefix"], "work_ms": options["work_ms"]})
    runner = cls([(deployment, counted)], limit=options["limit"], poll_seconds=options["poll_seconds"],
                 grace_seconds=60, settings=Settings(redis_url=options["redis_url"], state_prefix=options["prefix"]))
    poll = runner.poll_once
    runner.poll_once = lambda client: poll(client) if go.is_set() else []  # held back while a burst is created
    thread = threading.Thread(target=runner.run, name=f"runner-{index}", daemon=True)
    thread.start()
    while not runner.deployment_ids:
        if not thread.is_alive():
            raise SystemExit(f"runner {index} stopped before registering")
        time.sleep(0.1)  # poll
    ready.put((index, runner.identity, str(runner.deployment_ids[0])))
    stop.wait()
    runner.stop()
    thread.join(90)


@contextlib.contextmanager
def prefect_server(database: str, home: Path) -> Iterator[str]:
    """``prefect server start`` on a free port with the given database (sqlite | postgresql); its API URL."""
    with contextlib.ExitStack() as stack:
        if database == "postgresql":
            db_url = stack.enter_context(scratch_database(prefix="fd_claims", driver="asyncpg"))
        else:
            db_url = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=db_url,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING")
        log = (home / "prefect-server.log").open("ab")
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--analytics-off"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=PROJECT_ROOT)
        api_url = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"prefect server exited ({server.returncode}); see {home}/prefect-server.log")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the Prefect server did not become healthy within 120 s")
                time.sleep(0.25)  # poll
            yield api_url
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
            log.close()


async def _create_runs(deployment_id: str, *, count: int, due: datetime) -> list[uuid.UUID]:
    """``count`` flow runs of the deployment, all Scheduled for the same instant ``due``."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    limit = asyncio.Semaphore(4)  # (more concurrent creations only fight over SQLite's write lock)
    async with get_client() as client:
        async def one() -> uuid.UUID:
            async with limit:
                run = await client.create_flow_run_from_deployment(
                    uuid.UUID(deployment_id), state=Scheduled(scheduled_time=due))
                return run.id

        return list(await asyncio.gather(*(one() for _ in range(count))))


def _count_final(client: Any, ids: list[uuid.UUID]) -> int:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    return client.count_flow_runs(flow_run_filter=FlowRunFilter(
        id=FlowRunFilterId(any_=ids),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(t) for t in FINAL]))))


def run_round(deployment_id: str, options: dict[str, Any], go: Any, *, settle_s: float,
              timeout_s: float) -> dict[str, Any]:
    """Create the burst with the runners held back, release them, wait for every run to end (and stay ended),
    count executions per run."""
    from prefect.client.orchestration import get_client

    runs = options["runs"]
    go.clear()
    t0 = time.monotonic()
    ids = asyncio.run(_create_runs(deployment_id, count=runs, due=datetime.now(UTC)))
    created_s = time.monotonic() - t0
    go.set()
    released = time.monotonic()
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout_s
        quiet_since = None
        while True:  # all final, and still all final settle_s later (a second execution would show up)
            final = _count_final(client, ids)
            now = time.monotonic()
            if final == runs:
                quiet_since = quiet_since or now
                if now - quiet_since >= settle_s:
                    break
            else:
                quiet_since = None
            if now > deadline:
                break
            time.sleep(1.0)  # poll
        all_done_s = time.monotonic() - released - (settle_s if final == runs else 0)
        histories = {i: [s.type.value for s in client.read_flow_run_states(i)] for i in ids}
    counter = redis.Redis.from_url(options["redis_url"], decode_responses=True)
    counted_in_flow = counter.mget([f"{options['prefix']}:exec:{i}" for i in ids])
    by_history = [h.count("RUNNING") for h in histories.values()]
    by_flow = [int(c or 0) for c in counted_in_flow]
    twice = [str(i) for i, h, f in zip(ids, by_history, by_flow, strict=True) if h > 1 or f > 1]
    return {
        "runs": runs,
        "final": final,
        "executed_twice": len(twice),
        "never_executed": sum(1 for h, f in zip(by_history, by_flow, strict=True) if h == 0 and f == 0),
        "executions_by_history": dict(sorted(Counter(by_history).items())),
        "executions_counted_by_flow": dict(sorted(Counter(by_flow).items())),
        "pending_states": dict(sorted(Counter(h.count("PENDING") for h in histories.values()).items())),
        "final_states": dict(Counter(h[-1] for h in histories.values())),
        "created_s": round(created_s, 2),
        "all_done_s": round(all_done_s, 2),
        "runs_per_s": round(runs / max(all_done_s, 1e-9), 1),
        "examples_twice": [{"id": i, "history": histories[uuid.UUID(i)]} for i in twice[:3]],
    }


def bench_database(database: str, options: dict[str, Any], *, rounds: int, settle_s: float,
                   timeout_s: float) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with tempfile.TemporaryDirectory(prefix="fd-claims-") as tmp, prefect_server(database, Path(tmp)) as api_url:
        os.environ.update(PREFECT_API_URL=api_url, PREFECT_HOME=tmp, PREFECT_LOGGING_LEVEL="WARNING",
                          PREFECT_SERVER_ANALYTICS_ENABLED="false")
        ctx = mp.get_context("spawn")
        ready, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
        procs = [ctx.Process(target=_runner_process, args=(i, options, ready, go, stop), name=f"runner-{i}")
                 for i in range(options["runners"])]
        for p in procs:
            p.start()
        try:
            started = [ready.get(timeout=180) for _ in procs]
            deployment_ids = {d for _, _, d in started}
            assert len(deployment_ids) == 1, f"runners registered different deployments: {deployment_ids}"
            [deployment_id] = deployment_ids
            assert len({ident for _, ident, _ in started}) == len(procs)
            print(f"{database}: {len(procs)} runners ready ({options['claim']} claims)", file=sys.stderr)
            results = []
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                for r in range(rounds):
                    results.append(run_round(deployment_id, options, go, settle_s=settle_s, timeout_s=timeout_s))
                    print(f"{database} round {r + 1}/{rounds}: {json.dumps(results[-1])}", file=sys.stderr)
        finally:
            stop.set()
            for p in procs:
                p.join(120)
                if p.is_alive():
                    p.terminate()
                    p.join(10)
    total = {k: sum(res[k] for res in results) for k in ("runs", "final", "executed_twice", "never_executed")}
    return {"prefect_db": database, "claim": options["claim"], "runners": options["runners"],
            "runs_per_round": options["runs"], "rounds": rounds, "limit_per_runner": options["limit"],
            "poll_seconds": options["poll_seconds"], **total, "per_round": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, default=3, help="runner processes (serve replicas)")
    parser.add_argument("--runs", type=int, default=500, help="flow runs due at once, per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefect-db", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    parser.add_argument("--claim", choices=["redis", "pending-only"], default="redis",
                        help="redis: the runner's claims; pending-only: the previous claim, for comparison")
    parser.add_argument("--limit", type=int, default=5, help="flow runs at once per runner (serve's default: 5)")
    parser.add_argument("--poll-seconds", type=float, default=0.25, help="runner poll interval (serve's default)")
    parser.add_argument("--work-ms", type=int, default=0, help="how long each flow run works (0: finishes at once)")
    parser.add_argument("--settle-s", type=float, default=5.0, help="how long every run must stay final")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="longest wait for one round")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args(argv)
    prefix = f"fdbench:{uuid.uuid4().hex[:8]}"
    options = {"runners": args.runners, "runs": args.runs, "claim": args.claim, "limit": args.limit,
               "poll_seconds": args.poll_seconds, "work_ms": args.work_ms, "redis_url": args.redis_url,
               "prefix": prefix}
    out = []
    try:
        for database in args.prefect_db:
            out.append(bench_database(database, options, rounds=args.rounds, settle_s=args.settle_s,
                                      timeout_s=args.timeout_s))
    finally:
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    print(json.dumps({"results": out, "executed_twice": sum(r["executed_twice"] for r in out),
                      "counted": "Running states in each run's state history, and the flow's own Redis counter"}))
    return 1 if any(r["executed_twice"] or r["final"] != r["runs"] for r in out) else 0


if __name__ == "__main__":
    sys.exit(main())
