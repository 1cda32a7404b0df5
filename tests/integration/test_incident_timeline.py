"""incident-timeline against the session's Prefect test server: a real incident — an alert as the bridge sends
it, the watcher's events, real recoveries on the sandbox cluster and Redis — read back from the Prefect API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_LOCAL_STORAGE_PATH,
    PREFECT_RESULTS_PERSIST_BY_DEFAULT,
    PREFECT_TASKS_DEFAULT_PERSIST_RESULT,
    PREFECT_UI_URL,
    temporary_settings,
)

from deployments.alerts import AlertmanagerWebhook, translate
from deployments.watch import Condition, Detection, event_json
from flows.incident_timeline import incident_timeline
from flows.mcp_recovery import mcp_server_recovery
from flows.queue_sweep import queue_sweep
from sandbox.http_server import serve_app
from sandbox.mcp import MCPServer
from tasks.outcome import Outcome
from tasks.settings import use_settings
from tasks.timeline import NOT_PERSISTED, Kind
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import queue_state, report_of, seed_pending
from tests.unit.test_alerts import am_alert, am_body

pytestmark = pytest.mark.timeout(150)
env = fx.env  # the per-test settings fixture
MCP, SWEEP = "mcp-server-recovery", "queue-sweep"


# ---------------------------------------------------------------------------------------- shared with test_triage


def post_events(events: list[dict]) -> None:
    """POST events to the Prefect API exactly as the bridge and the watcher deliver them."""
    r = httpx.post(f"{PREFECT_API_URL.value()}/events", json=events, timeout=10)
    r.raise_for_status()


def post_alert(alertname: str, **labels: str) -> datetime:
    """One firing alert through the bridge's own translation (Alertmanager webhook -> Prefect event)."""
    alert = am_alert(alertname, **labels)
    alert["fingerprint"] = uuid.uuid4().hex[:16]
    occurred = datetime.now(UTC)
    translated, _ = translate(AlertmanagerWebhook.model_validate(am_body(alert)), source="alertmanager",
                              occurred=occurred, new_id=uuid.uuid4)
    post_events([t.event for t in translated])
    return occurred


def post_watcher_event(condition: Condition, *, role: str, pod: str, repeat: int = 0) -> None:
    """One event of the direct watcher (its own JSON shape), about ``pod``."""
    name = f"ferrumdeck.{'mcp' if role == 'mcp' else 'pod'}.{condition.value}"
    d = Detection(event=name, condition=condition, role=role, subject=pod, started=time.time(), repeat=repeat,
                  detail=f"{pod} {condition.value}", labels={"pod": pod, "namespace": "ferrumdeck",
                                                             "condition": condition.value}, evidence={})
    post_events([event_json(d, event_id=uuid.uuid4(), occurred=datetime.now(UTC))])


def stored(names: dict[str, int], *, since: datetime, timeout: float = 30.0) -> None:
    """Wait until the Prefect server has stored at least this many events of each name (it flushes every ~5 s)."""
    body = {"filter": {"occurred": {"since": since.isoformat(), "until": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()},
                       "event": {"prefix": ["ferrumdeck."]}, "order": "ASC"}, "limit": 50}

    def enough() -> bool:
        r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        r.raise_for_status()
        got = [e["event"] for e in r.json()["events"]]
        return all(got.count(n) >= k for n, k in names.items())

    fx.wait_for(enough, timeout=timeout, what=f"stored events {names}", interval=0.3)


@contextmanager
def persisting(storage: Path) -> Iterator[Path]:
    """Flow runs persist their typed results under ``storage`` (as the stack does, and production should: see
    the README); tasks do not."""
    with temporary_settings(updates={PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
                                     PREFECT_TASKS_DEFAULT_PERSIST_RESULT: False,
                                     PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield storage


@pytest.fixture
def persisted(tmp_path) -> Iterator[Path]:
    with persisting(tmp_path / "results") as storage:
        yield storage


@pytest.fixture(autouse=True)
def timeline_dir(tmp_path, monkeypatch) -> Path:
    """Postmortem files go to this test's directory (FD_TIMELINE_DIR)."""
    monkeypatch.setenv("FD_TIMELINE_DIR", str(tmp_path / "incidents"))
    return tmp_path / "incidents"


def ui() -> str:
    return (PREFECT_UI_URL.value() or PREFECT_API_URL.value().removesuffix("/api")).rstrip("/")


# ---------------------------------------------------------------------------------------- the incident


@pytest.fixture(scope="module")
def mcp_stub(sandbox_cluster):
    server = MCPServer()
    sandbox_cluster.add_listener(server.on_pod_event)
    served = serve_app(server.app(), name="mcp-timeline")
    yield server, served.url
    server.restore()
    served.stop()


@pytest.fixture
def incident(env, cluster, redis, mcp_stub):
    """Settings for the MCP stub; an MCP outage, and entries held by a worker gone for good (one delivered 3 times)."""
    server, url = mcp_stub
    server.restore()
    s = env.model_copy(update={"mcp_url": f"{url}/health", "mcp_check_interval_s": 0.01, "rollout_timeout_s": 30.0})
    with use_settings(s):
        yield s, server


def drill(s, server, cluster, redis) -> dict:
    """The incident: alert + watcher events, an MCP restart that cures it, an idle sweep, a sweep that moves the
    entries of a dead worker. Returns what happened, to compare with the timeline."""
    mcp_pod = next(p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server"))
    alerted = post_alert("MCPServerDown", pod=mcp_pod)
    post_watcher_event(Condition.CRASH_LOOPING, role="mcp", pod=mcp_pod)
    post_watcher_event(Condition.CRASH_LOOPING, role="mcp", pod=mcp_pod, repeat=1)
    server.outage(current_pods=[mcp_pod])
    mcp = mcp_server_recovery(dry_run=False, attempts=2, deadline_s=15, return_state=True)
    idle = queue_sweep(dry_run=False, delete_idle_consumers=False, return_state=True)
    steps = seed_pending(redis, s, consumer="worker-gone", n=3, tag="tl", redeliver={0: 2})
    sweep = queue_sweep(dead_consumers=["worker-gone"], dry_run=False, delete_idle_consumers=False,
                        return_state=True)
    assert [st.is_completed() for st in (mcp, idle, sweep)] == [True, True, True]
    state = queue_state(redis, s)
    assert [f["job_id"] for _, f in state["dlq"]] == [steps[0]["job_id"]] and state["pending"] == []
    stored({"ferrumdeck.alert.firing": 1, "ferrumdeck.mcp.crash-looping": 2, "ferrumdeck.recovery.mcp-restart": 1,
            "ferrumdeck.recovery.queue-sweep": 1}, since=alerted)
    return {"alerted": alerted, "mcp": mcp, "idle": idle, "sweep": sweep}


def run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def test_a_drilled_incident_in_order_with_links_counts_mttr_and_the_postmortem_file(
        incident, cluster, redis, persisted, tmp_path):
    s, server = incident
    since = datetime.now(UTC)
    d = drill(s, server, cluster, redis)
    path = tmp_path / "postmortem.md"

    state = incident_timeline(since=since.isoformat(), path=str(path), return_state=True)

    assert state.is_completed()
    result = state.result()
    t = result.timeline
    assert result.outcome is Outcome.NOTHING_TO_DO and result.actions == []
    assert [(c.name, c.ok) for c in result.checks] == [("postmortem markdown written", True)]
    # the runs, in order, typed, linked; the idle sweep counted, not listed
    assert [(r.flow, r.flow_run_id, r.outcome, r.typed) for r in t.runs] == [
        (MCP, run_id(d["mcp"]), Outcome.RECOVERED, True), (SWEEP, run_id(d["sweep"]), Outcome.RECOVERED, True)]
    assert [r.link for r in t.runs] == [f"{ui()}/runs/flow-run/{run_id(d[k])}" for k in ("mcp", "sweep")]
    assert t.quiet == {SWEEP: 1} and t.unreadable == [] and t.truncated == []
    # the entries: the alert first, the watcher's two events folded, then each run's story
    assert [e.kind for e in t.entries][:3] == [Kind.ALERT, Kind.WATCHER, Kind.RUN]
    assert t.entries[0].what.startswith("MCPServerDown firing") and "×2" in t.entries[1].what
    assert all(a.at <= b.at for a, b in zip(t.entries, t.entries[1:], strict=False))
    mine = [(e.kind, e.what.split(" ")[0]) for e in t.entries if e.flow_run_id == run_id(d["mcp"])]
    assert mine[0] == (Kind.RUN, MCP) and (Kind.ACTION, "rollout-restart") in mine and mine[-1] == (Kind.OUTCOME, f"{MCP}:")
    assert sorted(e.what for e in t.entries if e.kind is Kind.ACTION and e.flow_run_id == run_id(d["sweep"])) == [
        "dead-letter done (1)", "requeue done (2)"]
    # the numbers
    assert (t.counts.requeued, t.counts.dead_lettered, t.counts.runs_failed, t.counts.from_results) == (2, 1, 0, 2)
    assert abs((t.first_signal_at - d["alerted"]).total_seconds()) < 0.01
    assert t.recovered_at == t.runs[-1].ended  # the sweep's verified outcome was the last
    assert t.mttr_s == round((t.recovered_at - t.first_signal_at).total_seconds(), 1) and t.unresolved == []
    assert "MCP server unhealthy until its restart" in t.hints
    root = next(i for i in result.checklist if i.item == "Root cause documented")
    assert root.ok is None and root.evidence.startswith("proposed, confirm: ")
    # the file a person pastes into the postmortem, and the report
    assert result.markdown_path == str(path.resolve())
    md = path.read_text()
    assert "## Timeline" in md and "MCPServerDown firing" in md and f"{ui()}/runs/flow-run/{run_id(d['mcp'])}" in md
    assert "| steps requeued | 2 |" in md and "| steps dead-lettered | 1 |" in md
    report = report_of(state, key="incident-timeline")
    assert "Root cause (proposed: confirm)" in report and "Outcome: nothing_to_do" in report


def test_without_persisted_results_states_and_events_stand_in_and_caps_are_said(incident, cluster, redis, tmp_path):
    s, server = incident
    since = datetime.now(UTC)
    d = drill(s, server, cluster, redis)

    result = incident_timeline(since=since.isoformat())

    t = result.timeline
    assert [(r.flow, r.outcome, r.typed) for r in t.runs] == [(MCP, Outcome.RECOVERED, False),
                                                             (SWEEP, Outcome.RECOVERED, False)]
    assert t.quiet == {SWEEP: 1}  # a scheduled sweep that emitted nothing
    assert (t.counts.requeued, t.counts.dead_lettered, t.counts.from_events) == (2, 1, 2)  # from the events' payloads
    assert len(t.unreadable) == 2 and all(NOT_PERSISTED in u for u in t.unreadable)
    assert t.mttr_s is not None and t.first_signal_at is not None
    assert Path(result.markdown_path).parent == tmp_path / "incidents" and Path(result.markdown_path).is_file()

    capped = incident_timeline(since=since.isoformat(), max_events=2, max_runs=1)
    assert [r.flow_run_id for r in capped.timeline.runs] == [run_id(d["mcp"])]
    assert capped.timeline.events_read == 2 and len(capped.timeline.truncated) == 2
    assert "read the first 2 of" in capped.timeline.truncated[0]


def test_a_file_that_cannot_be_written_fails_the_run_after_its_report(incident, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    state = incident_timeline(minutes=1, path=str(blocker / "postmortem.md"), return_state=True)

    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.NOT_VERIFIED and result.markdown_path is None
    assert [(c.name, c.ok) for c in result.checks] == [("postmortem markdown written", False)]
    assert "Outcome: not_verified" in report_of(state, key="incident-timeline")


def test_a_flow_run_sets_the_window_and_an_empty_window_is_refused(incident, cluster, redis):
    s, server = incident
    since = datetime.now(UTC)
    d = drill(s, server, cluster, redis)

    about = incident_timeline(flow_run_id=run_id(d["mcp"]), lookback_minutes=0)
    assert about.about_flow_run_id == run_id(d["mcp"]) and about.title.startswith(f"Incident timeline of {MCP}")
    assert [r.flow_run_id for r in about.timeline.runs] == [run_id(d["mcp"])]  # the window is that run
    assert about.since >= since

    state = incident_timeline(since=datetime.now(UTC).isoformat(), until=since.isoformat(), return_state=True)
    assert state.is_failed() and "the window is empty" in state.result(raise_on_failure=False).error
