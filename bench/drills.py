"""Timed recovery drills: ``python -m bench.drills`` — each runbook failure under load, MTTR and steps lost.

Starts the whole stack (``sandbox.stack``), runs every scenario of ``sandbox.drills`` (or ``--scenarios``)
under a steady load, and prints one JSON object as the last line: per scenario ``mttr_s`` (fault injected ->
``post-recovery-check`` passing), ``steps_total``, ``steps_completed``, ``steps_failed`` (failed with their
error recorded, e.g. during the LLM outage), ``steps_dead_lettered``, ``steps_lost``, the target and the
scenario's own evidence (held steps completed by others, deliveries before the DLQ, failover time, ...).
Targets on a 2-core machine: crash MTTR <= 15 s, hang <= 30 s, LLM failover <= 30 s, MCP healthy <= 30 s,
0 steps lost everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def main(argv: list[str] | None = None) -> int:
    from sandbox.drills import SCENARIOS, run_drills, table
    from sandbox.stack import Stack

    p = argparse.ArgumentParser(prog="python -m bench.drills", description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--backlog", type=int, default=10_000, help="steps in the backlog burst")
    p.add_argument("--held", type=int, default=50, help="in-flight steps of the crashed worker")
    p.add_argument("--load", type=float, default=5.0, help="steady load, steps per second")
    p.add_argument("--state-dir", default=".fd-demo", help="recreated on every start")
    args = p.parse_args(argv)
    if not 1 <= args.held <= 50:
        p.error("--held must be between 1 and 50 (a sandbox worker reads at most 50 steps at once)")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    started = time.monotonic()
    with Stack.start(state_dir=args.state_dir, load_rate_per_s=args.load, say=say) as stack:
        results = run_drills(stack, args.scenarios, say=say,
                             options={"backlog": {"n": args.backlog}, "crash": {"held": args.held}})
        ready_s = stack.timings.get("ready_s")
    say("\n" + table(results))
    out = {
        "scenarios": {r.scenario: r.bench_row() for r in results},
        "all_recovered": all(r.recovered for r in results),
        "steps_lost_total": sum(r.steps.lost for r in results),
        "load_steps_per_s": args.load,
        "stack_ready_s": ready_s,
        "total_s": round(time.monotonic() - started, 1),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    print(json.dumps(out, default=str))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
