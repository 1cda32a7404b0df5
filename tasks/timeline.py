"""The incident timeline: what the Prefect API knows of one incident, put in order (``incident-timeline``).

Reads (bounded, each a @task): our ``ferrumdeck.*`` events in a window — alerts from the bridge
(``ferrumdeck.alert.*``), the direct watcher's (``ferrumdeck.pod|consumer|mcp|queue.*``), the recoveries' own
(``ferrumdeck.recovery.*``, with a per-run outcome event when one is emitted) — at most ``max_events``, oldest
first; the flow runs of our flows (the deployments of ``prefect.yaml``, subflows included) that started in the
window, at most ``max_runs``; and each run's typed ``RecoveryResult`` when it is readable (the run persisted
its result: ``PREFECT_RESULTS_PERSIST_BY_DEFAULT``, storage this process can read). Keyed markdown artifacts
are never parsed. A run whose result is not readable is still placed, from its state, its related
``ferrumdeck.recovery.*`` events and, for a triage subflow, the step triage recorded.

Assembly (pure, tested without I/O): one chronological list of entries — alerts, watcher events, each run's
start, decisions, actions, verifications and outcome, with UI links —, runs that had nothing to do collapsed
to counts, steps requeued / dead-lettered / runs failed from the typed results' action counts (from the
events' payloads for a run without one), MTTR (first alert or watcher event -> the last verified outcome,
none while a recovery's last run is failing), root-cause hints (crash classifications, poison entries, a
failing LLM model, ...) and the post-mortem markdown an SRE pastes into a postmortem.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import task
from pydantic import BaseModel, Field

from tasks.correlate import ChecklistItem
from tasks.errors import RETRY, RecoveryError
from tasks.outcome import ActionStatus, Outcome, RecoveryResult
from tasks.report import markdown_table, scrub

EVENT_PREFIX = "ferrumdeck."
ALERT_PREFIX = "ferrumdeck.alert."
RECOVERY_PREFIX = "ferrumdeck.recovery."
WATCHER_PREFIXES = ("ferrumdeck.pod.", "ferrumdeck.consumer.", "ferrumdeck.mcp.", "ferrumdeck.queue.")
EVENTS_PAGE = 50  # the Prefect API's largest page of events
RUNS_PAGE = 200  # PREFECT_SERVER_API_DEFAULT_LIMIT, the largest page of flow runs
PER_RUN = 10  # at most this many actions and this many checks of one run in the timeline (the rest counted)
TEXT = 200  # longest free text in one timeline cell
HINT = 400  # longest root-cause hint
DIRECTORY_ENV = "FD_TIMELINE_DIR"
NOT_PERSISTED = "no persisted result (PREFECT_RESULTS_PERSIST_BY_DEFAULT is off for it): placed from its state and events"
#: flows/<name>.py loaded as module ``<name>`` by a runner: the classes its results were pickled as
FLOW_MODULES = frozenset(p.stem for p in (Path(__file__).resolve().parent.parent / "flows").glob("*.py")
                         if not p.stem.startswith("_"))


class TimelineError(RecoveryError):
    """The Prefect API could not be read (temporary when the connection or the server failed)."""


class Kind(StrEnum):
    """What one timeline entry is."""

    ALERT = "alert"
    WATCHER = "watcher"
    RUN = "run started"
    DECISION = "decision"
    ACTION = "action"
    EVENT = "event"
    VERIFICATION = "verification"
    OUTCOME = "outcome"


_ORDER = {Kind.ALERT: 0, Kind.WATCHER: 0, Kind.RUN: 1, Kind.DECISION: 2, Kind.ACTION: 3, Kind.EVENT: 3,
          Kind.VERIFICATION: 4, Kind.OUTCOME: 5}


# ------------------------------------------------------------------------------------------ what was read


class SeenEvent(BaseModel):
    """One ``ferrumdeck.*`` event (repeats of the same event about the same subject folded into ``repeats``)."""

    id: str
    occurred: datetime
    name: str
    resource_id: str
    subject: str = ""
    text: str = ""
    source: str = ""
    flow_run_id: str | None = Field(None, description="The flow run it is related to (emitted inside it).")
    payload: dict[str, Any] = Field(default_factory=dict)
    repeats: int = 1
    last: datetime | None = None

    @property
    def kind(self) -> Kind:
        if self.name.startswith(ALERT_PREFIX):
            return Kind.ALERT
        if self.name.startswith(WATCHER_PREFIXES) or self.source == "watcher":
            return Kind.WATCHER
        return Kind.EVENT

    @property
    def outcome(self) -> Outcome | None:
        """The typed outcome a per-run outcome event carries (``payload.outcome``), if it is one."""
        value = self.payload.get("outcome")
        return Outcome(value) if value in {o.value for o in Outcome} else None


class SeenRun(BaseModel):
    """One flow run of our flows, as the API has it."""

    id: str
    name: str
    flow: str
    state: str = Field(description="Prefect state type, lower case (completed, failed, crashed, running, ...).")
    state_message: str = ""
    started: datetime | None = None
    ended: datetime | None = None
    started_by: str = ""
    persisted: bool = Field(False, description="Its final state carries a persisted result to read.")

    @property
    def at(self) -> datetime:
        return self.started or datetime.min.replace(tzinfo=UTC)


class Reads(BaseModel):
    """How much was read, and whether a cap cut it short."""

    events_read: int = 0
    events_total: int = 0
    runs_read: int = 0
    runs_more: bool = False
    max_events: int = 0
    max_runs: int = 0

    def truncation(self) -> list[str]:
        """Pure: one sentence per cap that cut the reading short."""
        out = []
        if self.events_total > self.events_read:
            out.append(f"events: read the first {self.events_read} of {self.events_total} in the window "
                       f"(max_events={self.max_events}); later ones are not shown: narrow the window")
        if self.runs_more:
            out.append(f"flow runs: read the first {self.runs_read} (max_runs={self.max_runs}); later ones are "
                       "not shown: narrow the window")
        return out


# ------------------------------------------------------------------------------------------ what is shown


class Entry(BaseModel):
    """One line of the timeline."""

    at: datetime
    kind: Kind
    what: str
    subject: str = ""
    flow_run_id: str | None = None
    run_name: str = ""
    link: str | None = None


class RunLine(BaseModel):
    """One flow run in the incident: how it ended and what it did."""

    flow_run_id: str
    flow: str
    name: str
    state: str
    outcome: Outcome | None = Field(None, description="Its typed outcome; None when no result was readable.")
    typed: bool = Field(False, description="The outcome and actions come from its typed result.")
    started: datetime | None = None
    ended: datetime | None = None
    actions: int = 0
    cause: str = ""
    link: str | None = None

    @property
    def verified(self) -> bool:
        return self.outcome is Outcome.RECOVERED


class StepCounts(BaseModel):
    """What the recoveries did to steps and runs (done, not previews), and where the numbers come from."""

    requeued: int = 0
    dead_lettered: int = 0
    runs_failed: int = 0
    steps_retried: int = 0
    replayed: int = 0
    actions_failed: int = 0
    from_results: int = Field(0, description="Runs counted from their typed results' actions.")
    from_events: int = Field(0, description="Runs counted from their ferrumdeck.recovery.* events' payloads.")

    def add(self, other: StepCounts) -> None:
        for name in StepCounts.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Timeline(BaseModel):
    """One incident, in order: entries, runs, counts, MTTR and the root-cause hints."""

    since: datetime
    until: datetime
    entries: list[Entry] = Field(default_factory=list)
    runs: list[RunLine] = Field(default_factory=list)
    quiet: dict[str, int] = Field(default_factory=dict, description="Flow -> runs with nothing to do (not listed).")
    counts: StepCounts = Field(default_factory=StepCounts)
    first_signal_at: datetime | None = None
    first_signal: str = ""
    recovered_at: datetime | None = None
    mttr_s: float | None = Field(None, description="First alert/watcher event -> the last verified outcome.")
    unresolved: list[str] = Field(default_factory=list, description="Recoveries whose last run is not green.")
    hints: list[str] = Field(default_factory=list, description="Root-cause hints for a person to confirm.")
    truncated: list[str] = Field(default_factory=list)
    unreadable: list[str] = Field(default_factory=list, description="Runs whose typed result could not be read.")
    events_read: int = 0

    def summary(self) -> str:
        """One line: MTTR (or why none) and the step counts."""
        if self.mttr_s is not None:
            head = f"MTTR {format_duration(self.mttr_s)}"
        elif self.unresolved:
            head = f"not recovered: {'; '.join(self.unresolved[:2])}"
        else:
            head = "no verified recovery"
        c = self.counts
        return (f"{head}; {len(self.runs)} runs, {c.requeued} steps requeued, {c.dead_lettered} dead-lettered, "
                f"{c.runs_failed} runs failed" + (f", {c.actions_failed} actions failed" if c.actions_failed else ""))


# ------------------------------------------------------------------------------------------ pure helpers


def format_duration(seconds: float) -> str:
    """Pure: 75.3 -> '1 min 15 s'; 4.2 -> '4.2 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _short(text: Any, limit: int = TEXT) -> str:
    one = scrub(" ".join(str(text or "").split()))
    return one if len(one) <= limit else one[: limit - 1] + "…"


def run_link(ui_url: str | None, flow_run_id: str) -> str | None:
    """Pure: the Prefect UI page of a flow run."""
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui_url else None


def event_link(ui_url: str | None, event: SeenEvent) -> str | None:
    """Pure: the Prefect UI page of an event."""
    return f"{ui_url.rstrip('/')}/events/event/{event.occurred:%Y-%m-%d}/{event.id}" if ui_url else None


def ui_url_from(*, ui_url: str | None, api_url: str | None) -> str | None:
    """Pure: the UI's base URL — PREFECT_UI_URL, else the API URL without its ``/api``."""
    if ui_url:
        return ui_url.rstrip("/")
    if api_url:
        return api_url.rstrip("/").removesuffix("/api")
    return None


_KEEP = ("outcome", "cause", "reason", "from", "to", "requeued", "dead_lettered", "done", "failed", "retried",
         "found", "code", "pod", "consumer", "condition", "evict", "detail")


def seen_event(event: Any) -> SeenEvent:
    """Pure: the parts of a Prefect ``ReceivedEvent`` the timeline uses (a few payload keys, no more)."""
    payload = event.payload if isinstance(event.payload, dict) else {}
    labels = payload.get("labels") if isinstance(payload.get("labels"), dict) else {}
    annotations = payload.get("annotations") if isinstance(payload.get("annotations"), dict) else {}
    resource = event.resource
    subject = labels.get("pod") or resource.get("ferrumdeck.label.pod") or resource.get("prefect.resource.name") \
        or resource.id.removeprefix("ferrumdeck.")
    flow_run = next((r.id.rpartition(".")[2] for r in event.related
                     if r.role == "flow-run" or r.id.startswith("prefect.flow-run.")), None)
    kept = {k: payload[k] for k in _KEEP if k in payload}
    if labels:
        kept["labels"] = {k: v for k, v in labels.items() if k in ("alertname", "pod", "severity", "model")}
    return SeenEvent(
        id=str(event.id), occurred=event.occurred, name=event.event, resource_id=resource.id, subject=str(subject),
        text=_short(payload.get("detail") or annotations.get("summary") or annotations.get("description") or ""),
        source=str(resource.get("ferrumdeck.source") or payload.get("source") or ""), flow_run_id=flow_run,
        payload=kept,
    )


def seen_run(run: Any, *, flow: str) -> SeenRun:
    """Pure: the parts of a Prefect ``FlowRun`` the timeline uses."""
    state = run.state
    by = getattr(run, "created_by", None)
    return SeenRun(
        id=str(run.id), name=run.name, flow=flow,
        state=state.type.value.lower() if state else "unknown",
        state_message=_short(state.message if state else ""),
        started=run.start_time, ended=run.end_time,
        started_by=f"{by.type.lower()} {by.display_value}".strip() if by and by.display_value else "",
        persisted=bool(state is not None and state.is_final() and state.data is not None),
    )


def fold_repeats(events: Sequence[SeenEvent]) -> list[SeenEvent]:
    """Pure: events of the same name about the same subject (the watcher re-emits while a condition lasts,
    an alert re-fires) folded into the first, with a count and the last time; the recoveries' own events and
    those of different flow runs are kept apart."""
    out: list[SeenEvent] = []
    open_: dict[tuple[str, str], SeenEvent] = {}
    for e in sorted(events, key=lambda e: e.occurred):
        key = (e.name, e.resource_id)
        first = open_.get(key)
        if first is not None and e.kind is not Kind.EVENT:
            first.repeats += 1
            first.last = e.occurred
            continue
        copy = e.model_copy()
        out.append(copy)
        if e.kind is not Kind.EVENT:
            open_[key] = copy
    return out


# ------------------------------------------------------------------------------------------ typed results


def _items(result: RecoveryResult, *names: str) -> list[Any]:
    """The per-target records of a typed result (``targets`` of a crash, ``workers`` of a hang)."""
    out: list[Any] = []
    for name in names:
        value = getattr(result, name, None)
        if isinstance(value, list):
            out += [v for v in value if isinstance(v, BaseModel)]
    return out


def counts_from_result(result: RecoveryResult) -> StepCounts:
    """Pure: steps and runs a typed result changed, from its actions' counts (previews and refusals are not
    counts); a crash/hang recovery's per-worker records split its ``recover-entries`` and ``settle-runs``."""
    c = StepCounts(from_results=1)
    done = [a for a in result.actions if a.status is ActionStatus.DONE]
    c.actions_failed = sum(1 for a in result.actions if a.status is ActionStatus.FAILED)
    per_worker = [w for w in _items(result, "targets", "workers") if hasattr(w, "requeued")]
    if per_worker and not result.dry_run:
        c.requeued = sum(int(getattr(w, "requeued", 0) or 0) for w in per_worker)
        c.dead_lettered = sum(int(getattr(w, "dead_lettered", 0) or 0) for w in per_worker)
        c.runs_failed = sum(len(getattr(w, "runs_failed", None) or []) for w in per_worker)
        c.steps_retried = sum(len(getattr(w, "runs_retried", None) or []) for w in per_worker)
    for a in done:
        n = 1 if a.count is None else a.count
        if a.kind in ("recover-entries", "settle-runs") and per_worker:
            continue
        if a.kind in ("requeue", "claim", "recover-entries"):
            c.requeued += n
        elif a.kind == "dead-letter":
            c.dead_lettered += n
        elif a.kind in ("fail-runs", "fail-stuck-runs", "fail-run", "settle-runs"):
            c.runs_failed += n
        elif a.kind in ("retry-steps", "retry-step"):
            c.steps_retried += n
        elif a.kind == "replay":
            c.replayed += n
    return c


def _n(value: Any) -> int:
    if isinstance(value, list):
        return len(value)
    return int(value) if isinstance(value, int) else 0


def counts_from_events(events: Iterable[SeenEvent]) -> StepCounts:
    """Pure: the same counts from one run's ``ferrumdeck.recovery.*`` events, for a run whose result is not
    readable (``entries-recovered``, ``queue-sweep``, ``run-failed``, ``stuck-runs-swept``, ``dlq-replay``)."""
    c = StepCounts(from_events=1)
    for e in events:
        action = e.name.removeprefix(RECOVERY_PREFIX)
        p = e.payload
        done = p.get("done") if isinstance(p.get("done"), dict) else {}
        if action == "entries-recovered":
            c.requeued += _n(p.get("requeued"))
            c.dead_lettered += _n(p.get("dead_lettered"))
        elif action == "queue-sweep":
            c.requeued += _n(done.get("requeued")) + _n(done.get("claimed"))
            c.dead_lettered += _n(done.get("dead_lettered"))
        elif action == "run-failed":
            c.runs_failed += 1
        elif action == "stuck-runs-swept":
            c.runs_failed += _n(p.get("failed"))
            c.steps_retried += _n(p.get("retried"))
        elif action == "dlq-replay":
            c.replayed += _n(done.get("replayed"))
    return c


def hints_from_result(result: RecoveryResult) -> list[str]:
    """Pure: root-cause hints a typed result carries: crash classifications and their likely cause, poison
    entries, hung workers' evidence, a failing LLM model, an unhealthy MCP server, stuck runs."""
    out: list[str] = []
    for t in _items(result, "targets"):
        if getattr(t, "root_cause", None) is not None:
            out.append(f"worker {t.pod} {getattr(t, 'cause', '')}: {t.root_cause}")
            if getattr(t, "poison", None):
                out.append(f"poison entr{'y' if len(t.poison) == 1 else 'ies'} {', '.join(t.poison)} from {t.pod} "
                           "dead-lettered: look at what that step does")
    for w in _items(result, "workers"):
        if getattr(w, "evidence", None):
            out.append(f"worker {w.pod} hung: {w.evidence}")
    decision = getattr(result, "decision", None)
    if decision in ("failover", "no-fallback") and getattr(result, "current", None):
        switched = f"; switched to {result.target}" if getattr(result, "switched", False) else ""
        out.append(f"LLM model {result.current} failing: {result.reason}{switched}")
    if getattr(result, "healthy_before", None) is False:
        out.append("MCP server unhealthy" + (" until its restart" if getattr(result, "restarted", False) else ""))
    if getattr(result, "found", 0) and isinstance(getattr(result, "failed", None), list):
        out.append(f"{result.found} runs stuck in `running`")
    return [_short(h, HINT) for h in out]


def hints_from_events(events: Iterable[SeenEvent]) -> list[str]:
    """Pure: hints from events: what the watcher saw, a poison entry's cause, an alert's summary."""
    out: list[str] = []
    for e in events:
        if e.kind is Kind.WATCHER:
            seen = f"{e.subject} {e.name.rpartition('.')[2]}"
            out.append(f"watcher: {seen}" + (f" ({e.text})" if e.text and e.text != seen else ""))
        elif e.name == f"{RECOVERY_PREFIX}poison-dead-lettered" and e.payload.get("cause"):
            out.append(f"poison entry {e.subject.removeprefix('entry.')}: {e.payload['cause']}")
        elif e.kind is Kind.ALERT and e.name.endswith(".firing") and e.text:
            out.append(f"alert: {e.text}")
    return [_short(h, HINT) for h in out]


def _dedupe(items: Iterable[str], limit: int) -> list[str]:
    seen: list[str] = []
    for i in items:
        if i and i not in seen:
            seen.append(i)
    return seen[:limit]


def steps_of_triage(results: dict[str, RecoveryResult]) -> dict[str, Any]:
    """Pure: flow run id -> the step a triage run recorded for it (its outcome, cause and actions), to stand
    in for a subflow whose own result is not readable."""
    out: dict[str, Any] = {}
    for r in results.values():
        for s in getattr(r, "steps", None) or []:
            if getattr(s, "flow_run_id", None):
                out[s.flow_run_id] = s
    return out


# ------------------------------------------------------------------------------------------ assembly


def _is_quiet(run: SeenRun, result: RecoveryResult | None, events: list[SeenEvent], scheduled: set[str]) -> bool:
    """Nothing happened in it: a typed run with no action and no check that had nothing to do, or an untyped
    completed run of a scheduled sweep that emitted nothing."""
    if run.state != "completed":
        return False
    if result is not None:
        return not result.actions and not result.checks and result.outcome is Outcome.NOTHING_TO_DO
    return run.flow in scheduled and not events


def _run_entries(run: SeenRun, line: RunLine, result: RecoveryResult | None, step: Any, run_events: list[SeenEvent],
                 *, link: str | None) -> list[Entry]:
    """The entries of one run: started, decisions, actions, verifications (typed), its events (untyped), outcome."""
    base = {"flow_run_id": run.id, "run_name": run.name, "link": link}
    start, end = run.at, run.ended or run.at
    by = f", started by {run.started_by}" if run.started_by else ""
    out = [Entry(at=start, kind=Kind.RUN, what=f"{run.flow} started: {_short(run.name, 80)}{by}", subject=run.flow,
                 **base)]
    actions = list(result.actions) if result is not None else list(getattr(step, "actions", None) or [])
    if result is not None:
        for block in [b for b in result.decided if isinstance(b, str)][:3]:
            out.append(Entry(at=start, kind=Kind.DECISION, what=_short(block), subject=run.flow, **base))
        plan = getattr(result, "plan", None) or []
        if plan:
            out.append(Entry(at=start, kind=Kind.DECISION, subject=run.flow, **base,
                             what="plan: " + " -> ".join(getattr(p, "flow", "?") for p in plan)))
        if result.blocked:
            out.append(Entry(at=start, kind=Kind.DECISION, what=f"blocked: {_short(result.blocked)}", subject=run.flow,
                             **base))
    for a in actions[:PER_RUN]:
        count = f" ({a.count})" if a.count is not None else ""
        detail = f": {_short(a.detail, 120)}" if a.detail else ""
        out.append(Entry(at=start, kind=Kind.ACTION, what=f"{a.kind} {a.status.value}{count}{detail}", subject=a.target,
                         **base))
    if len(actions) > PER_RUN:
        out.append(Entry(at=start, kind=Kind.ACTION, what=f"… and {len(actions) - PER_RUN} more actions",
                         subject=run.flow, **base))
    if result is None:  # the run's own events say what it did
        for e in run_events:
            if e.outcome is None:
                out.append(Entry(at=e.occurred, kind=Kind.EVENT, what=_event_text(e), subject=e.subject, **base))
    checks = list(result.checks) if result is not None else []
    for c in checks[:PER_RUN]:
        mark = "✅" if c.ok else "❌"
        out.append(Entry(at=end, kind=Kind.VERIFICATION, what=f"{mark} {c.name}" + (f": {_short(c.detail, 120)}" if c.detail
                                                                                      else ""),
                         subject=c.target or run.flow, **base))
    if len(checks) > PER_RUN:
        out.append(Entry(at=end, kind=Kind.VERIFICATION, what=f"… and {len(checks) - PER_RUN} more checks",
                         subject=run.flow, **base))
    if run.ended is not None or run.state not in ("running", "pending"):
        outcome = line.outcome.value if line.outcome else f"state {run.state}"
        cause = f" — {line.cause}" if line.cause and line.outcome is not Outcome.RECOVERED else ""
        out.append(Entry(at=end, kind=Kind.OUTCOME, what=f"{run.flow}: {outcome}{cause}", subject=run.flow, **base))
    return out


def _event_text(e: SeenEvent) -> str:
    repeats = f" ×{e.repeats} until {e.last:%H:%M:%S}" if e.repeats > 1 and e.last else ""
    if e.kind is Kind.ALERT:
        alertname = e.resource_id.removeprefix(ALERT_PREFIX)
        status = e.name.removeprefix(ALERT_PREFIX)
        return f"{alertname} {status}" + (f": {e.text}" if e.text else "") + repeats
    return e.name.removeprefix(EVENT_PREFIX) + (f": {e.text}" if e.text else "") + repeats


def _line(run: SeenRun, result: RecoveryResult | None, step: Any, run_events: list[SeenEvent], link: str | None
          ) -> RunLine:
    line = RunLine(flow_run_id=run.id, flow=run.flow, name=run.name, state=run.state, started=run.started,
                   ended=run.ended, link=link)
    if result is not None:
        line.typed, line.outcome, line.actions = True, result.outcome, len(result.actions)
        line.cause = "" if result.outcome in (Outcome.RECOVERED, Outcome.NOTHING_TO_DO) else _short(result.cause())
        return line
    if step is not None and getattr(step, "outcome", None) is not None:  # the step triage recorded for it
        line.outcome, line.cause, line.actions = step.outcome, _short(step.cause), len(step.actions or [])
        return line
    told = [e.outcome for e in run_events if e.outcome is not None]
    if told:  # a per-run outcome event
        line.outcome = told[-1]
    elif run.state == "completed" and any(e.name.startswith(RECOVERY_PREFIX) for e in run_events):
        line.outcome = Outcome.RECOVERED  # Completed (green) after its recovery events: it acted and verified
    line.cause = run.state_message if run.state != "completed" else ""
    return line


def _green(line: RunLine) -> bool:
    if line.outcome is not None:
        return not line.outcome.failing
    return line.state == "completed"


def mttr(*, first_signal_at: datetime | None, lines: Sequence[RunLine], results: dict[str, RecoveryResult],
         umbrella: set[str]) -> tuple[datetime | None, list[str]]:
    """Pure: when the incident was last verified recovered, and what is still not green.

    A run is a verified recovery when its outcome is ``recovered``, or a read-only check (``nothing_to_do``)
    whose checks all held. Unresolved: any recovery (umbrella flows such as triage aside) whose last run ended
    failing, or is still running. No recovered time while anything is unresolved."""
    last: dict[str, RunLine] = {}
    for line in sorted(lines, key=lambda x: (x.ended or datetime.max.replace(tzinfo=UTC))):
        if line.flow not in umbrella:
            last[line.flow] = line
    unresolved = [f"{f}: {ln.outcome.value if ln.outcome else ln.state}" + (f" ({ln.cause})" if ln.cause else "")
                  for f, ln in sorted(last.items()) if ln.ended is None or not _green(ln)]
    verified = []
    for line in lines:
        r = results.get(line.flow_run_id)
        checked = bool(line.outcome is Outcome.NOTHING_TO_DO and r is not None and r.checks
                       and all(c.ok for c in r.checks))
        if line.ended and (line.verified or checked) and (first_signal_at is None or line.ended >= first_signal_at):
            verified.append(line.ended)
    if unresolved or not verified:
        return None, unresolved
    return max(verified), unresolved


def assemble(
    *,
    since: datetime,
    until: datetime,
    runs: Sequence[SeenRun],
    results: dict[str, RecoveryResult],
    events: Sequence[SeenEvent],
    reads: Reads,
    ui_url: str | None,
    scheduled: set[str],
    umbrella: set[str],
    unreadable: dict[str, str] | None = None,
) -> Timeline:
    """Pure: the incident from what was read — entries in time order, runs (quiet ones counted), counts, MTTR,
    hints. ``results``: flow run id -> typed result (only the readable ones)."""
    folded = fold_repeats(events)
    by_run: dict[str, list[SeenEvent]] = {}
    for e in folded:
        if e.flow_run_id:
            by_run.setdefault(e.flow_run_id, []).append(e)
    steps = steps_of_triage(results)
    t = Timeline(since=since, until=until, truncated=reads.truncation(), events_read=reads.events_read)
    hints: list[str] = []
    for run in sorted(runs, key=lambda r: r.at):
        result, run_events = results.get(run.id), by_run.get(run.id, [])
        if _is_quiet(run, result, run_events, scheduled):
            t.quiet[run.flow] = t.quiet.get(run.flow, 0) + 1
            continue
        link = run_link(ui_url, run.id)
        step = steps.get(run.id) if result is None else None
        line = _line(run, result, step, run_events, link)
        t.runs.append(line)
        t.entries += _run_entries(run, line, result, step, run_events, link=link)
        if result is not None:
            hints += hints_from_result(result)
        elif run.state in ("completed", "failed"):
            t.unreadable.append(f"{run.flow} {run.name}: " + ((unreadable or {}).get(run.id) or NOT_PERSISTED))
        if run.flow in umbrella:  # triage's actions are its subflows', counted with them
            continue
        if result is not None:
            t.counts.add(counts_from_result(result))
        elif step is not None and getattr(step, "actions", None):
            t.counts.add(counts_from_result(RecoveryResult(flow=run.flow, title=run.name, actions=step.actions)))
        elif any(e.name.startswith(RECOVERY_PREFIX) and e.outcome is None for e in run_events):
            t.counts.add(counts_from_events(run_events))
    known = {r.id for r in runs}
    for e in folded:
        if e.flow_run_id in known:
            continue  # placed with its run
        t.entries.append(Entry(at=e.occurred, kind=e.kind, what=_event_text(e), subject=e.subject,
                               link=event_link(ui_url, e)))
    t.entries.sort(key=lambda x: (x.at, _ORDER[x.kind]))
    signals = [e for e in folded if e.kind in (Kind.ALERT, Kind.WATCHER) and not e.name.endswith(".resolved")]
    if signals:
        t.first_signal_at, t.first_signal = signals[0].occurred, _event_text(signals[0])
    t.recovered_at, t.unresolved = mttr(first_signal_at=t.first_signal_at, lines=t.runs, results=results,
                                        umbrella=umbrella)
    start = t.first_signal_at or min((r.started for r in t.runs if r.started), default=None)
    if t.recovered_at is not None and start is not None:
        t.mttr_s = round((t.recovered_at - start).total_seconds(), 1)
        if t.first_signal_at is None:
            t.first_signal = "no alert or watcher event in the window: measured from the first recovery run's start"
    told = [e for e in folded if e.flow_run_id not in results]  # a typed result says it better
    t.hints = _dedupe(hints + hints_from_events(told), 10)
    return t


# ------------------------------------------------------------------------------------------ rendering (rows)


def _when(at: datetime | None) -> str:
    return f"{at.astimezone(UTC):%H:%M:%S}" if at else ""


def _linked(text: str, link: str | None) -> str:
    return f"[{text}]({link})" if link else text


def entry_rows(t: Timeline) -> list[dict[str, Any]]:
    """Pure: the timeline as table rows (time UTC, seconds since the first signal, kind, what, subject, run)."""
    zero = t.first_signal_at
    rows = []
    for e in t.entries:
        rows.append({"time (UTC)": _when(e.at), "T+": f"{(e.at - zero).total_seconds():.0f} s" if zero else "",
                     "kind": e.kind.value, "what": e.what, "subject": e.subject,
                     "link": _linked("run" if e.flow_run_id else "event", e.link) if e.link else ""})
    return rows


def _outcome_text(r: RunLine) -> str:
    if r.outcome is None:
        return "in progress" if r.ended is None else "unknown (no typed result)"
    return r.outcome.value + ("" if r.typed else " (from its state and events)")


def run_rows(t: Timeline) -> list[dict[str, Any]]:
    """Pure: one row per flow run listed (quiet ones are counted elsewhere)."""
    return [{"flow": r.flow, "run": _linked(r.name, r.link), "state": r.state,
             "outcome": _outcome_text(r),
             "started": _when(r.started), "ended": _when(r.ended),
             "duration": format_duration((r.ended - r.started).total_seconds()) if r.started and r.ended else "",
             "actions": r.actions, "cause": r.cause} for r in t.runs]


def summary_rows(t: Timeline) -> list[dict[str, Any]]:
    """Pure: the incident in a few numbers."""
    c = t.counts
    rows = [
        {"": "window (UTC)", "value": f"{t.since:%Y-%m-%d %H:%M:%S} -> {t.until:%Y-%m-%d %H:%M:%S}"},
        {"": "first signal", "value": f"{_when(t.first_signal_at)} {t.first_signal}".strip() or "none in the window"},
        {"": "last verified recovery", "value": _when(t.recovered_at) or "none"},
        {"": "MTTR", "value": format_duration(t.mttr_s) if t.mttr_s is not None else "n/a"},
        {"": "steps requeued", "value": c.requeued},
        {"": "steps dead-lettered", "value": c.dead_lettered},
        {"": "runs failed (WORKER_TIMEOUT)", "value": c.runs_failed},
        {"": "steps retried", "value": c.steps_retried},
        {"": "DLQ entries replayed", "value": c.replayed},
        {"": "recovery actions failed", "value": c.actions_failed},
        {"": "flow runs", "value": f"{len(t.runs)} listed" + (f", {sum(t.quiet.values())} with nothing to do" if t.quiet else "")},
        {"": "events read", "value": t.events_read},
        {"": "counts from", "value": f"{c.from_results} typed results, {c.from_events} runs' events"},
    ]
    if t.unresolved:
        rows.insert(4, {"": "not recovered", "value": "; ".join(t.unresolved)})
    return rows


def checklist_rows(items: Sequence[ChecklistItem]) -> list[dict[str, Any]]:
    """Pure: the post-recovery checklist: ticked, failing, or for a person."""
    status = {True: "✅ ticked", False: "❌ failing", None: "☐ to confirm"}
    return [{"item": i.item, "status": status[i.ok], "evidence": i.evidence} for i in items]


def postmortem_markdown(t: Timeline, *, title: str, checklist: Sequence[ChecklistItem], generated_by: str = "") -> str:
    """Pure: the document an SRE pastes into a postmortem: summary, impact, root cause to confirm, timeline,
    flow runs, checklist (every entry: no 50-row cap)."""
    limit = max(len(t.entries), len(t.runs), 1)
    parts = [f"# {scrub(title)}", ""]
    if generated_by:
        parts += [f"_Assembled from the Prefect API by {scrub(generated_by)}; confirm what is marked to confirm._", ""]
    parts += ["## Summary", "", markdown_table(summary_rows(t)), ""]
    if t.truncated or t.unreadable:
        parts += ["## Gaps", ""] + [f"- {scrub(x)}" for x in t.truncated + t.unreadable] + [""]
    parts += ["## Root cause (proposed: confirm)", ""]
    parts += [f"- {scrub(h)}" for h in t.hints] or ["- no hint found in the results or events: write it down"]
    parts += ["", "## Timeline", "", markdown_table(entry_rows(t), limit=limit), ""]
    if t.quiet:
        parts += ["Runs with nothing to do (not listed): " + ", ".join(f"{f} ×{n}" for f, n in sorted(t.quiet.items())), ""]
    parts += ["## Flow runs", "", markdown_table(run_rows(t), limit=limit), ""]
    parts += ["## Post-recovery checklist", "", markdown_table(checklist_rows(checklist)), ""]
    return "\n".join(parts)


def default_path(*, directory: str, since: datetime, until: datetime, flow_run_id: str | None) -> Path:
    """Pure: where the postmortem file goes when no path is given: ``<directory>/incident-<since>-<run or until>.md``."""
    name = f"incident-{since.astimezone(UTC):%Y%m%dT%H%M%SZ}" + (f"-{flow_run_id[:8]}" if flow_run_id else
                                                                 f"-{until.astimezone(UTC):%H%M%SZ}")
    return Path(directory).expanduser() / f"{name}.md"


def default_directory() -> str:
    """Where postmortem files go by default: ``FD_TIMELINE_DIR``, else ``incidents`` under ``PREFECT_HOME``."""
    from prefect.settings import PREFECT_HOME

    return os.environ.get(DIRECTORY_ENV) or str(Path(PREFECT_HOME.value()) / "incidents")


# ------------------------------------------------------------------------------------------ Prefect API reads


def _api_error(what: str, e: Exception) -> TimelineError:
    import httpx

    status = getattr(getattr(e, "response", None), "status_code", None)
    temporary = isinstance(e, httpx.TransportError) or (status is not None and (status >= 500 or status == 429))
    return TimelineError(f"Prefect API: {what}: {type(e).__name__}: {str(e)[:200]}", temporary=temporary,
                         status=status)


@task(name="read-incident-events", **RETRY)
def read_events(*, since: datetime, until: datetime, max_events: int) -> tuple[list[SeenEvent], int]:
    """Our ``ferrumdeck.*`` events in the window, oldest first, at most ``max_events`` (pages of 50); and how
    many the window holds."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventOrder

    flt = EventFilter(occurred=EventOccurredFilter(since=since, until=until), event=EventNameFilter(prefix=[EVENT_PREFIX]),
                      order=EventOrder.ASC)
    out: list[SeenEvent] = []
    try:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=flt, limit=min(EVENTS_PAGE, max_events))
            total = page.total
            while True:
                out += [seen_event(e) for e in page.events[: max_events - len(out)]]
                if len(out) >= max_events or page.next_page is None or not page.events:
                    break
                page = client.read_events_page(str(page.next_page))
    except Exception as e:  # noqa: BLE001 - classified: temporary (retried) or not
        raise _api_error("reading events", e) from e
    return out, max(total, len(out))


@task(name="read-incident-runs", **RETRY)
def read_runs(*, since: datetime, until: datetime, flow_names: Sequence[str], max_runs: int) -> tuple[list[SeenRun], bool]:
    """Flow runs of ``flow_names`` (deployed or subflows) that started in the window, oldest first, at most
    ``max_runs``; and whether more started in it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterId,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    try:
        with get_client(sync_client=True) as client:
            flows = client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=list(flow_names))))
            names = {f.id: f.name for f in flows}
            if not names:
                return [], False
            ours = FlowFilter(id=FlowFilterId(any_=list(names)))
            flt = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since, before_=until))
            runs: list[Any] = []
            while len(runs) <= max_runs:
                page = client.read_flow_runs(flow_filter=ours, flow_run_filter=flt, sort=FlowRunSort.START_TIME_ASC,
                                             limit=min(RUNS_PAGE, max_runs + 1 - len(runs)), offset=len(runs))
                runs += page
                if len(page) < RUNS_PAGE:
                    break
    except Exception as e:  # noqa: BLE001 - classified: temporary (retried) or not
        raise _api_error("reading flow runs", e) from e
    return [seen_run(r, flow=names[r.flow_id]) for r in runs[:max_runs]], len(runs) > max_runs


@task(name="read-flow-run", **RETRY)
def read_run(*, flow_run_id: UUID) -> SeenRun:
    """One flow run (the triage run a timeline is about)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            flow = client.read_flow(run.flow_id)
    except ObjectNotFound:
        raise TimelineError(f"no flow run {flow_run_id}") from None
    except Exception as e:  # noqa: BLE001 - classified: temporary (retried) or not
        raise _api_error(f"reading flow run {flow_run_id}", e) from e
    return seen_run(run, flow=flow.name)


def _alias_flow_module(name: str | None) -> bool:
    """Make ``import <name>`` give ``flows.<name>``: a runner loads ``flows/<name>.py`` as module ``<name>``, so
    its results are pickled as ``<name>.<Class>``. False when ``name`` is not one of our flow modules."""
    if name not in FLOW_MODULES or name in sys.modules:
        return False
    sys.modules[name] = importlib.import_module(f"flows.{name}")
    return True


@task(name="read-typed-results", **RETRY)
def read_results(*, runs: Sequence[SeenRun]) -> tuple[dict[str, RecoveryResult], dict[str, str]]:
    """The typed ``RecoveryResult`` of every finished run that persisted one (a Failed run carries it too),
    and why not for each run that did but could not be read: one API read per page of runs, one storage read
    per result."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    results: dict[str, RecoveryResult] = {}
    why: dict[str, str] = {}
    wanted = [UUID(r.id) for r in runs if r.persisted]
    states: list[tuple[str, Any]] = []
    try:
        with get_client(sync_client=True) as client:
            for i in range(0, len(wanted), RUNS_PAGE):
                page = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=wanted[i:i + RUNS_PAGE])),
                                             limit=RUNS_PAGE)
                states += [(str(r.id), r.state) for r in page]
    except Exception as e:  # noqa: BLE001 - classified: temporary (retried) or not
        raise _api_error("reading flow run states", e) from e
    for run_id, state in states:
        try:
            value = _result_of(state)
        except Exception as e:  # noqa: BLE001 - an unreadable result is reported, not fatal
            why[run_id] = f"result not readable: {type(e).__name__}: {_short(e, 160)}"
            continue
        if isinstance(value, RecoveryResult):
            results[run_id] = value
        else:
            why[run_id] = f"returned {type(value).__name__}, not a RecoveryResult"
    return results, why


def _result_of(state: Any) -> Any:
    """A final state's result, importing a served flow module under the name its result was pickled with."""
    for _ in range(len(FLOW_MODULES) + 1):
        try:
            return state.result(raise_on_failure=False)
        except ModuleNotFoundError as e:
            if not _alias_flow_module(e.name):
                raise
    raise TimelineError("result not readable: too many flow modules to alias")


def window_of(run: SeenRun, *, lookback: timedelta, now: datetime) -> tuple[datetime, datetime]:
    """Pure: the window of a triage (or any) run: ``lookback`` before it started (the alert that started it) to
    its end (now, while it runs)."""
    start = run.started or now
    return start - lookback, (run.ended or now)
