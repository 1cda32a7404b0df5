"""What to do with each stuck run, from where its unfinished steps are in the queue (pure, no I/O).

Per step:
- queued (in the stream, not yet delivered)          -> leave: a worker will take it;
- pending with a live owner                          -> leave: a worker is on it;
- pending with a dead or long-idle owner             -> leave for the queue sweep (it requeues the entry);
- in the DLQ                                         -> fail the run (the step failed for good);
- nowhere in the queue, retries left                 -> retry the step through the gateway;
- nowhere, ``attempts >= max_step_retries``          -> fail the run.
A run takes the most careful of its steps' decisions (leave > leave-for-queue-sweep > fail > retry); a run
with no unfinished step is failed (nothing will ever finish it). ``action="fail"`` fails every run found;
``action="retry"`` never fails: it retries what is nowhere and leaves the rest, saying why.

"Live owner": when the caller passes ``live_consumers`` (the crash/hang flows: consumer names of live worker
pods), only those are live; otherwise (the sweep alone) an owner is live while its entry is idle for less than
``min_idle_ms`` (the runbook's 5 minutes).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel

from tasks.queue import StepLocation
from tasks.runs import RunRow, StepRow

Action = Literal["auto", "fail", "retry"]
DEFAULT_MIN_IDLE_MS = 300_000


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


def decide_step(
    *,
    step: StepRow,
    location: StepLocation | None,
    action: Action,
    max_step_retries: int,
    min_idle_ms: int,
    live_consumers: Collection[str] | None,
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
    if step.attempts >= max_step_retries:
        if action == "retry":
            return out(
                Decision.LEAVE,
                f"retries exhausted ({step.attempts}/{max_step_retries}); action=retry never fails",
            )
        return out(
            Decision.FAIL,
            f"step nowhere in the queue, retries exhausted ({step.attempts}/{max_step_retries})",
        )
    return out(Decision.RETRY, f"step nowhere in the queue: retry {step.attempts + 1}/{max_step_retries}")


def decide(
    *,
    runs: Sequence[str | RunRow],
    steps: Mapping[str, Sequence[StepRow]],
    locations: Mapping[str, StepLocation],
    action: Action = "auto",
    max_step_retries: int = 3,
    min_idle_ms: int = DEFAULT_MIN_IDLE_MS,
    live_consumers: Collection[str] | None = None,
) -> list[RunDecision]:
    """One decision per stuck run (given as ids or rows), in the order given (see the module docstring)."""
    if action not in ("auto", "fail", "retry"):
        raise ValueError(f"unknown action {action!r}: expected auto, fail or retry")
    if max_step_retries < 0 or min_idle_ms < 0:
        raise ValueError("max_step_retries and min_idle_ms must be >= 0")
    live = set(live_consumers) if live_consumers is not None else None
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
