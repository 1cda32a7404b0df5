"""Prefect events the recoveries emit (``ferrumdeck.recovery.<action>``), so users can chain automations —
delivered even when the Prefect API is down while a recovery runs.

Prefect's ``emit_event`` hands an event to its in-memory ``EventsWorker``, which sends it over a websocket and
keeps it until the server confirms it. Measured with prefect 3.9.1 (tests/e2e/test_runner_chaos.py): that
survives an outage of a process whose events client was already connected (resent a few seconds after the
server is back), but it loses (a) every event of a process whose events client first connects during the
outage ("Service 'EventsWorker' failed to process item"), and (b) every unconfirmed event of a process that
exits or dies before the server is back (a replica stopped or killed mid-outage). So a recovery event goes
through an OUTBOX first: ``XADD <FD_STATE_PREFIX>:events:outbox`` (at most ``FD_EVENTS_OUTBOX_MAX`` entries,
the oldest dropped first), then it is POSTed to the API's ``/events`` (one try, no client back-off) and removed
once the server answered 2xx. What the API did not take stays, and is delivered by ``EventOutbox.flush`` —
every ``fd-recovery serve`` replica calls it every second (one flusher at a time: a short lock), and every later
emit of any process too — until ``FD_EVENTS_MAX_AGE_S`` (then dropped, logged: a late automation is worse than
none). At least once: a flusher that dies between the POST and the delete makes another post it again, with
the same event id, which Prefect stores once and its triggers evaluate once (both deduplicate by event id).
Without Redis, the event goes through Prefect's own path (its in-memory buffer), as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import redis
from prefect.events import Event, emit_event

from tasks.report import scrub
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)
SETTLE_MS = 5_000  # the flusher leaves entries this young to their emitter's own POST (no double sends)
FLUSH_BATCH = 100  # events per POST
LOCK_MS = 15_000  # a flusher's lock lapses this long after it took it (a dead flusher holds nobody up longer)
POST_TIMEOUT_S = 5.0  # one POST of events
INLINE_PAUSE_S = 2.0  # after a failed POST, emitters leave delivery to the flushers this long
_QUIET_S = 30.0  # while the API is unreachable, say so at most this often
_state = {"down_until": 0.0, "said": 0.0}


def emit_recovery_event(*, action: str, resource_id: str, payload: dict[str, Any] | None = None) -> None:
    """Emit ``ferrumdeck.recovery.<action>`` about one resource (a pod, run, entry or deployment), kept in the
    outbox until Prefect has it. Never raises: a recovery outlives its telemetry."""
    spec = {"event": f"ferrumdeck.recovery.{action}",
            "resource": {"prefect.resource.id": f"ferrumdeck.{scrub(resource_id)}"}, "payload": payload or {}}
    emit_reliably(spec, settings=get_settings())


def emit_reliably(spec: dict[str, Any], *, settings: Settings) -> Event | None:
    """Emit one event (``emit_event``'s keywords: event, resource, related, payload) through the outbox; the
    event, or None if it could not even be built. Falls back to Prefect's own path when Redis is unavailable."""
    try:
        event = Event(**{**spec, "related": [*spec.get("related", []), *run_related()]})
    except Exception:  # noqa: BLE001 - an invalid event must not fail a recovery
        log.exception("could not build the event %s", spec.get("event"))
        return None
    outbox = EventOutbox.from_settings(settings)
    if outbox is None:
        return _prefect_path(spec)
    try:
        entry = outbox.put(event)
    except redis.RedisError as e:
        log.warning("event outbox unavailable (%s): %s goes through Prefect's in-memory buffer", e, event.event)
        return _prefect_path(spec)
    if time.monotonic() < _state["down_until"]:
        return event  # the API was unreachable moments ago: the outbox flushers deliver it
    try:
        if outbox.post([event]):
            outbox.delete([entry])
            outbox.flush(min_age_ms=SETTLE_MS)  # and what earlier emitters could not deliver
    except redis.RedisError as e:
        log.warning("event outbox unavailable after posting %s (%s)", event.event, e)
    return event


def _prefect_path(spec: dict[str, Any]) -> Event | None:
    try:
        return emit_event(**spec)
    except Exception:  # noqa: BLE001
        log.exception("could not emit %s", spec.get("event"))
        return None


def run_related() -> list[dict[str, str]]:
    """The flow run, its flow, deployment and tags as related resources (what ``emit_event`` attaches)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    if run is None:
        return []
    related = [{"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.role": "flow-run",
                "prefect.resource.name": run.name}]
    flow = getattr(ctx, "flow", None)
    if flow is not None and run.flow_id:
        related.append({"prefect.resource.id": f"prefect.flow.{run.flow_id}", "prefect.resource.role": "flow",
                        "prefect.resource.name": flow.name})
    if run.deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    related += [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in sorted(run.tags)]
    return related


class EventOutbox:
    """Events not yet confirmed by the Prefect API: a capped Redis stream, emptied as the API takes them."""

    def __init__(self, client: redis.Redis, *, key: str, max_len: int, max_age_s: float) -> None:
        self.redis, self.key, self.max_len, self.max_age_s = client, key, max_len, max_age_s

    @classmethod
    def from_settings(cls, settings: Settings) -> EventOutbox | None:
        """The outbox under ``FD_STATE_PREFIX`` (None when ``FD_EVENTS_OUTBOX_MAX`` is 0)."""
        if settings.events_outbox_max <= 0:
            return None
        from tasks.connections import redis_client

        return cls(redis_client(settings), key=f"{settings.state_prefix}:events:outbox",
                   max_len=settings.events_outbox_max, max_age_s=settings.events_max_age_s)

    def put(self, event: Event) -> str:
        """Add the event (oldest entries beyond ``max_len`` dropped); its entry id."""
        return self.redis.xadd(self.key, {"event": event.model_dump_json()}, maxlen=self.max_len, approximate=False)

    _DELETE = ("redis.call('XDEL', KEYS[1], unpack(ARGV)) if redis.call('XLEN', KEYS[1]) == 0 then "
               "redis.call('DEL', KEYS[1]) end return 1")

    def delete(self, entry_ids: Sequence[str]) -> None:
        """Remove delivered entries; an outbox left empty is removed too (atomically: no key left behind)."""
        if entry_ids:
            self.redis.eval(self._DELETE, 1, self.key, *entry_ids)

    def pending(self) -> int:
        return int(self.redis.xlen(self.key))

    def flush(self, *, min_age_ms: int = SETTLE_MS, limit: int = 10 * FLUSH_BATCH, owner: str = "flusher") -> int:
        """Deliver entries at least ``min_age_ms`` old, oldest first, in batches; the number the API took.

        One flusher at a time (``SET NX`` lock, ``LOCK_MS``); stops at the first batch the API does not take.
        """
        lock = f"{self.key}:lock"
        if not self.redis.set(lock, owner, nx=True, px=LOCK_MS):
            return 0
        delivered = 0
        try:
            end = f"({int(time.time() * 1000) - min_age_ms}" if min_age_ms else "+"
            start = "-"
            while delivered < limit:
                batch = self.redis.xrange(self.key, start, end, count=FLUSH_BATCH)
                if not batch:
                    break
                events, ids, stale = [], [], []
                for entry_id, fields in batch:
                    event = _parse(fields.get("event"))
                    if event is None or _age_s(event) > self.max_age_s:
                        stale.append(entry_id)
                        continue
                    events.append(event)
                    ids.append(entry_id)
                if stale:
                    log.warning("dropped %d recovery events older than %g s (or unreadable) from the outbox: the "
                                "Prefect API did not take them in time", len(stale), self.max_age_s)
                    self.delete(stale)
                if events and not self.post(events):
                    break
                self.delete(ids)
                delivered += len(events)
                start = f"({batch[-1][0]}"
        finally:
            self.redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                            "return 0", 1, lock, owner)
        if delivered:
            log.info("delivered %d recovery events from the outbox", delivered)
        return delivered

    @staticmethod
    def post(events: Sequence[Event]) -> bool:
        """POST the events to the API's ``/events`` once (no back-off: the caller keeps them); True when taken.

        A 4xx means the API will never take them (invalid): True as well, after logging — dropped, not retried
        forever. A connection error, timeout or 5xx: False, and emitters leave delivery to the flushers for
        ``INLINE_PAUSE_S``.
        """
        url, headers, verify = _api()
        if url is None:
            _unreachable("PREFECT_API_URL is not set")
            return False
        body = [e.model_dump(mode="json") for e in events]
        try:
            response = httpx.post(f"{url}/events", json=body, headers=headers, verify=verify, timeout=POST_TIMEOUT_S)
        except httpx.HTTPError as e:
            _unreachable(f"{type(e).__name__}: {e}")
            return False
        if 400 <= response.status_code < 500:
            log.error("the Prefect API refused %d events (%s %s): dropped", len(events), response.status_code,
                      response.text[:200])
            return True
        if response.status_code >= 300:
            _unreachable(f"HTTP {response.status_code}")
            return False
        _state["down_until"] = 0.0
        return True


def _api() -> tuple[str | None, dict[str, str], bool | str]:
    """The Prefect API URL, its Authorization header and TLS verification, from Prefect's settings."""
    import base64

    from prefect.settings import get_current_settings

    api = get_current_settings().api
    headers = {}
    if api.auth_string is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
    elif api.key is not None:
        headers["Authorization"] = f"Bearer {api.key.get_secret_value()}"
    verify: bool | str = False if api.tls_insecure_skip_verify else (api.ssl_cert_file or True)
    return (api.url.rstrip("/") if api.url else None), headers, verify


def _unreachable(reason: str) -> None:
    now = time.monotonic()
    _state["down_until"] = now + INLINE_PAUSE_S
    if now - _state["said"] >= _QUIET_S:
        _state["said"] = now
        log.warning("the Prefect API did not take recovery events (%s): they wait in the outbox and are delivered "
                    "when it answers", reason[:200])


def _parse(raw: str | None) -> Event | None:
    try:
        return Event.model_validate_json(raw or "")
    except ValueError:
        return None


def _age_s(event: Event) -> float:
    return (datetime.now(UTC) - event.occurred).total_seconds()
