"""MCP server stub: ``GET /health`` and ``POST /tools/call``, with an outage that only a restart cures.

During an outage ``/health`` answers 503 and every tool call is refused (503, "connection refused" in the error,
as the runbook's symptom says). The outage ends when the mcp-server Deployment is restarted: the stub follows
the sandbox cluster's pod events (``on_pod_event``, registered with ``SandboxCluster.add_listener``) and heals
once a Ready mcp-server pod exists that was not there when the outage began — exactly what
``kubectl rollout restart deployment mcp-server`` (or deleting its pod) produces.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sandbox.pods import pod_is_ready, pod_labels


class MCPServer:
    """The MCP stub's state and its Starlette app."""

    def __init__(self, *, app_label: str = "mcp-server") -> None:
        self.app_label = app_label
        self._lock = threading.Lock()
        self._down = False
        self._pods_at_outage: set[str] = set()
        self.calls = 0
        self.refused = 0
        self.restarts_seen = 0

    @property
    def down(self) -> bool:
        with self._lock:
            return self._down

    def outage(self, *, current_pods: Iterable[str]) -> None:
        """Fail ``/health`` and refuse calls until a pod other than ``current_pods`` is Ready (a restart)."""
        with self._lock:
            self._down = True
            self._pods_at_outage = set(current_pods)

    def restore(self) -> None:
        """End the outage at once (tests, demo reset)."""
        with self._lock:
            self._down = False
            self._pods_at_outage = set()

    def on_pod_event(self, event_type: str, pod: dict) -> None:
        """Cluster listener: a new Ready mcp-server pod during an outage means the server was restarted."""
        if event_type == "DELETED" or pod_labels(pod).get("app") != self.app_label or not pod_is_ready(pod):
            return
        name = pod.get("metadata", {}).get("name", "")
        with self._lock:
            if self._down and name not in self._pods_at_outage:
                self._down = False
                self._pods_at_outage = set()
                self.restarts_seen += 1

    def app(self) -> Starlette:
        """``GET /health`` and ``POST /tools/call``."""

        async def health(request: Request) -> JSONResponse:
            if self.down:
                return JSONResponse({"status": "unavailable", "error": "upstream tools unreachable"}, status_code=503)
            return JSONResponse({"status": "ok"})

        async def call(request: Request) -> JSONResponse:
            if self.down:
                with self._lock:
                    self.refused += 1
                return JSONResponse(
                    {"error": {"code": "ECONNREFUSED", "message": "connect ECONNREFUSED mcp tool backend"}},
                    status_code=503,
                )
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": {"code": "BAD_REQUEST", "message": "body must be JSON"}}, 400)
            name = body.get("name") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name:
                return JSONResponse({"error": {"code": "BAD_REQUEST", "message": "tool name is required"}}, 400)
            with self._lock:
                self.calls += 1
            return JSONResponse({"content": [{"type": "text", "text": f"{name}: ok"}], "isError": False})

        return Starlette(
            routes=[Route("/health", health, methods=["GET"]), Route("/tools/call", call, methods=["POST"])]
        )
