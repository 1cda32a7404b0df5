"""Alert to remediation latency: ``python -m bench.alert_latency --alerts 20``.

Starts the whole stack (a real Prefect server, ``fd-recovery serve`` with every deployment and trigger of
prefect.yaml, the alert bridge, the sandbox cluster and workers), then, one alert at a time: crashes a worker
pod, posts ``WorkerCrashLooping{pod=...}`` to the bridge exactly as Alertmanager's webhook would, and measures
from the POST to the moment the sandbox API server receives the remediation request (the DELETE or eviction
of that pod by the triggered ``worker-crash-recovery`` run). It waits for the replacement to be Ready and the
run to finish before the next alert. Last line: one JSON object with ``alerts``, ``p50_s``, ``p95_s``, ``max_s`` and the samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

from sandbox.drills import FlowRuns, post_alert, run_timeline
from sandbox.scratch import scratch_database
from sandbox.stack import Stack, wait_until

POLL_S = 0.005  # how finely the remediation request is timed


def _remediation_index(requests: list[Any], *, pod: str, start: int) -> int | None:
    """Index of the first DELETE / eviction of ``pod`` recorded at or after ``start``."""
    for i in range(start, len(requests)):
        r = requests[i]
        if r.name == pod and r.resource == "pods" and (r.verb == "delete" or r.subresource == "eviction"):
            return i
    return None


def measure_one(stack: Stack, runs: FlowRuns, *, timeout_s: float) -> dict[str, float | None]:
    """Crash one worker, fire its alert; seconds from the webhook POST to the pod's DELETE/eviction, and to the
    triggered flow run's creation (event -> automation) and start (runner pickup + process start)."""
    services = stack.services
    cluster = services.cluster
    [pod, *_] = services.wait_for_workers(3, timeout_s=timeout_s)
    services.crash(pod)
    start = len(cluster.requests)
    known = runs.ids("worker-crash-recovery")
    fired = datetime.now(UTC)
    t0 = time.perf_counter()
    post_alert(stack, "WorkerCrashLooping", labels={"pod": pod, "namespace": "ferrumdeck", "severity": "critical"})
    deadline = t0 + timeout_s
    while (found := _remediation_index(cluster.requests, pod=pod, start=start)) is None:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no remediation request for {pod} within {timeout_s} s")
        time.sleep(POLL_S)  # poll
    latency = time.perf_counter() - t0
    del found
    run_id = runs.wait_new("worker-crash-recovery", known=known, timeout_s=timeout_s)
    # the next alert starts from a healthy cluster (the crashed pod gone, three Ready workers) and with this
    # recovery finished: the deployment runs one recovery at a time (ENQUEUE), so an alert fired while the last
    # run still verifies would wait for a concurrency slot (the server's slot wait, 30 s), not for the runner
    wait_until(
        lambda: pod not in services.ready_worker_pods() and len(services.ready_worker_pods()) >= 3,
        timeout_s=timeout_s,
        what=f"a Ready replacement of {pod}",
    )
    timeline = run_timeline(runs.wait_final(run_id, timeout_s=timeout_s), fired)
    return {"latency_s": latency, "flow_run_created_s": timeline["created"], "flow_run_started_s": timeline["started"],
            "flow_run_ended_s": timeline["ended"]}


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=20, help="how many crash-loop alerts to fire, one at a time")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each remediation")
    parser.add_argument("--warmup", type=int, default=1, help="alerts fired first and not counted")
    parser.add_argument("--state-dir", default=None, help="keep the stack's logs here (default: a temporary dir)")
    parser.add_argument(
        "--prefect-db", choices=["postgresql", "sqlite"], default="postgresql",
        help="the Prefect server's database: PostgreSQL as in production (a scratch database, dropped after), "
        "or SQLite (its write locks add ~2 s retries to some requests under load)",
    )
    args = parser.parse_args(argv)
    overrides = {"pod_deletions_per_hour": 10 * (args.alerts + args.warmup), "target_cooldown_s": 1}
    with tempfile.TemporaryDirectory(prefix="fd-latency-") as tmp, (
        scratch_database(prefix="fd_latency", driver="asyncpg") if args.prefect_db == "postgresql" else nullcontext()
    ) as prefect_db, Stack.start(
        state_dir=args.state_dir or tmp, prefect_database_url=prefect_db,
        load_rate_per_s=2.0, settings_overrides=overrides,
        say=lambda msg: print(msg, file=sys.stderr),
    ) as stack:
        runs = FlowRuns(stack)
        for _ in range(args.warmup):
            measure_one(stack, runs, timeout_s=args.timeout)
        rows = []
        for i in range(args.alerts):
            rows.append(measure_one(stack, runs, timeout_s=args.timeout))
            print(f"alert {i + 1}/{args.alerts}: {rows[-1]}", file=sys.stderr)
        runs.close()
    samples = [r["latency_s"] for r in rows]
    created = [r["flow_run_created_s"] for r in rows if r["flow_run_created_s"] is not None]
    started = [r["flow_run_started_s"] for r in rows if r["flow_run_started_s"] is not None]
    result = {
        "alerts": len(samples),
        "p50_s": round(percentile(samples, 50), 3),
        "p95_s": round(percentile(samples, 95), 3),
        "max_s": round(max(samples), 3),
        "samples_s": [round(s, 3) for s in samples],
        "p50_flow_run_created_s": round(percentile(created, 50), 3) if created else None,
        "p50_flow_run_started_s": round(percentile(started, 50), 3) if started else None,
        "prefect_db": args.prefect_db,
        "measured": "webhook POST to the bridge -> DELETE/eviction of the pod received by the sandbox API",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
