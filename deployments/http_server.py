"""Serve an ASGI app in-process on a free (or given) port, in its own thread: the bridge, the sandbox, tests;
and ``serve_probes``: a few GET paths for probes and scrapes (serve's /health and /metrics, watch's /healthz).

Product infrastructure: the alert bridge runs on it in production (``fd-recovery bridge``); the sandbox and the
tests reuse it from here (never the other way round).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import uvicorn


class ServeError(Exception):
    """An in-process HTTP server did not start or stop in time."""


@dataclass
class ServedApp:
    """A running uvicorn server: its base URL, and ``stop()``."""

    url: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread
    _stopped: bool = field(default=False, repr=False)

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Ask uvicorn to exit and wait for its thread (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.server.should_exit = True
        self.thread.join(timeout_s)


def serve_app(
    app,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "app",
    timeout_s: float = 10.0,
    lifespan: str = "off",
    **uvicorn_options: object,
) -> ServedApp:
    """Start ``app`` on ``host:port`` (0 = a free port) and return once it accepts connections."""
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then (else ~40 ms Nagle stalls per request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan, timeout_keep_alive=30,
                            **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"{name}-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ServeError(f"{name} did not start on {host}:{bound_port} within {timeout_s} s")
        time.sleep(0.01)  # poll
    return ServedApp(url=f"http://{host}:{bound_port}", port=bound_port, server=server, thread=thread)


class BackgroundApp:
    """An ASGI app served in a background thread: ``start()``/``stop()`` or ``with``; ``url`` once started.

    Subclasses set ``name`` and ``lifespan`` and add what their app offers (the bridge, the sandbox gateway).
    """

    name = "app"
    lifespan = "off"

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 10.0) -> None:
        self.app, self.host, self._port, self._start_timeout_s = app, host, port, start_timeout_s
        self._served: ServedApp | None = None

    def start(self):
        self._served = serve_app(
            self.app, host=self.host, port=self._port, name=self.name, timeout_s=self._start_timeout_s,
            lifespan=self.lifespan,
        )
        return self

    @property
    def port(self) -> int:
        return self._served.port if self._served else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def thread(self) -> threading.Thread | None:
        return self._served.thread if self._served else None

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop(timeout_s=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: one GET path's answer, from the request's headers (looked up case-insensitively): (status, content type, body)
Probe = Callable[[Message], tuple[int, str, bytes]]


def serve_probes(probes: dict[str, Probe], *, host: str, port: int, name: str) -> ThreadingHTTPServer:
    """A threaded stdlib HTTP server answering GET on each path of ``probes`` (query and trailing slash ignored),
    404 elsewhere, with no access log (probes come every few seconds); started in a daemon thread ``name``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            probe = probes.get(self.path.split("?")[0].rstrip("/") or "/")
            if probe is None:
                self.send_error(404)
                return
            status, content_type, body = probe(self.headers)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server

