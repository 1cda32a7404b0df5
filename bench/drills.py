"""Timed recovery drills: ``python -m bench.drills`` — each runbook failure under load, detection included.

Starts the whole stack (``sandbox.stack``) with the chosen detection path (``--detect prometheus|watch|direct``;
default: prometheus when its Debian packages are installed, else direct), runs every scenario of
``sandbox.drills`` (or ``--scenarios``) under a steady load, and prints one JSON object as the last line. Per
scenario, seconds from the fault: ``detect_s`` (-> first alert at the bridge / first watcher event),
``start_s`` (-> the recovery's flow run started), ``mttr_s`` (-> that run ended with a verified typed outcome),
``healthy_s`` (-> post-recovery check passing, follow-ups included); ``steps_lost`` and the rest of the drill's
own accounting, the flow runs with their typed outcomes, and the scenario's evidence.

``detection_bound_s``: the worst case from the fault to the alert at the bridge per Prometheus rule, computed from
the rules file and alertmanager.yaml (``sandbox.drills.detection_bounds``), for production and the demo profile.

``--runs N`` starts a fresh stack N times (cooldowns and the LLM failover budget make a repeat on the same
stack a different drill) and adds ``median``: per scenario the median of each timing and the worst
``steps_lost``. Targets on a 2-core machine (``sandbox.drills.TARGETS``): with the watcher crash <= 10 s and
hang <= 20 s; with Prometheus on the demo profile crash <= 20 s; direct crash <= 15 s, hang <= 30 s; 0 lost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def main(argv: list[str] | None = None) -> int:
    from deployments.demo import default_detect
    from sandbox.drills import SCENARIOS, detection_bounds, median_rows, run_drills, table
    from sandbox.observability import DEMO, PRODUCTION
    from sandbox.stack import DETECTIONS, Stack

    p = argparse.ArgumentParser(prog="python -m bench.drills", description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--detect", choices=DETECTIONS, default=None,
                   help="detection path (default: prometheus when installed, else direct)")
    p.add_argument("--runs", type=int, default=1, help="fresh stacks to run the scenarios on (median over them)")
    p.add_argument("--backlog", type=int, default=10_000, help="steps in the backlog burst")
    p.add_argument("--held", type=int, default=50, help="in-flight steps of the crashed worker")
    p.add_argument("--load", type=float, default=5.0, help="steady load, steps per second")
    p.add_argument("--state-dir", default=".fd-demo", help="recreated on every start")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if not 1 <= args.held <= 50:
        p.error("--held must be between 1 and 50 (a sandbox worker reads at most 50 steps at once)")
    if args.runs < 1:
        p.error("--runs must be at least 1")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    detect = args.detect or default_detect(say)
    load_before = os.getloadavg()
    started = time.monotonic()
    all_results = []
    ready = []
    for n in range(args.runs):
        if args.runs > 1:
            say(f"=== run {n + 1} of {args.runs} (detection: {detect})")
        # a state directory per run: the runs DB of each stack is its own file (engines are cached by URL)
        state_dir = args.state_dir if n == 0 else f"{args.state_dir}-{n + 1}"
        with Stack.start(state_dir=state_dir, load_rate_per_s=args.load, say=say, detect=detect) as stack:
            say(stack.detection())
            results = run_drills(stack, args.scenarios, say=say,
                                 options={"backlog": {"n": args.backlog}, "crash": {"held": args.held}})
            ready.append(stack.timings.get("ready_s"))
        say("\n" + table(results))
        all_results.append(results)
    last = all_results[-1]
    out = {
        "detect": detect,
        "scenarios": {r.scenario: r.bench_row() for r in last},
        **({"median": median_rows(all_results), "runs": [{r.scenario: r.bench_row() for r in rs} for rs in all_results]}
           if args.runs > 1 else {}),
        "detection_bound_s": {name: {alert: b["bound_s"] for alert, b in detection_bounds(profile).items()}
                              for name, profile in (("production", PRODUCTION), ("demo", DEMO))},
        "all_recovered": all(r.recovered for rs in all_results for r in rs),
        "steps_lost_total": sum(r.steps.lost for rs in all_results for r in rs),
        "load_steps_per_s": args.load,
        "stack_ready_s": ready,
        "total_s": round(time.monotonic() - started, 1),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    text = json.dumps(out, default=str)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0 if all(r.ok for rs in all_results for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
