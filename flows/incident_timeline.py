"""`incident-timeline`: one incident, in order, from the Prefect API — for the on-call engineer and the postmortem.

For a window (or a triage flow run: from ``lookback_minutes`` before it started to its end) it reads, bounded,
our ``ferrumdeck.*`` events (alerts, the direct watcher's, the recoveries' own) and the runs of our flows with
their states and typed results (never their reports), and assembles (pure, ``tasks.timeline``): alerts,
watcher events, each run's decisions, actions, verifications and outcome, linked to their flow runs in the UI;
MTTR (first alert or watcher event -> the last verified outcome); steps requeued / dead-lettered / runs failed;
root-cause hints that pre-fill the checklist's "Root cause documented" for a person to confirm. Published as
the keyed report `incident-timeline` and written as a markdown file to paste into a postmortem. Read-only: its
outcome is ``nothing_to_do``; a file it could not write is a failed check (the run ends Failed, after its report).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from prefect import flow, task
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from flows._ui import LoggedResult, describe_parameters, keep_typed_name
from flows.post_recovery_check import FLOW_NAME as POST_CHECK
from flows.post_recovery_check import PREVENTION, ROOT_CAUSE
from tasks.correlate import ChecklistItem
from tasks.errors import RETRY
from tasks.outcome import Outcome, RecoveryResult, Table
from tasks.report import artifact_key, conclude, recording, scrub
from tasks.timeline import (
    Reads,
    SeenRun,
    StepCounts,
    Timeline,
    TimelineError,
    assemble,
    checklist_rows,
    default_directory,
    default_path,
    entry_rows,
    postmortem_markdown,
    read_events,
    read_results,
    read_run,
    read_runs,
    run_link,
    run_rows,
    summary_rows,
    ui_url_from,
    window_of,
)

FLOW_NAME = "incident-timeline"
TRIAGE = "worker-failure-triage"
UMBRELLA = {TRIAGE}  # flows whose actions are other flows' runs (counted with those)
WRITTEN = "postmortem markdown written"


def _run_name() -> str:
    about = flow_run.parameters.get("flow_run_id")
    return f"incident timeline of {about}" if about else "incident timeline"


class TimelineSummary(BaseModel):
    """What a caller (triage) keeps of a timeline run: where to read it and its one-line summary."""

    flow_run_id: str | None = None
    link: str | None = None
    outcome: Outcome | None = None
    markdown_path: str | None = None
    artifact_key: str = FLOW_NAME
    mttr_s: float | None = None
    counts: StepCounts | None = None
    summary: str = ""


class IncidentTimeline(LoggedResult):
    """One incident's timeline (what was read and assembled) and where its postmortem file is."""

    about_flow_run_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    timeline: Timeline | None = None
    checklist: list[ChecklistItem] = Field(default_factory=list)
    markdown_path: str | None = None


def our_flows() -> tuple[list[str], set[str]]:
    """The flows of ``prefect.yaml`` (a deployment and its flow share a name) but this one, and the scheduled ones."""
    from deployments.serve import read_deployment_specs

    specs = read_deployment_specs()
    return [s["name"] for s in specs if s["name"] != FLOW_NAME], {s["name"] for s in specs if s.get("schedules")}


def prefill_checklist(*, results: dict[str, RecoveryResult], runs: list[SeenRun], hints: list[str]
                      ) -> list[ChecklistItem]:
    """Pure: the post-recovery checklist of the latest check run in the window (its ticks and evidence), with
    "Root cause documented" pre-filled from the hints — still for a person to confirm, never ticked here."""
    checks = [results[r.id] for r in sorted(runs, key=lambda r: r.at) if r.flow == POST_CHECK and r.id in results]
    items = [i.model_copy() for i in getattr(checks[-1], "items", [])] if checks else []
    proposed = ("proposed, confirm: " + "; ".join(hints[:3])) if hints else "no hint found: write it down"
    root = ChecklistItem(item=ROOT_CAUSE, ok=None, evidence=proposed)
    items = [root if i.item == ROOT_CAUSE and not i.ok else i for i in items]
    if not any(i.item == ROOT_CAUSE for i in items):
        items.append(root)
    if not any(i.item == PREVENTION for i in items):
        items.append(ChecklistItem(item=PREVENTION, ok=None, evidence="open: for a person"))
    return items


def add_notes(result: IncidentTimeline, t: Timeline) -> None:
    """The report's tables: the incident in numbers, the timeline, the runs, gaps, hints and the checklist."""
    result.note("observed", Table(caption="Incident", rows=summary_rows(t)))
    result.note("observed", Table(caption="Timeline", rows=entry_rows(t)))
    result.note("observed", Table(caption="Flow runs", rows=run_rows(t)))
    if t.quiet:
        result.note("observed", "Runs with nothing to do (not listed): "
                    + ", ".join(f"{f} ×{n}" for f, n in sorted(t.quiet.items())) + ".")
    for gap in t.truncated + t.unreadable[:5] + ([f"… and {len(t.unreadable) - 5} more runs"] if len(t.unreadable) > 5
                                                 else []):
        result.note("observed", f"Gap: {gap}.")
    result.note("decided", Table(caption="Root cause (proposed: confirm)", rows=[{"hint": h} for h in t.hints]))
    result.note("decided", Table(caption="Post-recovery checklist", rows=checklist_rows(result.checklist)))


def _utc(at: datetime | None) -> datetime | None:
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


UUID_OR_EMPTY = r"^([0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12})?$"


def parse_when(text: str | None, *, name: str) -> datetime | None:
    """Pure: a form's time text (ISO 8601; naive = UTC) as a datetime, None when empty; a bad one is a clear
    error naming the field."""
    if not text or not text.strip():
        return None
    try:
        return _utc(TypeAdapter(datetime).validate_python(text.strip()))
    except ValidationError:
        raise TimelineError(f"{name}: {text!r} is not a time (ISO 8601, e.g. 2026-12-05T03:10 or "
                            f"2026-12-05 03:10:00+00:00)") from None


def pick_window(*, about: SeenRun | None, since: datetime | None, until: datetime | None, minutes: int,
                lookback_minutes: int, now: datetime) -> tuple[datetime, datetime]:
    """Pure: the window — given ``since``/``until`` (naive = UTC) win; else a run's (``lookback_minutes`` before
    it to its end), else the last ``minutes``. An empty window is an error."""
    start, end = (window_of(about, lookback=timedelta(minutes=lookback_minutes), now=now) if about is not None
                  else (None, now))
    until = _utc(until) or end
    since = _utc(since) or start or until - timedelta(minutes=minutes)
    if since >= until:
        raise TimelineError(f"the window is empty: since {since:%Y-%m-%d %H:%M:%S} is not before until "
                            f"{until:%Y-%m-%d %H:%M:%S}")
    return since, until


@task(name="write-postmortem", **RETRY)
def write_postmortem(*, path: Path, text: str) -> int:
    """Write the postmortem markdown (directories created) and read it back: the bytes on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return len(path.read_bytes())


def summarize(state: Any) -> TimelineSummary:
    """What a caller keeps of a finished timeline run (from its typed result, never its report)."""
    run_id = str(state.state_details.flow_run_id)
    out = TimelineSummary(flow_run_id=run_id, link=run_link(ui_url_from(ui_url=PREFECT_UI_URL.value(),
                                                                        api_url=PREFECT_API_URL.value()), run_id))
    value = state.result(raise_on_failure=False)
    if isinstance(value, IncidentTimeline):
        out.outcome, out.markdown_path = value.outcome, value.markdown_path
        if value.timeline is not None:
            t = value.timeline
            out.mttr_s, out.counts, out.summary = t.mttr_s, t.counts, t.summary()
        else:
            out.summary = scrub(value.cause())
    else:
        out.summary = f"{type(value).__name__}: {scrub(str(value))[:300]}"
    return out


@flow(name=FLOW_NAME, flow_run_name=keep_typed_name(_run_name))
@describe_parameters
def incident_timeline(
    flow_run_id: Annotated[str | None, Field(
        pattern=UUID_OR_EMPTY, title="Flow run id", description="A triage (or any recovery) flow run's id: the "
        "window is that run, from 'Look back before the run' to its end; empty: a window.")] = None,
    since: Annotated[str | None, Field(max_length=40, title="Window start (UTC)", description="ISO time, e.g. "
                                       "2026-12-05T03:10 (UTC unless it says otherwise); empty: 'Window' before "
                                       "its end.")] = None,
    until: Annotated[str | None, Field(max_length=40, title="Window end (UTC)", description="ISO time; empty: now, "
                                       "or the run's end.")] = None,
    minutes: Annotated[int, Field(ge=1, le=10_080, title="Window (min)",
                                  description="Window length without a start or a run.")] = 60,
    lookback_minutes: Annotated[int, Field(
        ge=0, le=1440, title="Look back before the run (min)",
        description="With a flow run id: how long before the run began to look for its alerts.")] = 15,
    max_events: Annotated[int, Field(ge=1, le=5000, title="Max events (events)",
                                     description="At most this many events read (oldest first).")] = 500,
    max_runs: Annotated[int, Field(ge=1, le=2000, title="Max flow runs (runs)",
                                   description="At most this many flow runs read (oldest first).")] = 300,
    path: Annotated[str | None, Field(max_length=1000, title="Postmortem file", description="Markdown file to "
                                      "write; empty: incident-<start>.md in FD_TIMELINE_DIR (else "
                                      "PREFECT_HOME/incidents).")] = None,
) -> IncidentTimeline:
    """Assemble one incident from the Prefect API, in order, with MTTR, counts and root-cause hints (read-only)."""
    now, ui = datetime.now(UTC), ui_url_from(ui_url=PREFECT_UI_URL.value(), api_url=PREFECT_API_URL.value())
    about_id = flow_run_id or None
    with recording(IncidentTimeline(flow=FLOW_NAME, title="Incident timeline", about_flow_run_id=about_id)) as result:
        # observe: the window, then (bounded) events, runs and their typed results
        about = read_run(flow_run_id=UUID(about_id)) if about_id else None
        result.since, result.until = since, until = pick_window(
            about=about, since=parse_when(since, name="since"), until=parse_when(until, name="until"),
            minutes=minutes, lookback_minutes=lookback_minutes, now=now)
        result.title = (f"Incident timeline of {about.flow} {about.name}" if about else
                        f"Incident timeline {since:%Y-%m-%d %H:%M} – {until:%Y-%m-%d %H:%M} UTC")
        names, scheduled = our_flows()
        events, total = read_events(since=since, until=until, max_events=max_events)
        runs, more = read_runs(since=since, until=until, flow_names=names, max_runs=max_runs)
        results, unreadable = read_results(runs=runs)
        # decide (pure): the timeline, and the checklist pre-filled for a person
        reads = Reads(events_read=len(events), events_total=total, runs_read=len(runs), runs_more=more,
                      max_events=max_events, max_runs=max_runs)
        result.timeline = t = assemble(since=since, until=until, runs=runs, results=results, events=events,
                                       reads=reads, scheduled=scheduled, umbrella=UMBRELLA, unreadable=unreadable,
                                       ui_url=ui)
        result.checklist = prefill_checklist(results=results, runs=runs, hints=t.hints)
        add_notes(result, t)
        # write the postmortem file, and verify it is on disk
        target = Path(path).expanduser() if path else default_path(directory=default_directory(), since=since,
                                                                    until=until, flow_run_id=about_id)
        me = run_link(ui, flow_run.get_id() or "")
        text = postmortem_markdown(t, title=result.title, checklist=result.checklist,
                                   generated_by=f"[{FLOW_NAME}]({me})" if me else f"`{FLOW_NAME}`")
        try:
            size = write_postmortem(path=target, text=text)
        except OSError as e:
            result.check(WRITTEN, False, f"{target}: {type(e).__name__}: {e.strerror or e}")
        else:
            result.markdown_path = str(target.resolve())
            result.check(WRITTEN, size > 0, f"{result.markdown_path} ({size} bytes)")
            result.note("decided", f"Postmortem markdown: `{result.markdown_path}` (report `{artifact_key(FLOW_NAME)}`).")
    return conclude(result)
