"""``python -m sandbox.kube --port PORT --kubeconfig PATH``: serve the seeded sandbox cluster until interrupted."""

from __future__ import annotations

import argparse
import signal
import threading

from sandbox.kube.cluster import SandboxCluster
from sandbox.kube.timing import Timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.kube", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--kubeconfig", default=None, help="where to write a kubeconfig pointing at the server")
    parser.add_argument("--timing", choices=["fast", "demo"], default="demo",
                        help="simulated delays: 'fast' (tests) or 'demo' (seconds, closer to a real cluster)")
    args = parser.parse_args(argv)
    timing = Timing.demo() if args.timing == "demo" else Timing()
    cluster = SandboxCluster.start(port=args.port, kubeconfig_path=args.kubeconfig, timing=timing, host=args.host)
    print(f"sandbox cluster serving at {cluster.url}; kubeconfig: {cluster.kubeconfig}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
