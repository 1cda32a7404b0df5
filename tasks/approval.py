"""Approval for large blast radii: above a threshold, a person approves the plan in the Prefect UI first.

A flow that decided to act on more than a setting allows — delete more than ``FD_APPROVAL_POD_DELETIONS`` pods
in one run, replay more than ``FD_APPROVAL_DLQ_REPLAYS`` DLQ entries, fail more than ``FD_APPROVAL_FAILED_RUNS``
runs, switch the workers' LLM model when ``FD_APPROVAL_LLM_SWITCH`` — calls ``approve`` between its decide and
act steps. ``approve`` publishes the plan (the typed result so far, rendered as the artifact
``<report key>-plan``: the run's report keeps its own key), emits ``ferrumdeck.recovery.approval-requested``
and pauses the run with Prefect's
``pause_flow_run(wait_for_input=Approval)``: the flow run's page shows a Resume button opening the typed form
(decision, name, reason) below the plan. Then:

- approve -> the flow goes on and acts (each action still guarded: kill switch, cooldown, budget); who approved
  and why is in the report (``decided``), in the result (``approval``) and in the event
  ``ferrumdeck.recovery.approval`` (payload ``decision``, ``approver``, ``reason``);
- reject, or no answer within ``FD_APPROVAL_TIMEOUT_S`` -> nothing changes: the planned action is recorded
  ``refused`` with the reason (outcome ``refused``), and the same event says who rejected (or that nobody
  answered). A timed-out pause is resumed by the flow itself (the run ends with its typed ``refused`` result,
  not Prefect's "paused and never resumed").

Submitting the form twice acts once: Prefect stores the answer only while the run is Paused and resumes it
with the first one; a second submission finds it running and is refused ("Cannot resume a flow run that is
not paused"). A dry run never pauses: its report says a real run would ask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from prefect.input import RunInput
from pydantic import BaseModel, Field

from tasks.outcome import ActionStatus, RecoveryResult
from tasks.settings import Settings

#: what a paused run's form is keyed by (one pause per gated action in a run)
PAUSE_KEY = "approval-{action}"
REQUESTED_EVENT, DECIDED_EVENT = "approval-requested", "approval"
_SAMPLE = 10


class Approval(RunInput):
    """Approve or reject this recovery's plan (above). Reject, or no answer in time, and nothing changes."""

    decision: Literal["approve", "reject"] = Field(
        title="Decision", description="approve: carry out the plan now; reject: change nothing.")
    approver: str = Field(
        title="Your name", min_length=1, max_length=100, pattern=r"\S",
        description="Who decides: written into the run's report and the approval event.")
    reason: str = Field(
        "", title="Reason", max_length=500, description="Why (written into the report and the event).")


class Ask(BaseModel):
    """One plan that may need a person's approval before the flow acts."""

    action: str  # the action recorded ``refused`` when the plan is rejected (e.g. ``delete-pod``)
    target: str  # what the plan acts on, in a few words
    targets: list[str] = Field(default_factory=list)  # refused one by one when rejected (else ``target``)
    count: int  # how many targets the plan acts on
    needed: bool  # over the threshold: a person must approve
    rule: str  # why a person is (or is not) asked, e.g. "4 pods > FD_APPROVAL_POD_DELETIONS = 3"
    plan: str  # one line a person reads: what will happen


class ApprovalRecord(BaseModel):
    """What a person (or the clock) decided about one plan."""

    action: str
    plan: str
    rule: str
    decision: Literal["approved", "rejected", "timed_out"]
    approver: str | None = None
    reason: str = ""
    asked_at: datetime
    answered_at: datetime | None = None
    timeout_s: float

    @property
    def approved(self) -> bool:
        return self.decision == "approved"

    def summary(self) -> str:
        """One line: ``approved by alice: checked the pods`` / ``no answer within 3600 s``."""
        if self.decision == "timed_out":
            return f"no approval within {self.timeout_s:g} s (FD_APPROVAL_TIMEOUT_S): nothing changed"
        verb = "approved" if self.approved else "rejected"
        return f"{verb} by {self.approver}" + (f": {self.reason}" if self.reason else "")


# ------------------------------------------------------------------------------------------------ plans (pure)


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SAMPLE])
    return shown + (f" (+{len(items) - _SAMPLE} more)" if len(items) > _SAMPLE else "")


def _n(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def over(count: int, limit: int) -> bool:
    """Pure: a plan needs approval when it acts on more targets than the limit."""
    return count > limit


def pod_deletions(settings: Settings, pods: Sequence[str], *, evict: bool = False) -> Ask:
    """Deleting (evicting) these worker pods in one run."""
    limit, n = settings.approval_pod_deletions, len(pods)
    verb = "evict" if evict else "delete"
    return Ask(action="evict-pod" if evict else "delete-pod", target=_n(n, "worker pod"), targets=list(pods), count=n,
               needed=over(n, limit), rule=f"{_n(n, 'pod')} {'>' if over(n, limit) else '<='} "
               f"FD_APPROVAL_POD_DELETIONS = {limit}", plan=f"{verb} {_n(n, 'worker pod')}: {_names(list(pods))}")


def dlq_replays(settings: Settings, count: int, *, source: str, sample: Sequence[str] = ()) -> Ask:
    """Replaying ``count`` DLQ entries onto the step stream."""
    limit = settings.approval_dlq_replays
    return Ask(action="replay", target=source, count=count, needed=over(count, limit),
               rule=f"{_n(count, 'entry', 'entries')} {'>' if over(count, limit) else '<='} "
               f"FD_APPROVAL_DLQ_REPLAYS = {limit}",
               plan=f"replay {_n(count, 'DLQ entry', 'DLQ entries')} ({source})"
               + (f", e.g. {_names(list(sample))}" if sample else ""))


def failed_runs(settings: Settings, count: int, *, action: str, sample: Sequence[str] = ()) -> Ask:
    """Failing ``count`` runs (``WORKER_TIMEOUT`` or a given code)."""
    limit = settings.approval_failed_runs
    return Ask(action=action, target=_n(count, "run"), count=count, needed=over(count, limit),
               rule=f"{_n(count, 'run')} {'>' if over(count, limit) else '<='} FD_APPROVAL_FAILED_RUNS = {limit}",
               plan=f"fail {_n(count, 'run')}" + (f": {_names(list(sample))}" if sample else ""))


def llm_switch(settings: Settings, *, deployment: str, current: str | None, target: str) -> Ask:
    """Switching the workers' LLM model (failover or failback)."""
    ask = settings.approval_llm_switch
    return Ask(action="set-deployment-env", target=f"deployment/{deployment}", count=1, needed=ask,
               rule=f"FD_APPROVAL_LLM_SWITCH = {'true' if ask else 'false'}",
               plan=f"switch the workers' LLM model from {current or 'unset'} to {target}")


def plan_key(report_key: str) -> str:
    """The artifact key of a run's plan awaiting approval (its final report keeps ``report_key``)."""
    return f"{report_key}-plan"


def form_description(ask: Ask, *, plan: str, timeout_s: float) -> str:
    """Pure: the text above the approval form in the Prefect UI (markdown)."""
    return (f"### Approve this recovery?\n\n**Plan:** {ask.plan}\n\n**Why a person is asked:** {ask.rule}\n\n"
            f"What was observed and decided is this run's artifact `{plan}`. "
            f"Reject it, or leave it unanswered for {timeout_s:g} s, and nothing changes.")


# ------------------------------------------------------------------------------------------------ the gate


def approve(result: RecoveryResult, ask: Ask, *, settings: Settings, dry_run: bool, key: str | None = None) -> bool:
    """The decide-step gate before acting: True to go ahead (under the threshold, a dry run, or approved);
    False when a person rejected the plan or nobody answered in time — then ``ask.action`` is recorded refused
    on ``ask.target`` with the reason, and the flow must change nothing. ``key``: the report's artifact key."""
    from tasks.report import publish

    if not ask.needed:
        return True
    if dry_run:
        result.note("decided", f"A real run would wait for a person's approval first: {ask.plan} ({ask.rule}).")
        return True
    timeout_s = settings.approval_timeout_s
    result.note("decided", f"Awaiting approval: {ask.plan} ({ask.rule}). Approve or reject it with the flow run's "
                f"Resume form within {timeout_s:g} s.")
    # the plan: the result so far, blocked on the person (its own artifact: the run's report keeps its key)
    publish(result.model_copy(update={"title": f"Awaiting approval — {result.title}"}),
            key=plan_key(key or result.flow), waiting_for=f"a person's approval: {ask.plan}")
    _event(REQUESTED_EVENT, result, ask, {"timeout_s": timeout_s})
    record = wait_for_person(ask, plan=plan_key(key or result.flow), settings=settings)
    if "approval" in type(result).model_fields:
        result.approval = record  # type: ignore[attr-defined]
    _event(DECIDED_EVENT, result, ask, {"decision": record.decision, "approver": record.approver,
                                        "reason": record.reason})
    if record.approved:
        result.note("decided", f"Approved by {record.approver}" + (f": {record.reason}" if record.reason else "")
                    + f" — {ask.plan}.")
        return True
    for target in ask.targets or [ask.target]:
        result.act(ask.action, target, ActionStatus.REFUSED, detail=record.summary())
    return False


def wait_for_person(ask: Ask, *, plan: str, settings: Settings) -> ApprovalRecord:
    """Pause the current flow run until a person submits the approval form, or the timeout (= rejected)."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    timeout_s = settings.approval_timeout_s
    form = Approval.with_initial_data(description=form_description(ask, plan=plan, timeout_s=timeout_s))
    asked = datetime.now(UTC)
    base = {"action": ask.action, "plan": ask.plan, "rule": ask.rule, "asked_at": asked, "timeout_s": timeout_s}
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=max(1, math.ceil(timeout_s)),
                                poll_interval=settings.approval_poll_s,  # type: ignore[arg-type] # float is fine
                                key=PAUSE_KEY.format(action=ask.action))
    except FlowPauseTimeout:
        carry_on_after_timeout()
        return ApprovalRecord(**base, decision="timed_out", answered_at=datetime.now(UTC))
    return ApprovalRecord(**base, decision="approved" if answer.decision == "approve" else "rejected",
                          approver=answer.approver.strip(), reason=answer.reason.strip(),
                          answered_at=datetime.now(UTC))


def carry_on_after_timeout() -> None:
    """Put the run whose pause expired back to Running so it can end with its typed result (refused).

    Prefect refuses any way out of an expired pause (and its server fails such runs), so this is forced; from
    then on a late form submission finds the run running and is refused (it cannot resume twice)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Running

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(ctx.flow_run.id, Running(message="no approval in time: nothing changed"),
                                  force=True)


def _event(action: str, result: RecoveryResult, ask: Ask, extra: dict[str, object]) -> None:
    from prefect.runtime import flow_run

    from tasks.events import emit_recovery_event

    emit_recovery_event(action=action, resource_id=f"recovery.{result.flow}", payload={
        "flow": result.flow, "flow_run_id": flow_run.get_id(), "action": ask.action, "target": ask.target,
        "count": ask.count, "plan": ask.plan, "rule": ask.rule, **extra})
