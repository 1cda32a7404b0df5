"""The runbook's "Stuck Runs Recovery" as three flows: the guarded sweep and its two manual commands.

- ``stuck-runs-sweep``: runs ``running`` for too long, cross-checked with where their steps are in the queue,
  are left alone (a worker is on it, or the queue sweep will requeue it), retried through the gateway, or
  failed with ``WORKER_TIMEOUT`` (``tasks.stuck_policy``, pure). At most ``max_runs`` per run of the flow.
  ``action=fail`` needs no per-run decision: one set-based UPDATE picks and fails the oldest stuck runs.
- ``fail-run``: mark one running run failed (the runbook's UPDATE), guarded by ``status = 'running'``.
- ``retry-step``: re-enqueue one step through the gateway (the runbook's curl), unless it is already queued.
Each: observe -> decide -> act (guarded tasks: dry run by default, kill switch) -> verify (one re-read of what it
touched: failed runs read ``failed``, retried steps are queued or taken, left runs unchanged) -> a typed result
and its keyed report. A step the gateway calls "already queued" while no stream has it is a lost retry, counted
against ``max_step_retries`` so its run is failed in the end instead of being retried forever.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal, TypedDict

from prefect import flow
from pydantic import Field

from flows._ui import LoggedResult, describe_parameters, keep_typed_name
from tasks import approval, gateway, queue, runs, stuck_policy
from tasks.approval import ApprovalRecord
from tasks.events import emit_recovery_event
from tasks.gateway import RetryAnswer, RetryBatch, validate_id
from tasks.outcome import ActionStatus, RecoveryResult, Table
from tasks.report import conclude, recording
from tasks.settings import Settings, get_settings
from tasks.stuck_policy import DEFAULT_MIN_IDLE_MS, SAMPLE, Plan, sample

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
SWEEP, FAIL_RUN, RETRY_STEP = "stuck-runs-sweep", "fail-run", "retry-step"


class Policy(TypedDict):
    """The sweep's parameters that feed ``stuck_policy.decide``."""

    action: stuck_policy.Action
    max_step_retries: int
    min_idle_ms: int
    live_consumers: list[str] | None


class StuckRunsSweep(LoggedResult):
    """What one sweep found, decided, did and verified (ids of what it changed; counts of the rest)."""

    action: Literal["auto", "fail", "retry"]
    found: int = 0
    more_than_max_runs: bool = False
    decisions: dict[str, int] = {}
    failed: list[str] = []  # runs failed now
    not_failed: list[str] = []  # decided fail, but finished meanwhile: left as they are
    would_fail: list[str] = []  # dry run
    retried: list[str] = []  # steps re-enqueued by the gateway
    would_retry: list[str] = []  # dry run
    retry_outcomes: dict[str, RetryAnswer] = {}  # "run/step" -> the gateway's answer
    retry_errors: dict[str, str] = {}
    lost_retries: dict[str, int] = {}  # step -> lost retries counted so far (see the module docstring)
    approval: ApprovalRecord | None = None


class FailRun(LoggedResult):
    """One ``fail-run``: the run's status before and after, and whether this run changed it."""

    run_id: str
    status_before: str | None = None
    status_after: str | None = None
    changed: bool = False
    approval: ApprovalRecord | None = None


class RetryStep(LoggedResult):
    """One ``retry-step``: where the step was and is, the gateway's answer, and whether it was re-enqueued."""

    run_id: str
    step_id: str
    where_before: str | None = None
    where_after: str | None = None
    answer: RetryAnswer | None = None
    changed: bool = False
    lost_retries: int = 0


def _unchanged_unless(result: RecoveryResult, changed: bool) -> None:
    """The last action changed nothing (every row it targeted was already as wanted): record it so."""
    if not changed and result.actions and result.actions[-1].status is ActionStatus.DONE:
        result.actions[-1].status = ActionStatus.UNCHANGED


def _acted(result: RecoveryResult) -> bool:
    return any(a.status in (ActionStatus.DONE, ActionStatus.UNCHANGED) for a in result.actions)


def _n(items: Sequence[object] | int, what: str) -> str:
    return f"{items if isinstance(items, int) else len(items)} {what}(s)"


@flow(
    name=SWEEP,
    flow_run_name=keep_typed_name("stuck-runs-sweep {action} older-than-{older_than_minutes}m dry-run-{dry_run}"),
    description=(
        "Runs stuck in `running` for over N minutes: for each, look where its step is in the queue and leave it "
        "(a live worker has it / the queue sweep will requeue it), retry it through the gateway, or fail the run "
        "with WORKER_TIMEOUT (action=fail: every stuck run, in one statement). Every UPDATE re-checks `running` "
        "and the cutoff, so a run that finishes meanwhile is never touched. Verifies by re-reading what it "
        "touched. Failing more than FD_APPROVAL_FAILED_RUNS runs waits for a person's approval. Dry run by default."
    ),
)
@describe_parameters
def stuck_runs_sweep(
    older_than_minutes: Annotated[
        int, Field(ge=1, le=10080, title="Stuck after (min)",
                   description="A run is stuck when `running` for longer than this.")
    ] = 30,
    action: Annotated[
        Literal["auto", "fail", "retry"],
        Field(title="Action",
              description="auto: decide per run from the queue; fail: fail every stuck run; retry: never fail."),
    ] = "auto",
    max_runs: Annotated[
        int, Field(ge=1, le=10000, title="Max runs (runs)",
                   description="Blast radius: act on at most this many runs per sweep (the oldest first).")
    ] = 100,
    max_step_retries: Annotated[
        int, Field(ge=0, le=10, title="Max step retries (retries)",
                   description="Retry a step through the gateway at most this many times, then fail its run.")
    ] = 3,
    min_idle_ms: Annotated[
        int,
        Field(ge=0, le=86_400_000, title="Owner alive while idle under (ms)",
              description="A pending step's owner counts as alive while idle less than this (runbook: 5 minutes)."),
    ] = DEFAULT_MIN_IDLE_MS,
    live_consumers: Annotated[
        list[str] | None,
        Field(title="Live consumers",
              description="Consumers known alive (worker pods); when given, only these count as live owners; "
              "empty: judged from the queue."),
    ] = None,
    dry_run: Annotated[bool, Field(title="Dry run", description="Only report what would be done.")] = True,
) -> StuckRunsSweep:
    """Find stuck runs, decide per run from the queue, fail / retry within the guard, verify, report."""
    settings = get_settings()
    cutoff = datetime.now(UTC) - timedelta(minutes=older_than_minutes)
    title = f"stuck-runs-sweep ({action}, older than {older_than_minutes} min)" + (" (dry run)" if dry_run else "")
    with recording(StuckRunsSweep(flow=SWEEP, title=title, dry_run=dry_run, action=action)) as result:
        if action == "fail":
            _fail_oldest(result, settings=settings, cutoff=cutoff, max_runs=max_runs, dry_run=dry_run)
        else:
            _sweep_by_policy(result, settings=settings, cutoff=cutoff, max_runs=max_runs, dry_run=dry_run,
                             policy=Policy(action=action, max_step_retries=max_step_retries,
                                           min_idle_ms=min_idle_ms, live_consumers=live_consumers or None))
    if result.failed or result.retried:  # also when verifying failed afterwards: these changes happened
        emit_recovery_event(action="stuck-runs-swept", resource_id="runs", payload={
            "failed": result.failed[:100], "retried": result.retried[:100], "found": result.found})
    return conclude(result, key=SWEEP)


def _sweep_by_policy(
    result: StuckRunsSweep, *, settings: Settings, cutoff: datetime, max_runs: int, dry_run: bool, policy: Policy
) -> None:
    """action auto / retry: observe the runs, their steps and where those are; decide per run; act; verify."""
    # observe
    found = runs.find_stuck_runs_task(settings=settings, cutoff=cutoff, limit=max_runs + 1)
    result.more_than_max_runs, found = len(found) > max_runs, found[:max_runs]
    result.found = len(found)
    steps = runs.find_unfinished_steps_task(settings=settings, run_ids=found) if found else {}
    step_ids = [s.id for group in steps.values() for s in group]
    where = queue.locate_steps_task(settings=settings, step_ids=step_ids) if step_ids else {}
    nowhere = [s for s in step_ids if s not in where or where[s].where == "nowhere"]
    lost = gateway.lost_retries_task(settings=settings, step_ids=nowhere) if nowhere else {}
    result.note("observed", _observed(found, result.more_than_max_runs, max_runs, cutoff, step_ids, where, lost))
    # decide
    decisions = stuck_policy.decide(runs=found, steps=steps, locations=where, lost_retries=lost, **policy)
    work = stuck_policy.plan(decisions)
    result.decisions = work.counts
    result.note("decided", ", ".join(f"{k}: {v}" for k, v in sorted(work.counts.items())) or "nothing to do")
    if decisions:
        more = f"; the first {SAMPLE} of {len(decisions)}" if len(decisions) > SAMPLE else ""
        result.note("decided", Table(caption=f"Per run (fail and retry first{more})",
                                     rows=stuck_policy.decision_rows(decisions, where)))
    # act (failing more runs than FD_APPROVAL_FAILED_RUNS waits for a person; rejected: nothing is done)
    ask = approval.failed_runs(settings, len(work.to_fail), action="fail-runs", sample=work.to_fail)
    if not approval.approve(result, ask, settings=settings, dry_run=dry_run, key=SWEEP):
        return
    if work.to_fail:
        failed = result.perform(
            "fail-runs", _n(work.to_fail, "run"), dry_run=dry_run,
            call=lambda: runs.fail_runs_task(settings=settings, run_ids=work.to_fail, cutoff=cutoff,
                                             error=dict(runs.WORKER_TIMEOUT), dry_run=dry_run),
            count=lambda f: len(f.would_change if dry_run else f.changed), detail=lambda f: _fail_detail(f, dry_run))
        if failed is not None:
            _unchanged_unless(result, dry_run or bool(failed.changed))
            result.failed, result.not_failed, result.would_fail = failed.changed, failed.unchanged, failed.would_change
    batch = _retry(result, settings=settings, targets=work.to_retry, dry_run=dry_run) if work.to_retry else None
    # verify: one re-read of every run found, the retried steps' rows and where those steps are now
    if _acted(result):
        _verify_sweep(result, settings=settings, found=found, work=work, batch=batch,
                      max_step_retries=policy["max_step_retries"])


def _retry(result: StuckRunsSweep | RetryStep, *, settings: Settings, targets: list[tuple[str, str]],
           dry_run: bool, target: str | None = None) -> RetryBatch | None:
    """Ask the gateway to re-enqueue these steps (guarded); a step the gateway could not answer is a failed action."""
    batch = result.perform(
        "retry-steps", target or _n(targets, "step"), dry_run=dry_run,
        call=lambda: gateway.retry_steps_task(settings=settings, targets=targets, dry_run=dry_run),
        count=lambda b: len(targets) if dry_run else len(b.retried),
        detail=lambda b: f"would retry {sample([s for _, s in targets])}" if dry_run else b.summary())
    if isinstance(result, StuckRunsSweep) and batch is not None:
        result.would_retry = [s for _, s in targets] if dry_run else []
        result.retried, result.retry_errors = batch.retried, batch.errors
        result.retry_outcomes = {f"{o.run_id}/{o.step_id}": o.outcome for o in batch.outcomes}
    errors = batch.errors if batch else {}
    if len(targets) == 1 and errors:  # the one step could not be retried: that action failed
        result.actions[-1].status, result.actions[-1].detail = ActionStatus.FAILED, next(iter(errors.values()))
    else:
        for failed_target, message in errors.items():
            result.act("retry-step", failed_target, ActionStatus.FAILED, detail=message)
    return batch


def _verify_sweep(result: StuckRunsSweep, *, settings: Settings, found: list[str], work: Plan,
                  batch: RetryBatch | None, max_step_retries: int) -> None:
    """Re-read what the sweep touched (runs: one set-based read; retried steps: their rows and the queue) and
    check each has the state decided; count lost retries."""
    answered = {o.step_id: o.outcome for o in batch.outcomes} if batch else {}
    status = runs.read_run_statuses_task(settings=settings, run_ids=found)
    where, step_status = _step_state(settings, list(answered))
    result.lost_retries = _count_lost(settings, answered, where, step_status)
    for v in stuck_policy.verify_sweep(plan=work, failed=result.failed, run_status=status, retried=answered,
                                       step_where=where, step_status=step_status,
                                       lost_retries=result.lost_retries, max_step_retries=max_step_retries):
        result.check(v.name, v.ok, v.detail, target=v.target)


def _step_state(settings: Settings, step_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Where these steps are in the queue now, and their rows' status (one locate, one set-based read)."""
    if not step_ids:
        return {}, {}
    located = queue.locate_steps_task(settings=settings, step_ids=step_ids)
    return {s: loc.where for s, loc in located.items()}, runs.read_step_statuses_task(settings=settings,
                                                                                         step_ids=step_ids)


def _count_lost(settings: Settings, answered: dict[str, str], where: dict[str, str],
                step_status: dict[str, str]) -> dict[str, int]:
    """Count a lost retry for each step the gateway called "already queued" that no stream holds."""
    lost = [s for s, answer in answered.items()
            if answer == "already_queued" and stuck_policy.is_lost(step_status=step_status.get(s),
                                                                    where=where.get(s, "nowhere"))]
    return gateway.count_lost_retries_task(settings=settings, step_ids=lost) if lost else {}


def _observed(found: list[str], more: bool, max_runs: int, cutoff: datetime, step_ids: list[str],
              where: dict[str, queue.StepLocation], lost: dict[str, int]) -> str:
    places = Counter(loc.where for loc in where.values())
    return (f"{len(found)} run(s) `running` since before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
            + (f" (more than max_runs={max_runs}; the rest wait for the next sweep)" if more else "")
            + f"; {len(step_ids)} unfinished step(s); queue: "
            + (", ".join(f"{k} {v}" for k, v in sorted(places.items())) or "-")
            + (f"; lost retries so far: {', '.join(f'{s} {n}' for s, n in sorted(lost.items())[:SAMPLE])}"
               if lost else ""))


def _fail_detail(failed: runs.FailResult, dry_run: bool) -> str:
    if dry_run:
        return f"would fail {sample(failed.would_change)} with WORKER_TIMEOUT"
    return (f"failed {sample(failed.changed)} with WORKER_TIMEOUT"
            + (f"; {len(failed.unchanged)} finished meanwhile, left as they are" if failed.unchanged else ""))


def _fail_oldest(result: StuckRunsSweep, *, settings: Settings, cutoff: datetime, max_runs: int,
                 dry_run: bool) -> None:
    """``action=fail``: no per-run decision, so no ids travel: count, fail the oldest ``max_runs`` stuck runs in
    one guarded statement (``fail_stuck_runs``; its dry run lists them), read back the ones it failed."""
    # observe
    stuck = runs.count_stuck_runs_task(settings=settings, cutoff=cutoff)
    result.found, result.more_than_max_runs = min(stuck, max_runs), stuck > max_runs
    result.note("observed", f"{stuck} run(s) `running` since before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
                + (f" (more than max_runs={max_runs}; the rest wait for the next sweep)" if stuck > max_runs else ""))
    # decide
    result.decisions = {stuck_policy.Decision.FAIL.value: result.found} if result.found else {}
    if not result.found:
        result.note("decided", "nothing to do")
        return
    result.note("decided", f"action=fail: fail {result.found} run(s) (the oldest, at most max_runs={max_runs}) with "
                "WORKER_TIMEOUT, in one UPDATE that re-checks `running` and the cutoff on every row")
    ask = approval.failed_runs(settings, result.found, action="fail-stuck-runs")
    if not approval.approve(result, ask, settings=settings, dry_run=dry_run, key=SWEEP):
        return
    # act
    ids = result.perform(
        "fail-stuck-runs", f"oldest {_n(result.found, 'stuck run')}", dry_run=dry_run,
        call=lambda: runs.fail_stuck_runs_task(settings=settings, cutoff=cutoff, limit=max_runs,
                                               error=dict(runs.WORKER_TIMEOUT), dry_run=dry_run),
        count=len, detail=lambda ids: ("would fail " if dry_run else "failed ") + sample(ids))
    if ids is None:
        return
    if dry_run:
        result.would_fail = ids
        return
    result.failed = ids
    _unchanged_unless(result, bool(ids))
    # verify: none of the runs it failed is still `running` (one read of the stuck-run index), a sample reads `failed`
    if not ids:
        result.check("stuck runs finished meanwhile (or another sweep holds them)", True,
                     f"0 of {result.found} still matched the UPDATE's predicate")
        return
    running = runs.still_running_task(settings=settings, run_ids=ids, cutoff=cutoff)
    shown = runs.read_run_statuses_task(settings=settings, run_ids=ids[:SAMPLE])
    for v in stuck_policy.verify_failed(failed=ids, still_running=running, sample_status=shown):
        result.check(v.name, v.ok, v.detail, target=v.target)


@flow(
    name=FAIL_RUN,
    flow_run_name=keep_typed_name("fail-run {run_id} dry-run-{dry_run}"),
    description=(
        "Mark one `running` run failed with an error code and message (WORKER_TIMEOUT by default) — the runbook's "
        "manual UPDATE, guarded: a run that is no longer running is left as it is. Dry run by default."
    ),
)
@describe_parameters
def fail_run(
    run_id: Annotated[str, Field(pattern=_ID_PATTERN, title="Run id",
                                 description="The run to fail, e.g. `run_01H...` (letters, digits, `_.:-`).")],
    code: Annotated[str, Field(min_length=1, max_length=64, title="Error code",
                               description="Error code written to the run's `error` JSON.")] = "WORKER_TIMEOUT",
    message: Annotated[
        str, Field(min_length=1, max_length=500, title="Error message",
                   description="Error message written to the run's `error` JSON.")
    ] = "Worker did not respond",
    dry_run: Annotated[bool, Field(title="Dry run", description="Only report what would be done.")] = True,
) -> FailRun:
    """Observe the run, fail it if still running (guarded), read it back, report."""
    validate_id(run_id, what="run id")
    settings = get_settings()
    title = f"fail-run {run_id}" + (" (dry run)" if dry_run else "")
    with recording(FailRun(flow=FAIL_RUN, title=title, dry_run=dry_run, run_id=run_id)) as result:
        # observe
        before = runs.read_runs_task(settings=settings, run_ids=[run_id]).get(run_id)
        result.status_before = result.status_after = before.status if before else None
        result.note("observed", f"run `{run_id}`: " + (f"status `{before.status}`" if before else "not found"))
        # decide: a run that is no longer running is an idempotent no-op
        if before is None or before.status != runs.RUNNING:
            result.note("decided", "no such run: nothing to do" if before is None
                        else f"already `{before.status}`: nothing to do (left as it is)")
            if before is not None:
                result.check("run is no longer running", True, f"`{before.status}`")
            return conclude(result, key=FAIL_RUN)
        result.note("decided", f"fail it with `{code}`: {message}")
        ask = approval.failed_runs(settings, 1, action="fail-run", sample=[run_id])
        if not approval.approve(result, ask, settings=settings, dry_run=dry_run, key=FAIL_RUN):
            return conclude(result, key=FAIL_RUN)
        # act
        done = result.perform(
            "fail-run", f"run/{run_id}", dry_run=dry_run,
            call=lambda: runs.fail_runs_task(settings=settings, run_ids=[run_id], cutoff=None,
                                             error={"code": code, "message": message}, dry_run=dry_run),
            detail=lambda f: "would fail it" if dry_run else ("failed" if f.changed else "finished meanwhile: left"))
        if done is None or dry_run:
            return conclude(result, key=FAIL_RUN)
        result.changed = bool(done.changed)
        _unchanged_unless(result, result.changed)
        # verify
        after = runs.read_runs_task(settings=settings, run_ids=[run_id]).get(run_id)
        result.status_after = after.status if after else None
        error = (after.error or {}) if after else {}
        if result.changed:
            result.check(f"run reads back `failed` with `{code}`",
                         result.status_after == "failed" and error.get("code") == code,
                         f"`{result.status_after}`, error code `{error.get('code')}`")
            emit_recovery_event(action="run-failed", resource_id=f"run.{run_id}", payload={"code": code})
        else:
            result.check("run finished meanwhile (no longer running)",
                         result.status_after not in (None, runs.RUNNING), f"`{result.status_after}`")
    return conclude(result, key=FAIL_RUN)


@flow(
    name=RETRY_STEP,
    flow_run_name=keep_typed_name("retry-step {run_id}/{step_id} dry-run-{dry_run}"),
    description=(
        "Re-enqueue one step through the gateway's retry API — the runbook's manual curl — unless the step is "
        "already queued or held by a worker; then check it is queued. The API key is never shown. Dry run by "
        "default."
    ),
)
@describe_parameters
def retry_step(
    run_id: Annotated[str, Field(pattern=_ID_PATTERN, title="Run id",
                                 description="The step's run (letters, digits, `_.:-`).")],
    step_id: Annotated[str, Field(pattern=_ID_PATTERN, title="Step id",
                                  description="The step to re-enqueue (letters, digits, `_.:-`).")],
    dry_run: Annotated[bool, Field(title="Dry run", description="Only report what would be done.")] = True,
) -> RetryStep:
    """Observe the step (database and queue), call the gateway (guarded), check it is queued, report."""
    validate_id(run_id, what="run id")
    validate_id(step_id, what="step id")
    settings = get_settings()
    title = f"retry-step {run_id}/{step_id}" + (" (dry run)" if dry_run else "")
    with recording(RetryStep(flow=RETRY_STEP, title=title, dry_run=dry_run, run_id=run_id, step_id=step_id)) as result:
        # observe
        step = runs.read_step_task(settings=settings, run_id=run_id, step_id=step_id)
        where = queue.locate_steps_task(settings=settings, step_ids=[step_id])[step_id]
        result.where_before = result.where_after = where.where
        result.note("observed", (f"step `{step_id}` of run `{run_id}`: status `{step.status}`, attempts {step.attempts}"
                                 if step else f"run `{run_id}` has no step `{step_id}` in the database")
                    + f"; queue: {where.where}"
                    + (f" (owner {where.consumer}, idle {where.idle_ms} ms)" if where.consumer else ""))
        # decide
        if where.where in ("queued", "pending"):
            result.note("decided", f"already {where.where} in the queue: not retried (no double work)")
            result.check("step is queued or taken by a worker", True, f"{where.where} in the queue")
            return conclude(result, key=RETRY_STEP)
        if step is None:
            result.blocked = f"run `{run_id}` has no step `{step_id}` in the database: nothing to re-enqueue"
            return conclude(result, key=RETRY_STEP)
        result.note("decided", "re-enqueue it through the gateway")
        # act
        batch = _retry(result, settings=settings, targets=[(run_id, step_id)], dry_run=dry_run,
                       target=f"step/{run_id}/{step_id}")
        if batch is None or dry_run or not batch.outcomes:
            return conclude(result, key=RETRY_STEP)
        result.answer, result.changed = batch.outcomes[0].outcome, batch.changed
        # verify
        places, status = _step_state(settings, [step_id])
        result.where_after = places.get(step_id)
        result.lost_retries = _count_lost(settings, {step_id: result.answer}, places, status).get(step_id, 0)
        ok, evidence = stuck_policy.step_requeued(where=places.get(step_id, "nowhere"), step_status=status.get(step_id))
        result.check("step is queued or taken by a worker", ok, evidence + f" (gateway: {result.answer}"
                     + (f"; lost retry {result.lost_retries} counted)" if result.lost_retries else ")"))
        if result.changed:
            emit_recovery_event(action="step-retried", resource_id=f"step.{step_id}", payload={"run_id": run_id})
    return conclude(result, key=RETRY_STEP)
