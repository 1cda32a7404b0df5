"""`make demo`: the whole thing on one machine — every runbook failure injected, detected, recovered, measured.

Starts the stack (``sandbox.stack``: a Prefect server on SQLite, the sandbox FerrumDeck with a steady load of
runs, the alert bridge, ``fd-recovery serve``, and the detection path), then runs each drill
(``sandbox.drills``): inject the fault, let the detection path see it, wait for the triggered recovery flow
and read its typed outcome, run ``post-recovery-check`` until it passes. ``--detect``: ``prometheus`` (the
real Prometheus, Alertmanager and exporters on the demo profile; the default when the Debian packages are
installed), ``watch`` (the direct watcher), ``direct`` (each drill posts its alert to the bridge itself).
Prints a table (detected by, fault -> detection, -> recovery started, -> verified outcome, -> healthy, steps
lost, dead-lettered) and the Prefect UI URL, and exits non-zero when a scenario lost a step or did not recover.
``--short``: crash + poison + MCP (CI). ``--keep``: leave it all running to explore until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def say(message: str) -> None:
    print(message, flush=True)


def default_detect(say: Callable[[str], None] = say) -> str:
    """``prometheus`` when its Debian packages are installed, else ``direct`` (with a hint how to get the loop)."""
    from sandbox.observability import missing_packages

    missing = missing_packages()
    if not missing:
        return "prometheus"
    say(f"detection: direct (the drills post each alert to the bridge) — for the whole loop install "
        f"{' '.join(missing)}: sudo apt-get install -y {' '.join(missing)}; then make demo (or --detect watch "
        f"for the direct watcher, which needs nothing more)")
    return "direct"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sandbox.drills import SCENARIOS
    from sandbox.stack import DETECTIONS

    p = argparse.ArgumentParser(prog="python -m deployments.demo", description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="CI-sized: crash + poison + mcp_outage only")
    p.add_argument("--keep", action="store_true", help="keep everything running afterwards (Ctrl-C stops it)")
    p.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), help="run only these drills, in order")
    p.add_argument("--state-dir", default=".fd-demo", help="Prefect home, logs, SQLite databases (recreated)")
    p.add_argument("--load", type=float, default=5.0, help="steady load, steps per second")
    p.add_argument("--backlog", type=int, default=10_000, help="steps in the backlog drill's burst")
    p.add_argument("--detect", choices=DETECTIONS, default=None,
                   help="detection path: prometheus (default when installed), watch, direct (default otherwise)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sandbox.drills import SCENARIOS, SHORT, run_drills, table
    from sandbox.stack import DRILL_PARAMETERS, DRILL_SETTINGS, Stack

    names = args.scenarios or (SHORT if args.short else list(SCENARIOS))
    detect = args.detect or default_detect()
    signal.signal(signal.SIGTERM, _interrupt)  # CI cancelling the job stops everything like Ctrl-C does
    started = time.monotonic()
    stack = None
    code = 130
    try:
        stack = Stack.start(state_dir=args.state_dir, load_rate_per_s=args.load, say=say, detect=detect)
        info = stack.summary()
        say(f"stack ready in {stack.timings['ready_s']:.1f} s — Prefect UI {stack.ui_url}; "
            f"load {args.load:g} steps/s on {info['sandbox']['stream']}; "
            f"workers {', '.join(info['sandbox']['workers'])}")
        say(f"start-up timings (s since start): {stack.timings}")
        say(stack.detection())
        say(f"drill profile: settings {DRILL_SETTINGS}; deployment parameters {DRILL_PARAMETERS}\n")
        results = run_drills(stack, names, say=say, options={"backlog": {"n": args.backlog}})
        failed = [r for r in results if not r.ok]
        say("\n" + table(results) + "\n")
        for r in results:
            extra = ", ".join(f"{k}={v}" for k, v in r.checks.items())
            say(f"  {r.scenario:<11} steps_lost {r.steps.lost}  (total {r.steps.total}, completed "
                f"{r.steps.completed}, failed with error recorded {r.steps.failed}, dead-lettered "
                f"{r.steps.dead_lettered}, still queued/in flight {r.steps.queued + r.steps.in_flight}){'; ' + extra if extra else ''}")
            for run in r.flow_runs:
                say(f"  {r.scenario:<11} {run.role}: {run.deployment} {run.label()} detected by {run.detected_by} "
                    f"{run.detection or ''} +{run.detect_s}s, started +{run.started_s}s, ended +{run.ended_s}s")
            for run in r.other_runs:
                say(f"  {r.scenario:<11} meanwhile: {run.deployment} {run.label()}")
            for note in r.notes:
                say(f"  {r.scenario:<11} note: {note}")
            for problem in r.problems:
                say(f"  {r.scenario:<11} PROBLEM: {problem}")
        say(f"\nEvery flow run and its report: {stack.ui_url}/runs  (artifacts: {stack.ui_url}/artifacts)")
        verdict = (f"{len(results)} scenarios detected ({detect}) and recovered, verified by their typed outcome, "
                   f"steps_lost 0 in every one" if not failed else
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
