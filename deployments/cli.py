"""``fd-recovery``: one command for every long-running part of ferrumdeck-recovery.

Subcommands import their own module only when chosen, so ``fd-recovery --help`` stays fast.
Each subcommand is registered by an ``_add_<name>(subparsers)`` function below; add new ones the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def _sandbox(args: argparse.Namespace) -> int:
    from sandbox.__main__ import run

    return run(args)


def _add_sandbox(subparsers: argparse._SubParsersAction) -> None:
    from sandbox.__main__ import add_arguments  # argparse only: cheap

    p = subparsers.add_parser(
        "sandbox",
        help="run the living sandbox FerrumDeck (cluster, workers, gateway, MCP, LLM status) until interrupted",
        description="Start the sandbox FerrumDeck in-process; print the kubeconfig path and URLs; "
        "write <state-dir>/sandbox.env with the FD_* settings for the recovery flows.",
    )
    add_arguments(p)
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
    from deployments.demo import main as demo_main

    return demo_main(args.demo_args)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the one-command demo: the whole stack, every drill fired as its alert, a recovery table",
        description="Same as `make demo` / `python -m deployments.demo`; options after `demo` are passed on "
        "(--short, --keep, --scenarios ...; `fd-recovery demo --help` lists them).",
        add_help=False,
    )
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_demo)


# --- other subcommands -------------------------------------------------------------------------------
# Each handler imports its own module lazily and returns an exit code.
# ------------------------------------------------------------------------------------------------------

_REGISTRARS = [_add_bridge, _add_sandbox, _add_serve, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    """The ``fd-recovery`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="fd-recovery", description="ferrumdeck-recovery: Prefect runbook automation")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fd-recovery`` console script."""
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command != "demo":
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":  # everything after `demo` belongs to the demo's own parser
        args.demo_args = [*args.demo_args, *extra]
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
