"""The alert bridge: Alertmanager / Grafana webhooks in, Prefect events out (``fd-recovery bridge``).

Prefect's open-source server has no webhooks, and it rejects Alertmanager's body, so this small Starlette
service authenticates the sender (Bearer token or HTTP Basic, constant-time), validates the body (4xx with a
clear message, never 5xx; 413 over the size limit), drops duplicates, and delivers one event per alert with
a single ``POST {PREFECT_API_URL}/events``. When Prefect does not take them it answers 503, so Alertmanager
retries, and it forgets the alerts it could not deliver, so the retry is not dropped as a duplicate.

Endpoints: ``POST /alertmanager``, ``POST /grafana``, ``GET /healthz``, ``GET /heartbeat`` (when a heartbeat
alert — ``Watchdog`` / ``FerrumDeckHeartbeat`` — last arrived; the post-recovery check reads it), ``GET /metrics``
(Prometheus: requests by endpoint and status, events forwarded and rejected, heartbeats).

Each alert event names what it is about as related resources, so the Prefect UI links an alert to the pod and the
Kubernetes Deployment the recovery acts on (``ferrumdeck.pod.<pod>``, ``ferrumdeck.deployment.<ns>.<name>``: the
same resources the watcher's and the recoveries' own events use). The flow run a trigger starts is linked by
Prefect itself: its ``prefect.automation.action.triggered`` event relates the alert event (role
``triggering-event``) and the new flow run (role ``flow-run``).

Dedupe lives in memory unless ``FD_BRIDGE_REDIS_URL`` is set: run several replicas only with Redis.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deployments.alerts import (
    WEBHOOK_MODELS,
    DedupeError,
    Deduper,
    MemoryDeduper,
    RedisDeduper,
    Source,
    translate,
)
from deployments.http_server import BackgroundApp, ServeError

log = logging.getLogger("ferrumdeck.bridge")

MIB = 1024 * 1024


class BridgeError(Exception):
    """The bridge cannot start (bad configuration)."""


class BridgeSettings(BaseSettings):
    """Settings of the alert bridge (env prefix ``FD_BRIDGE_``).

    FD_BRIDGE_HOST, FD_BRIDGE_PORT, FD_BRIDGE_TOKEN, FD_BRIDGE_BASIC_USER, FD_BRIDGE_BASIC_PASSWORD,
    FD_BRIDGE_DEDUPE_WINDOW_S, FD_BRIDGE_MAX_BODY_BYTES, FD_BRIDGE_PREFECT_API_URL,
    FD_BRIDGE_PREFECT_TIMEOUT_S, FD_BRIDGE_REDIS_URL, FD_BRIDGE_REDIS_PREFIX, FD_BRIDGE_NAMESPACE,
    FD_BRIDGE_ALERT_DEPLOYMENTS. The Prefect API URL and
    credentials otherwise come from Prefect's own settings (PREFECT_API_URL, PREFECT_API_AUTH_STRING).
    """

    model_config = SettingsConfigDict(env_prefix="FD_BRIDGE_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in a container).")
    port: int = Field(9095, ge=1, le=65535, description="Port to listen on.")
    token: SecretStr | None = Field(None, description="Bearer token senders must present (>= 16 chars).")
    basic_user: SecretStr | None = Field(None, description="HTTP Basic user senders may present instead.")
    basic_password: SecretStr | None = Field(None, description="HTTP Basic password (with basic_user).")
    dedupe_window_s: float = Field(300.0, ge=0, description="Same alert notification within this is dropped.")
    max_body_bytes: int = Field(MIB, ge=1024, description="Larger bodies get 413.")
    prefect_api_url: str | None = Field(None, description="Prefect API URL; default: PREFECT_API_URL.")
    prefect_timeout_s: float = Field(5.0, gt=0, le=60, description="Timeout of the POST to Prefect.")
    redis_url: SecretStr | None = Field(None, description="Redis for dedupe and heartbeat shared by replicas.")
    redis_prefix: str = Field("fd:bridge", min_length=1, description="Redis key prefix of the bridge's state.")
    namespace: str = Field("ferrumdeck", min_length=1, description="Namespace of an alert without a namespace label.")
    alert_deployments: dict[str, str] = Field(
        default_factory=lambda: {"WorkerCrashLooping": "worker", "WorkerHung": "worker", "LLMProviderErrors": "worker",
                                 "QueueBacklog": "worker", "MCPServerDown": "mcp-server"},
        description="Alert -> the Kubernetes Deployment its recovery acts on, when neither a `deployment` label nor "
        "a pod name says.",
    )

    @model_validator(mode="after")
    def _credentials(self) -> BridgeSettings:
        if self.token is not None and len(self.token.get_secret_value()) < 16:
            raise ValueError("FD_BRIDGE_TOKEN must be at least 16 characters")
        if (self.basic_user is None) != (self.basic_password is None):
            raise ValueError("set both FD_BRIDGE_BASIC_USER and FD_BRIDGE_BASIC_PASSWORD, or neither")
        if self.basic_password is not None and not self.basic_password.get_secret_value():
            raise ValueError("FD_BRIDGE_BASIC_PASSWORD must not be empty")
        if self.token is None and self.basic_user is None:
            raise ValueError("the bridge needs credentials: FD_BRIDGE_TOKEN and/or FD_BRIDGE_BASIC_USER/PASSWORD")
        return self


_REPLICASET_POD = re.compile(r"^(?P<deployment>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)-[a-z0-9]{1,10}-[a-z0-9]{5}$")


def related_resources(labels: dict[str, str], *, settings: BridgeSettings) -> list[dict[str, str]]:
    """Pure: the pod and the Kubernetes Deployment an alert is about, as Prefect related resources.

    The pod from its ``pod`` label; the Deployment from a ``deployment`` label, else the pod's name
    (``<deployment>-<replicaset hash>-<pod hash>``), else ``alert_deployments``.
    """
    namespace = labels.get("namespace") or settings.namespace
    related = []
    pod = labels.get("pod", "")
    if pod:
        related.append({"prefect.resource.id": f"ferrumdeck.pod.{pod}", "prefect.resource.role": "pod",
                        "prefect.resource.name": pod, "kubernetes.namespace": namespace})
    match = _REPLICASET_POD.match(pod)
    deployment = (labels.get("deployment") or (match["deployment"] if match else "")
                  or settings.alert_deployments.get(labels.get("alertname", ""), ""))
    if deployment:
        related.append({"prefect.resource.id": f"ferrumdeck.deployment.{namespace}.{deployment}",
                        "prefect.resource.role": "kubernetes-deployment", "prefect.resource.name": deployment,
                        "kubernetes.namespace": namespace})
    return related


class BridgeMetrics:
    """The bridge's Prometheus metrics, in a registry of its own (one per app)."""

    ENDPOINTS = frozenset({"/alertmanager", "/grafana", "/healthz", "/heartbeat", "/metrics"})

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ferrumdeck_bridge_requests", "Requests the alert bridge answered, by endpoint and "
                                "HTTP status.", ["endpoint", "status"], registry=self.registry)
        self.forwarded = Counter("ferrumdeck_bridge_events_forwarded", "Alert events delivered to Prefect, by source "
                                 "(alertmanager, grafana) and event.", ["source", "event"], registry=self.registry)
        self.rejected = Counter("ferrumdeck_bridge_events_rejected", "Alerts not forwarded, by source and reason "
                                "(duplicate, prefect_unavailable, dedupe_unavailable).", ["source", "reason"],
                                registry=self.registry)
        self.heartbeats = Counter("ferrumdeck_bridge_heartbeats", "Heartbeat alerts received (Watchdog, "
                                  "FerrumDeckHeartbeat).", registry=self.registry)
        self.heartbeat_last_seen = Gauge("ferrumdeck_bridge_heartbeat_last_seen_timestamp_seconds",
                                         "Unix time this bridge last received a heartbeat alert (0: none yet).",
                                         registry=self.registry)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in self.ENDPOINTS else "other", str(status)).inc()


class PrefectTarget(BaseModel):
    """Where events go and the Authorization header to send (never logged)."""

    events_url: str
    authorization: SecretStr | None = None


def prefect_target(settings: BridgeSettings) -> PrefectTarget:
    """Resolve the Prefect API (override, else Prefect's settings) and its credentials."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    url = settings.prefect_api_url or api.url
    if not url:
        raise BridgeError("no Prefect API: set PREFECT_API_URL (or FD_BRIDGE_PREFECT_API_URL)")
    authorization = None
    if api.auth_string is not None:
        encoded = base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
        authorization = SecretStr(f"Basic {encoded}")
    elif api.key is not None:
        authorization = SecretStr(f"Bearer {api.key.get_secret_value()}")
    return PrefectTarget(events_url=url.rstrip("/") + "/events", authorization=authorization)


def authorized(header: str | None, *, settings: BridgeSettings) -> bool:
    """True when the Authorization header carries the bridge's token or Basic credentials (constant time)."""
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    if scheme == "bearer" and settings.token is not None:
        return hmac.compare_digest(credentials.encode(), settings.token.get_secret_value().encode())
    if scheme == "basic" and settings.basic_user is not None and settings.basic_password is not None:
        try:
            decoded = base64.b64decode(credentials.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        user_ok = hmac.compare_digest(user, settings.basic_user.get_secret_value().encode())
        password_ok = hmac.compare_digest(password, settings.basic_password.get_secret_value().encode())
        return bool(sep) and user_ok and password_ok
    return False


class Heartbeat:
    """When a heartbeat alert last arrived (in memory, and in Redis when the bridge has one)."""

    def __init__(self, *, redis: Any = None, key: str = "") -> None:
        self._redis = redis
        self._key = key
        self.last_seen: float | None = None
        self.alertname: str | None = None
        self.count = 0

    async def record(self, alertname: str) -> None:
        from redis.exceptions import RedisError

        self.last_seen, self.alertname = time.time(), alertname
        self.count += 1
        if self._redis is not None:
            try:
                await self._redis.set(self._key, json.dumps({"last_seen": self.last_seen, "alertname": alertname}))
            except (RedisError, OSError) as e:
                log.warning("heartbeat not stored in Redis (%s); kept in memory", type(e).__name__)

    async def read(self) -> dict[str, Any]:
        from redis.exceptions import RedisError

        last_seen, alertname = self.last_seen, self.alertname
        if self._redis is not None:
            try:
                raw = await self._redis.get(self._key)
            except (RedisError, OSError) as e:
                log.warning("heartbeat not read from Redis (%s); using memory", type(e).__name__)
                raw = None
            if raw:
                stored = json.loads(raw)
                if stored.get("last_seen", 0) > (last_seen or 0):
                    last_seen, alertname = stored["last_seen"], stored["alertname"]
        return {
            "last_seen": datetime.fromtimestamp(last_seen, UTC).isoformat() if last_seen else None,
            "age_s": round(time.time() - last_seen, 3) if last_seen else None,
            "alertname": alertname,
            "count": self.count,
        }


def _problem(status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit`` (checked as it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    settings: BridgeSettings,
    *,
    http_client: httpx.AsyncClient | None = None,
    deduper: Deduper | None = None,
    target: PrefectTarget | None = None,
) -> Starlette:
    """The bridge as an ASGI app; tests inject the HTTP client (a stub Prefect) and the deduper."""
    target = target or prefect_target(settings)
    redis = None
    if settings.redis_url is not None:
        import redis.asyncio as redis_asyncio

        redis = redis_asyncio.Redis.from_url(settings.redis_url.get_secret_value())
    if deduper is None:
        deduper = (
            RedisDeduper(client=redis, prefix=settings.redis_prefix, window_s=settings.dedupe_window_s)
            if redis is not None
            else MemoryDeduper(window_s=settings.dedupe_window_s)
        )
    heartbeat = Heartbeat(redis=redis, key=f"{settings.redis_prefix}:heartbeat")
    metrics = BridgeMetrics()
    state: dict[str, httpx.AsyncClient] = {}
    if http_client is not None:
        state["client"] = http_client

    def client() -> httpx.AsyncClient:
        if "client" not in state:  # no lifespan ran (a bare ASGI transport): make one now
            state["client"] = httpx.AsyncClient(timeout=settings.prefect_timeout_s)
        return state["client"]

    async def deliver(events: list[dict[str, Any]]) -> bool:
        headers = {"Authorization": target.authorization.get_secret_value()} if target.authorization else {}
        try:
            response = await client().post(
                target.events_url, json=events, headers=headers, timeout=settings.prefect_timeout_s
            )
        except httpx.HTTPError as e:
            log.warning("Prefect API unreachable (%s): %d events not delivered", type(e).__name__, len(events))
            return False
        if not response.is_success:
            log.warning("Prefect API answered %d: %d events not delivered", response.status_code, len(events))
            return False
        return True

    async def parse(request: Request, source: Source) -> Any:
        """The validated webhook group, or the 4xx response that explains why not."""
        if not authorized(request.headers.get("authorization"), settings=settings):
            return JSONResponse(
                {"error": "unauthorized: send a Bearer token or HTTP Basic credentials"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="fd-bridge", Basic realm="fd-bridge"'},
            )
        try:
            body = await _read_body(request, settings.max_body_bytes)
        except ClientDisconnect:  # the sender hung up mid-body: nothing to answer, and not our error (no 500)
            return _problem(400, "the client disconnected before the whole body arrived")
        if body is None:
            return _problem(413, f"body larger than {settings.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return _problem(400, "body is not valid JSON")
        try:
            return WEBHOOK_MODELS[source].model_validate(data)
        except ValidationError as e:  # the messages and locations only: the input may hold anything
            errors = json.loads(e.json(include_url=False, include_input=False, include_context=False))
            return _problem(422, f"not a {source} webhook body", details=errors[:20])
        except RecursionError:
            return _problem(400, "body is nested too deeply")

    async def webhook(request: Request, source: Source) -> Response:
        group = await parse(request, source)
        if isinstance(group, Response):
            return group
        translated, heartbeats = translate(group, source=source, occurred=datetime.now(UTC), new_id=uuid.uuid4)
        for t in translated:
            t.event["related"] = related_resources(t.event["payload"]["labels"], settings=settings)
        for alert in heartbeats:
            await heartbeat.record(alert.alertname)
            metrics.heartbeats.inc()
            metrics.heartbeat_last_seen.set(heartbeat.last_seen or time.time())
        if group.truncatedAlerts:
            log.warning("%s left out %d alerts of a group (max_alerts)", source, group.truncatedAlerts)
        try:
            claimed = set(await deduper.claim([t.key for t in translated]))
        except DedupeError as e:
            log.warning("%s; asking the sender to retry", e)
            if translated:
                metrics.rejected.labels(source, "dedupe_unavailable").inc(len(translated))
            return _problem(503, "dedupe store unavailable; retry", headers={"Retry-After": "5"})
        fresh = [t for t in translated if t.key in claimed]
        for t in translated:
            if t.key not in claimed:
                log.info("duplicate alert %s fingerprint=%s dropped", t.alertname, t.fingerprint)
                metrics.rejected.labels(source, "duplicate").inc()
        if fresh and not await deliver([t.event for t in fresh]):
            metrics.rejected.labels(source, "prefect_unavailable").inc(len(fresh))
            try:
                await deduper.release(claimed)
            except DedupeError as e:  # the keys expire with the window; a retry inside it is dropped
                log.warning("%s; could not forget undelivered alerts", e)
            return _problem(503, "Prefect API did not accept the events; retry", headers={"Retry-After": "5"})
        for t in fresh:
            log.info("alert %s %s fingerprint=%s -> event", t.alertname, t.event["event"], t.fingerprint)
            metrics.forwarded.labels(source, t.event["event"]).inc()
        return JSONResponse(
            {
                "events": len(fresh),
                "duplicates": len(translated) - len(fresh),
                "heartbeats": len(heartbeats),
                "truncatedAlerts": group.truncatedAlerts,
            }
        )

    async def alertmanager(request: Request) -> Response:
        return await webhook(request, "alertmanager")

    async def grafana(request: Request) -> Response:
        return await webhook(request, "grafana")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def heartbeat_view(request: Request) -> Response:
        return JSONResponse(await heartbeat.read())

    async def metrics_view(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics.registry), media_type=content_type)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owned = "client" not in state
        if owned:
            state["client"] = httpx.AsyncClient(timeout=settings.prefect_timeout_s)
        try:
            yield
        finally:
            if owned:
                await state.pop("client").aclose()
            if redis is not None:
                await redis.aclose()

    app = Starlette(
        routes=[
            Route("/alertmanager", alertmanager, methods=["POST"]),
            Route("/grafana", grafana, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/heartbeat", heartbeat_view, methods=["GET"]),
            Route("/metrics", metrics_view, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(_CountRequests, metrics=metrics)
    app.state.deduper = deduper
    app.state.heartbeat = heartbeat
    app.state.target = target
    app.state.metrics = metrics
    return app


class _CountRequests:
    """ASGI middleware: count every HTTP response by endpoint and status (``ferrumdeck_bridge_requests_total``)."""

    def __init__(self, app: Any, *, metrics: BridgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.count_request(scope.get("path", ""), status["code"])


def run_bridge(settings: BridgeSettings, *, log_level: str = "info") -> None:
    """Serve the bridge with uvicorn until interrupted (``fd-recovery bridge``)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings)
    log.info("alert bridge on %s:%d -> %s", settings.host, settings.port, app.state.target.events_url)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, proxy_headers=False)


class BackgroundBridge(BackgroundApp):
    """The bridge served by uvicorn in a background thread (tests, the demo, benchmarks).

    ``with BackgroundBridge(app) as bridge: bridge.url`` — the port is picked by the OS unless given.
    """

    name = "bridge"
    lifespan = "on"

    def start(self) -> BackgroundBridge:
        try:
            return super().start()
        except ServeError as e:
            raise BridgeError("the bridge did not start") from e
