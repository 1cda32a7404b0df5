"""`post-recovery-check`: the runbook's Post-Recovery Checklist, automated, with the evidence behind each tick.

Read-only. Ticks the four checkable items from the systems themselves — every worker pod Ready and its
consumer reading from Redis; the queue lag back under a threshold; no run `running` for too long; alerting
alive (the alert bridge saw a recent heartbeat alert, or Alertmanager's API answers: `FD_ALERTING_CHECK`) —
and asks the two human items (root cause documented, preventive measures identified) through a form in the
Prefect UI when run with `interactive=True`; otherwise they are listed as open.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows._ui import describe_parameters
from tasks import runs
from tasks.alerting import check_alerting
from tasks.correlate import ChecklistItem, no_stuck_runs, queue_depth_ok, workers_ready_and_consuming
from tasks.recovery import observe_workers
from tasks.report import Report, markdown_table
from tasks.settings import get_settings

FLOW_NAME = "post-recovery-check"
ROOT_CAUSE = "Root cause documented"
PREVENTION = "Preventive measures identified"


class HumanChecklist(RunInput):
    """The two items only a person can tick (shown as a form in the Prefect UI)."""

    root_cause_documented: bool = Field(False, description="The root cause is written down (incident doc/ticket).")
    root_cause_link: str = Field("", max_length=500, description="Where (URL or ticket id).")
    preventive_measures_identified: bool = Field(False, description="Follow-ups to prevent a repeat are filed.")
    notes: str = Field("", max_length=2000, description="Anything the next on-call should know.")


class PostRecoveryResult(BaseModel):
    items: list[ChecklistItem]
    all_ok: bool
    open_items: list[str]
    report: str = ""


def checklist_markdown(items: list[ChecklistItem]) -> str:
    """The checklist as GitHub-style task list lines, each with its evidence."""
    mark = {True: "[x]", False: "[ ] ❌", None: "[ ] (open)"}
    return "\n".join(f"- {mark[i.ok]} **{i.item}** — {i.evidence}" for i in items)


def human_items(answer: HumanChecklist | None, *, asked: bool) -> list[ChecklistItem]:
    """The two human items from the form's answer (or open when nobody was asked / nobody answered)."""
    if answer is None:
        why = "no answer before the form timed out" if asked else "not run interactively: confirm by hand"
        return [ChecklistItem(item=ROOT_CAUSE, ok=None, evidence=why), ChecklistItem(item=PREVENTION, ok=None, evidence=why)]
    link = f" ({answer.root_cause_link})" if answer.root_cause_link else ""
    return [
        ChecklistItem(item=ROOT_CAUSE, ok=answer.root_cause_documented or None,
                      evidence=("confirmed by the operator" + link) if answer.root_cause_documented else "not yet"),
        ChecklistItem(item=PREVENTION, ok=answer.preventive_measures_identified or None,
                      evidence="confirmed by the operator" if answer.preventive_measures_identified else "not yet"),
    ]


@flow(name=FLOW_NAME, flow_run_name="post-recovery check")
@describe_parameters
def post_recovery_check(
    interactive: Annotated[
        bool, Field(description="Ask the two human items (root cause, prevention) through a form in the UI.")
    ] = False,
    human_timeout_s: Annotated[int, Field(ge=10, le=86_400, description="How long to wait for the form.")] = 3600,
    max_queue_depth: Annotated[
        int | None, Field(ge=0, description="Lag at or below which the queue is back to normal (default setting).")
    ] = None,
    stuck_older_than_minutes: Annotated[
        int, Field(ge=1, le=10_080, description="A run `running` for longer than this counts as stuck.")
    ] = 30,
    consumer_idle_ms: Annotated[
        int | None, Field(ge=0, description="A worker whose consumer read within this (ms) is consuming (default setting).")
    ] = None,
    alerting: Annotated[
        Literal["bridge", "alertmanager", "none"] | None,
        Field(description="How to confirm alerting works (default FD_ALERTING_CHECK)."),
    ] = None,
) -> PostRecoveryResult:
    """Tick the runbook's post-recovery checklist from live evidence; ask a person for the rest."""
    settings = get_settings()
    log = get_run_logger()
    depth = settings.post_check_max_queue_depth if max_queue_depth is None else max_queue_depth
    idle = settings.post_check_consumer_idle_ms if consumer_idle_ms is None else consumer_idle_ms
    report = Report(title="Post-recovery check")

    view = observe_workers(settings=settings)
    cutoff = datetime.now(UTC) - timedelta(minutes=stuck_older_than_minutes)
    stuck = runs.find_stuck_runs_task(settings=settings, cutoff=cutoff, limit=100)
    alert_status = check_alerting(settings=settings, mode=alerting)
    report.table("Observed", view.pod_rows(), caption="Worker pods and their consumers")
    report.table("Observed", view.snapshot.summary_rows(), caption="Queue")

    snap = view.snapshot
    items = [
        workers_ready_and_consuming(links=view.links, desired=None, max_consumer_idle_ms=idle,
                                    lag=int(snap.lag or 0)),
        queue_depth_ok(lag=int(snap.lag or 0), pending=snap.pending, length=snap.length, max_depth=depth),
        no_stuck_runs(stuck=stuck, older_than_minutes=stuck_older_than_minutes),
        ChecklistItem(item="Alerting confirmed working", ok=alert_status.ok, evidence=alert_status.evidence),
    ]
    answer: HumanChecklist | None = None
    if interactive:
        report.add("Decided", "Asked the operator for the two human items (form in the Prefect UI).")
        try:
            answer = pause_flow_run(wait_for_input=HumanChecklist, timeout=human_timeout_s, poll_interval=1)
        except Exception as e:  # noqa: BLE001 - a timed-out or failed pause leaves the items open
            log.warning("no answer to the checklist form: %s", type(e).__name__)
    items += human_items(answer, asked=interactive)
    if answer is not None and answer.notes:
        report.add("Done", f"Operator notes: {answer.notes}")

    open_items = [i.item for i in items if i.ok is not True]
    all_ok = all(i.ok is True for i in items[:4])
    report.add("Verified", checklist_markdown(items))
    report.add("Verified", markdown_table([i.model_dump() for i in items]))
    report.outcome = "all checks pass" if all_ok and not open_items else (
        "checks pass, human items open" if all_ok else "checks FAILING")
    markdown = report.publish(key=FLOW_NAME, description="Runbook post-recovery checklist with evidence")
    log.info("post-recovery-check: %s", report.outcome)
    return PostRecoveryResult(items=items, all_ok=all_ok, open_items=open_items, report=markdown)
