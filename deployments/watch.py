"""The direct watcher (``fd-recovery watch``): the Kubernetes API and the consumer group in, Prefect events out.

Alerts through Prometheus wait for a scrape, a rule's ``for:`` and Alertmanager's ``group_wait``; the watcher
reacts to the source instead. Two inputs:

- a Kubernetes **watch** of the worker pods (``FD_WORKER_SELECTOR``) and of the MCP Deployment's pods (its
  own selector, read once): list, then watch from the list's resourceVersion with bookmarks; a closed watch
  resumes from the last resourceVersion, a 410 Gone re-lists (pods gone meanwhile count as deleted), an API
  error or timeout reconnects after an exponential back-off with jitter. No call per event, except one
  ``XINFO CONSUMERS`` when a worker pod is deleted (does its consumer still hold entries?);
- a light **poll** of the consumer group, once per interval: ``XINFO GROUPS`` + ``XINFO CONSUMERS`` in one
  round trip (a consumer idle beyond ``FD_HANG_MIN_IDLE_MS`` holding entries; the lag growing).

It emits Prefect events (``EVENTS``) shaped like the alert bridge's — resource ``ferrumdeck.pod.<pod>`` with
``ferrumdeck.label.<name>`` labels, ``payload.labels.pod`` — so ``prefect.yaml`` triggers the same deployments
and templates ``pod`` the same way. One event per pod and condition until the condition clears (the pod Ready,
or the consumer empty, for ``clear_after_s``), re-emitted every ``reemit_interval_s`` while it lasts.

Every decision is a pure function of (an observation, the previous ``State``) -> (new state, ``Detection``s)
— ``decide_pod``, ``decide_consumers``, ``tick`` — tested without I/O; ``Watcher`` is the thin I/O loop and
``PrefectEvents`` delivers (``POST {PREFECT_API_URL}/events``, bounded buffer, retries while Prefect is down).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from enum import StrEnum
from http.server import ThreadingHTTPServer
from typing import Any, Literal

import httpx
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.http_server import serve_probes
from tasks.kube_diagnosis import Classification, PodInfo, diagnosis, pod_info
from tasks.settings import Settings

log = logging.getLogger("ferrumdeck.watch")

Role = Literal["worker", "mcp"]
SOURCE = "watcher"


class Condition(StrEnum):
    """What the watcher detects (the last part of its event names)."""

    CRASH_LOOPING = "crash-looping"
    OOM_KILLED = "oom-killed"
    UNSCHEDULABLE = "unschedulable"
    DELETED_HOLDING = "deleted-holding-entries"
    HUNG = "hung"
    LAG_GROWING = "lag-growing"


#: Pod classifications (tasks.kube_diagnosis) the watcher reports, and as which condition.
POD_CONDITIONS: dict[Classification, Condition] = {
    Classification.CRASH_LOOPING: Condition.CRASH_LOOPING,
    Classification.OOM_KILLED: Condition.OOM_KILLED,
    Classification.UNSCHEDULABLE: Condition.UNSCHEDULABLE,
}
#: Conditions for which a recovery is started (prefect.yaml): a pod deleted while one was active is being
#: handled, so its consumer's entries are not reported again as "deleted while holding entries" at once.
RECOVERED_CONDITIONS = frozenset({Condition.CRASH_LOOPING, Condition.OOM_KILLED, Condition.HUNG})
CONSUMER_CONDITIONS = frozenset({Condition.HUNG, Condition.DELETED_HOLDING})


def event_name(role: Role | Literal["queue"], condition: Condition) -> str:
    """``ferrumdeck.pod.<condition>`` (worker pods), ``ferrumdeck.mcp.<condition>``, ``ferrumdeck.consumer.hung``,
    ``ferrumdeck.queue.lag-growing``."""
    if condition is Condition.HUNG:
        return "ferrumdeck.consumer.hung"
    if condition is Condition.LAG_GROWING:
        return "ferrumdeck.queue.lag-growing"
    return f"ferrumdeck.{'mcp' if role == 'mcp' else 'pod'}.{condition.value}"


EVENTS: tuple[str, ...] = (
    *(event_name("worker", c) for c in (*POD_CONDITIONS.values(), Condition.DELETED_HOLDING)),
    event_name("worker", Condition.HUNG),
    event_name("queue", Condition.LAG_GROWING),
    *(event_name("mcp", c) for c in POD_CONDITIONS.values()),
)


class WatchSettings(BaseSettings):
    """Settings of the watcher (env prefix ``FD_WATCH_``); FerrumDeck's own (namespace, selectors, Redis, stream,
    ``FD_HANG_MIN_IDLE_MS``) come from ``tasks.settings.Settings``."""

    model_config = SettingsConfigDict(env_prefix="FD_WATCH_", extra="ignore", frozen=True)

    poll_interval_s: float = Field(5.0, gt=0, le=3600, description="How often the consumer group is read.")
    reemit_interval_s: float = Field(300.0, ge=0, description="A condition that lasts is reported again after this.")
    clear_after_s: float = Field(
        60.0, ge=0, description="A condition ends once its pod is Ready (or its consumer empty) this long."
    )
    watch_timeout_s: int = Field(300, ge=1, le=3600, description="The API server closes each watch after this.")
    backoff_initial_s: float = Field(0.5, gt=0, description="First wait after an API/Redis/Prefect error (doubles).")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between reconnection attempts.")
    lag_samples: int = Field(3, ge=2, le=100, description="Lag grows = it rose at each of this many polls.")
    lag_min_growth: int = Field(1, ge=1, description="... and by at least this much in total.")
    mcp_selector: str | None = Field(None, description="MCP pods' selector; default: the MCP Deployment's own.")
    buffer_max: int = Field(1000, ge=1, description="Events kept while Prefect is unreachable (oldest dropped).")
    prefect_api_url: str | None = Field(None, description="Prefect API URL; default: PREFECT_API_URL.")
    prefect_timeout_s: float = Field(5.0, gt=0, le=60, description="Timeout of the POST to Prefect.")
    health_host: str = Field("127.0.0.1", description="Address of GET /healthz (0.0.0.0 in a container).")
    health_port: int | None = Field(None, ge=1, le=65535, description="Port of GET /healthz; unset: no endpoint.")


# ================================================================== pure decisions


@dataclass(frozen=True)
class Policy:
    """What the pure decisions need to know (from ``Settings`` + ``WatchSettings``: ``Policy.of``)."""

    namespace: str = "ferrumdeck"
    stream: str = "fd:queue:steps"
    group: str = "workers"
    consumer_template: str = "{pod}"
    hang_min_idle_ms: int = 120_000
    reemit_s: float = 300.0
    clear_after_s: float = 60.0
    lag_samples: int = 3
    lag_min_growth: int = 1

    @classmethod
    def of(cls, settings: Settings, options: WatchSettings) -> Policy:
        return cls(
            namespace=settings.namespace, stream=settings.stream, group=settings.group,
            consumer_template=settings.consumer_name_template, hang_min_idle_ms=settings.hang_min_idle_ms,
            reemit_s=options.reemit_interval_s, clear_after_s=options.clear_after_s,
            lag_samples=options.lag_samples, lag_min_growth=options.lag_min_growth,
        )

    def consumer(self, pod: str) -> str:
        return self.consumer_template.format(pod=pod)

    def pod_of(self, consumer: str) -> str | None:
        """The pod whose consumer this is (the template read backwards), or None if it cannot be one."""
        prefix, sep, suffix = self.consumer_template.partition("{pod}")
        if not sep or "{pod}" in suffix:
            return None
        if len(consumer) <= len(prefix) + len(suffix) or not consumer.startswith(prefix) or not consumer.endswith(suffix):
            return None
        return consumer[len(prefix): len(consumer) - len(suffix)]


@dataclass(frozen=True)
class Episode:
    """One condition of one subject, from when it was first seen until it clears."""

    started: float
    emitted: float
    count: int = 1  # events sent about it
    healthy_since: float | None = None


@dataclass(frozen=True)
class Seen:
    """A pod as the watch last saw it."""

    role: Role
    info: PodInfo


@dataclass(frozen=True)
class ConsumerSample:
    """One consumer of the group as ``XINFO CONSUMERS`` shows it."""

    name: str
    pending: int
    idle_ms: int


Key = tuple[str, Condition]  # (pod name or stream, condition)


@dataclass(frozen=True)
class State:
    """Everything the decisions remember: pods, open episodes, recently handled deleted pods, recent lags."""

    pods: Mapping[str, Seen] = field(default_factory=dict)
    episodes: Mapping[Key, Episode] = field(default_factory=dict)
    handled: Mapping[str, float] = field(default_factory=dict)  # worker pod -> when deleted during a recovery
    lags: tuple[int, ...] = ()
    synced: frozenset[str] = frozenset()  # roles whose first list is done


@dataclass(frozen=True)
class Detection:
    """One event to emit: what, about whom, the evidence."""

    event: str
    condition: Condition
    role: Role | Literal["queue"]
    subject: str
    started: float
    repeat: int  # 0 for the first event of an episode
    detail: str
    labels: dict[str, str]
    evidence: dict[str, Any]


def track(
    episode: Episode | None, *, active: bool, healthy: bool, now: float, policy: Policy
) -> tuple[Episode | None, bool]:
    """One step of one (subject, condition): the episode afterwards, and whether to emit an event now.

    Active: a new episode emits; an open one re-emits every ``reemit_s``. Not active: an episode clears once
    the subject has looked healthy for ``clear_after_s`` (not merely "not active": between two crashes a
    crash-looping container runs, unready, for a while); active again before that = the same episode.
    """
    if active:
        if episode is None or (
            episode.healthy_since is not None and now - episode.healthy_since >= policy.clear_after_s
        ):
            return Episode(started=now, emitted=now), True
        if now - episode.emitted >= policy.reemit_s:
            return dataclasses.replace(episode, emitted=now, count=episode.count + 1, healthy_since=None), True
        return (dataclasses.replace(episode, healthy_since=None) if episode.healthy_since is not None else episode), False
    if episode is None:
        return None, False
    if not healthy:
        return (dataclasses.replace(episode, healthy_since=None) if episode.healthy_since is not None else episode), False
    since = episode.healthy_since if episode.healthy_since is not None else now
    if now - since >= policy.clear_after_s:
        return None, False
    return (episode if episode.healthy_since == since else dataclasses.replace(episode, healthy_since=since)), False


def _apply(
    episodes: dict[Key, Episode], key: Key, *, active: bool, healthy: bool, now: float, policy: Policy
) -> Episode | None:
    """``track`` on ``episodes[key]`` in place; the episode when an event is due, else None."""
    new, emit = track(episodes.get(key), active=active, healthy=healthy, now=now, policy=policy)
    if new is None:
        episodes.pop(key, None)
    else:
        episodes[key] = new
    return new if emit else None


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def pod_condition(pod: PodInfo, *, now: float) -> tuple[Condition | None, str]:
    """The condition a pod is in (None: none the watcher reports) and a one-line summary of it."""
    d = diagnosis(pod, cpu_millicores=None, now=_at(now))
    return POD_CONDITIONS.get(d.classification) if d.classification else None, d.summary


def _pod_detection(pod: PodInfo, role: Role, condition: Condition, ep: Episode, detail: str, policy: Policy) -> Detection:
    labels = {"pod": pod.name, "namespace": policy.namespace, "role": role, "condition": condition.value}
    if role == "worker":
        labels["consumer"] = policy.consumer(pod.name)
    last = pod.last_exit
    evidence: dict[str, Any] = {
        "phase": pod.phase, "ready": pod.ready, "restart_count": pod.restart_count,
        "waiting_reason": pod.waiting_reason, "node": pod.node,
        "last_exit_reason": last.reason if last else None, "last_exit_code": last.exit_code if last else None,
    }
    if pod.unschedulable_message:
        evidence["unschedulable_message"] = pod.unschedulable_message
    return Detection(event=event_name(role, condition), condition=condition, role=role, subject=pod.name,
                     started=ep.started, repeat=ep.count - 1, detail=detail, labels=labels, evidence=evidence)


def _judge_pod(episodes: dict[Key, Episode], seen: Seen, *, now: float, policy: Policy) -> list[Detection]:
    pod = seen.info
    condition, detail = pod_condition(pod, now=now)
    out = []
    for c in POD_CONDITIONS.values():
        ep = _apply(episodes, (pod.name, c), active=condition is c, healthy=pod.serving, now=now, policy=policy)
        if ep is not None:
            out.append(_pod_detection(pod, seen.role, c, ep, detail, policy))
    return out


def decide_pod(state: State, *, kind: str, pod: PodInfo, role: Role, now: float, policy: Policy) -> tuple[State, list[Detection]]:
    """A watch event (``ADDED`` / ``MODIFIED`` / ``DELETED``) about one pod -> new state, events to emit."""
    pods = dict(state.pods)
    episodes = dict(state.episodes)
    if kind == "DELETED":
        pods.pop(pod.name, None)
        handled = dict(state.handled)
        for key in [k for k in episodes if k[0] == pod.name and k[1] is not Condition.DELETED_HOLDING]:
            if key[1] in RECOVERED_CONDITIONS and role == "worker":
                handled[pod.name] = now
            del episodes[key]
        return dataclasses.replace(state, pods=pods, episodes=episodes, handled=handled), []
    seen = Seen(role=role, info=pod)
    pods[pod.name] = seen
    detections = _judge_pod(episodes, seen, now=now, policy=policy)
    return dataclasses.replace(state, pods=pods, episodes=episodes), detections


def decide_relist(state: State, *, pods: Sequence[PodInfo], role: Role, now: float,
                  policy: Policy) -> tuple[State, list[Detection], list[str]]:
    """A fresh list of one role's pods (start, or after 410 Gone): pods missing from it are deleted; the state,
    the events, and the names of the pods that went."""
    listed = {p.name for p in pods}
    gone = [name for name, s in state.pods.items() if s.role == role and name not in listed]
    detections: list[Detection] = []
    for name in gone:
        state, _ = decide_pod(state, kind="DELETED", pod=state.pods[name].info, role=role, now=now, policy=policy)
    for p in pods:
        state, found = decide_pod(state, kind="MODIFIED", pod=p, role=role, now=now, policy=policy)
        detections += found
    return dataclasses.replace(state, synced=state.synced | {role}), detections, gone


def tick(state: State, *, now: float, policy: Policy) -> tuple[State, list[Detection]]:
    """Re-judge every known pod without any I/O (re-emits due, conditions that aged out)."""
    episodes = dict(state.episodes)
    detections: list[Detection] = []
    for seen in state.pods.values():
        detections += _judge_pod(episodes, seen, now=now, policy=policy)
    return dataclasses.replace(state, episodes=episodes), detections


def _consumer_detection(condition: Condition, pod: str, c: ConsumerSample, ep: Episode, policy: Policy,
                        lags: tuple[int, ...]) -> Detection:
    labels = {"pod": pod, "namespace": policy.namespace, "role": "worker", "condition": condition.value,
              "consumer": c.name}
    if condition is Condition.HUNG:
        detail = f"{pod}: consumer {c.name} holds {c.pending} entries and has not read for {c.idle_ms} ms"
    else:
        detail = f"{pod}: deleted while its consumer {c.name} holds {c.pending} entries"
    evidence = {"pending": c.pending, "idle_ms": c.idle_ms, "hang_min_idle_ms": policy.hang_min_idle_ms,
                "lag_series": list(lags)}
    return Detection(event=event_name("worker", condition), condition=condition, role="worker", subject=pod,
                     started=ep.started, repeat=ep.count - 1, detail=detail, labels=labels, evidence=evidence)


def lag_growing(lags: Sequence[int], *, samples: int, min_growth: int) -> bool:
    """The lag rose at each of the last ``samples`` readings, by at least ``min_growth`` in all."""
    last = list(lags)[-samples:]
    return len(last) == samples and all(b > a for a, b in zip(last, last[1:], strict=False)) and last[-1] - last[0] >= min_growth


def decide_consumers(
    state: State, *, consumers: Sequence[ConsumerSample], lag: int | None, now: float, policy: Policy
) -> tuple[State, list[Detection]]:
    """One reading of the group -> new state, events: hung consumers (a Ready worker's consumer holding entries,
    silent beyond ``hang_min_idle_ms``), consumers of deleted pods still holding entries (unless a recovery of
    that pod is under way, for ``reemit_s``), and lag growth (``lag`` None: not read this time)."""
    episodes = dict(state.episodes)
    handled = {p: t for p, t in state.handled.items() if now - t < policy.reemit_s}
    workers = {policy.consumer(name): name for name, s in state.pods.items() if s.role == "worker"}
    lags = state.lags if lag is None else (*state.lags, lag)[-policy.lag_samples:]
    detections: list[Detection] = []
    judged: set[Key] = set()
    for c in consumers:
        pod = workers.get(c.name) or policy.pod_of(c.name)
        if pod is None:
            continue
        seen = state.pods.get(pod)
        if seen is not None and seen.role == "worker":
            key: Key = (pod, Condition.HUNG)
            idle = c.pending > 0 and c.idle_ms >= policy.hang_min_idle_ms
            ep = _apply(episodes, key, active=idle and seen.info.serving, healthy=not idle, now=now, policy=policy)
        elif seen is None and "worker" in state.synced:
            key = (pod, Condition.DELETED_HOLDING)
            ep = _apply(episodes, key, active=c.pending > 0 and pod not in handled, healthy=c.pending == 0,
                        now=now, policy=policy)
        else:
            continue
        judged.add(key)
        if ep is not None:
            detections.append(_consumer_detection(key[1], pod, c, ep, policy, lags))
    for key in [k for k in episodes if k[1] in CONSUMER_CONDITIONS and k not in judged]:  # consumer gone: holds nothing
        _apply(episodes, key, active=False, healthy=True, now=now, policy=policy)
    if lag is not None:
        growing = lag_growing(lags, samples=policy.lag_samples, min_growth=policy.lag_min_growth)
        falling = len(lags) >= 2 and lags[-1] <= lags[-2]
        ep = _apply(episodes, (policy.stream, Condition.LAG_GROWING), active=growing, healthy=falling, now=now,
                    policy=policy)
        if ep is not None:
            detections.append(Detection(
                event=event_name("queue", Condition.LAG_GROWING), condition=Condition.LAG_GROWING, role="queue",
                subject=policy.stream, started=ep.started, repeat=ep.count - 1,
                detail=f"lag of {policy.stream}/{policy.group} grew: {', '.join(map(str, lags))}",
                labels={"stream": policy.stream, "group": policy.group, "namespace": policy.namespace,
                        "condition": Condition.LAG_GROWING.value},
                evidence={"lag_series": list(lags), "lag": lags[-1]}))
    return dataclasses.replace(state, episodes=episodes, handled=handled, lags=lags), detections


def event_json(d: Detection, *, event_id: uuid.UUID, occurred: datetime) -> dict[str, Any]:
    """The Prefect event (JSON for ``POST /api/events``) of one detection, shaped like the bridge's."""
    kind = "queue" if d.role == "queue" else "pod"
    resource_id = f"ferrumdeck.{kind}.{d.subject}"
    fingerprint = hashlib.sha256(f"{resource_id}|{d.condition.value}|{d.started!r}".encode()).hexdigest()[:16]
    resource = {
        "prefect.resource.id": resource_id,
        "prefect.resource.name": d.subject,
        "ferrumdeck.source": SOURCE,
        "ferrumdeck.condition": d.condition.value,
        "ferrumdeck.role": d.role,
        "ferrumdeck.team": "ferrumdeck",
        "ferrumdeck.fingerprint": fingerprint,
        **{f"ferrumdeck.label.{k}": v for k, v in sorted(d.labels.items())},
    }
    return {
        "id": str(event_id),
        "occurred": occurred.isoformat(),
        "event": d.event,
        "resource": resource,
        "related": [],
        "payload": {
            "labels": dict(d.labels),
            "detail": d.detail,
            "evidence": d.evidence,
            "status": "firing",
            "startsAt": _at(d.started).isoformat(),
            "repeat": d.repeat,
            "fingerprint": fingerprint,
            "source": SOURCE,
        },
    }


def selector_string(selector: Mapping[str, Any] | None) -> str:
    """A LabelSelector (``matchLabels`` / ``matchExpressions``, camel or snake case) as a query string."""
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or selector.get("match_labels") or {}).items())]
    for e in selector.get("matchExpressions") or selector.get("match_expressions") or []:
        op, key, values = e.get("operator"), e.get("key"), e.get("values") or []
        if op in ("In", "NotIn"):
            parts.append(f"{key} {'in' if op == 'In' else 'notin'} ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    if not parts:
        raise ValueError("empty selector: it would select every pod")
    return ",".join(parts)


def backoff_delay(attempt: int, *, initial: float, maximum: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential back-off with jitter: between half and all of ``min(maximum, initial * 2**attempt)``."""
    base = min(maximum, initial * 2 ** min(attempt, 30))
    return base * (0.5 + rand() / 2)


# ================================================================== delivery to Prefect


class WatchError(Exception):
    """The watcher cannot start (bad configuration)."""


def events_url(api_url: str | None = None) -> tuple[str, SecretStr | None]:
    """``{PREFECT_API_URL}/events`` (or ``api_url``'s) and the Authorization header Prefect's settings give."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    url = api_url or api.url
    if not url:
        raise WatchError("no Prefect API: set PREFECT_API_URL (or FD_WATCH_PREFECT_API_URL)")
    authorization = None
    if api.auth_string is not None:
        authorization = SecretStr("Basic " + base64.b64encode(api.auth_string.get_secret_value().encode()).decode())
    elif api.key is not None:
        authorization = SecretStr(f"Bearer {api.key.get_secret_value()}")
    return url.rstrip("/") + "/events", authorization


class PrefectEvents:
    """Delivers events with ``POST /api/events`` from a background thread: a bounded buffer (the oldest event is
    dropped, and counted, when full), retried with back-off while Prefect is unreachable or refuses them.
    ``put`` never blocks the watcher. Event ids stay the same across retries."""

    def __init__(self, *, url: str, authorization: SecretStr | None = None, timeout_s: float = 5.0,
                 max_buffer: int = 1000, batch: int = 100, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, client: httpx.Client | None = None) -> None:
        self.url = url
        self._headers = {"Authorization": authorization.get_secret_value()} if authorization else {}
        self._timeout = timeout_s
        self._buffer: deque[dict[str, Any]] = deque()
        self._max = max_buffer
        self._batch = batch
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._client = client
        self._owns_client = client is None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.dropped = 0
        self.failures = 0
        self.in_flight = 0

    @property
    def buffered(self) -> int:
        with self._cond:
            return len(self._buffer)

    def put(self, events: Sequence[dict[str, Any]]) -> None:
        with self._cond:
            for event in events:
                if len(self._buffer) >= self._max:
                    self._buffer.popleft()
                    self.dropped += 1
                    log.warning("event buffer full (%d): oldest event dropped (%d so far)", self._max, self.dropped)
                self._buffer.append(event)
            self._cond.notify()

    def start(self) -> PrefectEvents:
        if self._client is None:
            self._client = httpx.Client(timeout=self._timeout)
        self._thread = threading.Thread(target=self._run, name="fd-watch-events", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, flush_timeout_s: float = 5.0) -> None:
        """Deliver what is buffered for at most ``flush_timeout_s``, then stop."""
        deadline = time.monotonic() + flush_timeout_s
        with self._cond:
            while (self._buffer or self.in_flight) and time.monotonic() < deadline and self._thread is not None:
                self._cond.wait(timeout=0.05)
            self._stop.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout + 1)
        if self._buffer:
            log.warning("%d events not delivered to Prefect at shutdown", len(self._buffer))
        if self._owns_client and self._client is not None:
            self._client.close()

    def deliver(self, events: list[dict[str, Any]]) -> bool:
        """One POST; True when Prefect took the events."""
        assert self._client is not None
        try:
            response = self._client.post(self.url, json=events, headers=self._headers, timeout=self._timeout)
        except httpx.HTTPError as e:
            log.warning("Prefect API unreachable (%s): %d events kept for retry", type(e).__name__, len(events))
            return False
        if not response.is_success:
            log.warning("Prefect API answered %d: %d events kept for retry", response.status_code, len(events))
            return False
        return True

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                while not self._buffer and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                batch = [self._buffer[i] for i in range(min(self._batch, len(self._buffer)))]
                self.in_flight = len(batch)
            ok = self.deliver(batch)
            with self._cond:
                if ok:  # drop exactly what was sent (the buffer may have dropped some of it meanwhile)
                    sent_ids = {e["id"] for e in batch}
                    self._buffer = deque(e for e in self._buffer if e["id"] not in sent_ids)
                    self.sent += len(batch)
                self.in_flight = 0
                self._cond.notify_all()
            if ok:
                attempt = 0
                continue
            self.failures += 1
            self._stop.wait(backoff_delay(attempt, initial=self._backoff[0], maximum=self._backoff[1]))
            attempt += 1


# ================================================================== the I/O loop


@dataclass
class WatchStats:
    """Counters of the watcher's I/O (what the tests and ``/healthz`` read)."""

    lists: int = 0
    watches: int = 0
    expired: int = 0  # 410 Gone -> re-list
    api_errors: int = 0
    polls: int = 0
    consumer_checks: int = 0  # XINFO CONSUMERS after a worker pod was deleted
    redis_errors: int = 0
    events: int = 0
    watching: dict[str, bool] = field(default_factory=dict)


class Watcher:
    """The watch threads (worker pods, MCP pods) and the group poll thread around the pure decisions.

    ``emit`` receives each batch of event JSON (``PrefectEvents.put`` in production, a list in tests).
    """

    def __init__(self, *, settings: Settings, options: WatchSettings | None = None,
                 emit: Callable[[list[dict[str, Any]]], None], clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.options = options or WatchSettings()
        self.policy = Policy.of(settings, self.options)
        self._emit_to = emit
        self._clock = clock
        self._lock = threading.Lock()
        self._state = State()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: set[Any] = set()  # open kubernetes Watch objects (stopped on shutdown)
        self._beats: dict[str, float] = {}
        self.selectors: dict[str, str] = {}
        self.stats = WatchStats()

    # --- lifecycle ---
    def start(self) -> Watcher:
        from tasks.kube import kube_api_client

        kube_api_client(self.settings)  # a missing kubeconfig fails here, clearly, not in a thread
        for name, target in (("worker", self._watch_loop), ("mcp", self._watch_loop), ("poll", self._poll_loop)):
            args = (name,) if name != "poll" else ()
            thread = threading.Thread(target=self._guard, args=(name, target, *args), name=f"fd-watch-{name}", daemon=True)
            self._beats[name] = time.monotonic()
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for w in list(self._open):
            w.stop()
        for thread in self._threads:
            thread.join(timeout=timeout_s)

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Alive = every thread running and each looped recently (watches close every ``watch_timeout_s``)."""
        now = time.monotonic()
        o = self.options
        bounds = {"worker": o.watch_timeout_s + 60 + o.backoff_max_s, "mcp": o.watch_timeout_s + 60 + o.backoff_max_s,
                  "poll": 3 * o.poll_interval_s + 60 + o.backoff_max_s}
        ages = {name: round(now - beat, 1) for name, beat in self._beats.items()}
        alive = all(t.is_alive() for t in self._threads) and all(ages[n] <= bounds[n] for n in ages)
        return alive and not self._stop.is_set(), {"threads_alive": [t.name for t in self._threads if t.is_alive()],
                                                    "loop_age_s": ages, **dataclasses.asdict(self.stats)}

    def _guard(self, name: str, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except Exception:  # a bug: say so loudly; /healthz turns unhealthy and the pod restarts
            log.exception("watcher thread %s died", name)

    def _beat(self, name: str) -> None:
        self._beats[name] = time.monotonic()

    def _sleep(self, seconds: float) -> bool:
        """Wait (interrupted by stop); True when stopping."""
        return self._stop.wait(seconds)

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, initial=self.options.backoff_initial_s, maximum=self.options.backoff_max_s)

    # --- decisions, under the lock; events out of it ---
    def _decide(self, fn: Callable[[State], tuple[State, list[Detection]]]) -> None:
        with self._lock:
            self._state, detections = fn(self._state)
        self._send(detections)

    def _send(self, detections: list[Detection]) -> None:
        if not detections:
            return
        now = datetime.now(UTC)
        events = [event_json(d, event_id=uuid.uuid4(), occurred=now) for d in detections]
        for d in detections:
            log.info("%s %s%s: %s", d.event, d.subject, f" (again, #{d.repeat + 1})" if d.repeat else "", d.detail)
        self.stats.events += len(events)
        self._emit_to(events)

    # --- Kubernetes ---
    def _core(self) -> Any:
        from kubernetes import client as k8s

        from tasks.kube import kube_api_client

        return k8s.CoreV1Api(kube_api_client(self.settings))

    def _timeout(self) -> tuple[float, float]:
        return (min(5.0, self.settings.kube_timeout_s), self.settings.kube_timeout_s)

    def _selector(self, role: Role) -> str | None:
        """The role's label selector; the MCP Deployment's is read once (retried until it answers)."""
        if role == "worker":
            return self.settings.worker_selector
        if self.options.mcp_selector:
            return self.options.mcp_selector
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        from tasks.kube import kube_api_client

        name, attempt = self.settings.mcp_deployment, 0
        while not self._stop.is_set():
            self._beat(role)
            try:
                obj = k8s.AppsV1Api(kube_api_client(self.settings)).read_namespaced_deployment(
                    name, self.settings.namespace, _request_timeout=self._timeout())
                return selector_string(obj.spec.selector.to_dict() if obj.spec and obj.spec.selector else None)
            except ApiException as e:
                if e.status in (403, 404):
                    log.warning("cannot read Deployment %s (%s): watching app=%s", name, e.status, name)
                    return f"app={name}"
                self.stats.api_errors += 1
                log.warning("reading Deployment %s failed (%s); retrying", name, e.status)
            except ValueError as e:
                log.warning("Deployment %s: %s; watching app=%s", name, e, name)
                return f"app={name}"
            except Exception as e:  # urllib3/OSError: the API is unreachable
                self.stats.api_errors += 1
                log.warning("reading Deployment %s failed (%s); retrying", name, type(e).__name__)
            self._sleep(self._backoff(attempt))
            attempt += 1
        return None

    def _container(self, role: Role) -> str | None:
        return self.settings.worker_container if role == "worker" else None

    def _watch_loop(self, role: Role) -> None:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        selector = self._selector(role)
        if selector is None:
            return
        self.selectors[role] = selector
        rv: str | None = None
        attempt = 0
        while not self._stop.is_set():
            self._beat(role)
            try:
                if rv is None:
                    rv = self._relist(role, selector)
                rv = self._stream(role, selector, rv)
                attempt = 0
                continue
            except ApiException as e:
                if e.status == 410:
                    self.stats.expired += 1
                    log.info("%s pod watch expired (410 Gone): re-listing", role)
                    rv = None
                    continue
                self.stats.api_errors += 1
                log.warning("%s pod watch: Kubernetes API answered %s; reconnecting", role, e.status)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                if self._stop.is_set():
                    return
                self.stats.api_errors += 1
                log.warning("%s pod watch: Kubernetes API unreachable (%s); reconnecting", role, type(e).__name__)
            except Exception:  # unexpected (a malformed object?): keep watching, loudly, rather than die silently
                if self._stop.is_set():
                    return
                self.stats.api_errors += 1
                log.exception("%s pod watch failed; reconnecting", role)
            finally:
                self.stats.watching[role] = False
            self._sleep(self._backoff(attempt))
            attempt += 1

    def _relist(self, role: Role, selector: str) -> str:
        listing = self._core().list_namespaced_pod(
            self.settings.namespace, label_selector=selector, _request_timeout=self._timeout())
        self.stats.lists += 1
        pods = [pod_info(p, container=self._container(role)) for p in listing.items]
        gone: list[str] = []

        def relist(state: State) -> tuple[State, list[Detection]]:
            nonlocal gone
            state, detections, gone = decide_relist(state, pods=pods, role=role, now=self._clock(), policy=self.policy)
            return state, detections

        self._decide(relist)
        if gone and role == "worker":
            self._check_consumers()
        return listing.metadata.resource_version

    def _stream(self, role: Role, selector: str, rv: str) -> str:
        from kubernetes import watch as k8s_watch

        w = k8s_watch.Watch()
        self._open.add(w)
        self.stats.watches += 1
        try:
            stream = w.stream(
                self._core().list_namespaced_pod, self.settings.namespace, label_selector=selector,
                resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=self.options.watch_timeout_s,
                _request_timeout=(self._timeout()[0], self.options.watch_timeout_s + 30),
            )
            self.stats.watching[role] = True
            for event in stream:
                self._beat(role)
                kind, raw = event["type"], event.get("raw_object") or {}
                rv = (raw.get("metadata") or {}).get("resourceVersion") or rv
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._on_pod(role, kind, raw)
                if self._stop.is_set():
                    break
        finally:
            w.stop()
            self._open.discard(w)
        return rv

    def _on_pod(self, role: Role, kind: str, raw: dict[str, Any]) -> None:
        info = pod_info(raw, container=self._container(role))
        self._decide(lambda s: decide_pod(s, kind=kind, pod=info, role=role, now=self._clock(), policy=self.policy))
        if kind == "DELETED" and role == "worker":
            self._check_consumers()

    # --- Redis ---
    def _read_group(self, *, with_lag: bool) -> tuple[list[ConsumerSample], int | None]:
        import redis

        from tasks.connections import redis_client

        s = self.settings
        with redis_client(s).pipeline(transaction=False) as pipe:
            if with_lag:
                pipe.xinfo_groups(s.stream)
            pipe.xinfo_consumers(s.stream, s.group)
            replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and not isinstance(reply, redis.ResponseError):
                raise reply
        consumers_reply = replies[-1]
        consumers = [] if isinstance(consumers_reply, Exception) else [
            ConsumerSample(name=c["name"], pending=int(c["pending"]), idle_ms=int(c["idle"])) for c in consumers_reply]
        lag = None
        if with_lag and not isinstance(replies[0], Exception):
            group = next((g for g in replies[0] if g["name"] == s.group), None)
            lag = int(group["lag"]) if group and group.get("lag") is not None else None
        return consumers, lag

    def _check_consumers(self) -> None:
        """After a worker pod went: one XINFO CONSUMERS (does its consumer still hold entries?)."""
        import redis

        try:
            consumers, _ = self._read_group(with_lag=False)
        except (redis.RedisError, OSError) as e:
            self.stats.redis_errors += 1
            log.warning("consumer check after a pod deletion failed (%s); the next poll retries", type(e).__name__)
            return
        self.stats.consumer_checks += 1
        self._decide(lambda s: decide_consumers(s, consumers=consumers, lag=None, now=self._clock(), policy=self.policy))

    def _poll_loop(self) -> None:
        import redis

        attempt = 0
        while not self._stop.is_set():
            self._beat("poll")
            self._decide(lambda s: tick(s, now=self._clock(), policy=self.policy))
            try:
                consumers, lag = self._read_group(with_lag=True)
            except Exception as e:  # RedisError, OSError; anything else too: the pod watches must go on
                self.stats.redis_errors += 1
                log.warning("reading consumer group %s/%s failed (%s)", self.settings.stream, self.settings.group,
                            type(e).__name__, exc_info=not isinstance(e, redis.RedisError | OSError))
                self._sleep(min(self._backoff(attempt), self.options.poll_interval_s * 4))
                attempt += 1
                continue
            attempt = 0
            self.stats.polls += 1
            self._decide(lambda s, c=consumers, lag=lag: decide_consumers(
                s, consumers=c, lag=lag, now=self._clock(), policy=self.policy))
            self._sleep(self.options.poll_interval_s)


# ================================================================== running it


def _health_server(watcher: Watcher, events: PrefectEvents | None, host: str, port: int) -> ThreadingHTTPServer:
    def healthz(_headers: Message) -> tuple[int, str, bytes]:
        ok, detail = watcher.health()
        if events is not None:
            detail |= {"buffered": events.buffered, "sent": events.sent, "dropped": events.dropped}
        return 200 if ok else 503, "application/json", json.dumps({"status": "ok" if ok else "unhealthy", **detail}).encode()

    return serve_probes({"/healthz": healthz}, host=host, port=port, name="fd-watch-health")


@contextlib.contextmanager
def watching(settings: Settings, options: WatchSettings | None = None) -> Iterator[tuple[Watcher, PrefectEvents]]:
    """The watcher and its delivery to Prefect, running for the block (the demo and the drills embed it)."""
    options = options or WatchSettings()
    url, authorization = events_url(options.prefect_api_url)
    events = PrefectEvents(url=url, authorization=authorization, timeout_s=options.prefect_timeout_s,
                           max_buffer=options.buffer_max, backoff_initial_s=options.backoff_initial_s,
                           backoff_max_s=options.backoff_max_s).start()
    watcher = Watcher(settings=settings, options=options, emit=events.put)
    try:
        watcher.start()
        yield watcher, events
    finally:
        watcher.stop()
        events.stop()


def run_watch(settings: Settings, options: WatchSettings, *, log_level: str = "info") -> None:
    """``fd-recovery watch``: run until SIGINT/SIGTERM (then deliver what is buffered, for a few seconds)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    with watching(settings, options) as (watcher, events):
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        server = None
        try:
            if options.health_port is not None:
                server = _health_server(watcher, events, options.health_host, options.health_port)
            log.info("watching pods %s and the MCP pods in %s, group %s/%s every %g s -> %s", settings.worker_selector,
                     settings.namespace, settings.stream, settings.group, options.poll_interval_s, events.url)
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if server is not None:
                server.shutdown()
