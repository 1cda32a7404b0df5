"""``fd-recovery``: one command for every long-running part of ferrumdeck-recovery.

Subcommands import their own module only when chosen, so ``fd-recovery --help`` stays fast and the production
commands (``bridge``, ``serve``) never load the sandbox: ``sandbox`` and ``demo`` reach it only when they run.
Each subcommand is registered by an ``_add_<name>(subparsers)`` function below; add new ones the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path


def _bridge(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deployments.bridge import BridgeError, BridgeSettings, run_bridge

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    try:
        settings = BridgeSettings(**overrides)
        run_bridge(settings, log_level=args.log_level)
    except ValidationError as e:  # the messages only: the input may hold the token
        for error in e.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"fd-recovery bridge: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except BridgeError as e:
        print(f"fd-recovery bridge: {e}", file=sys.stderr)
        return 2
    return 0


def _add_bridge(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bridge",
        help="run the alert bridge (Alertmanager/Grafana webhooks -> Prefect events)",
        description="Serve POST /alertmanager, POST /grafana, GET /healthz, GET /heartbeat. "
        "Settings: FD_BRIDGE_* environment variables (see README); Prefect API from PREFECT_API_URL.",
    )
    p.add_argument("--host", default=None, help="listen address (default FD_BRIDGE_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default FD_BRIDGE_PORT or 9095)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=_bridge)


def _checkout_package(name: str) -> None:
    """Make ``name`` (``sandbox``: shipped in a checkout only, never installed) importable, or exit clearly.

    From a checkout it is found beside ``deployments/`` (``python -m`` from the root already has it; the
    ``fd-recovery`` console script of an editable install does not); an installed package has no sandbox.
    """
    root = Path(__file__).resolve().parent.parent
    if (root / name / "__init__.py").is_file():
        if str(root) not in sys.path:
            sys.path.append(str(root))
    elif importlib.util.find_spec(name) is None:
        raise SystemExit(
            f"fd-recovery: `{name}` is part of a checkout of ferrumdeck-recovery, not of the installed package; "
            "run this from a checkout (make demo, python -m sandbox)"
        )


def _sandbox(args: argparse.Namespace) -> int:
    _checkout_package("sandbox")
    from sandbox.__main__ import main as sandbox_main

    return sandbox_main(args.passed_on, prog="fd-recovery sandbox")


def _add_sandbox(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sandbox",
        help="run the living sandbox FerrumDeck (cluster, workers, gateway, MCP, LLM status) until interrupted",
        description="Same as `python -m sandbox` (from a checkout): start the sandbox FerrumDeck in-process; "
        "print the kubeconfig path and URLs; write <state-dir>/sandbox.env with the FD_* settings for the "
        "recovery flows. Options after `sandbox` are passed on (`fd-recovery sandbox --help` lists them).",
        add_help=False,
    )
    p.add_argument("passed_on", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_sandbox)


def _serve(args: argparse.Namespace) -> int:
    from deployments.serve import serve_all

    serve_all(names=args.only or None, limit=args.limit, poll_seconds=args.poll_seconds, subprocess=args.subprocess)
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve every deployment of prefect.yaml (schedules and alert triggers) from this one process",
        description="Register every deployment of prefect.yaml with the Prefect API in PREFECT_API_URL and run "
        "their flow runs here: in threads of this process (flows already imported: a run starts within ~0.3 s; "
        "polls every 0.25 s), or with --subprocess in Prefect's Runner (a fresh process per run: isolated, "
        "2-4 s to start; polls every second, PREFECT_RUNNER_POLL_FREQUENCY overrides).",
    )
    p.add_argument("--only", nargs="*", metavar="DEPLOYMENT", help="serve only these deployments")
    p.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once")
    p.add_argument("--poll-seconds", type=float, default=None, help="how often to look for due runs")
    p.add_argument("--subprocess", action="store_true",
                   help="run each flow run in its own process with Prefect's Runner (isolation, slower start)")
    p.set_defaults(handler=_serve)


def _demo(args: argparse.Namespace) -> int:
    _checkout_package("sandbox")  # the demo drives the sandbox
    from deployments.demo import main as demo_main

    return demo_main(args.passed_on)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the one-command demo: the whole stack, every drill fired as its alert, a recovery table",
        description="Same as `make demo` / `python -m deployments.demo`; options after `demo` are passed on "
        "(--short, --keep, --scenarios ...; `fd-recovery demo --help` lists them).",
        add_help=False,
    )
    p.add_argument("passed_on", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_demo)


def _watch(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deployments.watch import WatchError, WatchSettings, run_watch
    from tasks.errors import RecoveryError
    from tasks.settings import Settings

    overrides = {k: v for k, v in {"poll_interval_s": args.poll_interval, "health_port": args.health_port,
                                   "health_host": args.health_host}.items() if v is not None}
    try:
        run_watch(Settings(), WatchSettings(**overrides), log_level=args.log_level)
    except ValidationError as e:  # the messages only: the input may hold a URL with a password
        for error in e.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"fd-recovery watch: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except (WatchError, RecoveryError) as e:  # no Prefect API, no kubeconfig
        print(f"fd-recovery watch: {e}", file=sys.stderr)
        return 2
    return 0


def _add_watch(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "watch",
        help="run the direct watcher (Kubernetes watch of worker/MCP pods + consumer-group poll -> Prefect events)",
        description="Watch the worker and MCP pods (CrashLoopBackOff, OOMKilled, Unschedulable, deleted while "
        "holding entries) and poll the consumer group (hung consumer, lag growth); emit ferrumdeck.pod.* / "
        "ferrumdeck.mcp.* / ferrumdeck.consumer.hung / ferrumdeck.queue.lag-growing events to PREFECT_API_URL. "
        "Settings: FD_* (namespace, selectors, Redis, FD_HANG_MIN_IDLE_MS) and FD_WATCH_* (see README).",
    )
    p.add_argument("--poll-interval", type=float, default=None, help="seconds between consumer-group reads "
                   "(default FD_WATCH_POLL_INTERVAL_S or 5)")
    p.add_argument("--health-port", type=int, default=None, help="serve GET /healthz on this port "
                   "(default FD_WATCH_HEALTH_PORT; unset: none)")
    p.add_argument("--health-host", default=None, help="address of /healthz (default FD_WATCH_HEALTH_HOST or 127.0.0.1)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=_watch)


def _notifications(args: argparse.Namespace) -> int:
    from prefect.settings import get_current_settings
    from pydantic import ValidationError

    from deployments.notifications import apply_notifications
    from tasks.settings import Settings

    if not get_current_settings().api.url:  # never apply to a throwaway ephemeral server
        print("fd-recovery notifications: no Prefect API: set PREFECT_API_URL", file=sys.stderr)
        return 2
    try:
        applied = apply_notifications(Settings())
    except ValidationError as e:  # the messages only: the input may hold a webhook URL with its token
        for error in e.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"fd-recovery notifications: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - no Prefect API, a refused block: say so, no traceback
        print(f"fd-recovery notifications: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if not applied.blocks:
        print("no FD_NOTIFY_SLACK_WEBHOOK_URL / FD_NOTIFY_WEBHOOK_URL set: notifications off")
    for name in applied.blocks:
        print(f"block {name}: saved")
    for name, fate in applied.automations.items():
        print(f"automation {name!r}: {fate}")
    return 0


def _add_notifications(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "notifications",
        help="create/update the Prefect notification blocks and automations (Slack, generic webhook)",
        description="`apply`: save the notification blocks (FD_NOTIFY_SLACK_WEBHOOK_URL, FD_NOTIFY_WEBHOOK_URL) and "
        "the automations that send through them on recovery outcomes (FD_NOTIFY_OUTCOMES) and crashed recovery "
        "runs, idempotently by name, to the Prefect API in PREFECT_API_URL. With no URL set the automations are "
        "removed.",
    )
    p.add_argument("action", choices=["apply"], help="apply: create or update them from the settings")
    p.set_defaults(handler=_notifications)


# --- other subcommands -------------------------------------------------------------------------------
# Each handler imports its own module lazily and returns an exit code.
# ------------------------------------------------------------------------------------------------------

_REGISTRARS = [_add_bridge, _add_sandbox, _add_serve, _add_demo, _add_watch, _add_notifications]
_PASSED_ON = {"sandbox", "demo"}  # subcommands whose options their own module parses, verbatim


def build_parser() -> argparse.ArgumentParser:
    """The ``fd-recovery`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="fd-recovery", description="ferrumdeck-recovery: Prefect runbook automation")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fd-recovery`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in _PASSED_ON:  # everything after `demo` / `sandbox` is for that command's own parser
        args = parser.parse_args(argv[:1])
        args.passed_on = argv[1:]
    else:
        args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
