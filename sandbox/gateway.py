"""A small FerrumDeck gateway for the sandbox, the demo and tests: ``POST /v1/runs/{run_id}/steps/{step_id}/retry``.

Bearer auth (401 otherwise); 400 for an id that is not one plain path segment; 404 when the runs database
knows no such run/step; 409 when the step is already queued/pending (in the database, or in the stream: held
by a consumer or waiting undelivered) or its run is no longer running; otherwise the step is marked
``queued`` (attempts + 1, one conditional UPDATE, so concurrent retries cannot both win) and re-enqueued with
``XADD job_id run_id step_id`` -> 202.

It decides all of that with its own reads and writes (its own SQL, its own stream scan), never with the
recovery's code: the simulated FerrumDeck must be able to disagree with the product it tests.
``GatewayServer`` runs it in-process on a free port; ``inject_fault`` makes the next calls fail (e.g. 503 with
``Retry-After``) to drill the client's retries.

Run alone: ``python -m sandbox.gateway --port 8080`` (settings from ``FD_*``; key from ``FD_GATEWAY_API_KEY``).
"""

from __future__ import annotations

import argparse
import hmac
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis
import sqlalchemy as sa
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sandbox.http_server import BackgroundApp
from tasks.connections import db_engine, redis_client
from tasks.settings import Settings, get_settings

#: Step statuses meaning "already waiting for a worker": a retry of such a step is refused with 409.
WAITING = ("queued", "pending")
#: The ids this gateway accepts: one plain path segment that starts with a letter, digit or '_'.
ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")
SCAN_PAGE = 500


@dataclass
class Fault:
    """One injected failure: answer ``status`` (with ``Retry-After`` when given) instead of handling the call."""

    status: int = 503
    retry_after: str | None = None


def _steps(settings: Settings) -> sa.TableClause:
    """The columns of the steps table this gateway reads and writes (named by the settings)."""
    return sa.table(settings.steps_table, *(sa.column(c) for c in (
        "id", "run_id", "status", "attempts", "completed_at", "error")))


def _step_status(settings: Settings, run_id: str, step_id: str) -> str | None:
    """The step's status in the runs database, or None when the run has no such step."""
    s = _steps(settings)
    query = sa.select(s.c.status).where(s.c.id == step_id, s.c.run_id == run_id)
    with db_engine(settings).connect() as conn:
        return conn.execute(query).scalar_one_or_none()


def _mark_queued(settings: Settings, run_id: str, step_id: str) -> int | None:
    """Mark the step queued and count the attempt, in one conditional UPDATE (so of two concurrent retries
    only one wins); None when it was queued meanwhile or its run is not running. Returns the attempts."""
    s = _steps(settings)
    r = sa.table(settings.runs_table, sa.column("id"), sa.column("status"))
    still_running = sa.exists().where(r.c.id == run_id, r.c.status == "running")
    update = (
        sa.update(s)
        .where(s.c.id == step_id, s.c.run_id == run_id, s.c.status.not_in(WAITING), still_running)
        .values(status="queued", attempts=s.c.attempts + 1, completed_at=None, error=sa.null())
        .returning(s.c.attempts)
    )
    with db_engine(settings).begin() as conn:
        return conn.execute(update).scalar_one_or_none()


def _in_stream(client: redis.Redis, settings: Settings, step_id: str) -> str | None:
    """"pending" when a consumer holds an entry of the step, "queued" when one waits undelivered, else None.

    Reads the stream from its oldest pending entry on (earlier entries were all delivered and acknowledged):
    an entry after the group's last-delivered id is queued; one before it is pending if it is in the PEL.
    """
    if not client.exists(settings.stream):
        return None
    group = next((g for g in client.xinfo_groups(settings.stream) if g["name"] == settings.group), None)
    last_delivered = _id(group["last-delivered-id"]) if group else (0, 0)
    oldest_pending = client.xpending(settings.stream, settings.group)["min"] if group else None
    start = oldest_pending or (f"({group['last-delivered-id']}" if group else "-")
    while page := client.xrange(settings.stream, min=start, max="+", count=SCAN_PAGE):
        for entry_id, fields in page:
            if step_id not in (fields.get("job_id"), fields.get("step_id")):
                continue
            if _id(entry_id) > last_delivered:
                return "queued"
            if client.xpending_range(settings.stream, settings.group, min=entry_id, max=entry_id, count=1):
                return "pending"
        start = f"({page[-1][0]}"
    return None


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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
        run_id, step_id = request.path_params["run_id"], request.path_params["step_id"]
        if not (ID.fullmatch(run_id) and ID.fullmatch(step_id)):
            return JSONResponse({"error": "a run or step id must be one plain path segment"}, status_code=400)
        try:
            return _requeue(current, run_id, step_id)
        except (sa.exc.SQLAlchemyError, redis.RedisError) as e:
            return JSONResponse({"error": f"unavailable: {type(e).__name__}"}, status_code=503)

    def _requeue(current: Settings, run_id: str, step_id: str) -> JSONResponse:
        status = _step_status(current, run_id, step_id)
        if status is None:
            return JSONResponse({"error": f"unknown run {run_id} or step {step_id}"}, status_code=404)
        if status in WAITING:
            return JSONResponse({"error": f"step {step_id} is already {status}"}, status_code=409)
        client = redis_client(current)
        where = _in_stream(client, current, step_id)
        if where is not None:
            return JSONResponse({"error": f"step {step_id} is already {where} in the queue"}, status_code=409)
        attempts = _mark_queued(current, run_id, step_id)
        if attempts is None:
            return JSONResponse(
                {"error": f"step {step_id} was queued meanwhile, or run {run_id} is not running"},
                status_code=409,
            )
        entry_id = client.xadd(current.stream, {"job_id": step_id, "run_id": run_id, "step_id": step_id})
        stats["retried"] += 1
        return JSONResponse(
            {"run_id": run_id, "step_id": step_id, "entry_id": entry_id, "attempts": attempts}, status_code=202
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
        from tasks.runs import create_schema  # FerrumDeck's tables (names and columns), nothing more

        create_schema(settings=settings)
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
