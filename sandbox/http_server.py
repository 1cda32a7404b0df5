"""The in-thread ASGI server helper, for the sandbox's stubs: it lives in ``deployments.http_server``.

The product owns it (the alert bridge runs on it); the sandbox uses it from there, never the other way round.
Re-exported here so sandbox modules and tests keep one short import.
"""

from __future__ import annotations

from deployments.http_server import BackgroundApp, ServedApp, ServeError, serve_app

__all__ = ["BackgroundApp", "ServeError", "ServedApp", "serve_app"]
