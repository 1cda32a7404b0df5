"""Is alerting working? The post-recovery check asks the alert bridge's heartbeat or Alertmanager's API.

`FD_ALERTING_CHECK` chooses: ``bridge`` (``GET FD_BRIDGE_HEARTBEAT_URL``: the bridge saw a heartbeat alert —
Watchdog / FerrumDeckHeartbeat — younger than ``FD_HEARTBEAT_MAX_AGE_S``), ``alertmanager`` (``GET
{FD_ALERTMANAGER_URL}/api/v2/status`` answers, plus whether a Watchdog alert is active), or ``none``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
from prefect import task
from pydantic import BaseModel

from tasks.errors import RETRY, RecoveryError
from tasks.report import scrub
from tasks.settings import Settings

_TIME_KEYS = ("last_heartbeat_at", "last_heartbeat", "last_seen_at", "last_seen", "lastSeen", "at", "received_at")
_AGE_KEYS = ("age_seconds", "age_s", "age")


class AlertingError(RecoveryError):
    """The alerting endpoint could not be asked (connection error, timeout, 5xx)."""

    temporary = True


class AlertingStatus(BaseModel):
    """Whether alerting looks alive, and the evidence (a sentence for the checklist)."""

    mode: str
    ok: bool | None
    evidence: str


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def heartbeat_age_s(payload: Any, *, now: datetime) -> float | None:
    """Seconds since the bridge's last heartbeat alert, from its ``/heartbeat`` JSON (None = never seen)."""
    if not isinstance(payload, dict):
        return None
    for key in _AGE_KEYS:
        if isinstance(payload.get(key), int | float):
            return float(payload[key])
    for key in _TIME_KEYS:
        at = _parse_time(payload.get(key))
        if at is not None:
            return max(0.0, (now - at).total_seconds())
    nested = payload.get("heartbeat")
    return heartbeat_age_s(nested, now=now) if isinstance(nested, dict) else None


def judge_heartbeat(*, payload: Any, now: datetime, max_age_s: float) -> AlertingStatus:
    """Pure: a heartbeat younger than ``max_age_s`` means alerts flow from Prometheus to the bridge."""
    age = heartbeat_age_s(payload, now=now)
    if age is None:
        return AlertingStatus(mode="bridge", ok=False, evidence="the alert bridge has seen no heartbeat alert yet")
    ok = age <= max_age_s
    return AlertingStatus(
        mode="bridge", ok=ok,
        evidence=f"last heartbeat alert {age:.0f}s ago at the bridge ({'within' if ok else 'older than'} {max_age_s:g}s)",
    )


def _get(client: httpx.Client, url: str) -> httpx.Response:
    try:
        response = client.get(url)
    except httpx.HTTPError as e:
        raise AlertingError(f"cannot reach {scrub(url)}: {type(e).__name__}") from e
    if response.status_code >= 500:
        raise AlertingError(f"{scrub(url)} answered {response.status_code}")
    return response


@task(name="check-alerting", **RETRY)
def check_alerting(*, settings: Settings, mode: str | None = None, now: datetime | None = None) -> AlertingStatus:
    """Ask the configured alerting endpoint whether alerts are flowing (read-only)."""
    mode = mode or settings.alerting_check
    now = now or datetime.now(UTC)
    if mode == "none":
        return AlertingStatus(mode=mode, ok=None, evidence="alerting check disabled (FD_ALERTING_CHECK=none): confirm by hand")
    with httpx.Client(timeout=settings.http_timeout_s) as client:
        if mode == "bridge":
            response = _get(client, settings.bridge_heartbeat_url)
            if response.status_code != 200:
                return AlertingStatus(mode=mode, ok=False,
                                      evidence=f"bridge heartbeat endpoint answered {response.status_code}")
            try:
                payload = response.json()
            except ValueError:
                return AlertingStatus(mode=mode, ok=False, evidence="bridge heartbeat endpoint returned no JSON")
            return judge_heartbeat(payload=payload, now=now, max_age_s=settings.heartbeat_max_age_s)
        if mode == "alertmanager":
            if not settings.alertmanager_url:
                return AlertingStatus(mode=mode, ok=False, evidence="FD_ALERTMANAGER_URL is not set")
            base = settings.alertmanager_url.rstrip("/")
            status = _get(client, f"{base}/api/v2/status")
            if status.status_code != 200:
                return AlertingStatus(mode=mode, ok=False, evidence=f"Alertmanager status answered {status.status_code}")
            version = ((status.json() or {}).get("versionInfo") or {}).get("version", "?")
            alerts = _get(client, f"{base}/api/v2/alerts")
            names = [((a or {}).get("labels") or {}).get("alertname") for a in (alerts.json() or [])] \
                if alerts.status_code == 200 else []
            watchdog = any(n in {"Watchdog", "FerrumDeckHeartbeat"} for n in names)
            return AlertingStatus(
                mode=mode, ok=True,
                evidence=f"Alertmanager {version} answers at {scrub(base)}; {len(names)} active alerts"
                + ("; heartbeat alert active" if watchdog else "; no heartbeat alert active"),
            )
    raise ValueError(f"unknown alerting check mode {mode!r} (bridge, alertmanager or none)")
