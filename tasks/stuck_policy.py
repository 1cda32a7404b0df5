"""What to do with each stuck run, from where its unfinished steps are in the queue (pure, no I/O).

Per step:
- queued (in the stream, not yet delivered)          -> leave: a worker will take it;
- pending with a live owner                          -> leave: a worker is on it;
- pending with a dead or long-idle owner             -> leave for the queue sweep (it requeues the entry);
- in the DLQ                                         -> fail the run (the step failed for good);
- nowhere in the queue, retries left                 -> retry the step through the gateway;
- nowhere, retries spent ``>= max_step_retries``     -> fail the run.
Retries spent = ``steps.attempts`` (re-enqueues the gateway counted) + ``lost_retries`` (retries the gateway
answered "already queued" while the step was nowhere in the queue: a *lost* step, ``queued`` in the database
but in no stream, which the gateway never re-enqueues and whose attempts therefore never rise). Counting those
makes the sweep converge: such a run is failed once its retries are spent, instead of being retried forever.

A run takes the most careful of its steps' decisions (leave > leave-for-queue-sweep > fail > retry); a run
with no unfinished step is failed (nothing will ever finish it). ``action="fail"`` fails every run found;
``action="retry"`` never fails: it retries what is nowhere and leaves the rest, saying why.

"Live owner": when the caller passes ``live_consumers`` (the crash/hang flows: consumer names of live worker
pods), only those are live; otherwise (the sweep alone) an owner is live while its entry is idle for less than
``min_idle_ms`` (the runbook's 5 minutes).

Verify (after acting; pure here, fed by one re-read of the runs, the retried steps' rows and where those steps
are now): every run the sweep touched has the state it decided — runs it failed read back ``failed`` (one that
finished meanwhile only has to be no longer ``running``), retried steps are queued or were taken by a worker,
left runs were not touched. ``verify_sweep`` groups that evidence per kind of target (verified / not verified),
so a report shows counts and a bounded sample, and some targets verified while others are not is ``partial``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Literal, NamedTuple

from pydantic import BaseModel

from tasks.queue import StepLocation
from tasks.runs import QUEUED_STEP_STATUSES, RUNNING, RunRow, StepRow

Action = Literal["auto", "fail", "retry"]
DEFAULT_MIN_IDLE_MS = 300_000
#: at most this many ids (or rows) are shown per check or table; the counts are always complete
SAMPLE = 20


class Decision(StrEnum):
    LEAVE = "leave"
    LEAVE_FOR_QUEUE_SWEEP = "leave-for-queue-sweep"
    RETRY = "retry"
    FAIL = "fail"


_CARE = {Decision.LEAVE: 0, Decision.LEAVE_FOR_QUEUE_SWEEP: 1, Decision.FAIL: 2, Decision.RETRY: 3}


class StepDecision(BaseModel):
    """One unfinished step's decision and its reason."""

    step_id: str
    where: str
    decision: Decision
    reason: str


class RunDecision(BaseModel):
    """One stuck run's decision, the steps to retry (when ``retry``) and a reason an SRE can read."""

    run_id: str
    decision: Decision
    reason: str
    retry_steps: list[str] = []
    steps: list[StepDecision] = []


def owner_is_live(
    *, consumer: str | None, idle_ms: int | None, live_consumers: Collection[str] | None, min_idle_ms: int
) -> bool:
    """Whether the consumer holding a pending entry counts as alive (see the module docstring)."""
    if consumer is None:
        return False
    if live_consumers is not None:
        return consumer in live_consumers
    return idle_ms is not None and idle_ms < min_idle_ms


def is_lost(*, step_status: str | None, where: str) -> bool:
    """A lost step: ``queued``/``pending`` in the database, yet in no stream (the gateway will not re-enqueue it)."""
    return step_status in QUEUED_STEP_STATUSES and where == "nowhere"


def decide_step(
    *,
    step: StepRow,
    location: StepLocation | None,
    action: Action,
    max_step_retries: int,
    min_idle_ms: int,
    live_consumers: Collection[str] | None,
    lost_retries: int = 0,
) -> StepDecision:
    """The decision for one unfinished step of a stuck run."""
    where = location.where if location is not None else "nowhere"

    def out(decision: Decision, reason: str) -> StepDecision:
        return StepDecision(step_id=step.id, where=where, decision=decision, reason=reason)

    if action == "fail":
        return out(Decision.FAIL, f"action=fail (step {where})")
    if where == "queued":
        return out(Decision.LEAVE, "step queued, not yet delivered: a worker will take it")
    if where == "pending":
        assert location is not None
        idle = f"idle {location.idle_ms} ms" if location.idle_ms is not None else "idle unknown"
        if owner_is_live(
            consumer=location.consumer,
            idle_ms=location.idle_ms,
            live_consumers=live_consumers,
            min_idle_ms=min_idle_ms,
        ):
            return out(Decision.LEAVE, f"step pending with live owner {location.consumer} ({idle})")
        return out(
            Decision.LEAVE_FOR_QUEUE_SWEEP,
            f"step pending with dead or idle owner {location.consumer} ({idle}): the queue sweep requeues it",
        )
    if where == "dlq":
        if action == "retry":
            return out(
                Decision.LEAVE, "step dead-lettered: replay it with dlq-replay (action=retry never fails)"
            )
        return out(Decision.FAIL, "step dead-lettered (failed for good)")
    spent = step.attempts + lost_retries
    what = (
        f"step `{step.status}` in the database but nowhere in the queue (lost"
        + (f"; the gateway answered 'already queued' {lost_retries} time(s))" if lost_retries else ")")
        if is_lost(step_status=step.status, where=where)
        else "step nowhere in the queue"
    )
    if spent >= max_step_retries:
        if action == "retry":
            return out(
                Decision.LEAVE,
                f"{what}, retries exhausted ({spent}/{max_step_retries}); action=retry never fails",
            )
        return out(Decision.FAIL, f"{what}, retries exhausted ({spent}/{max_step_retries})")
    return out(Decision.RETRY, f"{what}: retry {spent + 1}/{max_step_retries}")


def decide(
    *,
    runs: Sequence[str | RunRow],
    steps: Mapping[str, Sequence[StepRow]],
    locations: Mapping[str, StepLocation],
    action: Action = "auto",
    max_step_retries: int = 3,
    min_idle_ms: int = DEFAULT_MIN_IDLE_MS,
    live_consumers: Collection[str] | None = None,
    lost_retries: Mapping[str, int] | None = None,
) -> list[RunDecision]:
    """One decision per stuck run (given as ids or rows), in the order given (see the module docstring).

    ``lost_retries``: per step id, the retries the gateway answered "already queued" while the step was
    nowhere in the queue (they count against ``max_step_retries``)."""
    if action not in ("auto", "fail", "retry"):
        raise ValueError(f"unknown action {action!r}: expected auto, fail or retry")
    if max_step_retries < 0 or min_idle_ms < 0:
        raise ValueError("max_step_retries and min_idle_ms must be >= 0")
    live = set(live_consumers) if live_consumers is not None else None
    lost = lost_retries or {}
    decisions: list[RunDecision] = []
    for run in runs:
        run_id = run if isinstance(run, str) else run.id
        run_steps = list(steps.get(run_id, ()))
        if not run_steps:
            if action == "retry":
                decisions.append(
                    RunDecision(run_id=run_id, decision=Decision.LEAVE, reason="no unfinished step to retry")
                )
            else:
                decisions.append(
                    RunDecision(
                        run_id=run_id,
                        decision=Decision.FAIL,
                        reason="no unfinished step: nothing will finish it",
                    )
                )
            continue
        per_step = [
            decide_step(
                step=step,
                location=locations.get(step.id),
                action=action,
                max_step_retries=max_step_retries,
                min_idle_ms=min_idle_ms,
                live_consumers=live,
                lost_retries=lost.get(step.id, 0),
            )
            for step in run_steps
        ]
        chosen = min(per_step, key=lambda d: _CARE[d.decision])
        retry = (
            [d.step_id for d in per_step if d.decision == Decision.RETRY]
            if chosen.decision == Decision.RETRY
            else []
        )
        reason = (
            chosen.reason
            if len(per_step) == 1
            else f"{chosen.reason} (step {chosen.step_id} of {len(per_step)})"
        )
        decisions.append(
            RunDecision(
                run_id=run_id, decision=chosen.decision, reason=reason, retry_steps=retry, steps=per_step
            )
        )
    return decisions


# --- what the flow does with the decisions ----------------------------------------------------------------


class Plan(BaseModel):
    """The decisions as work: runs to fail, (run, step) pairs to retry, runs left alone, counts per decision."""

    to_fail: list[str] = []
    to_retry: list[tuple[str, str]] = []
    left: list[str] = []
    counts: dict[str, int] = {}


def plan(decisions: Iterable[RunDecision]) -> Plan:
    """Split decisions into the work the sweep does (pure)."""
    out = Plan()
    for d in decisions:
        out.counts[d.decision.value] = out.counts.get(d.decision.value, 0) + 1
        if d.decision == Decision.FAIL:
            out.to_fail.append(d.run_id)
        elif d.decision == Decision.RETRY:
            out.to_retry += [(d.run_id, s) for s in d.retry_steps]
        else:
            out.left.append(d.run_id)
    return out


def decision_rows(
    decisions: Sequence[RunDecision], locations: Mapping[str, StepLocation], *, limit: int = SAMPLE
) -> list[dict[str, str]]:
    """A bounded sample of the per-run decisions for the report: fail and retry first, then the rest."""
    order = {Decision.FAIL: 0, Decision.RETRY: 1, Decision.LEAVE_FOR_QUEUE_SWEEP: 2, Decision.LEAVE: 3}
    rows = []
    for d in sorted(decisions, key=lambda d: order[d.decision])[:limit]:
        loc = locations.get(d.steps[0].step_id) if d.steps else None
        rows.append({
            "run": d.run_id,
            "decision": d.decision.value,
            "steps": ", ".join(s.step_id for s in d.steps) or "-",
            "where": loc.where if loc else "-",
            "owner": (loc.consumer or "-") if loc else "-",
            "reason": d.reason,
        })
    return rows


def sample(ids: Sequence[str], *, limit: int = SAMPLE) -> str:
    """``a, b, c (+N more)``: a bounded list of ids for a report cell."""
    shown = ", ".join(ids[:limit])
    return shown + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


# --- verify --------------------------------------------------------------------------------------------------


class Verification(NamedTuple):
    """One check for the flow to record (``result.check(name, ok, detail, target=target)``)."""

    name: str
    ok: bool
    detail: str
    target: str


def grouped(name: str, evidence: Sequence[tuple[str, bool, str]], *, limit: int = SAMPLE) -> list[Verification]:
    """One check for the targets that hold and one for those that do not (each with a count and a bounded
    sample; the ones that do not hold grouped by their evidence), so a report stays short and the outcome can
    tell "some verified" (partial) from "none"."""
    good = [t for t, ok, _ in evidence if ok]
    bad: dict[str, list[str]] = {}
    for target, ok, why in evidence:
        if not ok:
            bad.setdefault(why, []).append(target)
    out = []
    if good:
        out.append(Verification(name, True, f"{len(good)}/{len(evidence)}: {sample(good, limit=limit)}", name))
    if bad:
        reasons = list(bad.items())
        shown = "; ".join(f"{why}: {sample(targets, limit=limit)}" for why, targets in reasons[:5])
        shown += f"; +{len(reasons) - 5} other reason(s)" if len(reasons) > 5 else ""
        count = sum(len(t) for t in bad.values())
        out.append(Verification(name, False, f"{count}/{len(evidence)} not: {shown}", f"{name} (not verified)"))
    return out


def step_requeued(*, where: str, step_status: str | None) -> tuple[bool, str]:
    """Whether a retried step is where a retry should leave it: queued, or taken by a worker (held in the
    pending list, or already finished by one); and the evidence."""
    if where in ("queued", "pending"):
        return True, f"{where} in the queue"
    if step_status in ("completed", "failed"):
        return True, f"already {step_status} by a worker"
    if step_status is None:
        return False, "no such step in the database"
    if is_lost(step_status=step_status, where=where):
        return False, f"lost: `{step_status}` in the database but {where} in the queue"
    return False, f"{where} in the queue, `{step_status}` in the database"


def verify_sweep(
    *,
    plan: Plan,
    failed: Sequence[str],
    run_status: Mapping[str, str],
    retried: Mapping[str, str],
    step_where: Mapping[str, str],
    step_status: Mapping[str, str],
    lost_retries: Mapping[str, int],
    max_step_retries: int,
) -> list[Verification]:
    """The sweep's checks from what it re-read after acting (see the module docstring).

    ``failed``: runs the fail changed; ``retried``: step id -> the gateway's answer, for every step it asked to
    retry; ``lost_retries``: lost-retry counts of steps found lost now (after counting this sweep's)."""
    changed = set(failed)
    decided_fail = []
    for run in plan.to_fail:
        status = run_status.get(run)
        if run in changed:
            decided_fail.append((run, status == "failed", f"reads `{status}`"))
        else:  # left by the guarded UPDATE: it finished meanwhile (or another sweep failed it)
            decided_fail.append((run, status not in (None, RUNNING), f"finished meanwhile: `{status}`"))
    requeued = []
    run_of = {step: run for run, step in plan.to_retry}
    for step, answer in retried.items():
        run_now = run_status.get(run_of.get(step, ""))
        if run_now not in (None, RUNNING):  # its run ended meanwhile: nothing left to queue
            requeued.append((step, True, f"run finished meanwhile: `{run_now}`"))
            continue
        ok, evidence = step_requeued(where=step_where.get(step, "nowhere"), step_status=step_status.get(step))
        if step in lost_retries:
            evidence += (f" (gateway: {answer}; lost retry {lost_retries[step]}/{max_step_retries} counted, the run"
                         " is failed once they are spent)")
        requeued.append((step, ok, evidence))
    left = [(run, run in run_status, "untouched: " + f"`{run_status[run]}`" if run in run_status else "gone")
            for run in plan.left]
    return (
        grouped("runs decided `fail` are failed (or finished meanwhile)", decided_fail)
        + grouped("retried steps are queued or taken by a worker", requeued)
        + grouped("runs left alone are unchanged", left)
    )


def verify_failed(
    *, failed: Sequence[str], still_running: Collection[str], sample_status: Mapping[str, str]
) -> list[Verification]:
    """The checks of ``action=fail``: every run it failed is no longer ``running`` (read for all of them through
    the stuck-run index), and those of them read back in full (a bounded sample) read ``failed``."""
    running = set(still_running)
    evidence = []
    for run in failed:
        if run in running:
            evidence.append((run, False, "still `running`"))
        elif run in sample_status:
            evidence.append((run, sample_status[run] == "failed", f"reads `{sample_status[run]}`"))
        else:
            evidence.append((run, True, "no longer `running`"))
    shown = Counter(sample_status.values())
    name = "runs failed are no longer `running` (" + (
        ", ".join(f"{n} of the sample read `{status}`" for status, n in sorted(shown.items())) or "none read back"
    ) + ")"
    return grouped(name, evidence)
