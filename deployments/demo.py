"""`make demo`: the whole thing on one machine — every runbook failure injected, alerted, recovered, measured.

Starts the stack (``sandbox.stack``: a Prefect server on SQLite, the sandbox FerrumDeck with a steady load of
runs, the alert bridge, ``fd-recovery serve``), then runs each drill (``sandbox.drills``): inject the fault,
post its alert to the bridge as Alertmanager would, wait for the triggered recovery flow, run
``post-recovery-check`` until it passes. Prints a table (fault injected at, alert, flow run, recovered at,
time to recovery, steps lost, steps dead-lettered) and the Prefect UI URL, and exits non-zero when a
scenario lost a step or did not recover. ``--short``: crash + poison + MCP (CI). ``--keep``: leave it all
running to explore until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def say(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sandbox.drills import SCENARIOS

    p = argparse.ArgumentParser(prog="python -m deployments.demo", description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="CI-sized: crash + poison + mcp_outage only")
    p.add_argument("--keep", action="store_true", help="keep everything running afterwards (Ctrl-C stops it)")
    p.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), help="run only these drills, in order")
    p.add_argument("--state-dir", default=".fd-demo", help="Prefect home, logs, SQLite databases (recreated)")
    p.add_argument("--load", type=float, default=5.0, help="steady load, steps per second")
    p.add_argument("--backlog", type=int, default=10_000, help="steps in the backlog drill's burst")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sandbox.drills import SCENARIOS, SHORT, run_drills, table
    from sandbox.stack import DRILL_PARAMETERS, DRILL_SETTINGS, Stack

    names = args.scenarios or (SHORT if args.short else list(SCENARIOS))
    signal.signal(signal.SIGTERM, _interrupt)  # CI cancelling the job stops everything like Ctrl-C does
    started = time.monotonic()
    stack = None
    code = 130
    try:
        stack = Stack.start(state_dir=args.state_dir, load_rate_per_s=args.load, say=say)
        info = stack.summary()
        say(f"stack ready in {stack.timings['ready_s']:.1f} s — Prefect UI {stack.ui_url}; "
            f"load {args.load:g} steps/s on {info['sandbox']['stream']}; "
            f"workers {', '.join(info['sandbox']['workers'])}")
        say(f"start-up timings (s since start): {stack.timings}")
        say(f"drill profile: settings {DRILL_SETTINGS}; deployment parameters {DRILL_PARAMETERS}\n")
        results = run_drills(stack, names, say=say, options={"backlog": {"n": args.backlog}})
        failed = [r for r in results if not r.ok]
        say("\n" + table(results) + "\n")
        for r in results:
            extra = ", ".join(f"{k}={v}" for k, v in r.checks.items())
            say(f"  {r.scenario:<11} steps_lost {r.steps.lost}  (total {r.steps.total}, completed "
                f"{r.steps.completed}, failed with error recorded {r.steps.failed}, dead-lettered "
                f"{r.steps.dead_lettered}, still queued/in flight {r.steps.queued + r.steps.in_flight}){'; ' + extra if extra else ''}")
            for problem in r.problems:
                say(f"  {r.scenario:<11} PROBLEM: {problem}")
        say(f"\nEvery flow run and its report: {stack.ui_url}/runs  (artifacts: {stack.ui_url}/artifacts)")
        verdict = (f"{len(results)} scenarios recovered, steps_lost 0 in every one" if not failed else
                   f"{len(failed)} of {len(results)} scenarios FAILED: {', '.join(r.scenario for r in failed)}")
        say(f"demo {'OK' if not failed else 'FAILED'}: {verdict} ({time.monotonic() - started:.0f} s in all)")
        code = 1 if failed else 0
        if args.keep:
            env = stack.write_env()
            say(f"\n--keep: everything keeps running. Prefect UI {stack.ui_url}; environment: set -a; . {env}; "
                f"set +a; then e.g. kubectl get pods -n ferrumdeck. Ctrl-C stops it all.")
            threading.Event().wait()
        return code
    except KeyboardInterrupt:
        say("\nstopping everything ...")
        return code
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
