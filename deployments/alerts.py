"""Alert webhooks in, Prefect events out: the payload models and the pure translation the bridge uses.

Alertmanager (webhook payload version 4) and Grafana alerting send the same shape: a group envelope with
``alerts[]``, each alert with ``status``, ``labels``, ``annotations``, ``startsAt``, ``endsAt``,
``generatorURL`` and ``fingerprint``. Unknown fields are accepted everywhere (forward compatible); known
fields are type-checked strictly, so a wrongly typed body is rejected with a clear message.

Each alert becomes one Prefect event ``ferrumdeck.alert.firing`` / ``ferrumdeck.alert.resolved`` on the
resource ``ferrumdeck.alert.<alertname>``. Heartbeat alerts (``Watchdog``, ``FerrumDeckHeartbeat``) only
prove that alerting works: the bridge records them and does not turn them into events.

Duplicates: the dedupe key is ``(fingerprint, status, startsAt)``. It drops Alertmanager's re-sends of the
same notification (group changes, retries) inside the window, yet an alert that resolves and fires again
(a new episode: a new ``startsAt``) is not mistaken for a duplicate of the first firing.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

EVENT_FIRING = "ferrumdeck.alert.firing"
EVENT_RESOLVED = "ferrumdeck.alert.resolved"
RESOURCE_PREFIX = "ferrumdeck.alert."

#: Alerts that have their own recovery flow (prefect.yaml triggers); everything else with team=ferrumdeck
#: goes to triage. The event's resource carries ``ferrumdeck.routed`` = "true"/"false" accordingly, because
#: a Prefect trigger cannot say "none of these six" with one resource match.
ROUTED_ALERTS: frozenset[str] = frozenset(
    {"WorkerCrashLooping", "WorkerHung", "LLMProviderErrors", "MCPServerDown", "QueueBacklog", "RunsStuck"}
)
#: Alerts that fire all the time to prove the alerting pipeline works; recorded, never forwarded.
HEARTBEAT_ALERTS: frozenset[str] = frozenset({"Watchdog", "FerrumDeckHeartbeat"})

_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_MAX_RESOURCE_LABELS = 64
_MAX_RESOURCE_LABEL_VALUE = 256

Source = Literal["alertmanager", "grafana"]

#: Text the bridge cannot forward: a lone UTF-16 surrogate (JSON allows the escape ``"\ud800"``, but it is not
#: Unicode: encoding the event to UTF-8 fails) and NUL (PostgreSQL, where Prefect stores events, refuses it).
_UNSENDABLE = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _where(link: tuple | None) -> str:
    """A JSON location as ``alerts.0.labels.pod``, ASCII-escaped (it may hold the very text being refused)."""
    steps: list[str] = []
    while link is not None:
        link, step = link
        steps.append(ascii(str(step))[1:-1])
    return ".".join(reversed(steps)) or "(body)"


def unsendable_text(data: Any) -> str | None:
    """Where a parsed JSON document holds text that cannot be forwarded (lone surrogate or NUL), else None.

    Every key and string anywhere in the document is checked: first all at once (serialized, at C speed), and
    only when that finds something, node by node to say where — iteratively, each node once (the path is a
    linked list, spelled out only when found): nesting depth costs neither stack nor time.
    """
    try:
        text = json.dumps(data, ensure_ascii=False)  # lone surrogates stay as they are; NUL becomes \u0000
    except (TypeError, ValueError, RecursionError):
        text = None
    if text is not None and "\\u0000" not in text and not _SURROGATE.search(text):
        return None
    stack: list[tuple[tuple | None, Any]] = [(None, data)]
    while stack:
        link, node = stack.pop()
        if isinstance(node, str):
            if _UNSENDABLE.search(node):
                return _where(link)
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and _UNSENDABLE.search(key):
                    return _where((link, key))
                stack.append(((link, key), value))
        elif isinstance(node, list):
            stack.extend(((link, i), value) for i, value in enumerate(node))
    return None


class WebhookAlert(BaseModel):
    """One alert of a webhook group (Alertmanager v4 and Grafana share this shape)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"]
    labels: dict[StrictStr, StrictStr]
    annotations: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    startsAt: StrictStr = Field("", max_length=64)
    endsAt: StrictStr = Field("", max_length=64)
    generatorURL: StrictStr = Field("", max_length=4096)
    fingerprint: StrictStr | None = Field(None, min_length=1, max_length=128)

    @field_validator("labels")
    @classmethod
    def _has_alertname(cls, labels: dict[str, str]) -> dict[str, str]:
        name = labels.get("alertname", "")
        if not name.strip():
            raise ValueError("every alert needs a non-empty 'alertname' label")
        if len(name) > 200:
            raise ValueError("the 'alertname' label is longer than 200 characters")
        return labels

    @property
    def alertname(self) -> str:
        return self.labels["alertname"]

    @property
    def key_fingerprint(self) -> str:
        """The sender's fingerprint, or a stable hash of the labels when the sender gave none."""
        if self.fingerprint:
            return self.fingerprint
        text = "\x1f".join(f"{k}\x1e{v}" for k, v in sorted(self.labels.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def is_heartbeat(self) -> bool:
        return self.alertname in HEARTBEAT_ALERTS

    def dedupe_key(self) -> str:
        """``fingerprint:status:startsAt`` — one notification of one alert episode."""
        return f"{self.key_fingerprint}:{self.status}:{self.startsAt}"


class _WebhookGroup(BaseModel):
    """Fields common to Alertmanager's and Grafana's webhook envelopes."""

    model_config = ConfigDict(extra="allow")

    alerts: list[WebhookAlert]
    status: Literal["firing", "resolved"] | None = None
    receiver: StrictStr = Field("", max_length=1024)
    groupKey: StrictStr = Field("", max_length=8192)
    groupLabels: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    commonLabels: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    commonAnnotations: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    externalURL: StrictStr = ""
    truncatedAlerts: StrictInt = Field(0, ge=0, description="Alerts Alertmanager left out (max_alerts).")

    @model_validator(mode="before")
    @classmethod
    def _forwardable_text(cls, data: Any) -> Any:
        """Refuse (4xx, nothing emitted) a body holding text no event can carry, instead of failing on delivery."""
        where = unsendable_text(data)
        if where is not None:
            raise ValueError(
                f"text at {where} holds a lone UTF-16 surrogate (\\ud800-\\udfff) or a NUL character: "
                "not valid Unicode text, so it cannot be forwarded"
            )
        return data


class AlertmanagerWebhook(_WebhookGroup):
    """Prometheus Alertmanager's webhook body (``version: "4"``)."""

    version: StrictStr = Field(..., max_length=16)


class GrafanaWebhook(_WebhookGroup):
    """Grafana alerting's webhook body (contact point type "webhook", ``version: "1"``)."""

    version: StrictStr = Field("1", max_length=16)
    orgId: StrictInt | None = None
    title: StrictStr = ""
    state: StrictStr = ""
    message: StrictStr = ""


WEBHOOK_MODELS: dict[Source, type[_WebhookGroup]] = {
    "alertmanager": AlertmanagerWebhook,
    "grafana": GrafanaWebhook,
}


class Translated(BaseModel):
    """One alert ready for Prefect: its dedupe key, name, fingerprint and the event JSON."""

    key: str
    alertname: str
    fingerprint: str
    event: dict[str, Any]


def _resource(alert: WebhookAlert) -> dict[str, str]:
    """The event's resource: the alert's identity plus its short, well-formed labels for trigger matching."""
    resource = {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{alert.alertname}",
        "prefect.resource.name": alert.alertname,
        "ferrumdeck.alertname": alert.alertname,
        "ferrumdeck.fingerprint": alert.key_fingerprint,
        "ferrumdeck.routed": "true" if alert.alertname in ROUTED_ALERTS else "false",
    }
    if alert.labels.get("team"):  # triggers match "anything else with team=ferrumdeck" on this
        resource["ferrumdeck.team"] = alert.labels["team"]
    copied = 0
    for name, value in sorted(alert.labels.items()):
        if copied >= _MAX_RESOURCE_LABELS:
            break
        if _LABEL_NAME.match(name) and len(value) <= _MAX_RESOURCE_LABEL_VALUE:
            resource[f"ferrumdeck.label.{name}"] = value
            copied += 1
    return resource


def alert_event(
    alert: WebhookAlert, *, group: _WebhookGroup, source: Source, event_id: UUID, occurred: datetime
) -> dict[str, Any]:
    """The Prefect event (JSON for ``POST /api/events``) for one alert of a webhook group."""
    return {
        "id": str(event_id),
        "occurred": occurred.isoformat(),
        "event": EVENT_FIRING if alert.status == "firing" else EVENT_RESOLVED,
        "resource": _resource(alert),
        "related": [],
        "payload": {
            "labels": dict(alert.labels),
            "annotations": dict(alert.annotations),
            "startsAt": alert.startsAt,
            "endsAt": alert.endsAt,
            "fingerprint": alert.key_fingerprint,
            "generatorURL": alert.generatorURL,
            "status": alert.status,
            "receiver": group.receiver,
            "groupKey": group.groupKey,
            "truncatedAlerts": group.truncatedAlerts,
            "source": source,
        },
    }


def translate(
    group: _WebhookGroup,
    *,
    source: Source,
    occurred: datetime,
    new_id: Callable[[], UUID],
) -> tuple[list[Translated], list[WebhookAlert]]:
    """Split a webhook group into events to deliver (one per distinct alert) and heartbeat alerts."""
    events: list[Translated] = []
    heartbeats: list[WebhookAlert] = []
    seen: set[str] = set()
    for alert in group.alerts:
        if alert.is_heartbeat:
            heartbeats.append(alert)
            continue
        key = alert.dedupe_key()
        if key in seen:  # the same alert twice in one body
            continue
        seen.add(key)
        event = alert_event(alert, group=group, source=source, event_id=new_id(), occurred=occurred)
        events.append(
            Translated(key=key, alertname=alert.alertname, fingerprint=alert.key_fingerprint, event=event)
        )
    return events, heartbeats


class DedupeError(Exception):
    """The shared dedupe store (Redis) failed; the bridge answers 503 so the sender retries."""


class Deduper(Protocol):
    """Remembers which alert notifications were delivered within the window."""

    async def claim(self, keys: Sequence[str]) -> list[str]:
        """Reserve the keys not seen within the window; return those (the rest are duplicates)."""
        ...

    async def release(self, keys: Iterable[str]) -> None:
        """Forget keys whose delivery failed, so the sender's retry is not dropped as a duplicate."""
        ...


class MemoryDeduper:
    """In-process dedupe: enough for one bridge replica (several replicas need a shared store: Redis)."""

    def __init__(
        self, *, window_s: float, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window_s
        self._max = max_keys
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()  # insertion order == expiry order
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        while self._expiry:
            key, expires = next(iter(self._expiry.items()))
            if expires > now and len(self._expiry) <= self._max:
                break
            self._expiry.popitem(last=False)

    async def claim(self, keys: Sequence[str]) -> list[str]:
        with self._lock:
            now = self._clock()
            self._prune(now)
            claimed = []
            for key in keys:
                if key in self._expiry:
                    continue
                self._expiry[key] = now + self._window
                claimed.append(key)
            return claimed

    async def release(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._expiry.pop(key, None)

    def __len__(self) -> int:
        return len(self._expiry)


class RedisDeduper:
    """Dedupe shared by several bridge replicas: one ``SET key NX PX window`` per alert, pipelined."""

    def __init__(self, *, client: Any, prefix: str, window_s: float) -> None:
        self._client = client  # redis.asyncio.Redis
        self._prefix = prefix
        self._window_ms = max(1, int(window_s * 1000))

    def _k(self, key: str) -> str:
        return f"{self._prefix}:dedupe:{key}"

    async def claim(self, keys: Sequence[str]) -> list[str]:
        from redis.exceptions import RedisError

        if not keys:
            return []
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(self._k(key), "1", nx=True, px=self._window_ms)
                results = await pipe.execute()
        except (RedisError, OSError) as e:
            raise DedupeError(f"dedupe store unavailable: {type(e).__name__}") from e
        return [key for key, ok in zip(keys, results, strict=True) if ok]

    async def release(self, keys: Iterable[str]) -> None:
        from redis.exceptions import RedisError

        names = [self._k(k) for k in keys]
        if names:
            try:
                await self._client.delete(*names)
            except (RedisError, OSError) as e:
                raise DedupeError(f"dedupe store unavailable: {type(e).__name__}") from e
