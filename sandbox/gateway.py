"""A small FerrumDeck gateway for the sandbox, the demo and tests: ``POST /v1/runs/{run_id}/steps/{step_id}/retry``.

Bearer auth (401 otherwise); 400 for an id that is not one plain path segment; 404 when the runs database
knows no such run/step; 409 when the step is already queued/pending (in the database or in the stream's
pending list) or its run is no longer running; otherwise the step is marked ``queued`` (attempts + 1, one
conditional UPDATE, so concurrent retries cannot both win) and re-enqueued with ``XADD job_id run_id step_id``
-> 202. ``GatewayServer`` runs it in-process on a free port; ``inject_fault`` makes the next calls fail
(e.g. 503 with ``Retry-After``) to drill the client's retries.

Run alone: ``python -m sandbox.gateway --port 8080`` (settings from ``FD_*``; key from ``FD_GATEWAY_API_KEY``).
"""

from __future__ import annotations

import argparse
import hmac
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sandbox.http_server import BackgroundApp
from tasks import runs
from tasks.connections import redis_client
from tasks.gateway import InvalidIdError, validate_id
from tasks.queue import QueueError, locate_steps
from tasks.settings import Settings, get_settings


@dataclass
class Fault:
    """One injected failure: answer ``status`` (with ``Retry-After`` when given) instead of handling the call."""

    status: int = 503
    retry_after: str | None = None


def _queue_location(settings: Settings, step_id: str) -> str:
    """Where the step is in the stream: "pending", "queued", "dlq" or "nowhere"."""
    return locate_steps(settings=settings, step_ids=[step_id])[step_id].where


def create_app(*, settings: Settings | Callable[[], Settings], api_key: SecretStr | str) -> Starlette:
    """The gateway app, acting on ``settings``' runs database and stream, accepting only ``api_key``.

    ``settings`` may be a callable (e.g. ``get_settings``) read per request, so one server can follow the
    settings in force (tests give each test its own tables and stream)."""
    secret = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
    if not secret.get_secret_value():
        raise ValueError("the sandbox gateway needs a non-empty API key")
    expected = f"Bearer {secret.get_secret_value()}".encode()
    faults: deque[Fault] = deque()
    stats = {"calls": 0, "retried": 0}

    def retry(request: Request) -> JSONResponse:
        stats["calls"] += 1
        current = settings() if callable(settings) else settings
        if faults:
            fault = faults.popleft()
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            return JSONResponse({"error": "injected fault"}, status_code=fault.status, headers=headers)
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse(
                {"error": "unauthorized"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="gateway"'},
            )
        try:
            run_id = validate_id(request.path_params["run_id"], what="run id")
            step_id = validate_id(request.path_params["step_id"], what="step id")
        except InvalidIdError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        try:
            return _requeue(current, run_id, step_id)
        except (runs.RunsError, QueueError, redis.RedisError) as e:
            return JSONResponse({"error": f"unavailable: {type(e).__name__}"}, status_code=503)

    def _requeue(current: Settings, run_id: str, step_id: str) -> JSONResponse:
        step = runs.read_step(settings=current, run_id=run_id, step_id=step_id)
        if step is None:
            return JSONResponse({"error": f"unknown run {run_id} or step {step_id}"}, status_code=404)
        if step.status in runs.QUEUED_STEP_STATUSES:
            return JSONResponse({"error": f"step {step_id} is already {step.status}"}, status_code=409)
        where = _queue_location(current, step_id)
        if where in ("pending", "queued"):
            return JSONResponse({"error": f"step {step_id} is already {where} in the queue"}, status_code=409)
        updated = runs.requeue_step(settings=current, run_id=run_id, step_id=step_id)
        if updated is None:
            return JSONResponse(
                {"error": f"step {step_id} was queued meanwhile, or run {run_id} is not running"},
                status_code=409,
            )
        entry_id = redis_client(current).xadd(
            current.stream, {"job_id": step_id, "run_id": run_id, "step_id": step_id}
        )
        stats["retried"] += 1
        return JSONResponse(
            {"run_id": run_id, "step_id": step_id, "entry_id": entry_id, "attempts": updated.attempts},
            status_code=202,
        )

    def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/v1/runs/{run_id}/steps/{step_id}/retry", retry, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
        ]
    )
    app.state.faults = faults
    app.state.stats = stats
    return app


class GatewayServer(BackgroundApp):
    """The sandbox gateway served by uvicorn in a background thread on a free loopback port."""

    name = "gateway"

    def __init__(
        self,
        *,
        settings: Settings | Callable[[], Settings],
        api_key: SecretStr | str,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        super().__init__(create_app(settings=settings, api_key=api_key), host=host, port=port)

    @property
    def stats(self) -> dict[str, int]:
        return self.app.state.stats

    def inject_fault(self, *, status: int = 503, times: int = 1, retry_after: str | None = None) -> None:
        """Make the next ``times`` calls answer ``status`` (e.g. 503 with ``Retry-After: 1``)."""
        self.app.state.faults.extend(Fault(status=status, retry_after=retry_after) for _ in range(times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the sandbox FerrumDeck gateway.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--create-schema", action="store_true", help="create the runs tables first")
    args = parser.parse_args(argv)
    settings = get_settings()
    if settings.gateway_api_key is None:
        raise SystemExit("set FD_GATEWAY_API_KEY")
    if args.create_schema:
        runs.create_schema(settings=settings)
    server = GatewayServer(
        settings=settings, api_key=settings.gateway_api_key, host=args.host, port=args.port
    )
    server.start()
    print(f"sandbox gateway on {server.url}", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
