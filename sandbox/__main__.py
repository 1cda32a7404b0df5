"""``python -m sandbox`` (also ``fd-recovery sandbox``): run the living sandbox FerrumDeck until interrupted.

Starts the sandbox cluster, the workers, the gateway, MCP and LLM status stubs (see ``sandbox.services``) on
the Redis and runs database of the ``FD_*`` settings (a SQLite file in the state directory by default),
prints the kubeconfig path and the URLs, and writes ``sandbox.env`` (``FD_*`` variables and ``KUBECONFIG``)
for the recovery flows: ``set -a; . <state-dir>/sandbox.env; set +a``. ``kubectl`` works against it:
``KUBECONFIG=<state-dir>/kubeconfig kubectl get pods -n ferrumdeck``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sandbox's options (shared by ``python -m sandbox`` and ``fd-recovery sandbox``)."""
    parser.add_argument("--state-dir", default=".fd-sandbox", help="kubeconfig, sandbox.env and the SQLite runs DB")
    parser.add_argument("--database-url", default=None, help="runs DB URL (default: SQLite file in the state dir)")
    parser.add_argument("--kube-port", type=int, default=0, help="sandbox Kubernetes API port (0 = free port)")
    parser.add_argument("--gateway-port", type=int, default=0)
    parser.add_argument("--mcp-port", type=int, default=0)
    parser.add_argument("--llm-port", type=int, default=0)
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated work per step, in ms")
    parser.add_argument("--batch", type=int, default=50, help="entries a worker reads at once (XREADGROUP COUNT)")
    parser.add_argument("--load", type=float, default=2.0, help="steady load in steps per second (0 = none)")
    parser.add_argument(
        "--realistic-pods", action="store_true",
        help="pods take seconds to start/terminate and crash-loop back-off grows to 60 s (default: fast, for tests)",
    )
    parser.add_argument("--exit-after", type=float, default=None, help="stop after this many seconds (smoke runs)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Start the sandbox, print where it is, and serve until SIGINT/SIGTERM (or ``--exit-after``)."""
    from pydantic import SecretStr

    from sandbox.kube import Timing
    from sandbox.services import SandboxServices
    from tasks.settings import Settings

    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    database_url = args.database_url
    if database_url is None and "FD_DATABASE_URL" not in os.environ:
        database_url = f"sqlite:///{state / 'runs.db'}"
    services = SandboxServices.start(
        settings=settings.model_copy(update={"database_url": SecretStr(database_url)}) if database_url else settings,
        state_dir=state,
        cluster_timing=Timing.demo() if args.realistic_pods else None,
        step_ms=args.step_ms,
        batch=args.batch,
        load_rate_per_s=args.load,
        kube_port=args.kube_port,
        gateway_port=args.gateway_port,
        mcp_port=args.mcp_port,
        llm_port=args.llm_port,
    )
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        env_file = state / "sandbox.env"
        env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in services.env().items()))
        env_file.chmod(0o600)
        summary = services.summary()
        print(f"sandbox FerrumDeck running (namespace {summary['namespace']}, stream {summary['stream']})")
        print(f"  kubeconfig: {summary['kubeconfig']}")
        for name, url in summary["urls"].items():
            print(f"  {name:<18} {url}")
        print(f"  environment: {env_file}  (set -a; . {env_file}; set +a)")
        print(f"  try: KUBECONFIG={summary['kubeconfig']} kubectl get pods -n {summary['namespace']}")
        print(json.dumps({"kubeconfig": summary["kubeconfig"], "urls": summary["urls"], "env_file": str(env_file)}))
        sys.stdout.flush()
        done.wait(args.exit_after)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        services.stop()
    return 0


def main(argv: list[str] | None = None, *, prog: str = "python -m sandbox") -> int:
    """Parse the sandbox's options and run it (``python -m sandbox`` and ``fd-recovery sandbox``)."""
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
