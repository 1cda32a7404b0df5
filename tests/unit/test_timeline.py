"""The incident timeline's pure assembly: order, links, quiet runs, counts, MTTR, hints, fallbacks, the file."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.events.schemas.events import ReceivedEvent

from flows.incident_timeline import FLOW_NAME, our_flows, parse_when, pick_window, prefill_checklist
from flows.mcp_recovery import McpRecovery
from flows.post_recovery_check import PostRecoveryCheck
from flows.queue_sweep import QueueSweep
from flows.triage import StepResult, TriageResult
from flows.worker_crash import CrashedWorker, CrashRecovery
from tasks.correlate import ChecklistItem
from tasks.kube_diagnosis import Classification
from tasks.outcome import ActionStatus, Outcome
from tasks.timeline import (
    NOT_PERSISTED,
    Kind,
    Reads,
    RunLine,
    SeenEvent,
    SeenRun,
    TimelineError,
    assemble,
    counts_from_events,
    counts_from_result,
    default_path,
    entry_rows,
    fold_repeats,
    mttr,
    postmortem_markdown,
    seen_event,
    ui_url_from,
    window_of,
)

T0 = datetime(2026, 11, 27, 21, 0, tzinfo=UTC)
UI = "http://prefect.example"
SCHEDULED = {"queue-sweep", "stuck-runs-sweep", "llm-provider-failback"}
UMBRELLA = {"worker-failure-triage"}


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def run(flow: str, start: float, end: float | None, *, state: str = "completed", persisted: bool = True) -> SeenRun:
    return SeenRun(id=str(uuid.uuid4()), name=f"{flow}-run", flow=flow, state=state, started=at(start),
                   ended=at(end) if end is not None else None, persisted=persisted)


def event(name: str, s: float, *, subject: str = "", run_id: str | None = None, payload: dict | None = None,
          resource: str | None = None, text: str = "", source: str = "") -> SeenEvent:
    return SeenEvent(id=str(uuid.uuid4()), occurred=at(s), name=name, resource_id=resource or f"ferrumdeck.{subject}",
                     subject=subject, flow_run_id=run_id, payload=payload or {}, text=text, source=source)


def alert(s: float, name: str = "MCPServerDown") -> SeenEvent:
    return event("ferrumdeck.alert.firing", s, subject=name, resource=f"ferrumdeck.alert.{name}", text=f"{name} fires")


def mcp_recovered() -> McpRecovery:
    r = McpRecovery(flow="mcp-server-recovery", title="MCP", healthy_before=False, restarted=True)
    r.note("decided", "Unhealthy (0/3 checks ok): rollout-restart Deployment `mcp-server`.")
    r.act("rollout-restart", "deployment/mcp-server", ActionStatus.DONE)
    r.check("MCP server healthy after the restart", True, "2 checks")
    return r


def sweep_moved(requeued: int = 2, dead: int = 1) -> QueueSweep:
    r = QueueSweep(flow="queue-sweep", title="sweep")
    r.act("requeue", "s/g", ActionStatus.DONE, count=requeued)
    r.act("dead-letter", "dlq", ActionStatus.DONE, count=dead)
    r.check("requeued entries left their old owner", True, target="requeued")
    return r


def crash_recovered(pod: str = "worker-a") -> CrashRecovery:
    r = CrashRecovery(flow="worker-crash-recovery", title="crash")
    r.targets.append(CrashedWorker(pod=pod, consumer=pod, cause=Classification.OOM_KILLED,
                                   root_cause="OOMKilled (exit 137): raise the memory limit", entries=3,
                                   poison=["1-0"], requeued=2, dead_lettered=1, runs_failed=["run_1"],
                                   runs_retried=["run_2"]))
    r.act("recover-entries", pod, ActionStatus.DONE, count=3, detail="2 requeued at once, 1 dead-lettered")
    r.act("delete-pod", pod, ActionStatus.DONE)
    r.act("settle-runs", pod, ActionStatus.DONE, count=2)
    r.check("Ready replacement", True, target=pod)
    return r


def build(runs, results, events=(), **kw):
    return assemble(since=at(-60), until=at(600), runs=runs, results=results, events=list(events),
                    reads=kw.pop("reads", Reads()), ui_url=UI, scheduled=SCHEDULED, umbrella=UMBRELLA, **kw)


def test_one_incident_in_order_with_links_counts_and_mttr():
    mcp, idle, sweep = run("mcp-server-recovery", 5, 20), run("queue-sweep", 21, 22), run("queue-sweep", 30, 34)
    results = {mcp.id: mcp_recovered(), idle.id: QueueSweep(flow="queue-sweep", title="idle"), sweep.id: sweep_moved()}
    events = [alert(0), event("ferrumdeck.mcp.crash-looping", 1, subject="mcp-1", source="watcher"),
              event("ferrumdeck.mcp.crash-looping", 3, subject="mcp-1", source="watcher"),
              event("ferrumdeck.recovery.mcp-restart", 8, subject="deployment.ferrumdeck.mcp-server", run_id=mcp.id)]
    t = build([sweep, idle, mcp], results, events)

    assert [(r.flow, r.outcome, r.typed) for r in t.runs] == [
        ("mcp-server-recovery", Outcome.RECOVERED, True), ("queue-sweep", Outcome.RECOVERED, True)]
    assert t.quiet == {"queue-sweep": 1}  # the idle sweep is counted, not listed
    assert [r.link for r in t.runs] == [f"{UI}/runs/flow-run/{mcp.id}", f"{UI}/runs/flow-run/{sweep.id}"]
    expected = [
        (Kind.ALERT, "MCPServerDown firing"), (Kind.WATCHER, "mcp.crash-looping"),
        (Kind.RUN, "mcp-server-recovery started"), (Kind.DECISION, "Unhealthy (0/3 checks ok)"),
        (Kind.ACTION, "rollout-restart done"), (Kind.VERIFICATION, "✅ MCP server healthy after the restart"),
        (Kind.OUTCOME, "mcp-server-recovery"), (Kind.RUN, "queue-sweep started"), (Kind.ACTION, "requeue done (2)"),
        (Kind.ACTION, "dead-letter done (1)"), (Kind.VERIFICATION, "✅ requeued entries left their old owner"),
        (Kind.OUTCOME, "queue-sweep")]
    assert [e.kind for e in t.entries] == [k for k, _ in expected]
    assert all(e.what.startswith(w) for e, (_, w) in zip(t.entries, expected, strict=True)), [e.what for e in t.entries]
    assert "×2" in t.entries[1].what  # the watcher's re-emission folded
    assert all(a.at <= b.at for a, b in zip(t.entries, t.entries[1:], strict=False))
    assert t.entries[0].link and t.entries[0].link.startswith(f"{UI}/events/event/2026-11-27/")
    assert (t.counts.requeued, t.counts.dead_lettered, t.counts.runs_failed) == (2, 1, 0)
    assert t.first_signal_at == at(0) and t.recovered_at == at(34) and t.mttr_s == 34.0 and t.unresolved == []
    assert "MCP server unhealthy until its restart" in t.hints and any(h.startswith("watcher: mcp-1") for h in t.hints)
    assert t.summary().startswith("MTTR 34.0 s; 2 runs, 2 steps requeued, 1 dead-lettered")
    rows = entry_rows(t)
    assert rows[0]["T+"] == "0 s" and rows[-1]["T+"] == "34 s"
    assert rows[2]["link"] == f"[run]({UI}/runs/flow-run/{mcp.id})" and rows[0]["link"].startswith("[event](")
    assert rows[2]["what"] == "mcp-server-recovery started: mcp-server-recovery-run"


def test_crash_counts_come_from_its_workers_not_twice_from_its_actions():
    c = counts_from_result(crash_recovered())
    assert (c.requeued, c.dead_lettered, c.runs_failed, c.steps_retried) == (2, 1, 1, 1)
    dry = crash_recovered()
    dry.dry_run = True
    for a in dry.actions:
        a.status = ActionStatus.DRY_RUN
    assert counts_from_result(dry).model_dump(exclude={"from_results"}) == counts_from_result(
        QueueSweep(flow="queue-sweep", title="x")).model_dump(exclude={"from_results"})
    refused = QueueSweep(flow="queue-sweep", title="x")
    refused.act("requeue", "s/g", ActionStatus.REFUSED, count=5)
    refused.act("sweep-pending", "s/g", ActionStatus.FAILED, detail="boom")
    c = counts_from_result(refused)
    assert (c.requeued, c.actions_failed) == (0, 1)


def test_hints_name_the_crash_cause_and_the_poison():
    crash, untyped = run("worker-crash-recovery", 5, 30), run("worker-crash-recovery", 40, 50, persisted=False)
    poison = [event("ferrumdeck.recovery.poison-dead-lettered", s, subject=f"entry.{e}", run_id=r.id,
                    payload={"cause": "OOMKilled"}) for s, e, r in ((10, "1-0", crash), (45, "2-0", untyped))]
    t = build([crash, untyped], {crash.id: crash_recovered()}, [alert(0, "WorkerCrashLooping"), *poison])
    assert t.hints == ["worker worker-a oom-killed: OOMKilled (exit 137): raise the memory limit",
                       "poison entry 1-0 from worker-a dead-lettered: look at what that step does",
                       "alert: WorkerCrashLooping fires",
                       "poison entry 2-0: OOMKilled"]  # from the events only where no typed result says it


def test_without_typed_results_states_and_recovery_events_stand_in():
    mcp = run("mcp-server-recovery", 5, 20, persisted=False)
    sweep = run("queue-sweep", 30, 34, persisted=False)
    idle = run("queue-sweep", 40, 41, persisted=False)  # a scheduled sweep that emitted nothing
    told = run("scale-workers", 42, 50, state="failed", persisted=False)
    events = [alert(0),
              event("ferrumdeck.recovery.mcp-restart", 8, subject="deployment.ferrumdeck.mcp-server", run_id=mcp.id),
              event("ferrumdeck.recovery.queue-sweep", 32, subject="queue.s", run_id=sweep.id,
                    payload={"done": {"requeued": 2, "dead_lettered": 1}, "scanned": 3}),
              event("ferrumdeck.recovery.outcome", 50, subject="x", run_id=told.id, payload={"outcome": "not_verified"})]
    t = build([mcp, sweep, idle, told], {}, events)

    assert [(r.flow, r.outcome, r.typed) for r in t.runs] == [
        ("mcp-server-recovery", Outcome.RECOVERED, False), ("queue-sweep", Outcome.RECOVERED, False),
        ("scale-workers", Outcome.NOT_VERIFIED, False)]
    assert t.quiet == {"queue-sweep": 1}
    assert (t.counts.requeued, t.counts.dead_lettered, t.counts.from_events, t.counts.from_results) == (2, 1, 2, 0)
    assert [e.what for e in t.entries if e.kind is Kind.EVENT] == ["recovery.mcp-restart", "recovery.queue-sweep"]
    assert len(t.unreadable) == 3 and all(NOT_PERSISTED in u for u in t.unreadable)
    assert t.mttr_s is None and t.unresolved == ["scale-workers: not_verified"]


def test_a_triage_step_stands_in_for_its_unreadable_subflow_and_triage_is_not_counted_twice():
    crash = run("worker-crash-recovery", 5, 30, persisted=False)
    triage = run("worker-failure-triage", 2, 40)
    tr = TriageResult(flow="worker-failure-triage", title="t")
    tr.steps.append(StepResult(flow="worker-crash-recovery", target="x", state="completed", outcome=Outcome.RECOVERED,
                               actions=crash_recovered().actions, flow_run_id=crash.id))
    tr.act("worker-crash-recovery", "x", ActionStatus.FAILED)  # an umbrella's action: not a step count
    t = build([triage, crash], {triage.id: tr})
    line = {r.flow: r for r in t.runs}["worker-crash-recovery"]
    assert line.outcome is Outcome.RECOVERED and not line.typed
    assert (t.counts.requeued, t.counts.runs_failed, t.counts.actions_failed) == (3, 2, 0)  # from the step's actions


@pytest.mark.parametrize(("lines", "recovered", "unresolved"), [
    ([("mcp-server-recovery", Outcome.NOT_VERIFIED, 10), ("mcp-server-recovery", Outcome.RECOVERED, 20)], 20, []),
    ([("mcp-server-recovery", Outcome.RECOVERED, 10), ("mcp-server-recovery", Outcome.FAILED, 20)], None,
     ["mcp-server-recovery: failed"]),
    ([("worker-crash-recovery", Outcome.RECOVERED, 10), ("worker-failure-triage", Outcome.PARTIAL, 20)], 10, []),
    ([("worker-crash-recovery", Outcome.RECOVERED, 10), ("scale-workers", None, None)], None, ["scale-workers: running"]),
    ([("queue-sweep", Outcome.REFUSED, 10)], None, []),  # refused: nothing verified, nothing failing
])
def test_mttr_needs_every_recovery_green_at_its_last_run(lines, recovered, unresolved):
    runs = [RunLine(flow_run_id=str(i), flow=f, name=f, state="running" if end is None else "completed", outcome=o,
                    ended=at(end) if end is not None else None) for i, (f, o, end) in enumerate(lines)]
    got, still = mttr(first_signal_at=at(0), lines=runs, results={}, umbrella=UMBRELLA)
    assert got == (at(recovered) if recovered is not None else None) and still == unresolved


def test_a_read_only_check_that_held_is_a_verified_outcome():
    check = run("post-recovery-check", 40, 45)
    pc = PostRecoveryCheck(flow="post-recovery-check", title="c")
    pc.check("Workers healthy", True, "3/3")
    t = build([check], {check.id: pc}, [alert(0)])
    assert t.recovered_at == at(45) and t.mttr_s == 45.0
    failing = PostRecoveryCheck(flow="post-recovery-check", title="c")
    failing.check("Workers healthy", False, "1/3")
    t = build([check], {check.id: failing}, [alert(0)])
    assert t.mttr_s is None and t.unresolved == ["post-recovery-check: not_verified (not verified: Workers healthy (1/3))"]


def test_repeats_fold_but_recovery_events_and_other_subjects_do_not():
    evs = [event("ferrumdeck.pod.oom-killed", s, subject=p, source="watcher") for s, p in ((0, "a"), (5, "a"), (6, "b"))]
    evs += [event("ferrumdeck.recovery.pod-deleted", s, subject="pod.a") for s in (7, 8)]
    folded = fold_repeats(evs)
    assert [(e.subject, e.repeats) for e in folded] == [("a", 2), ("b", 1), ("pod.a", 1), ("pod.a", 1)]
    assert folded[0].last == at(5) and evs[0].repeats == 1  # the inputs are left as they were


def test_caps_are_reported():
    reads = Reads(events_read=500, events_total=1234, runs_read=300, runs_more=True, max_events=500, max_runs=300)
    t = build([], {}, reads=reads)
    assert t.truncated == [
        "events: read the first 500 of 1234 in the window (max_events=500); later ones are not shown: narrow the window",
        "flow runs: read the first 300 (max_runs=300); later ones are not shown: narrow the window"]
    assert Reads(events_read=3, events_total=3).truncation() == []
    assert "## Gaps" in postmortem_markdown(t, title="x", checklist=[])


def test_the_postmortem_file_holds_every_entry_and_the_checklist_prefilled():
    runs = [run("worker-crash-recovery", 5 + i, 6 + i) for i in range(30)]
    results = {r.id: crash_recovered(f"worker-{i}") for i, r in enumerate(runs)}
    t = build(runs, results, [alert(0, "WorkerCrashLooping")])
    assert len(t.entries) > 100
    check = run("post-recovery-check", 50, 51)
    pc = PostRecoveryCheck(flow="post-recovery-check", title="c", items=[
        ChecklistItem(item="Workers healthy", ok=True, evidence="3/3"),
        ChecklistItem(item="Root cause documented", ok=None, evidence="not run interactively"),
        ChecklistItem(item="Preventive measures identified", ok=None, evidence="not run interactively")])
    items = prefill_checklist(results={check.id: pc}, runs=[check], hints=t.hints)
    assert [(i.item, i.ok) for i in items] == [("Workers healthy", True), ("Root cause documented", None),
                                               ("Preventive measures identified", None)]
    assert items[1].evidence.startswith("proposed, confirm: worker worker-0 oom-killed")
    md = postmortem_markdown(t, title="Incident of 21:00", checklist=items)
    assert md.count("| action |") == len([e for e in t.entries if e.kind is Kind.ACTION]) and "more_" not in md
    assert "| Root cause documented | ☐ to confirm | proposed, confirm: worker worker-0 oom-killed" in md
    assert "## Root cause (proposed: confirm)" in md and f"[{runs[0].name}]({UI}/runs/flow-run/{runs[0].id})" in md
    assert prefill_checklist(results={}, runs=[], hints=[])[0].evidence == "no hint found: write it down"


def test_a_received_event_is_read_with_its_flow_run():
    run_id = uuid.uuid4()
    ev = ReceivedEvent(
        occurred=T0, received=T0, event="ferrumdeck.alert.firing", id=uuid.uuid4(),
        resource={"prefect.resource.id": "ferrumdeck.alert.WorkerCrashLooping", "ferrumdeck.label.pod": "w-1"},
        related=[{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "flow-run"}],
        payload={"labels": {"alertname": "WorkerCrashLooping", "pod": "w-1", "secret": "x"},
                 "annotations": {"summary": "w-1 crash-loops"}, "generatorURL": "http://user:pw@prom/graph"})
    seen = seen_event(ev)
    assert (seen.kind, seen.subject, seen.text, seen.flow_run_id) == (Kind.ALERT, "w-1", "w-1 crash-loops", str(run_id))
    assert seen.payload == {"labels": {"alertname": "WorkerCrashLooping", "pod": "w-1"}}


def test_windows_paths_and_links():
    triage = run("worker-failure-triage", 100, None, state="running")
    now = at(200)
    assert window_of(triage, lookback=timedelta(minutes=15), now=now) == (at(100) - timedelta(minutes=15), now)
    assert window_of(run("x", 100, 150), lookback=timedelta(0), now=now) == (at(100), at(150))
    assert default_path(directory="/srv/incidents", since=T0, until=at(60), flow_run_id="abcdef12-3456") == Path(
        "/srv/incidents/incident-20261127T210000Z-abcdef12.md")
    assert default_path(directory="d", since=T0, until=at(60), flow_run_id=None).name == "incident-20261127T210000Z-210100Z.md"
    assert pick_window(about=triage, since=None, until=None, minutes=60, lookback_minutes=15, now=now) == (
        at(100) - timedelta(minutes=15), now)
    assert pick_window(about=None, since=None, until=None, minutes=60, lookback_minutes=15, now=now) == (
        now - timedelta(minutes=60), now)
    naive = datetime(2026, 11, 27, 20, 0)
    assert pick_window(about=triage, since=naive, until=None, minutes=60, lookback_minutes=15, now=now) == (
        naive.replace(tzinfo=UTC), now)
    with pytest.raises(TimelineError, match="the window is empty"):
        pick_window(about=None, since=now, until=at(-1), minutes=60, lookback_minutes=15, now=now)
    assert ui_url_from(ui_url=None, api_url="http://127.0.0.1:4200/api") == "http://127.0.0.1:4200"
    assert ui_url_from(ui_url="https://ui.example/", api_url="x") == "https://ui.example"
    assert ui_url_from(ui_url=None, api_url=None) is None


def test_the_form_times_are_iso_text_naive_meaning_utc_and_a_bad_one_names_its_field():
    assert parse_when(None, name="since") is None and parse_when("  ", name="since") is None
    assert parse_when("2026-12-05T03:10", name="since") == datetime(2026, 12, 5, 3, 10, tzinfo=UTC)
    assert parse_when("2026-12-05 04:10:00+01:00", name="since") == datetime(2026, 12, 5, 3, 10, tzinfo=UTC)
    with pytest.raises(TimelineError, match="until: 'yesterday' is not a time"):
        parse_when("yesterday", name="until")


def test_the_timeline_reads_every_deployed_flow_but_itself():
    names, scheduled = our_flows()
    assert FLOW_NAME not in names and {"worker-failure-triage", "mcp-server-recovery", "queue-sweep"} <= set(names)
    assert scheduled == SCHEDULED


def test_counts_from_events_payloads():
    c = counts_from_events([
        event("ferrumdeck.recovery.entries-recovered", 1, payload={"requeued": 4, "dead_lettered": 1}),
        event("ferrumdeck.recovery.run-failed", 2), event("ferrumdeck.recovery.run-failed", 3),
        event("ferrumdeck.recovery.stuck-runs-swept", 4, payload={"failed": ["a", "b"], "retried": ["c"], "found": 3}),
        event("ferrumdeck.recovery.dlq-replay", 5, payload={"done": {"replayed": 7}}),
        event("ferrumdeck.recovery.poison-dead-lettered", 6, payload={"cause": "x"})])
    assert (c.requeued, c.dead_lettered, c.runs_failed, c.steps_retried, c.replayed) == (4, 1, 4, 1, 7)
