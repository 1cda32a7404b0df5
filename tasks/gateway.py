"""FerrumDeck's gateway: re-enqueue a step (``POST /v1/runs/{run_id}/steps/{step_id}/retry``, Bearer key).

The key comes from ``FD_GATEWAY_API_KEY`` or the Prefect Secret block named by ``FD_GATEWAY_API_KEY_SECRET``,
lives only in a ``SecretStr`` and the request header, and is never part of a message, log line or repr.
Retries of 429/502/503/504 and connection errors happen here, not as Prefect task retries, because only this
loop can honour the server's ``Retry-After`` (capped by ``FD_GATEWAY_RETRY_AFTER_CAP_S``).
404 and 409 are outcomes (run/step gone, already queued), not errors; 401/403 is a ``GatewayAuthError``.
``retry_steps`` is ``@guarded`` (``dry_run=``, kill switch). A 409 for a step that is in no stream is a *lost*
retry: ``count_lost_retries`` remembers it so the stuck-runs policy stops retrying that step in the end.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, SecretStr

from tasks.connections import redis_client
from tasks.errors import RETRY, RecoveryError
from tasks.guard import guarded
from tasks.settings import Settings

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class GatewayError(RecoveryError):
    """The gateway refused or failed a call in a way retrying will not fix."""


class GatewayAuthError(GatewayError):
    """The gateway rejected the API key (401/403), or no key is configured. Never carries the key."""


class GatewayTemporaryError(GatewayError):
    """The gateway stayed unavailable (429/5xx or no connection) through every attempt."""

    temporary = True


class InvalidIdError(GatewayError, ValueError):
    """A run or step id that cannot be a single, plain URL path segment."""


RetryAnswer = Literal["retried", "not_found", "already_queued"]


class RetryOutcome(BaseModel):
    """What one retry call did: ``retried`` re-enqueued the step; ``not_found`` / ``already_queued`` changed nothing."""

    run_id: str
    step_id: str
    outcome: RetryAnswer
    status_code: int
    attempts: int
    detail: str = ""

    @property
    def changed(self) -> bool:
        return self.outcome == "retried"


def validate_id(value: str, *, what: str) -> str:
    """Accept an id only as one plain path segment (letters, digits, ``_.:-``; no ``/``, no ``..``)."""
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or ".." in value:
        shown = repr(value[:60]) if isinstance(value, str) else type(value).__name__
        raise InvalidIdError(f"invalid {what} {shown}: expected letters, digits, '_', '.', ':' or '-' only")
    return value


def resolve_api_key(*, settings: Settings) -> SecretStr:
    """The gateway key: ``FD_GATEWAY_API_KEY``, else the Prefect Secret block ``FD_GATEWAY_API_KEY_SECRET``."""
    if settings.gateway_api_key is not None and settings.gateway_api_key.get_secret_value():
        return settings.gateway_api_key
    if settings.gateway_api_key_secret:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(settings.gateway_api_key_secret).get()
        except ValueError as e:
            raise GatewayAuthError(
                f"gateway API key: Prefect Secret block {settings.gateway_api_key_secret!r} not found"
            ) from e
        if not value:
            raise GatewayAuthError(
                f"gateway API key: Secret block {settings.gateway_api_key_secret!r} is empty"
            )
        return SecretStr(str(value))
    raise GatewayAuthError(
        "no gateway API key configured: set FD_GATEWAY_API_KEY or FD_GATEWAY_API_KEY_SECRET"
    )


_clients_lock = threading.Lock()
_clients: dict[tuple[str, float], httpx.Client] = {}


def gateway_client(*, settings: Settings) -> httpx.Client:
    """One shared, pooled httpx client per gateway URL (with the configured timeout); holds no credentials."""
    key = (settings.gateway_url.rstrip("/"), settings.http_timeout_s)
    with _clients_lock:
        client = _clients.get(key)
        if client is None or client.is_closed:
            client = _clients[key] = httpx.Client(
                base_url=key[0], timeout=httpx.Timeout(settings.http_timeout_s), follow_redirects=False
            )
        return client


def close_clients() -> None:
    """Close the shared gateway clients (tests, shutdown)."""
    with _clients_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse ``Retry-After`` (delta seconds or an HTTP date) into seconds; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_delay(*, settings: Settings, attempt: int, retry_after: float | None) -> float:
    """Wait before attempt ``attempt + 1``: the server's Retry-After (capped) or an exponential back-off."""
    if retry_after is not None:
        return min(retry_after, settings.gateway_retry_after_cap_s)
    return settings.gateway_backoff_s * (2 ** (attempt - 1))


def _retry_step(
    *,
    settings: Settings,
    run_id: str,
    step_id: str,
    api_key: SecretStr | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RetryOutcome:
    """Ask the gateway to re-enqueue one step; retries temporary failures, maps 404/409 to outcomes."""
    validate_id(run_id, what="run id")
    validate_id(step_id, what="step id")
    key = api_key or resolve_api_key(settings=settings)
    client = gateway_client(settings=settings)
    path = f"/v1/runs/{run_id}/steps/{step_id}/retry"
    attempts = settings.gateway_max_attempts
    last = ""
    for attempt in range(1, attempts + 1):
        retry_after: float | None = None
        try:
            response = client.post(path, headers={"Authorization": f"Bearer {key.get_secret_value()}"})
        except httpx.TransportError as e:
            last = f"{type(e).__name__}"
            if attempt == attempts:
                raise GatewayTemporaryError(
                    f"POST {path}: no answer after {attempts} attempts ({last})"
                ) from e
        else:
            code = response.status_code
            if code < 300:
                return RetryOutcome(
                    run_id=run_id, step_id=step_id, outcome="retried", status_code=code, attempts=attempt
                )
            if code == 404:
                return RetryOutcome(
                    run_id=run_id,
                    step_id=step_id,
                    outcome="not_found",
                    status_code=code,
                    attempts=attempt,
                    detail=_detail(response),
                )
            if code == 409:
                return RetryOutcome(
                    run_id=run_id,
                    step_id=step_id,
                    outcome="already_queued",
                    status_code=code,
                    attempts=attempt,
                    detail=_detail(response),
                )
            if code in (401, 403):
                raise GatewayAuthError(
                    f"POST {path}: gateway rejected the API key (HTTP {code}); check FD_GATEWAY_API_KEY"
                    " / FD_GATEWAY_API_KEY_SECRET"
                )
            if code not in RETRYABLE_STATUS:
                raise GatewayError(f"POST {path}: HTTP {code} {_detail(response)}".rstrip())
            last = f"HTTP {code}"
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == attempts:
                raise GatewayTemporaryError(f"POST {path}: {last} after {attempts} attempts")
        delay = backoff_delay(settings=settings, attempt=attempt, retry_after=retry_after)
        log.info("gateway %s on %s; attempt %d/%d, next in %.2fs", last, path, attempt, attempts, delay)
        sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _detail(response: httpx.Response) -> str:
    """A short, scrubbed excerpt of an error body (never the request, which carries the key)."""
    from tasks.report import scrub

    return scrub(response.text[:200].replace("\n", " "))


class RetryBatch(BaseModel):
    """Outcomes of retrying a batch of steps; ``errors`` maps ``run_id/step_id`` to a clear message."""

    outcomes: list[RetryOutcome]
    errors: dict[str, str]

    @property
    def retried(self) -> list[str]:
        """Step ids the gateway re-enqueued."""
        return [o.step_id for o in self.outcomes if o.changed]

    @property
    def changed(self) -> bool:
        """Whether any step was re-enqueued (409 "already queued" and 404 change nothing)."""
        return bool(self.retried)

    def summary(self) -> str:
        """``retried 2, already_queued 1, error 1``: the answers, counted."""
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        if self.errors:
            counts["error"] = len(self.errors)
        return ", ".join(f"{k} {v}" for k, v in counts.items())


@guarded("retry-steps")
def retry_steps(*, settings: Settings, targets: Sequence[tuple[str, str]], dry_run: bool) -> RetryBatch:
    """Retry many (run_id, step_id) through one shared client; a failed step is reported, not fatal,
    except an auth failure, which stops the batch at once (every later call would fail the same way).
    A dry run calls nothing and returns no outcomes."""
    if dry_run:
        return RetryBatch(outcomes=[], errors={})
    key = resolve_api_key(settings=settings)
    outcomes: list[RetryOutcome] = []
    errors: dict[str, str] = {}
    for run_id, step_id in targets:
        try:
            outcomes.append(_retry_step(settings=settings, run_id=run_id, step_id=step_id, api_key=key))
        except GatewayAuthError:
            raise
        except GatewayError as e:
            errors[f"{run_id}/{step_id}"] = str(e)
    return RetryBatch(outcomes=outcomes, errors=errors)


retry_steps_task = task(name="retry-steps", cache_policy=NO_CACHE)(retry_steps)


# --- lost retries: "already queued", yet in no stream -----------------------------------------------------

#: how long a lost-retry count is kept (a run is failed long before: max_step_retries sweeps)
LOST_RETRY_TTL_S = 7 * 24 * 3600


def _lost_key(settings: Settings, step_id: str) -> str:
    return f"{settings.state_prefix}:lost-retry:{step_id}"


def lost_retries(*, settings: Settings, step_ids: Sequence[str]) -> dict[str, int]:
    """Per step, how many retries the gateway answered "already queued" while the step was in no stream.

    Such a step is ``queued`` in the database, so the gateway never re-enqueues it and its ``attempts`` never
    rise; the stuck-runs policy counts these against ``max_step_retries`` (the recovery's own memory, kept
    under ``FD_STATE_PREFIX`` in Redis like the guard's cooldowns, never in FerrumDeck's tables). One MGET."""
    ids = list(dict.fromkeys(s for s in step_ids if s))
    if not ids:
        return {}
    values = redis_client(settings).mget([_lost_key(settings, s) for s in ids])
    return {s: int(v) for s, v in zip(ids, values, strict=True) if v}


def count_lost_retries(*, settings: Settings, step_ids: Sequence[str]) -> dict[str, int]:
    """Count one more lost retry for each of these steps; returns the new counts (one pipelined round trip)."""
    ids = list(dict.fromkeys(s for s in step_ids if s))
    if not ids:
        return {}
    pipe = redis_client(settings).pipeline(transaction=False)
    for step_id in ids:
        pipe.incr(_lost_key(settings, step_id))
        pipe.expire(_lost_key(settings, step_id), LOST_RETRY_TTL_S)
    replies = pipe.execute()
    return {s: int(replies[2 * i]) for i, s in enumerate(ids)}


lost_retries_task = task(name="lost-retries", **RETRY)(lost_retries)
count_lost_retries_task = task(name="count-lost-retries", **RETRY)(count_lost_retries)
