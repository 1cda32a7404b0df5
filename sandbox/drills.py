"""Timed recovery drills on the running stack, shared by ``make demo`` and ``python -m bench.drills``.

A drill: set the scene under the steady load (e.g. a burst so one worker holds 50 steps), inject the fault
(``SandboxServices.crash/hang/poison/llm_outage/mcp_outage/backlog``), let the stack's detection path see it
(``Stack.detect``), wait for the recovery's flow run that the ``prefect.yaml`` trigger starts (served by
``fd-recovery serve``), read the run's typed result (``RecoveryResult.outcome``), check what the recovery must
have achieved (e.g. the 50 steps completed by other workers), and run ``post-recovery-check`` until it passes.

Detection paths (``DrillResult.detected_by`` says which one saw the fault):

- ``prometheus``: the real Prometheus evaluates the rules (demo profile) on the sandbox's series and the real
  exporters', Alertmanager notifies the bridge: the drill posts nothing and waits;
- ``watch``: the direct watcher's ``ferrumdeck.pod.*`` / ``ferrumdeck.consumer.hung`` events; a fault the watcher
  does not see (an LLM outage, an unhealthy MCP whose pods run, a backlog: no trigger on lag growth) falls back
  to ``direct`` and says so;
- ``direct``: the drill posts the alert to the bridge exactly as Alertmanager would (webhook v4, Bearer token),
  once the symptom is visible.

Measured per scenario, from the moment the fault is injected:

- ``detect_s``: -> the first detection, i.e. the ``occurred`` time of the first matching event in Prefect (the
  bridge stamps an alert when it receives it; the watcher when it sends);
- ``start_s``: -> the recovery's flow run started (Running);
- ``mttr_s``: -> the recovery's flow run ended with a verified outcome (its typed result's ``outcome`` is
  ``recovered``; a run that could not verify ends Failed and carries its result: then there is no MTTR);
- ``healthy_s``: -> ``post-recovery-check`` passes and nothing is left pending under a gone pod (follow-ups
  included).

Accounting of "lost" is the drill's own (it does not use the product's queue code, so a bug there cannot hide a
lost step): every step created during the scenario (rows in the runs DB; the load generator and the scenario
write the rows before the stream entries) must end completed, or failed with its error recorded (runs DB),
dead-lettered (an entry in the DLQ stream), still queued (after the group's last-delivered id), or in flight
(pending under a live worker's consumer, delivered less than ``STALE_MS`` ago). Anything else — pending under a
dead, hung or deleted consumer, pending for too long, failed with no error, nowhere at all — is lost.

When a recovery leaves steps pending under consumers whose pods are gone (the sandbox kills a deleted pod's
worker abruptly, e.g. in a rollout), the follow-up is the watcher's ``ferrumdeck.pod.deleted-holding-entries``
(-> ``worker-crash-recovery``) with the watcher; otherwise the drill fires ``StepsPendingWithoutWorker``
(team=ferrumdeck; no Prometheus rule sees this), which the bridge routes to ``worker-failure-triage``. Triage
can legitimately end Failed (its own post-recovery check ran before the queue drained): follow-ups are judged
by their typed result (which subflows failed) and by the system state the drill checks itself.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from pydantic import BaseModel, Field

from sandbox.stack import StackError, wait_until
from tasks.connections import db_engine
from tasks.correlate import pod_of_consumer
from tasks.runs import tables

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
CHUNK = 5_000
PAGE = 1_000
#: a step pending under a live consumer longer than this is not "in flight" any more (sandbox steps take ms)
STALE_MS = 20_000
#: the watcher's events that start worker-crash-recovery for a crashed pod
CRASH_EVENTS = ("ferrumdeck.pod.crash-looping", "ferrumdeck.pod.oom-killed")
HUNG_EVENTS = ("ferrumdeck.consumer.hung",)
GONE_EVENTS = ("ferrumdeck.pod.deleted-holding-entries",)
#: alerts a Prometheus rule of deployments/prometheus/ferrumdeck-alerts.yaml fires (others are posted directly)
PROMETHEUS_ALERTS = frozenset({"WorkerCrashLooping", "WorkerHung", "LLMProviderErrors", "MCPServerDown",
                               "QueueBacklog", "RunsStuck"})
#: Outcomes a recovery run may end with when the fault is recovered (one of the runs must have acted: recovered)
GREEN = ("recovered", "nothing_to_do")
POST_CHECK = "post-recovery-check"


class DrillError(Exception):
    """A drill could not be carried out (the stack misbehaved, a deadline passed)."""


class Accounting(BaseModel):
    """Where every step of a scenario ended (the drill's own scan of the runs DB, stream, PEL and DLQ)."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    queued: int = 0
    in_flight: int = 0
    lost: int = 0
    lost_samples: list[str] = Field(default_factory=list)


class RunOutcome(BaseModel):
    """One flow run a scenario caused: how it ended (Prefect state and typed outcome) and when, from the fault."""

    deployment: str
    id: str
    name: str
    role: str = "recovery"  # recovery | follow-up | other
    state: str = ""  # Prefect state name: Completed, Failed, ...
    outcome: str | None = None  # the typed RecoveryResult.outcome; None: no typed result could be read
    cause: str = ""
    failing_subflows: list[str] = Field(default_factory=list)  # triage: subflows that ended failing
    pod: str | None = None
    detected_by: str = ""  # prometheus | watch | direct
    detection: str = ""  # the first detection event (name, resource)
    detection_from: str = ""  # who sent it: the alert's generatorURL (Prometheus, or the drill's), or "watcher"
    detect_s: float | None = None
    created_s: float | None = None
    started_s: float | None = None
    ended_s: float | None = None
    end_time: str | None = None

    @property
    def verified(self) -> bool:
        return self.outcome == "recovered"

    @property
    def green(self) -> bool:
        return self.outcome in GREEN

    def label(self) -> str:
        return f"{self.name} ({self.state}, {self.outcome or 'no result'})"


class DrillResult(BaseModel):
    """One scenario's outcome: the detection path, timings, the flow runs it caused, step accounting, checks."""

    scenario: str
    title: str
    alert: str
    detect: str = "direct"  # the stack's detection path
    detected_by: str = ""  # the path that saw this fault (direct when the chosen one cannot)
    detection: str = ""
    fault_at: str = ""
    recovered_at: str = ""
    detect_s: float | None = None
    start_s: float | None = None
    mttr_s: float | None = None
    healthy_s: float | None = None
    target_s: float | None = None
    recovered: bool = False
    flow_runs: list[RunOutcome] = Field(default_factory=list)
    other_runs: list[RunOutcome] = Field(default_factory=list)
    steps: Accounting = Field(default_factory=Accounting)
    checks: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.recovered and self.steps.lost == 0 and not self.problems

    def recovery_runs(self) -> list[RunOutcome]:
        return [r for r in self.flow_runs if r.role == "recovery"]

    def outcome_text(self) -> str:
        runs = self.recovery_runs()
        if not runs:
            return "-"
        outcomes = sorted({r.outcome or "no result" for r in runs})
        return f"{'/'.join(outcomes)}" + (f" x{len(runs)}" if len(runs) > 1 else "")

    def bench_row(self) -> dict[str, Any]:
        return {
            "detect": self.detect, "detected_by": self.detected_by,
            "detect_s": self.detect_s, "start_s": self.start_s, "mttr_s": self.mttr_s, "healthy_s": self.healthy_s,
            "target_s": self.target_s,
            "met_target": None if self.target_s is None or self.mttr_s is None else self.mttr_s <= self.target_s,
            "recovered": self.recovered, "outcome": self.outcome_text(),
            "steps_total": self.steps.total, "steps_completed": self.steps.completed,
            "steps_failed": self.steps.failed, "steps_dead_lettered": self.steps.dead_lettered,
            "steps_queued_or_in_flight": self.steps.queued + self.steps.in_flight,
            "steps_lost": self.steps.lost,
            "flow_runs": [r.model_dump(exclude={"end_time"}, exclude_none=True) for r in self.flow_runs],
            **({"other_runs": [r.label() for r in self.other_runs]} if self.other_runs else {}),
            **self.checks,
            **({"notes": self.notes} if self.notes else {}),
            **({"problems": self.problems} if self.problems else {}),
        }


def _now() -> datetime:
    return datetime.now(UTC)


def _clock(dt: datetime | None) -> str:
    return dt.astimezone().strftime("%H:%M:%S.%f")[:-4] if dt else "-"


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def wait_for(predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """The stack's poll-with-deadline, failing as a drill error."""
    try:
        return wait_until(predicate, timeout_s=timeout_s, what=what, interval_s=interval_s)
    except StackError as e:
        raise DrillError(str(e)) from e


# ------------------------------------------------------------------------------------------ the alert


def alertmanager_body(alertname: str, *, labels: dict[str, str], annotations: dict[str, str] | None = None,
                      status: str = "firing", starts_at: datetime | None = None) -> dict[str, Any]:
    """The webhook body (version 4) Alertmanager sends for one alert of a group."""
    all_labels = {"alertname": alertname, "team": "ferrumdeck", "namespace": "ferrumdeck", **labels}
    fingerprint = hashlib.sha256(
        "\x1f".join(f"{k}={v}" for k, v in sorted(all_labels.items())).encode()).hexdigest()[:16]
    started = (starts_at or _now()).isoformat().replace("+00:00", "Z")
    alert = {
        "status": status, "labels": all_labels,
        "annotations": {"summary": f"{alertname} (sandbox drill)", **(annotations or {})},
        "startsAt": started, "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.sandbox/graph", "fingerprint": fingerprint,
    }
    return {
        "version": "4", "groupKey": f'{{}}/{{team="ferrumdeck"}}:{{alertname="{alertname}"}}',
        "truncatedAlerts": 0, "status": status, "receiver": "ferrumdeck-recovery",
        "groupLabels": {"alertname": alertname}, "commonLabels": all_labels,
        "commonAnnotations": alert["annotations"], "externalURL": "http://alertmanager.sandbox:9093",
        "alerts": [alert],
    }


def post_alert(stack: Any, alertname: str, *, labels: dict[str, str], annotations: dict[str, str] | None = None
               ) -> dict[str, Any]:
    """POST the alert to the stack's bridge as Alertmanager's webhook receiver would; the bridge's answer."""
    body = alertmanager_body(alertname, labels=labels, annotations=annotations)
    for attempt in range(5):  # like Alertmanager: a 5xx (Prefect busy) is retried with back-off
        r = httpx.post(f"{stack.bridge.url}/alertmanager", json=body, timeout=10,
                       headers={"Authorization": f"Bearer {stack.bridge_token}"})
        if r.status_code < 500:
            break
        time.sleep(0.5 * 2**attempt)  # back-off before the retry
    if r.status_code != 200:
        raise DrillError(f"the bridge refused {alertname}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


# ----------------------------------------------------------------------------------- Prefect (REST)


class FlowRuns:
    """The few Prefect API reads a drill needs: flow runs of a deployment, their state and typed result, events."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        from sandbox.stack import api_call

        r = api_call(method, f"{self.stack.api_url}{path}", **kwargs)
        if r.status_code >= 300:
            raise DrillError(f"Prefect API {method} {path}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()

    def ids(self, deployment: str) -> set[str]:
        dep = self.stack.deployments[deployment]
        body = {"flow_runs": {"deployment_id": {"any_": [dep]}}, "limit": 200, "sort": "EXPECTED_START_TIME_DESC"}
        return {r["id"] for r in self._json("POST", "/flow_runs/filter", json=body)}

    def created_after(self, after: datetime, deployment: str | None = None) -> list[dict[str, Any]]:
        """Deployment flow runs created after ``after`` (of ``deployment``, or of any), oldest first."""
        runs_filter: dict[str, Any] = {"deployment_id": {"is_null_": False}}
        if deployment is not None:
            runs_filter = {"deployment_id": {"any_": [self.stack.deployments[deployment]]}}
        body = {"flow_runs": runs_filter, "limit": 200, "sort": "EXPECTED_START_TIME_DESC"}
        runs = [r for r in self._json("POST", "/flow_runs/filter", json=body) if (_ts(r.get("created")) or after) > after]
        return sorted(runs, key=lambda r: r["created"])

    def read(self, run_id: str) -> dict[str, Any]:
        return self._json("GET", f"/flow_runs/{run_id}")

    def wait_new(self, deployment: str, *, known: set[str], timeout_s: float) -> str:
        """A run of ``deployment`` not in ``known`` (bench.alert_latency)."""
        new = wait_for(lambda: self.ids(deployment) - known, timeout_s=timeout_s, interval_s=0.2,
                       what=f"a flow run of {deployment}")
        return sorted(new)[0]

    def wait_created(self, deployment: str, *, after: datetime, pod: str | None, exclude: set[str],
                     timeout_s: float) -> dict[str, Any]:
        """The first run of ``deployment`` created after ``after`` (for ``pod``, when given) not in ``exclude``."""
        def found() -> dict[str, Any] | None:
            for run in self.created_after(after, deployment):
                if run["id"] not in exclude and (pod is None or (run.get("parameters") or {}).get("pod") == pod):
                    return run
            return None

        return wait_for(found, timeout_s=timeout_s, interval_s=0.2,
                        what=f"a flow run of {deployment}" + (f" for {pod}" if pod else ""))

    def wait_final(self, run_id: str, *, timeout_s: float, while_waiting: Callable[[], None] | None = None
                   ) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            if while_waiting is not None:
                while_waiting()
            run = self.read(run_id)
            return run if (run.get("state") or {}).get("type") in FINAL else None

        return wait_for(final, timeout_s=timeout_s, interval_s=0.25, what=f"flow run {run_id} to finish")

    def typed_result(self, run_id: str) -> tuple[Any, str]:
        """The run's returned value (a ``RecoveryResult``: a Failed run carries it too), or None and why not.

        The stack's runner persists flow results under its state directory (absolute paths): read from here."""
        from uuid import UUID

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        try:
            with temporary_settings(updates={PREFECT_API_URL: self.stack.api_url}):
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(UUID(run_id)).state
                if state is None:
                    return None, "the run has no state"
                for _ in range(len(FLOW_MODULES) + 1):
                    try:
                        value = state.result(raise_on_failure=False)
                        break
                    except ModuleNotFoundError as e:  # the runner loaded flows/x.py as module `x`
                        if not _alias_flow_module(e.name):
                            raise
        except Exception as e:  # noqa: BLE001 - an unreadable result is reported, not fatal
            return None, f"result not readable: {type(e).__name__}: {str(e)[:200]}"
        if isinstance(value, BaseException):
            return None, f"the run raised {type(value).__name__}: {str(value)[:200]}"
        if not hasattr(value, "outcome"):
            return None, f"the run returned {type(value).__name__}, not a RecoveryResult"
        return value, ""

    def first_event(self, *, names: Iterable[str], resource_id: str, since: datetime,
                    labels: dict[str, str] | None = None) -> dict[str, Any] | None:
        """The oldest event named one of ``names`` about ``resource_id`` since ``since`` (resource labels equal)."""
        body = {"filter": {"occurred": {"since": since.isoformat(), "until": (_now() + timedelta(minutes=1)).isoformat()},
                           "event": {"name": list(names)}, "resource": {"id": [resource_id]}, "order": "ASC"},
                "limit": 50}
        for event in self._json("POST", "/events/filter", json=body).get("events") or []:
            resource = event.get("resource") or {}
            if all(resource.get(f"ferrumdeck.label.{k}") == v for k, v in (labels or {}).items()):
                return event
        return None

    def close(self) -> None:
        """Nothing held open (each call is one request)."""


#: flows/<name>.py: a served deployment's entrypoint is loaded from its file as module ``<name>``, so its result
#: classes are pickled as ``<name>.<Class>``; the same classes are ``flows.<name>.<Class>`` here
FLOW_MODULES = frozenset(p.stem for p in (Path(__file__).resolve().parent.parent / "flows").glob("*.py")
                         if not p.stem.startswith("_"))


def _alias_flow_module(name: str | None) -> bool:
    """Make ``import <name>`` give ``flows.<name>`` (for unpickling a served run's result); False if not a flow."""
    import importlib
    import sys

    if name not in FLOW_MODULES or name in sys.modules:
        return False
    sys.modules[name] = importlib.import_module(f"flows.{name}")
    return True


def run_timeline(run: dict[str, Any], fired: datetime) -> dict[str, float | None]:
    """Seconds from ``fired`` (an alert POST) to the flow run's creation (event -> trigger), start and end."""
    def after(key: str) -> float | None:
        t = _ts(run.get(key))
        return round((t - fired).total_seconds(), 2) if t else None

    return {"created": after("created"), "started": after("start_time"), "ended": after("end_time")}


def failing_subflows(result: Any) -> list[str]:
    """Triage's subflows that ended failing (from its typed ``steps``); empty for other results."""
    return [f"{s.flow} {s.target}".strip() + f": {s.outcome.value if s.outcome else s.state}"
            for s in getattr(result, "steps", None) or [] if getattr(s, "failing", False)]


# ----------------------------------------------------------------------------------- the steps


def all_step_ids(stack: Any) -> set[str]:
    steps = tables(stack.flow_settings).steps
    with db_engine(stack.flow_settings).connect() as conn:
        return set(conn.execute(sa.select(steps.c.id)).scalars())


def step_rows(stack: Any, ids: Iterable[str]) -> dict[str, tuple[str, str | None, datetime | None, bool]]:
    """id -> (status, model, completed_at, error recorded) from the runs DB."""
    steps = tables(stack.flow_settings).steps
    ids = list(ids)
    out: dict[str, tuple[str, str | None, datetime | None, bool]] = {}
    with db_engine(stack.flow_settings).connect() as conn:
        for i in range(0, len(ids), CHUNK):
            q = sa.select(steps.c.id, steps.c.status, steps.c.model, steps.c.completed_at, steps.c.error).where(
                steps.c.id.in_(ids[i:i + CHUNK]))
            out.update({r.id: (r.status, r.model, r.completed_at, bool(r.error)) for r in conn.execute(q)})
    return out


def live_consumers(stack: Any) -> set[str]:
    """Consumers of workers that run and are not hung (the sandbox's own view of its workers)."""
    s = stack.flow_settings
    return {s.consumer_for_pod(p) for p in stack.services.pool.running()}


def _entry_step(fields: dict[str, str]) -> str:
    return fields.get("job_id") or fields.get("step_id") or ""


def _xrange_pages(client: Any, key: str, *, start: str = "-") -> Iterable[tuple[str, dict[str, str]]]:
    while True:
        page = client.xrange(key, min=start, max="+", count=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        start = "(" + page[-1][0]


def scan_queue(stack: Any, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Where the entries of ``wanted`` steps are, by a plain scan with redis-py (not the product's queue code):
    the group's pending list (owner, idle, deliveries), the undelivered tail of the stream, the DLQ.
    step id -> {"where": pending|queued|dlq, ...}; a step in none of them is absent. Pending wins over queued
    over dlq when a step has several copies (a copy still pending is what could be lost)."""
    s, client = stack.flow_settings, stack.services.redis
    found: dict[str, dict[str, Any]] = {}
    groups = {g["name"]: g for g in client.xinfo_groups(s.stream)} if client.exists(s.stream) else {}
    group = groups.get(s.group)
    if group is not None and wanted:
        start = "-"
        while True:
            page = client.xpending_range(s.stream, s.group, min=start, max="+", count=PAGE)
            if not page:
                break
            with client.pipeline(transaction=False) as pipe:
                for p in page:
                    pipe.xrange(s.stream, min=p["message_id"], max=p["message_id"], count=1)
                entries = pipe.execute()
            for p, got in zip(page, entries, strict=True):
                step = _entry_step(got[0][1]) if got else ""
                if step in wanted and step not in found:
                    found[step] = {"where": "pending", "consumer": p["consumer"],
                                   "idle_ms": int(p["time_since_delivered"]), "deliveries": int(p["times_delivered"])}
            if len(page) < PAGE:
                break
            start = "(" + page[-1]["message_id"]
    if group is not None and wanted - found.keys():
        last = group.get("last-delivered-id") or "0-0"
        for entry_id, fields in _xrange_pages(client, s.stream, start="-" if last == "0-0" else "(" + last):
            step = _entry_step(fields)
            if step in wanted and step not in found:
                found[step] = {"where": "queued", "entry_id": entry_id}
    if wanted - found.keys():
        for entry_id, fields in _xrange_pages(client, s.dlq_stream):
            step = _entry_step(fields)
            if step in wanted and step not in found:
                found[step] = {"where": "dlq", "entry_id": entry_id, "deliveries": fields.get("deliveries")}
    return found


def account(stack: Any, ids: Iterable[str]) -> Accounting:
    """Where each step ended (see the module docstring): one SELECT per 5 000 ids and a page-wise Redis scan."""
    ids = sorted(set(ids))
    rows = step_rows(stack, ids)
    acc = Accounting(total=len(ids))
    rest: set[str] = set()
    lost: list[str] = []
    for i in ids:
        status, _model, _at, has_error = rows.get(i, ("missing", None, None, False))
        if status == "completed":
            acc.completed += 1
        elif status == "failed" and has_error:
            acc.failed += 1
        elif status == "failed":
            lost.append(f"{i}: failed with no error recorded")
        else:
            rest.add(i)
    if rest:
        live = live_consumers(stack)
        where = scan_queue(stack, rest)
        for step_id in sorted(rest):
            loc = where.get(step_id)
            if loc is None:
                lost.append(f"{step_id}: nowhere (no entry pending, queued or dead-lettered)")
            elif loc["where"] == "dlq":
                acc.dead_lettered += 1
            elif loc["where"] == "queued":
                acc.queued += 1
            elif loc["consumer"] in live and loc["idle_ms"] < STALE_MS:
                acc.in_flight += 1
            else:
                why = "its consumer's worker is gone or hung" if loc["consumer"] not in live else \
                    f"delivered {loc['idle_ms'] // 1000} s ago"
                lost.append(f"{step_id}: pending under {loc['consumer']} ({why})")
    acc.lost = len(lost)
    acc.lost_samples = lost[:5]
    return acc


def settle(stack: Any, ids: set[str], *, timeout_s: float) -> Accounting:
    """Account ``ids`` once nothing of them is queued, in flight or unaccounted any more (or at the deadline).

    A step counted lost is looked at again until the deadline: the load generator writes a step's row a few
    milliseconds before its stream entry, so a step created right at the end is briefly "nowhere".
    """
    deadline = time.monotonic() + timeout_s
    while True:
        acc = account(stack, ids)
        if (acc.queued == 0 and acc.in_flight == 0 and acc.lost == 0) or time.monotonic() > deadline:
            return acc
        time.sleep(0.5)  # poll


def consumer_step_ids(stack: Any, consumer: str) -> list[str]:
    """The step ids a consumer holds (its pending entries' ``job_id``)."""
    s, client = stack.flow_settings, stack.services.redis
    pending = client.xpending_range(s.stream, s.group, min="-", max="+", count=10_000, consumername=consumer)
    pipe = client.pipeline(transaction=False)
    for p in pending:
        pipe.xrange(s.stream, min=p["message_id"], max=p["message_id"])
    return [entries[0][1].get("job_id", "") for entries in pipe.execute() if entries]


def orphaned_consumers(stack: Any) -> dict[str, int]:
    """Consumers holding pending entries whose pod no longer exists (nobody will ever acknowledge them)."""
    s, services = stack.flow_settings, stack.services
    pods = {s.consumer_for_pod(p["metadata"]["name"])
            for p in services.cluster.pods(namespace=s.namespace, selector=s.worker_selector)}
    return {c["name"]: c["pending"] for c in services.redis.xinfo_consumers(s.stream, s.group)
            if c["pending"] and c["name"] not in pods}


def dlq_since(at: datetime) -> str:
    """The first DLQ entry id at or after ``at`` (DLQ entry ids are their dead-letter times)."""
    return f"{int(at.timestamp() * 1000)}-0"


def dead_lettered(stack: Any, step_id: str, *, since: datetime) -> dict[str, Any] | None:
    """The DLQ entry of ``step_id`` dead-lettered since ``since`` (its fields), read with a plain XRANGE of that
    part of the DLQ stream (not its whole history); None if absent."""
    for _entry_id, fields in _xrange_pages(stack.services.redis, stack.flow_settings.dlq_stream,
                                           start=dlq_since(since)):
        if _entry_step(fields) == step_id:
            return fields
    return None


# ----------------------------------------------------------------------------------- the drill


class Drill:
    """One scenario being run: its clock, its detection path, its flow runs, its result."""

    def __init__(self, stack: Any, runs: FlowRuns, *, scenario: str, title: str, alert: str,
                 target_s: float | None, say: Callable[[str], None]) -> None:
        self.stack, self.runs, self.say = stack, runs, say
        self.services = stack.services
        self.detect = getattr(stack, "detect", "direct")
        self.result = DrillResult(scenario=scenario, title=title, alert=alert, target_s=target_s, detect=self.detect)
        self.before = all_step_ids(stack)
        self.t0 = 0.0
        self.fault_dt: datetime | None = None
        self._seen: set[str] = set()
        self._lookups: list[tuple[RunOutcome, str, tuple[str, ...]]] = []

    def fault(self) -> None:
        """Mark the moment the fault is injected (call right before injecting)."""
        self.t0 = time.monotonic()
        self.fault_dt = _now()
        self.result.fault_at = self.fault_dt.isoformat()

    def since(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def after(self, value: str | datetime | None) -> float | None:
        """Seconds from the fault to ``value`` (an API timestamp)."""
        t = _ts(value) if isinstance(value, str) or value is None else value
        assert self.fault_dt is not None
        return round((t - self.fault_dt).total_seconds(), 2) if t else None

    def path_for(self, alertname: str, watch: tuple[str, ...]) -> str:
        """The path that will see this fault: the stack's, or direct when that one cannot."""
        if self.detect == "watch" and watch:
            return "watch"
        if self.detect == "prometheus" and alertname in PROMETHEUS_ALERTS:
            return "prometheus"
        return "direct"

    def recover(self, alertname: str, deployment: str, *, labels: dict[str, str], pod: str | None = None,
                watch: tuple[str, ...] = (), role: str = "recovery", timeout_s: float = 180.0,
                detect_timeout_s: float = 120.0, while_waiting: Callable[[], None] | None = None) -> RunOutcome:
        """Let the detection path see the fault (or post the alert: direct), wait for the flow run of
        ``deployment`` (for ``pod``) it starts to finish, read its typed outcome and the first detection."""
        assert self.fault_dt is not None
        path = self.path_for(alertname, watch)
        if path == "direct":
            answer = post_alert(self.stack, alertname, labels=labels)
            if answer.get("events") != 1:
                raise DrillError(f"the bridge did not forward {alertname}: {answer}")
            self.say(f"    +{self.since():5.1f}s alert {alertname} {labels or ''} posted -> bridge -> Prefect event")
        else:
            self.say(f"    +{self.since():5.1f}s waiting for {path} to detect it "
                     f"({alertname if path == 'prometheus' else ' | '.join(watch)})")
        try:
            created = self.runs.wait_created(deployment, after=self.fault_dt, pod=pod, exclude=self._seen,
                                             timeout_s=30 if path == "direct" else detect_timeout_s)
        except DrillError as e:
            raise DrillError(f"{e} (detection: {path}{self._detection_state()})") from e
        self._seen.add(created["id"])
        run = self.runs.wait_final(created["id"], timeout_s=timeout_s, while_waiting=while_waiting)
        value, why = self.runs.typed_result(run["id"])
        out = RunOutcome(
            deployment=deployment, id=run["id"], name=run.get("name") or "", role=role, pod=pod,
            state=(run.get("state") or {}).get("name", ""), detected_by=path,
            outcome=str(value.outcome.value) if value is not None else None,
            cause=value.cause() if value is not None else why,
            failing_subflows=failing_subflows(value) if value is not None else [],
            created_s=self.after(run.get("created")), started_s=self.after(run.get("start_time")),
            ended_s=self.after(run.get("end_time")), end_time=run.get("end_time"),
        )
        self._lookups.append((out, alertname, watch))
        self.result.flow_runs.append(out)
        self.say(f"    +{self.since():5.1f}s flow run {out.label()} of {deployment} ({path}): created "
                 f"+{out.created_s}s, started +{out.started_s}s, ended +{out.ended_s}s")
        return out

    def _resolve_detections(self) -> None:
        """Each run's first detection event, read once the drill is over (Prefect stores events a few seconds
        after its triggers saw them; the time is the event's own ``occurred``, so reading late changes nothing)."""
        lookups, self._lookups = self._lookups, []
        for out, alertname, watch in lookups:
            event = self._first_detection(out.detected_by, alertname, pod=out.pod, watch=watch)
            if event is None:
                self.result.notes.append(f"no detection event found for {out.name} ({out.detected_by})")
                continue
            out.detect_s = self.after(event.get("occurred"))
            out.detection = f"{event.get('event')} {event.get('resource', {}).get('prefect.resource.id')}"
            payload = event.get("payload") or {}
            sender = str(payload.get("generatorURL") or payload.get("source") or "")
            out.detection_from = sender.split("/graph", 1)[0]

    def _first_detection(self, path: str, alertname: str, *, pod: str | None, watch: tuple[str, ...]
                         ) -> dict[str, Any] | None:
        """The first event of the detection in Prefect (events are stored a moment after the trigger saw them)."""
        assert self.fault_dt is not None
        if path == "watch":
            query = {"names": watch, "resource_id": f"ferrumdeck.pod.{pod}"}
        else:
            query = {"names": ["ferrumdeck.alert.firing"], "resource_id": f"ferrumdeck.alert.{alertname}",
                     "labels": {"pod": pod} if pod else None}
        deadline = time.monotonic() + 20
        while True:
            event = self.runs.first_event(since=self.fault_dt, **query)
            if event is not None or time.monotonic() > deadline:
                return event
            time.sleep(0.5)  # poll

    def _detection_state(self) -> str:
        """What the detection path shows right now, for a message when nothing was detected in time."""
        try:
            if self.detect == "prometheus" and getattr(self.stack, "observability", None) is not None:
                obs = self.stack.observability
                alerts = [f"{a['labels'].get('alertname')}:{a['state']}" for a in obs.alerts(state=None)
                          if a["labels"].get("alertname") != "FerrumDeckHeartbeat"]
                return f"; Prometheus alerts {alerts or 'none'}; problems {obs.problems() or 'none'}"
            if self.detect == "watch" and getattr(self.stack, "watcher", None) is not None:
                ok, health = self.stack.watcher.health()
                return f"; watcher healthy={ok} events={health.get('events')} sent={self.stack.watch_events.sent}"
        except Exception as e:  # noqa: BLE001 - only context for a message
            return f"; ({type(e).__name__} reading the detection path)"
        return ""

    def judge(self, run: RunOutcome) -> None:
        problem, note = judge(run)
        if problem:
            self.result.problems.append(problem)
        if note:
            self.result.notes.append(note)

    def recover_orphans(self) -> None:
        """Steps left pending under consumers whose pods are gone: the watcher's follow-up, or the drill's alert
        routed to triage."""
        orphans = orphaned_consumers(self.stack)
        if not orphans:
            return
        self.say(f"    +{self.since():5.1f}s steps pending under gone pods: {orphans}")
        self.result.checks["orphaned_consumers"] = orphans
        if self.detect == "watch":
            for consumer in sorted(orphans):
                pod = pod_of_consumer(consumer, consumer_for_pod=self.stack.flow_settings.consumer_for_pod)
                try:
                    # the watcher reports a deleted pod holding entries at once (unless a recovery of that pod
                    # is under way: then it waits for its re-emit interval; the drill does not)
                    run = self.recover("StepsPendingWithoutWorker", "worker-crash-recovery", labels={}, pod=pod,
                                       watch=GONE_EVENTS, role="follow-up", timeout_s=180, detect_timeout_s=30)
                except DrillError as e:
                    self.result.notes.append(f"the watcher did not recover {consumer}: {e}")
                    continue
                self.judge(run)
            if not orphaned_consumers(self.stack):
                return
        run = self.recover("StepsPendingWithoutWorker", "worker-failure-triage", labels={"severity": "warning"},
                           role="follow-up", timeout_s=180)
        self.judge(run)

    def post_check(self, *, timeout_s: float = 90.0) -> datetime:
        """Run ``post-recovery-check`` until it passes and nothing is pending under a gone pod; when it first did."""
        self.stack.heartbeat()
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            ok, last = post_recovery_check_once(self.stack)
            orphans = orphaned_consumers(self.stack)
            if ok and not orphans:
                self.say(f"    +{self.since():5.1f}s post-recovery-check passes")
                return _now()
            if time.monotonic() > deadline:
                raise DrillError(f"post-recovery-check still failing after {timeout_s:g} s: {last}"
                                 + (f"; pending under gone pods: {orphans}" if orphans else ""))
            time.sleep(0.5)  # poll

    def finish(self, healthy_at: datetime) -> DrillResult:
        """Timings from the recovery runs' typed outcomes; recovered = every recovery run green, one verified."""
        r = self.result
        assert self.fault_dt is not None
        r.recovered_at = healthy_at.isoformat()
        r.healthy_s = round((healthy_at - self.fault_dt).total_seconds(), 2)
        self._finish_runs()
        return r

    def _finish_runs(self) -> None:
        r = self.result
        self._resolve_detections()
        for run in r.recovery_runs():
            self.judge(run)
        summary = summarize(r.recovery_runs())
        r.problems += summary.pop("problems")
        for key, value in summary.items():
            setattr(r, key, value)

    def other_runs(self) -> None:
        """Every other deployment flow run created during the scenario (scheduled sweeps, a second detection)."""
        if self.fault_dt is None:
            return
        mine = {x.id for x in self.result.flow_runs}
        names = {v: k for k, v in self.stack.deployments.items()}
        for run in self.runs.created_after(self.fault_dt):
            if run["id"] in mine or (run.get("auto_scheduled") and not run.get("start_time")):
                continue  # ours, or a schedule's future run
            value, why = (self.runs.typed_result(run["id"]) if (run.get("state") or {}).get("type") in FINAL
                          else (None, "still running"))
            self.result.other_runs.append(RunOutcome(
                deployment=names.get(run.get("deployment_id"), "?"), id=run["id"], name=run.get("name") or "",
                role="other", state=(run.get("state") or {}).get("name", ""),
                outcome=str(value.outcome.value) if value is not None else None,
                cause=value.cause() if value is not None else why,
                pod=(run.get("parameters") or {}).get("pod"), created_s=self.after(run.get("created"))))


def judge(run: RunOutcome) -> tuple[str | None, str | None]:
    """Pure: (problem, note) for one flow run, by its typed outcome. A recovery must end green; a follow-up
    (triage) whose only failing subflow is its own post-recovery check is a note (that check may have run before
    the queue drained; the drill checks the system state itself), any other failing part is a problem."""
    if run.outcome is None:
        return f"{run.deployment} run {run.name} ended {run.state}: no typed result ({run.cause})", None
    if run.green:
        return None, None
    if run.role == "follow-up" and run.failing_subflows and all(f.startswith(POST_CHECK) for f in run.failing_subflows):
        return None, (f"{run.deployment} run {run.name} ended {run.state} ({run.outcome}): only its own {POST_CHECK} "
                      f"failed ({run.cause}); judged by the system state")
    failing = f"; failing: {', '.join(run.failing_subflows)}" if run.failing_subflows else ""
    return f"{run.deployment} run {run.name}: {run.outcome} ({run.cause}){failing}", None


def summarize(runs: list[RunOutcome]) -> dict[str, Any]:
    """Pure: a scenario's detection and timings from its recovery runs. Recovered = every run green and at least
    one verified (``recovered``); ``mttr_s`` = the last verified run's end; detection and start = the first's."""
    first = min(runs, key=lambda x: x.created_s if x.created_s is not None else float("inf"), default=None)
    detections = [x.detect_s for x in runs if x.detect_s is not None]
    starts = [x.started_s for x in runs if x.started_s is not None]
    verified = [x.ended_s for x in runs if x.verified and x.ended_s is not None]
    recovered = bool(runs) and all(x.green for x in runs) and bool(verified)
    problems = []
    if runs and not verified and all(x.green for x in runs):
        problems.append("no recovery run verified a recovery (every one had nothing to do)")
    return {
        "detected_by": first.detected_by if first else "", "detection": first.detection if first else "",
        "detect_s": min(detections) if detections else None, "start_s": min(starts) if starts else None,
        "mttr_s": max(verified) if recovered else None, "recovered": recovered, "problems": problems,
    }


def post_recovery_check_once(stack: Any) -> tuple[bool, str]:
    """One run of the ``post-recovery-check`` flow (in this process, against the stack); (passed, evidence)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.post_recovery_check import ALERTING, post_recovery_check
    from tasks.settings import use_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}), use_settings(stack.flow_settings):
        state = post_recovery_check(return_state=True)  # Failed (not_verified) until every check holds
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        return False, f"{type(result).__name__}: {result}"
    failing = "; ".join(f"{c.name}: {c.detail}" for c in result.failed_checks) or (result.error or "")
    return not result.outcome.failing and ALERTING not in result.open_items, failing  # all four ticked


# ----------------------------------------------------------------------------------- scenarios


def _burst_until_holding(d: Drill, n: int) -> str:
    """Enqueue bursts until one worker holds at least ``n`` unacknowledged steps; its pod."""
    from sandbox.services import SandboxError

    batch = n
    for _ in range(5):
        d.services.backlog(batch * 3, tool_every=4)
        try:
            return d.services.wait_for_holding(n, timeout_s=5)
        except SandboxError:
            continue
    raise DrillError(f"no worker held {n} steps after 5 bursts")


def _held_completed(d: Drill, pod: str, held_ids: list[str]) -> None:
    def done() -> bool:
        rows = step_rows(d.stack, held_ids)
        return all(rows.get(i, ("",))[0] == "completed" for i in held_ids)

    wait_for(done, timeout_s=60, what=f"the {len(held_ids)} steps {pod} held to complete elsewhere")
    d.result.checks["held_completed_by_others"] = len(held_ids)
    d.say(f"    +{d.since():5.1f}s all {len(held_ids)} held steps completed by other workers")


def _worker_pods(d: Drill) -> set[str]:
    s = d.stack.flow_settings
    return {p["metadata"]["name"] for p in d.services.cluster.pods(namespace=s.namespace, selector=s.worker_selector)}


def scenario_crash(d: Drill, *, held: int = 50) -> None:
    pod = _burst_until_holding(d, held)
    d.fault()
    d.services.crash(pod)
    consumer = d.stack.flow_settings.consumer_for_pod(pod)
    held_ids = consumer_step_ids(d.stack, consumer)
    d.result.checks["held_by_crashed_worker"] = len(held_ids)
    d.say(f"    +{d.since():5.1f}s fault: worker {pod} crashed holding {len(held_ids)} steps (crash-looping)")
    d.recover("WorkerCrashLooping", "worker-crash-recovery", labels={"pod": pod, "container": "worker"}, pod=pod,
              watch=CRASH_EVENTS)
    d.result.checks["crashed_pod_replaced"] = pod not in _worker_pods(d)
    if not d.result.checks["crashed_pod_replaced"]:
        d.result.problems.append(f"crashed pod {pod} still exists")
    _held_completed(d, pod, held_ids)
    d.recover_orphans()
    d.finish(d.post_check())


def scenario_hang(d: Drill) -> None:
    pod = _burst_until_holding(d, 20)
    d.fault()
    d.services.hang(pod)
    consumer = d.stack.flow_settings.consumer_for_pod(pod)
    held_ids = consumer_step_ids(d.stack, consumer)
    d.result.checks["held_by_hung_worker"] = len(held_ids)
    d.say(f"    +{d.since():5.1f}s fault: worker {pod} hung holding {len(held_ids)} steps (Ready, CPU ~0)")
    d.recover("WorkerHung", "worker-hang-recovery", labels={"pod": pod, "consumer": consumer}, pod=pod,
              watch=HUNG_EVENTS)
    gone = pod not in _worker_pods(d)
    d.result.checks["hung_pod_replaced"] = gone
    if not gone:
        d.result.problems.append(f"hung pod {pod} still exists")
    _held_completed(d, pod, held_ids)
    d.recover_orphans()
    d.finish(d.post_check())


def scenario_poison(d: Drill) -> None:
    seen = set(d.services.pool.crashed())
    d.fault()
    assert d.fault_dt is not None
    poison = d.services.poison(count=1)[0]
    d.say(f"    +{d.since():5.1f}s fault: poison step {poison.step_id} enqueued (crashes whichever worker takes it)")
    deadline = time.monotonic() + 240
    crashes = 0
    while True:
        entry = dead_lettered(d.stack, poison.step_id, since=d.fault_dt)
        if entry is not None:
            deliveries = int(entry["deliveries"]) if str(entry.get("deliveries") or "").isdigit() else None
            d.result.checks["poison_dead_lettered_after_deliveries"] = deliveries
            d.say(f"    +{d.since():5.1f}s poison step dead-lettered after {deliveries} deliveries")
            break
        new = sorted(set(d.services.pool.crashed()) - seen)
        if new:
            seen.add(new[0])
            crashes += 1
            d.recover("WorkerCrashLooping", "worker-crash-recovery", labels={"pod": new[0], "container": "worker"},
                      pod=new[0], watch=CRASH_EVENTS)
            continue
        if time.monotonic() > deadline:
            raise DrillError(f"poison step not dead-lettered after {crashes} crashes")
        time.sleep(0.1)  # poll
    d.result.checks["workers_crashed_by_poison"] = crashes
    if d.result.checks["poison_dead_lettered_after_deliveries"] != 3:
        d.result.problems.append("poison step not dead-lettered after exactly 3 deliveries")
    others = sorted({_entry_step(f) for _i, f in _xrange_pages(d.services.redis, d.stack.flow_settings.dlq_stream,
                                                                start=dlq_since(d.fault_dt))} - {poison.step_id})
    d.result.checks["other_steps_dead_lettered"] = len(others)
    if others:
        d.result.notes.append(f"{len(others)} other step(s) dead-lettered with the poison (delivered 3 times with it "
                              f"to the crashing workers): {', '.join(others[:5])}")
    d.recover_orphans()
    d.finish(d.post_check())


def scenario_llm_outage(d: Drill) -> None:
    from sandbox.llm import provider_of

    models = d.stack.flow_settings.llm_fallback_models
    primary, backup = models[0], models[1]
    provider = provider_of(primary)
    steps = tables(d.stack.flow_settings).steps
    engine = db_engine(d.stack.flow_settings)

    def count(model: str, status: str, after: datetime) -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(steps).where(
                steps.c.model == model, steps.c.status == status, steps.c.completed_at > after)).scalar_one())

    d.fault()
    d.services.llm_outage(provider)
    try:
        assert d.fault_dt is not None
        d.say(f"    +{d.since():5.1f}s fault: provider {provider} down (calls fail, status page major)")
        wait_for(lambda: count(primary, "failed", d.fault_dt) >= 3, timeout_s=30, what="LLM steps failing")
        run = d.recover("LLMProviderErrors", "llm-provider-failover", labels={"provider": provider, "model": primary})
        switched = _ts(run.end_time) or _now()
        d.result.checks["failover_s"] = run.ended_s
        wait_for(lambda: count(backup, "completed", switched) >= 5, timeout_s=60,
                 what=f"steps succeeding on {backup}")
        d.result.checks["backup_model"] = backup
        d.result.checks["steps_ok_on_backup_after_failover"] = count(backup, "completed", switched)
        d.result.checks["steps_failed_on_primary"] = count(primary, "failed", d.fault_dt)
        d.say(f"    +{d.since():5.1f}s steps succeed on {backup}")
        d.recover_orphans()
        d.finish(d.post_check())
    finally:
        d.services.llm_restore(provider)


def scenario_mcp_outage(d: Drill) -> None:
    url = d.stack.flow_settings.mcp_url
    steps = tables(d.stack.flow_settings).steps
    engine = db_engine(d.stack.flow_settings)

    def tool_steps(ids: list[str], status: str) -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(steps).where(
                steps.c.id.in_(ids), steps.c.kind == "tool", steps.c.status == status)).scalar_one())

    d.fault()
    d.services.mcp_outage()
    during = [s.step_id for s in d.services.backlog(20, tool_every=2)]  # the symptom: tool steps fail
    d.say(f"    +{d.since():5.1f}s fault: MCP server unhealthy ({url} fails, tool steps fail)")
    wait_for(lambda: tool_steps(during, "failed") >= 1, timeout_s=30, what="tool steps failing")
    d.recover("MCPServerDown", "mcp-server-recovery", labels={"deployment": "mcp-server"})
    healthy = httpx.get(url, timeout=5).status_code == 200
    d.result.checks["mcp_healthy_s"] = d.since() if healthy else None
    d.result.checks["tool_steps_failed_during_outage"] = tool_steps(during, "failed")
    if not healthy:
        d.result.problems.append("MCP /health still failing after the recovery")
    after = [s.step_id for s in d.services.backlog(10, payload={"kind": "tool"})]
    wait_for(lambda: tool_steps(after, "completed") == len(after), timeout_s=30,
             what="tool steps succeeding after the restart")
    d.result.checks["tool_steps_ok_after_restart"] = len(after)
    d.recover_orphans()
    d.finish(d.post_check())


def scenario_backlog(d: Drill, *, n: int = 10_000) -> None:
    s = d.stack.flow_settings
    before = len(d.services.ready_worker_pods())
    peak = {"workers": before}

    def watch() -> None:
        peak["workers"] = max(peak["workers"], len(d.services.ready_worker_pods()))

    d.fault()
    d.services.backlog(n)
    d.say(f"    +{d.since():5.1f}s fault: burst of {n} steps enqueued ({before} workers)")
    d.recover("QueueBacklog", "scale-workers", labels={"stream": s.stream, "group": s.group}, timeout_s=360,
              while_waiting=watch)
    after = wait_for(lambda: (n := len(d.services.ready_worker_pods())) <= before and n, timeout_s=60,
                     what="workers scaled back")
    d.result.checks.update({"workers_before": before, "workers_peak": peak["workers"], "workers_after": after,
                            "backlog": n})
    if peak["workers"] <= before:
        d.result.problems.append("workers were not scaled up")
    d.say(f"    +{d.since():5.1f}s scaled {before} -> {peak['workers']} -> {after} workers")
    d.recover_orphans()
    d.finish(d.post_check())


#: name -> (title, alert, runner)
SCENARIOS: dict[str, tuple[str, str, Callable[..., None]]] = {
    "crash": ("worker crash holding 50 in-flight steps", "WorkerCrashLooping", scenario_crash),
    "hang": ("worker hung (Ready, CPU ~0) holding steps", "WorkerHung", scenario_hang),
    "poison": ("poison step crashing each worker that takes it", "WorkerCrashLooping", scenario_poison),
    "llm_outage": ("LLM provider outage", "LLMProviderErrors", scenario_llm_outage),
    "mcp_outage": ("MCP server down", "MCPServerDown", scenario_mcp_outage),
    "backlog": ("backlog burst of 10 000 steps", "QueueBacklog", scenario_backlog),
}
#: MTTR targets (fault -> verified outcome), seconds, per detection path (2 cores): the issue's for the watcher
#: and Prometheus' demo profile, the earlier drills' for direct (the watcher falls back to direct for the LLM
#: and MCP outages). None: measured, no target.
TARGETS: dict[str, dict[str, float]] = {
    "direct": {"crash": 15.0, "hang": 30.0, "llm_outage": 30.0, "mcp_outage": 30.0},
    "watch": {"crash": 10.0, "hang": 20.0, "llm_outage": 30.0, "mcp_outage": 30.0},
    "prometheus": {"crash": 20.0},
}
SHORT = ["crash", "poison", "mcp_outage"]


def run_drill(stack: Any, name: str, *, say: Callable[[str], None] = print, settle_s: float = 30.0,
              **kwargs: Any) -> DrillResult:
    """Run one scenario on the stack; never raises for a failed drill (the result says what went wrong)."""
    title, alert, runner = SCENARIOS[name]
    runs = FlowRuns(stack)
    target = TARGETS.get(getattr(stack, "detect", "direct"), {}).get(name)
    d = Drill(stack, runs, scenario=name, title=title, alert=alert, target_s=target, say=say)
    say(f"[{name}] {title} (detection: {d.detect})")
    try:
        runner(d, **kwargs)
    except DrillError as e:
        d.result.problems.append(str(e))
        d._finish_runs()
        d.result.recovered = False  # the drill's own checks did not hold (the runs' timings are kept)
        say(f"    FAILED: {e}")
    finally:
        runs.close()
    try:
        d.other_runs()
    except DrillError as e:
        d.result.notes.append(f"other flow runs not read: {e}")
    ids = all_step_ids(stack) - d.before
    d.result.steps = settle(stack, ids, timeout_s=settle_s)
    r = d.result
    say(f"    steps_total {r.steps.total} completed {r.steps.completed} failed {r.steps.failed} "
        f"dead_lettered {r.steps.dead_lettered} queued/in-flight {r.steps.queued + r.steps.in_flight} "
        f"steps_lost {r.steps.lost}" + (f" {r.steps.lost_samples}" if r.steps.lost_samples else ""))
    say(f"    detected by {r.detected_by or '-'} +{r.detect_s}s, recovery started +{r.start_s}s, "
        f"verified ({r.outcome_text()}) +{r.mttr_s}s, healthy +{r.healthy_s}s")
    for note in r.notes:
        say(f"    note: {note}")
    return r


def run_drills(stack: Any, names: list[str], *, say: Callable[[str], None] = print,
               options: dict[str, dict[str, Any]] | None = None) -> list[DrillResult]:
    """Run the named scenarios one after the other."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    started = time.monotonic()
    ok, evidence = post_recovery_check_once(stack)  # warms the in-process flow engine; the baseline
    say(f"baseline post-recovery-check: {'passes' if ok else 'FAILING: ' + evidence} "
        f"({time.monotonic() - started:.1f} s)")
    return [run_drill(stack, n, say=say, **(options or {}).get(n, {})) for n in names]


def _num(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def table(results: list[DrillResult]) -> str:
    """The demo's summary table (plain text, fixed columns)."""
    head = ["scenario", "fault injected", "detected by", "detect s", "start s", "MTTR s", "healthy s",
            "recovery outcome", "steps lost", "dead-lettered"]
    rows = []
    for r in results:
        fault = datetime.fromisoformat(r.fault_at) if r.fault_at else None
        rows.append([r.scenario, _clock(fault), r.detected_by or "-", _num(r.detect_s), _num(r.start_s),
                     _num(r.mttr_s) if r.recovered else "NOT RECOVERED", _num(r.healthy_s), r.outcome_text(),
                     str(r.steps.lost), str(r.steps.dead_lettered)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(out)


def _rule_condition_s(alert: str, expr: str, stuck_after_s: float) -> float:
    """How long the fault must last before the rule's expression is true at all (its own threshold in time)."""
    from sandbox.observability import parse_duration

    numbers = [float(n) for n in re.findall(r">\s*([\d.]+)", expr)]
    if alert == "WorkerHung":  # the consumer idle longer than the first threshold
        return numbers[0]
    if alert == "QueueBacklog":  # the group this far behind
        return numbers[-1]
    if alert == "LLMProviderErrors":  # from all-ok to all-failing, the error ratio over the window passes the threshold
        window = parse_duration(re.findall(r"\[(\w+)\]", expr)[0])
        return window * numbers[0]
    if alert == "RunsStuck":
        return stuck_after_s
    return 0.0  # the state is in the next scrape (CrashLoopBackOff, a failed probe, no available replica)


def detection_bounds(profile: Any = None) -> dict[str, dict[str, float]]:
    """Worst case, per alert of the rules file under ``profile`` (default: production, the file as it is):
    seconds from the fault to the alert at the bridge = the rule's own threshold time + one scrape interval +
    one evaluation interval + its ``for:`` + Alertmanager's ``group_wait`` (deployments/prometheus/*.yaml)."""
    import yaml

    from sandbox.observability import ALERTMANAGER_CONFIG, PRODUCTION, RULES, parse_duration, profile_rules

    profile = profile or PRODUCTION
    rules = yaml.safe_load(profile_rules(RULES.read_text(), profile))
    routes = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["route"].get("routes") or []
    alerts_route = next(r for r in routes if not any("Heartbeat" in m for m in r.get("matchers") or []))
    group_wait = (profile.group_wait_s if profile.group_wait_s is not None
                  else parse_duration(str(alerts_route.get("group_wait", "30s"))))
    out: dict[str, dict[str, float]] = {}
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r and "for" in r):
        parts = {"condition_s": _rule_condition_s(rule["alert"], rule["expr"], profile.stuck_after_s),
                 "scrape_s": profile.scrape_interval_s, "evaluation_s": profile.evaluation_interval_s,
                 "for_s": parse_duration(str(rule["for"])), "group_wait_s": group_wait}
        out[rule["alert"]] = {**parts, "bound_s": round(sum(parts.values()), 2)}
    return out


def median_rows(runs: list[list[DrillResult]]) -> dict[str, dict[str, Any]]:
    """Per scenario over several runs: the median of each timing (runs that recovered), the worst steps_lost,
    how many runs recovered."""
    by: dict[str, list[DrillResult]] = {}
    for results in runs:
        for r in results:
            by.setdefault(r.scenario, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in by.items():
        row: dict[str, Any] = {"runs": len(rs), "recovered": sum(r.recovered for r in rs),
                               "detected_by": sorted({r.detected_by for r in rs if r.detected_by})}
        for key in ("detect_s", "start_s", "mttr_s", "healthy_s"):
            values = [getattr(r, key) for r in rs if getattr(r, key) is not None]
            row[key] = round(statistics.median(values), 2) if values else None
            row[f"{key}_all"] = [getattr(r, key) for r in rs]
        row["steps_lost_max"] = max(r.steps.lost for r in rs)
        row["steps_dead_lettered"] = [r.steps.dead_lettered for r in rs]
        out[name] = row
    return out
