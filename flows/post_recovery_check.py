"""`post-recovery-check`: the runbook's Post-Recovery Checklist, automated, with the evidence behind each tick.

Read-only: it acts on nothing, so its outcome is ``nothing_to_do`` when every checkable item holds and
``not_verified`` (the run ends Failed, after its report) when any does not. The four checkable items are
ticked from the systems themselves — every worker pod Ready and its consumer reading from Redis; the queue
lag back under a threshold; no run `running` for too long; alerting alive (the alert bridge saw a recent
heartbeat alert, or Alertmanager's API answers: `FD_ALERTING_CHECK`; with ``none`` it is left to a person).
The two human items (root cause documented, preventive measures identified) are asked through a form in the
Prefect UI with `interactive=True`, else listed as open; they are reported and never fail the run.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows._ui import LoggedResult, Setting, describe_parameters, keep_typed_name, setting
from tasks import runs
from tasks.alerting import AlertingError, AlertingStatus, check_alerting
from tasks.approval import carry_on_after_timeout
from tasks.correlate import ChecklistItem, no_stuck_runs, queue_depth_ok, workers_ready_and_consuming
from tasks.outcome import Table
from tasks.recovery import observe_workers
from tasks.report import conclude, recording
from tasks.settings import Settings, get_settings

FLOW_NAME = "post-recovery-check"
ALERTING = "Alerting confirmed working"
ROOT_CAUSE = "Root cause documented"
PREVENTION = "Preventive measures identified"


class HumanChecklist(RunInput):
    """The two items only a person can tick (shown as a form in the Prefect UI)."""

    root_cause_documented: bool = Field(False, title="Root cause documented",
                                        description="The root cause is written down (incident doc/ticket).")
    root_cause_link: str = Field("", max_length=500, title="Where", description="URL or ticket id of the write-up.")
    preventive_measures_identified: bool = Field(False, title="Preventive measures identified",
                                                 description="Follow-ups to prevent a repeat are filed.")
    notes: str = Field("", max_length=2000, title="Notes", description="Anything the next on-call should know.")


class PostRecoveryCheck(LoggedResult):
    """The runbook's six checklist items, in its order: ticked (True), failed (False) or open for a person
    (None). The checkable ones that hold or fail are also its ``checks``."""

    items: list[ChecklistItem] = Field(default_factory=list)
    operator_notes: str = ""

    @property
    def open_items(self) -> list[str]:
        """Items left to a person (the human ones unless confirmed; alerting when its check is disabled)."""
        return [i.item for i in self.items if i.ok is None]


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


def person_rows(items: list[ChecklistItem]) -> list[dict[str, Any]]:
    """Pure: the items a person owns — the human ones, and any checkable one left open — as report rows."""
    status = {True: "confirmed", False: "failing", None: "open"}
    return [{"item": i.item, "status": status[i.ok], "evidence": i.evidence}
            for i in items if i.ok is None or i.item in (ROOT_CAUSE, PREVENTION)]


def alerting_item(*, settings: Settings, mode: str | None) -> ChecklistItem:
    """Ask the alerting endpoint; one that stays unreachable after the retries is a failing item, not a crash."""
    try:
        status = check_alerting(settings=settings, mode=mode)
    except AlertingError as e:
        status = AlertingStatus(mode=mode or settings.alerting_check, ok=False, evidence=str(e))
    return ChecklistItem(item=ALERTING, ok=status.ok, evidence=status.evidence)


def ask_operator(*, timeout_s: int) -> HumanChecklist | None:
    """Pause the run for the checklist form in the Prefect UI; None when nobody answered in time."""
    from prefect.exceptions import FlowPauseTimeout

    try:
        return pause_flow_run(wait_for_input=HumanChecklist, timeout=timeout_s, poll_interval=1)
    except FlowPauseTimeout:  # the run carries on to report the items open (not "paused and never resumed")
        get_run_logger().warning("no answer to the checklist form within %s s: the human items stay open", timeout_s)
        carry_on_after_timeout()
        return None
    except Exception as e:  # noqa: BLE001 - a failed pause leaves the items open
        get_run_logger().warning("no answer to the checklist form: %s", type(e).__name__)
        return None


@flow(name=FLOW_NAME, flow_run_name=keep_typed_name("post-recovery check"))
@describe_parameters
def post_recovery_check(
    interactive: Annotated[
        bool, Field(title="Ask a person", description="Ask the two human items (root cause, prevention) through a "
                    "form in the UI.")
    ] = False,
    human_timeout_s: Annotated[int, Field(ge=10, le=86_400, title="Form timeout (s)",
                                          description="How long to wait for the form.")] = 3600,
    max_queue_depth: Annotated[
        int | None, Field(ge=0, title="Normal queue lag (entries)",
                          description="Lag at or below which the queue is back to normal."),
        Setting("post_check_max_queue_depth"),
    ] = None,
    stuck_older_than_minutes: Annotated[
        int, Field(ge=1, le=10_080, title="Stuck after (min)",
                   description="A run `running` for longer than this counts as stuck.")
    ] = 30,
    consumer_idle_ms: Annotated[
        int | None, Field(ge=0, title="Consuming within (ms)",
                          description="A worker whose consumer read within this long is consuming."),
        Setting("post_check_consumer_idle_ms"),
    ] = None,
    alerting: Annotated[
        Literal["bridge", "alertmanager", "none"] | None,
        Field(title="Alerting check", description="How to confirm alerting works: the bridge's heartbeat, "
              "Alertmanager's API, or not at all."),
        Setting("alerting_check"),
    ] = None,
) -> PostRecoveryCheck:
    """Tick the runbook's post-recovery checklist from live evidence (read-only); ask a person for the rest."""
    settings = get_settings()
    depth = setting(max_queue_depth, settings, "post_check_max_queue_depth")
    idle = setting(consumer_idle_ms, settings, "post_check_consumer_idle_ms")
    with recording(PostRecoveryCheck(flow=FLOW_NAME, title="Post-recovery check")) as result:
        # observe
        view = observe_workers(settings=settings)
        cutoff = datetime.now(UTC) - timedelta(minutes=stuck_older_than_minutes)
        stuck = runs.find_stuck_runs_task(settings=settings, cutoff=cutoff, limit=100)
        snap, lag = view.snapshot, int(view.snapshot.lag or 0)
        result.note("observed", Table(caption="Worker pods and their consumers", rows=view.pod_rows()))
        result.note("observed", Table(caption="Queue", rows=snap.summary_rows()))
        # decide: tick each checkable item from its evidence (pure), ask a person for the others
        result.items = [
            workers_ready_and_consuming(links=view.links, desired=None, max_consumer_idle_ms=idle, lag=lag),
            queue_depth_ok(lag=lag, pending=snap.pending, length=snap.length, max_depth=depth),
            no_stuck_runs(stuck=stuck, older_than_minutes=stuck_older_than_minutes),
            alerting_item(settings=settings, mode=alerting),
        ]
        if interactive:
            result.note("decided", "Asked the operator for the two human items (form in the Prefect UI).")
        answer = ask_operator(timeout_s=human_timeout_s) if interactive else None
        result.items += human_items(answer, asked=interactive)
        if answer is not None and answer.notes:
            result.operator_notes = answer.notes
            result.note("observed", f"Operator notes: {answer.notes}")
        result.note("decided", Table(caption="For a person", rows=person_rows(result.items)))
        # verify: every checkable item that was checked is one check (an open one is left to a person)
        for item in result.items[:4]:
            if item.ok is not None:
                result.check(item.item, item.ok, item.evidence)
    return conclude(result)
