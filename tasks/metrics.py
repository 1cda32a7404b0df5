"""ferrumdeck-recovery's own metrics: what the recoveries did, for Prometheus to scrape from ``fd-recovery serve``.

Every recovery run is recorded once, by ``tasks.report.conclude`` (``record_run``), from its typed result: the
run by flow and outcome, each action by kind and result, each guard refusal by reason, the run's duration, the
time this process last concluded a run of each flow and, for runs an automation started, the time from the
triggering alert/watcher event to the run's start. The guard's state — kill switch and budgets left — and the
system's heartbeat (the newest finished queue-sweep run) are read from Prefect when Prometheus scrapes
(``StateCollector``), so an exhausted budget recovers on the graph as its slots decay even when no run happens,
and idle sweeps (which publish no report of their own) still beat.

Metrics live in this module's own ``REGISTRY`` (not prometheus_client's global one): ``exposition()`` renders it
for an HTTP handler, ``metrics_app()`` is an ASGI app, ``start_metrics_server(port)`` serves it on its own port.
Runs are counted in the process that runs them: ``fd-recovery serve`` (in-process runs) sees them all; with
``--subprocess`` each run is a process of its own and only the scrape-time state is served.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tasks.outcome import ActionStatus, RecoveryResult

if TYPE_CHECKING:
    from tasks.settings import Settings

log = logging.getLogger(__name__)

#: the registry of every metric below (one per process)
REGISTRY = CollectorRegistry(auto_describe=True)

RECOVERIES = Counter(
    "ferrumdeck_recovery_runs", "Recovery flow runs concluded, by flow and typed outcome.",
    ["flow", "outcome"], registry=REGISTRY,
)
ACTIONS = Counter(
    "ferrumdeck_recovery_actions",
    "Actions the recoveries took or previewed, by flow, kind and result (done, unchanged, dry_run, refused, failed).",
    ["flow", "kind", "result"], registry=REGISTRY,
)
REFUSALS = Counter(
    "ferrumdeck_recovery_guard_refusals",
    "Actions the guard refused, by flow and reason (kill_switch, cooldown, budget, approval, safety).",
    ["flow", "reason"], registry=REGISTRY,
)
DURATION = Histogram(
    "ferrumdeck_recovery_duration_seconds", "Duration of recovery flow runs, from start to conclusion.",
    ["flow", "outcome"], registry=REGISTRY,
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 600, 1200, 1800, 3600),
)
ALERT_TO_START = Histogram(
    "ferrumdeck_recovery_alert_to_start_seconds",
    "From the alert (or watcher) event reaching Prefect to the flow run it triggered starting.",
    ["flow"], registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
LAST_RUN = Gauge(
    "ferrumdeck_recovery_last_run_timestamp_seconds",
    "Unix time a run of the flow last concluded (with its report) in this process.",
    ["flow"], registry=REGISTRY,
)

#: refusal reasons, first match wins (the guard's messages: tasks/guard.py)
REFUSAL_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kill_switch", re.compile(r"kill[ _-]?switch", re.I)),
    ("cooldown", re.compile(r"cooldown|done recently", re.I)),
    ("budget", re.compile(r"budget", re.I)),
    ("approval", re.compile(r"approv|reject", re.I)),
)


def refusal_reason(detail: str) -> str:
    """Pure: the reason label of a refused action from the guard's message (``safety`` for any other rule)."""
    for reason, pattern in REFUSAL_REASONS:
        if pattern.search(detail or ""):
            return reason
    return "safety"


def record_run(result: RecoveryResult, *, started: datetime | None = None, now: datetime | None = None) -> None:
    """Count one concluded run from its typed result: outcome, actions, refusals, duration, last-run time."""
    now = now or datetime.now(UTC)
    outcome = result.outcome.value
    RECOVERIES.labels(result.flow, outcome).inc()
    for action in result.actions:
        ACTIONS.labels(result.flow, action.kind, action.status.value).inc()
        if action.status is ActionStatus.REFUSED:
            REFUSALS.labels(result.flow, refusal_reason(action.detail)).inc()
    if started is not None:
        DURATION.labels(result.flow, outcome).observe(max((now - started).total_seconds(), 0.0))
    LAST_RUN.labels(result.flow).set(now.timestamp())


# ------------------------------------------------------------------------- alert -> start

def triggering_event_time(flow_run_id: str, *, client: Any = None) -> datetime | None:
    """When the event that made an automation start ``flow_run_id`` occurred, read from Prefect's events (None if
    the run was not started by a trigger, or the automation's events are not stored yet)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventFilter,
        EventIDFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventRelatedFilter,
    )

    def read(c: Any) -> datetime | None:
        since = datetime.now(UTC) - timedelta(days=1)
        actions = c.read_events(filter=EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=["prefect.automation.action.triggered"]),
            related=EventRelatedFilter(resources_in_roles=[(f"prefect.flow-run.{flow_run_id}", "flow-run")]),
        ), limit=1).events
        if not actions:
            return None
        ids = [r.id.removeprefix("prefect.event.") for r in actions[0].related if r.role == "triggering-event"]
        if not ids:
            return None
        found = c.read_events(filter=EventFilter(occurred=EventOccurredFilter(since=since - timedelta(days=1)),
                                                 id=EventIDFilter(id=ids)), limit=1).events
        return found[0].occurred if found else None

    if client is not None:
        return read(client)
    with get_client(sync_client=True) as c:
        return read(c)


def observe_alert_to_start(
    *, flow: str, flow_run_id: str, started: datetime, wait_s: float = 30.0, interval_s: float = 2.0
) -> float | None:
    """Record the alert-to-start time of a triggered run (waiting up to ``wait_s`` for Prefect to store the
    automation's events); return the seconds recorded, or None when the run had no triggering event."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            occurred = triggering_event_time(flow_run_id)
        except Exception as e:  # noqa: BLE001 - a metric is never worth an error
            log.debug("alert-to-start of %s not read: %s", flow_run_id, e)
            occurred = None
        if occurred is not None:
            seconds = max((started - occurred).total_seconds(), 0.0)
            ALERT_TO_START.labels(flow).observe(seconds)
            return seconds
        if time.monotonic() + interval_s > deadline:
            return None
        time.sleep(interval_s)  # poll: Prefect stores events in batches (every ~5 s)


def observe_alert_to_start_later(*, flow: str, flow_run_id: str, started: datetime) -> threading.Thread:
    """``observe_alert_to_start`` in a daemon thread, so a run never waits for Prefect's event store."""
    thread = threading.Thread(target=observe_alert_to_start, name="fd-alert-to-start", daemon=True,
                              kwargs={"flow": flow, "flow_run_id": flow_run_id, "started": started})
    thread.start()
    return thread


# ------------------------------------------------------------------------- state read at scrape time

#: the scheduled flow whose runs prove the recovery system runs (every minute, idle or not)
HEARTBEAT_FLOW = "queue-sweep"


def last_finished_run_end(client: Any, *, flow: str) -> datetime | None:
    """When the newest Completed or Failed run of ``flow`` ended (one API read), or None."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.COMPLETED, StateType.FAILED]))),
        sort=FlowRunSort.END_TIME_DESC, limit=1,
    )
    return runs[0].end_time if runs else None


class StateCollector(Collector):
    """The guard's state, read from Prefect when scraped (cached ``cache_s``): kill switch, budgets left, and the
    recovery system's heartbeat (the newest finished queue-sweep run, whichever runner ran it).

    ``ferrumdeck_recovery_state_up`` is 0 when Prefect could not be read (the other samples are then absent).
    """

    def __init__(self, settings: Callable[[], Settings], *, cache_s: float = 5.0, client: Callable[[], Any] | None = None):
        self._settings = settings
        self._cache_s = cache_s
        self._client = client
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def describe(self) -> list[Metric]:
        return []  # collected lazily: registering this never calls Prefect

    def _read(self) -> list[Metric]:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        from tasks.guard import is_truthy, llm_failover_budget, pod_deletion_budget

        settings = self._settings()
        engaged = GaugeMetricFamily("ferrumdeck_recovery_kill_switch_engaged",
                                    "1 while the kill switch Prefect Variable is on (every mutating step refuses).")
        remaining = GaugeMetricFamily("ferrumdeck_recovery_budget_remaining",
                                      "Actions a blast-radius budget allows now (its limit minus slots in use).",
                                      labels=["budget"])
        limit_family = GaugeMetricFamily("ferrumdeck_recovery_budget_limit",
                                         "A blast-radius budget's limit per its window.", labels=["budget"])
        heartbeat = GaugeMetricFamily("ferrumdeck_recovery_heartbeat_timestamp_seconds",
                                      f"Unix time the newest {HEARTBEAT_FLOW} run (scheduled every minute) finished, "
                                      "by any runner (absent: none yet).")
        with (self._client or (lambda: get_client(sync_client=True)))() as client:
            variable = client.read_variable_by_name(settings.kill_switch_variable)
            engaged.add_metric([], 1.0 if variable is not None and is_truthy(variable.value) else 0.0)
            for budget in (pod_deletion_budget(settings), llm_failover_budget(settings)):
                name = budget.name.removeprefix(f"{settings.budget_prefix}-")
                try:
                    gcl = client.read_global_concurrency_limit_by_name(budget.name)
                except ObjectNotFound:  # created on first use: the whole budget is free
                    remaining.add_metric([name], float(budget.limit))
                else:
                    elapsed = max((datetime.now(UTC) - gcl.updated).total_seconds(), 0.0) if gcl.updated else 0.0
                    decayed = int((gcl.slot_decay_per_second or 0.0) * elapsed)
                    active = max(0, gcl.active_slots - decayed)
                    remaining.add_metric([name], float(max(budget.limit - active, 0)))
                limit_family.add_metric([name], float(budget.limit))
            ended = last_finished_run_end(client, flow=HEARTBEAT_FLOW)
            if ended is not None:
                heartbeat.add_metric([], ended.timestamp())
        return [engaged, remaining, limit_family, heartbeat]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self._cache_s:
                up = GaugeMetricFamily("ferrumdeck_recovery_state_up",
                                       "1 when the kill switch and budgets were read from Prefect at this scrape.")
                try:
                    families = self._read()
                    up.add_metric([], 1.0)
                except Exception as e:  # noqa: BLE001 - a scrape must answer even when Prefect does not
                    log.warning("recovery state not read from Prefect: %s: %s", type(e).__name__, e)
                    families = []
                    up.add_metric([], 0.0)
                self._cached = (time.monotonic(), [*families, up])
            yield from self._cached[1]


_state_lock = threading.Lock()
_state_collector: StateCollector | None = None


def enable_state_metrics(settings: Callable[[], Settings] | None = None) -> StateCollector:
    """Serve the kill switch and budget gauges (read from Prefect at scrape time) from ``REGISTRY``, once."""
    global _state_collector
    with _state_lock:
        if _state_collector is None:
            from tasks.settings import get_settings

            _state_collector = StateCollector(settings or get_settings)
            REGISTRY.register(_state_collector)
        return _state_collector


# ------------------------------------------------------------------------- serving

def exposition(accept: str | None = None) -> tuple[bytes, str]:
    """The metrics page (body, content type) for an HTTP handler; the state gauges are enabled on first call."""
    from prometheus_client.exposition import choose_encoder

    enable_state_metrics()
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


def metrics_app() -> Callable[..., Any]:
    """An ASGI app answering ``GET`` with the metrics page (rendered in a worker thread: scrape-time reads of
    Prefect never block the event loop)."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        import anyio

        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        headers = dict(scope.get("headers") or [])
        accept = headers.get(b"accept", b"").decode("latin-1")
        body, content_type = await anyio.to_thread.run_sync(exposition, accept)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def start_metrics_server(port: int, host: str = "0.0.0.0") -> Any:
    """Serve ``GET /metrics`` on ``host:port`` in a daemon thread (prometheus_client's server); return it
    (``.shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    enable_state_metrics()
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server
