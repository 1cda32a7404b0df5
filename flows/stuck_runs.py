"""The runbook's "Stuck Runs Recovery" as three flows: the guarded sweep and its two manual commands.

- ``stuck-runs-sweep``: runs ``running`` for too long, cross-checked with where their steps are in the queue,
  are left alone (a worker is on it, or the queue sweep will requeue it), retried through the gateway, or
  failed with ``WORKER_TIMEOUT`` (see ``tasks.stuck_policy``). At most ``max_runs`` per run of the flow.
  ``action=fail`` needs no per-run decision: one set-based UPDATE picks and fails the oldest stuck runs.
- ``fail-run``: mark one running run failed (the runbook's UPDATE), guarded by ``status = 'running'``.
- ``retry-step``: re-enqueue one step through the gateway (the runbook's curl), unless it is already queued.
All three: dry run by default, refuse while the kill switch is on, idempotent, and publish a keyed report.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from tasks.events import emit_recovery_event
from tasks.gateway import GatewayError, RetryOutcome, retry_steps_task, validate_id
from tasks.guard import check, refuse_if_paused
from tasks.queue import StepLocation, locate_steps_task
from tasks.report import Report
from tasks.runs import (
    WORKER_TIMEOUT,
    count_stuck_runs,
    count_stuck_runs_task,
    fail_runs_task,
    fail_stuck_runs_task,
    find_stuck_runs_task,
    find_unfinished_steps_task,
    read_runs_task,
    read_step_task,
)
from tasks.settings import Settings, get_settings
from tasks.stuck_policy import DEFAULT_MIN_IDLE_MS, Decision, RunDecision, decide

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


class SweepResult(BaseModel):
    """What one sweep found, decided and did (returned by the flow, also in its report)."""

    found: int
    more_than_max_runs: bool
    decisions: dict[str, int]
    failed: list[str] = []
    not_failed: list[str] = []
    retried: list[str] = []
    retry_outcomes: dict[str, str] = {}
    retry_errors: dict[str, str] = {}
    guard: str
    dry_run: bool


class FailRunResult(BaseModel):
    run_id: str
    changed: bool
    status_before: str | None
    status_after: str | None
    reason: str


class RetryStepResult(BaseModel):
    run_id: str
    step_id: str
    changed: bool
    outcome: str
    where_before: str | None
    where_after: str | None
    reason: str


def _decision_rows(decisions: list[RunDecision], locations: dict[str, StepLocation]) -> list[dict]:
    rows = []
    for d in decisions:
        step = d.steps[0] if d.steps else None
        loc = locations.get(step.step_id) if step else None
        rows.append(
            {
                "run": d.run_id,
                "decision": d.decision.value,
                "steps": ", ".join(s.step_id for s in d.steps) or "-",
                "where": loc.where if loc else "-",
                "owner": (loc.consumer or "-") if loc else "-",
                "reason": d.reason,
            }
        )
    return rows


@flow(
    name="stuck-runs-sweep",
    flow_run_name="stuck-runs-sweep {action} older-than-{older_than_minutes}m dry-run-{dry_run}",
    description=(
        "Runs stuck in `running` for over N minutes: for each, look where its step is in the queue and leave it "
        "(a live worker has it / the queue sweep will requeue it), retry it through the gateway, or fail the run "
        "with WORKER_TIMEOUT (action=fail: every stuck run, in one statement). Every UPDATE re-checks `running` "
        "and the cutoff, so a run that finishes meanwhile is never touched. Dry run by default."
    ),
)
def stuck_runs_sweep(
    older_than_minutes: Annotated[
        int,
        Field(ge=1, le=10080, description="A run is stuck when `running` for longer than this (minutes)."),
    ] = 30,
    action: Annotated[
        Literal["auto", "fail", "retry"],
        Field(
            description="auto: decide per run from the queue; fail: fail every stuck run; retry: never fail."
        ),
    ] = "auto",
    max_runs: Annotated[
        int, Field(ge=1, le=10000, description="Blast radius: act on at most this many runs per sweep.")
    ] = 100,
    max_step_retries: Annotated[
        int,
        Field(
            ge=0, le=10, description="Retry a step through the gateway at most this many times, then fail."
        ),
    ] = 3,
    min_idle_ms: Annotated[
        int,
        Field(
            ge=0,
            le=86_400_000,
            description="A pending step's owner counts as alive while idle less than this.",
        ),
    ] = DEFAULT_MIN_IDLE_MS,
    live_consumers: Annotated[
        list[str] | None,
        Field(
            description="Consumers known alive (worker pods); when given, only these count as live owners."
        ),
    ] = None,
    dry_run: Annotated[bool, Field(description="Only report what would be done.")] = True,
) -> SweepResult:
    """Find stuck runs, decide per run from the queue, then fail / retry within the guard, verify, report.

    Args:
        older_than_minutes: A run is stuck when `running` for longer than this (minutes).
        action: auto: decide per run from the queue; fail: fail every stuck run; retry: never fail.
        max_runs: Blast radius: act on at most this many runs per sweep (the oldest first).
        max_step_retries: Retry a step through the gateway at most this many times, then fail its run.
        min_idle_ms: A pending step's owner counts as alive while idle less than this (ms; runbook: 5 minutes).
        live_consumers: Consumers known alive (worker pods); when given, only these count as live owners.
        dry_run: Only report what would be done.
    """
    settings = get_settings()
    logger = get_run_logger()
    report = Report(title=f"stuck-runs-sweep ({action}, older than {older_than_minutes} min)")
    cutoff = datetime.now(UTC) - timedelta(minutes=older_than_minutes)

    if action == "fail":
        result = _fail_every_stuck_run(
            settings=settings, report=report, cutoff=cutoff, max_runs=max_runs, dry_run=dry_run
        )
        report.outcome = (
            "dry run" if dry_run else ("refused" if result.guard.startswith("refused") else "completed")
        )
        report.publish(key="stuck-runs-sweep")
        if result.failed:
            emit_recovery_event(
                action="stuck-runs-swept",
                resource_id="runs",
                payload={"failed": result.failed[:100], "retried": [], "found": result.found},
            )
        logger.info(
            "stuck-runs-sweep: action=fail, found %d, failed %d (%s)",
            result.found,
            len(result.failed),
            result.guard,
        )
        return result

    # observe
    found = find_stuck_runs_task(settings=settings, cutoff=cutoff, limit=max_runs + 1)
    more = len(found) > max_runs
    found = found[:max_runs]
    run_ids = found
    steps = find_unfinished_steps_task(settings=settings, run_ids=run_ids) if run_ids else {}
    step_ids = [s.id for run_steps in steps.values() for s in run_steps]
    locations = locate_steps_task(settings=settings, step_ids=step_ids) if step_ids else {}
    report.add(
        "Observed",
        f"{len(found)} run(s) `running` since before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
        + (f" (more than max_runs={max_runs}; the rest wait for the next sweep)" if more else "")
        + f"; {len(step_ids)} unfinished step(s); queue: "
        + (", ".join(f"{k} {v}" for k, v in Counter(loc.where for loc in locations.values()).items()) or "-"),
    )

    # decide
    decisions = decide(
        runs=found,
        steps=steps,
        locations=locations,
        action=action,
        max_step_retries=max_step_retries,
        min_idle_ms=min_idle_ms,
        live_consumers=live_consumers,
    )
    counts = Counter(d.decision.value for d in decisions)
    report.add("Decided", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing to do")
    report.table("Decided", _decision_rows(decisions, locations), caption="Per run")
    to_fail = [d.run_id for d in decisions if d.decision == Decision.FAIL]
    to_retry = [(d.run_id, s) for d in decisions if d.decision == Decision.RETRY for s in d.retry_steps]

    # act
    verdict = refuse_if_paused(dry_run=dry_run, settings=settings)
    result = SweepResult(
        found=len(found),
        more_than_max_runs=more,
        decisions=dict(counts),
        guard=verdict.reason,
        dry_run=dry_run,
    )
    auth_error: GatewayError | None = None
    if not (to_fail or to_retry):
        report.add("Done", "nothing to change")
    elif not verdict.allowed:
        report.add(
            "Done", f"{verdict.reason}: would fail {len(to_fail)} run(s) and retry {len(to_retry)} step(s)"
        )
    else:
        if to_fail:
            failed = fail_runs_task(
                settings=settings, run_ids=to_fail, cutoff=cutoff, error=dict(WORKER_TIMEOUT)
            )
            result.failed, result.not_failed = failed.changed, failed.unchanged
            report.add(
                "Done",
                f"failed {len(failed.changed)} run(s) with WORKER_TIMEOUT"
                + (
                    f"; {len(failed.unchanged)} had finished meanwhile and were left as they are"
                    if failed.unchanged
                    else ""
                ),
            )
            reasons = {d.run_id: d.reason for d in decisions}
            report.table(
                "Done",
                [{"run": i, "done": "failed (WORKER_TIMEOUT)", "reason": reasons[i]} for i in failed.changed]
                + [
                    {"run": i, "done": "left: no longer running", "reason": reasons[i]}
                    for i in failed.unchanged
                ],
                caption="Runs failed",
            )
        if to_retry:
            try:
                batch = retry_steps_task(settings=settings, targets=to_retry)
            except GatewayError as e:
                auth_error = e
                report.add("Done", f"gateway retries stopped: {e}")
            else:
                result.retry_outcomes = {f"{o.run_id}/{o.step_id}": o.outcome for o in batch.outcomes}
                result.retried = [o.step_id for o in batch.outcomes if o.changed]
                result.retry_errors = batch.errors
                report.table("Done", _outcome_rows(batch.outcomes, batch.errors), caption="Gateway retries")

    # verify
    if result.failed or result.not_failed:
        now = read_runs_task(settings=settings, run_ids=result.failed + result.not_failed)
        ok = sum(1 for i in result.failed if now.get(i) and now[i].status == "failed")
        report.add("Verified", f"{ok}/{len(result.failed)} failed run(s) read back as `failed`")
        report.table(
            "Verified",
            [{"run": i, "status": now[i].status if i in now else "gone"} for i in result.not_failed],
            caption="Found stuck but not failed (finished meanwhile)",
        )
    if result.retried:
        after = locate_steps_task(settings=settings, step_ids=result.retried)
        queued = sum(1 for loc in after.values() if loc.where in ("queued", "pending"))
        report.add("Verified", f"{queued}/{len(result.retried)} retried step(s) are back in the queue")
    still = count_stuck_runs(settings=settings, cutoff=cutoff)
    report.add("Verified", f"{still} run(s) still `running` since before the cutoff")

    report.outcome = "dry run" if dry_run else ("refused" if not verdict.allowed else "completed")
    if auth_error is not None:
        report.outcome = "failed"
    report.publish(key="stuck-runs-sweep")
    if result.failed or result.retried:
        emit_recovery_event(
            action="stuck-runs-swept",
            resource_id="runs",
            payload={"failed": result.failed[:100], "retried": result.retried[:100], "found": len(found)},
        )
    logger.info(
        "stuck-runs-sweep: found %d, decided %s, failed %d, retried %d (%s)",
        len(found),
        dict(counts),
        len(result.failed),
        len(result.retried),
        verdict.reason,
    )
    if auth_error is not None:
        raise auth_error
    return result


def _fail_every_stuck_run(
    *, settings: Settings, report: Report, cutoff: datetime, max_runs: int, dry_run: bool
) -> SweepResult:
    """``action=fail``: no per-run decision, so no ids travel: count, then fail the oldest ``max_runs`` stuck runs
    in one guarded statement (``fail_stuck_runs``) and count again. A dry run or a refusal lists what it would
    fail instead."""
    # observe
    stuck = count_stuck_runs_task(settings=settings, cutoff=cutoff)
    found, more = min(stuck, max_runs), stuck > max_runs
    report.add(
        "Observed",
        f"{stuck} run(s) `running` since before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
        + (f" (more than max_runs={max_runs}; the rest wait for the next sweep)" if more else ""),
    )
    # decide: action=fail fails every stuck run, oldest first, at most max_runs
    report.add(
        "Decided",
        f"action=fail: fail {found} run(s) (the oldest, at most max_runs={max_runs}) with WORKER_TIMEOUT, "
        "in one UPDATE that re-checks `running` and the cutoff on every row",
    )
    # act
    verdict = refuse_if_paused(dry_run=dry_run, settings=settings)
    result = SweepResult(
        found=found,
        more_than_max_runs=more,
        decisions={Decision.FAIL.value: found} if found else {},
        guard=verdict.reason,
        dry_run=dry_run,
    )
    if not found:
        report.add("Done", "nothing to change")
    elif not verdict.allowed:
        would = find_stuck_runs_task(settings=settings, cutoff=cutoff, limit=max_runs)
        report.add("Done", f"{verdict.reason}: would fail {len(would)} run(s)")
        report.table(
            "Done",
            [{"run": i, "would": "fail (WORKER_TIMEOUT)", "reason": "action=fail"} for i in would],
            caption="Runs it would fail (oldest first)",
        )
    else:
        result.failed = fail_stuck_runs_task(
            settings=settings, cutoff=cutoff, limit=max_runs, error=dict(WORKER_TIMEOUT)
        )
        skipped = found - len(result.failed)
        report.add(
            "Done",
            f"failed {len(result.failed)} run(s) with WORKER_TIMEOUT"
            + (
                f"; {skipped} finished meanwhile (or another sweep holds them) and were left"
                if skipped > 0
                else ""
            ),
        )
        report.table(
            "Done",
            [{"run": i, "done": "failed (WORKER_TIMEOUT)", "reason": "action=fail"} for i in result.failed],
            caption="Runs failed (oldest first)",
        )
    # verify: the UPDATE's RETURNING names exactly the rows it changed; what is left stuck is one count
    still = count_stuck_runs_task(settings=settings, cutoff=cutoff)
    report.add(
        "Verified",
        f"{still} run(s) still `running` since before the cutoff"
        + (f" (expected {stuck - len(result.failed)})" if result.failed else ""),
    )
    return result


def _outcome_rows(outcomes: list[RetryOutcome], errors: dict[str, str]) -> list[dict]:
    rows = [
        {"run": o.run_id, "step": o.step_id, "outcome": o.outcome, "http": o.status_code} for o in outcomes
    ]
    for target, message in errors.items():
        run_id, step_id = target.split("/", 1)
        rows.append({"run": run_id, "step": step_id, "outcome": "error", "http": message})
    return rows


@flow(
    name="fail-run",
    flow_run_name="fail-run {run_id} dry-run-{dry_run}",
    description=(
        "Mark one `running` run failed with an error code and message (WORKER_TIMEOUT by default) — the runbook's "
        "manual UPDATE, guarded: a run that is no longer running is left as it is. Dry run by default."
    ),
)
def fail_run(
    run_id: Annotated[str, Field(pattern=_ID_PATTERN, description="The run to fail, e.g. `run_01H...`.")],
    code: Annotated[str, Field(min_length=1, max_length=64, description="Error code written to the run.")] = (
        "WORKER_TIMEOUT"
    ),
    message: Annotated[
        str, Field(min_length=1, max_length=500, description="Error message written to the run.")
    ] = ("Worker did not respond"),
    dry_run: Annotated[bool, Field(description="Only report what would be done.")] = True,
) -> FailRunResult:
    """Observe the run, ask the guard, fail it if still running, read it back, report.

    Args:
        run_id: The run to fail, e.g. `run_01H...` (letters, digits, `_.:-`).
        code: Error code written to the run's `error` JSON.
        message: Error message written to the run's `error` JSON.
        dry_run: Only report what would be done.
    """
    validate_id(run_id, what="run id")
    settings = get_settings()
    report = Report(title=f"fail-run {run_id}")
    before = read_runs_task(settings=settings, run_ids=[run_id]).get(run_id)
    status_before = before.status if before else None
    report.add("Observed", f"run `{run_id}`: " + (f"status `{status_before}`" if before else "not found"))
    if before is None or before.status != "running":
        reason = "no such run" if before is None else f"already `{before.status}`: nothing to do"
        report.add("Decided", reason)
        report.outcome = "no change"
        report.publish(key="fail-run")
        return FailRunResult(
            run_id=run_id,
            changed=False,
            status_before=status_before,
            status_after=status_before,
            reason=reason,
        )
    report.add("Decided", f"fail it with `{code}`: {message}")
    verdict = check(action="fail-run", target=run_id, dry_run=dry_run, settings=settings, cooldown_s=0)
    changed = False
    if verdict.allowed:
        result = fail_runs_task(
            settings=settings, run_ids=[run_id], cutoff=None, error={"code": code, "message": message}
        )
        changed = bool(result.changed)
        report.add("Done", "failed" if changed else "it finished meanwhile: left as it is")
    else:
        report.add("Done", verdict.reason)
    after = read_runs_task(settings=settings, run_ids=[run_id]).get(run_id)
    status_after = after.status if after else None
    report.add(
        "Verified",
        f"status now `{status_after}`" + (f", error {after.error}" if after and after.error else ""),
    )
    report.outcome = "completed" if changed else ("dry run" if verdict.dry_run else "no change")
    report.publish(key="fail-run")
    if changed:
        emit_recovery_event(action="run-failed", resource_id=f"run.{run_id}", payload={"code": code})
    return FailRunResult(
        run_id=run_id,
        changed=changed,
        status_before=status_before,
        status_after=status_after,
        reason=verdict.reason,
    )


@flow(
    name="retry-step",
    flow_run_name="retry-step {run_id}/{step_id} dry-run-{dry_run}",
    description=(
        "Re-enqueue one step through the gateway's retry API — the runbook's manual curl — unless the step is "
        "already queued or held by a worker. The API key is never shown. Dry run by default."
    ),
)
def retry_step(
    run_id: Annotated[str, Field(pattern=_ID_PATTERN, description="The step's run.")],
    step_id: Annotated[str, Field(pattern=_ID_PATTERN, description="The step to re-enqueue.")],
    dry_run: Annotated[bool, Field(description="Only report what would be done.")] = True,
) -> RetryStepResult:
    """Observe the step (database and queue), ask the guard, call the gateway, check it is queued, report.

    Args:
        run_id: The step's run (letters, digits, `_.:-`).
        step_id: The step to re-enqueue (letters, digits, `_.:-`).
        dry_run: Only report what would be done.
    """
    validate_id(run_id, what="run id")
    validate_id(step_id, what="step id")
    settings = get_settings()
    report = Report(title=f"retry-step {run_id}/{step_id}")
    step = read_step_task(settings=settings, run_id=run_id, step_id=step_id)
    where = locate_steps_task(settings=settings, step_ids=[step_id])[step_id]
    report.add(
        "Observed",
        (
            f"step `{step_id}` of run `{run_id}`: status `{step.status}`, attempts {step.attempts}"
            if step
            else f"run `{run_id}` has no step `{step_id}` in the database"
        )
        + f"; queue: {where.where}"
        + (f" (owner {where.consumer}, idle {where.idle_ms} ms)" if where.consumer else ""),
    )

    def finish(
        outcome: str, reason: str, changed: bool = False, where_after: str | None = None
    ) -> RetryStepResult:
        report.outcome = "completed" if changed else ("dry run" if outcome == "dry-run" else "no change")
        report.publish(key="retry-step")
        return RetryStepResult(
            run_id=run_id,
            step_id=step_id,
            changed=changed,
            outcome=outcome,
            where_before=where.where,
            where_after=where_after or where.where,
            reason=reason,
        )

    if where.where in ("queued", "pending"):
        reason = f"already {where.where} in the queue: not retried (no double work)"
        report.add("Decided", reason)
        return finish("already_queued", reason)
    report.add("Decided", "re-enqueue it through the gateway")
    verdict = check(
        action="retry-step", target=f"{run_id}/{step_id}", dry_run=dry_run, settings=settings, cooldown_s=0
    )
    if not verdict.allowed:
        report.add("Done", verdict.reason)
        return finish("dry-run" if verdict.dry_run else "refused", verdict.reason)
    try:
        batch = retry_steps_task(settings=settings, targets=[(run_id, step_id)])
    except GatewayError as e:
        report.add("Done", f"gateway call failed: {e}")
        report.outcome = "failed"
        report.publish(key="retry-step")
        raise
    if batch.errors:
        message = next(iter(batch.errors.values()))
        report.add("Done", f"gateway call failed: {message}")
        report.outcome = "failed"
        report.publish(key="retry-step")
        raise GatewayError(message)
    outcome = batch.outcomes[0]
    report.add("Done", f"gateway answered {outcome.status_code}: {outcome.outcome} {outcome.detail}".rstrip())
    after = locate_steps_task(settings=settings, step_ids=[step_id])[step_id]
    report.add("Verified", f"queue: {after.where}" + (f" (entry {after.entry_id})" if after.entry_id else ""))
    if outcome.changed:
        emit_recovery_event(action="step-retried", resource_id=f"step.{step_id}", payload={"run_id": run_id})
    return finish(
        outcome.outcome, f"gateway: {outcome.outcome}", changed=outcome.changed, where_after=after.where
    )
