"""`worker-crash-recovery`: the runbook's "Worker Process Crash", automated end to end.

observe: every worker pod (status, events, previous logs, CPU) joined with its Redis consumer (a pod's name is
its consumer name), and each crashed consumer's pending list, read once -> decide (pure,
``tasks.correlate.plan_crash``): crashed workers are crash-looping / OOM-killed / failed pods and consumers
whose pod is gone; for each, the poison (an entry delivered >= 2 times: the one its crash log names, else the
oldest), where every other entry goes, whether its pod is replaced, the likely root cause -> act (guarded
tasks): the poison to the DLQ and the rest requeued AT ONCE (no 5-minute wait: the owner is known dead; once
per pod), the pod replaced (kill switch, per-pod cooldown, pod-deletion budget), the consumer removed once
empty, its runs settled through the stuck-runs policy -> verify, per crashed worker: the crashed consumer holds
nothing, a Ready replacement whose consumer reads from Redis -> report. A healthy, Ready worker is never a
target: its entries are never taken. Acted but not verified ends the run Failed, after its report.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows._ui import LoggedResult, Setting, describe_parameters, keep_typed_name, setting
from tasks import approval, kube, queue
from tasks.approval import ApprovalRecord
from tasks.correlate import CrashPlan, Skipped, decide_crash, live_consumers, plan_crash
from tasks.events import emit_recovery_event
from tasks.kube_diagnosis import Classification
from tasks.outcome import ActionStatus, Table
from tasks.recovery import (
    WorkerRecovery,
    observe_workers,
    read_consumer_entries,
    recover_worker_entries,
    remove_consumer,
    replace_pod,
    settle_runs,
    wait_consuming,
)
from tasks.report import conclude, recording
from tasks.settings import get_settings

FLOW_NAME = "worker-crash-recovery"
# what each crashed worker is verified by (check names)
CONSUMER_EMPTY = "crashed consumer's pending list empty"
REPLACEMENT_READY = "Ready replacement"
REPLACEMENT_READING = "replacement's consumer reads from Redis"
WORKERS_READY = "a Ready worker takes the requeued entries"


def _run_name() -> str:
    return f"recover {flow_run.parameters.get('pod') or 'crashed workers'}"


class CrashedWorker(BaseModel):
    """What happened to one crashed worker (counts are previews in a dry run)."""

    pod: str
    consumer: str
    cause: Classification
    root_cause: str
    entries: int = 0
    poison: list[str] = Field(default_factory=list)
    requeued: int = 0
    dead_lettered: int = 0
    pod_deleted: bool = False
    replacement: str | None = None
    consumer_deleted: bool = False
    runs_failed: list[str] = Field(default_factory=list)
    runs_retried: list[str] = Field(default_factory=list)


class CrashRecovery(LoggedResult):
    """What a crash recovery run saw, did and verified, per crashed worker."""

    targets: list[CrashedWorker] = Field(default_factory=list)
    skipped: list[Skipped] = Field(default_factory=list)
    approval: ApprovalRecord | None = None


@flow(name=FLOW_NAME, flow_run_name=keep_typed_name(_run_name), log_prints=False)
@describe_parameters
def worker_crash_recovery(
    pod: Annotated[
        str | None,
        Field(max_length=253, title="Crashed pod",
              description="Worker pod that crashed (e.g. from the alert); empty: every crashed worker."),
    ] = None,
    dry_run: Annotated[bool, Field(title="Dry run", description="Only report what would be done; change nothing.")] = True,
    replace_pod: Annotated[
        bool, Field(title="Replace the pod",
                    description="Delete a crash-looping pod so its Deployment starts a fresh one (guarded).")
    ] = True,
    evict: Annotated[bool, Field(title="Evict instead of delete",
                                 description="Replace through the Eviction API (respects PodDisruptionBudgets).")] = False,
    max_deliveries: Annotated[
        int, Field(ge=1, le=100, title="Dead-letter after (deliveries)",
                   description="Dead-letter any entry delivered this often (runbook: 3).")
    ] = 3,
    poison_min_deliveries: Annotated[
        int | None,
        Field(ge=2, le=100, title="Poison after (deliveries)",
              description="A crashed consumer's entry delivered this often is the poison suspect."),
        Setting("poison_min_deliveries"),
    ] = None,
    replacement_timeout_s: Annotated[
        float | None, Field(gt=0, le=3600, title="Replacement timeout (s)",
                            description="Wait this long for a Ready replacement pod."),
        Setting("replacement_timeout_s"),
    ] = None,
    verify_consuming_s: Annotated[
        float, Field(ge=0, le=600, title="Verify consuming within (s)",
                     description="Wait this long for the replacement's consumer to read from Redis.")
    ] = 30.0,
) -> CrashRecovery:
    """Recover crashed workers: poison to the DLQ, their steps requeued at once, pod replaced, runs settled."""
    settings, pod = get_settings(), pod or None
    title = f"Worker crash recovery: {pod or 'all crashed workers'}" + (" (dry run)" if dry_run else "")
    with recording(CrashRecovery(flow=FLOW_NAME, title=title, dry_run=dry_run)) as result:
        # observe: pods joined with consumers; each crashed consumer's pending list, read once
        view = observe_workers(settings=settings)
        result.note("observed", Table(caption="Worker pods and their consumers", rows=view.pod_rows()))
        result.note("observed", Table(caption="Queue", rows=view.snapshot.summary_rows()))
        decision = decide_crash(links=view.links, pod=pod, consumer_for_pod=settings.consumer_for_pod)
        entries = {t.consumer: read_consumer_entries(settings=settings, consumer=t.consumer)
                   for t in decision.targets if t.pending}
        # decide (pure)
        plans = plan_crash(decision=decision, pods=view.pods, entries=entries, max_deliveries=max_deliveries,
                           poison_min_deliveries=setting(poison_min_deliveries, settings, "poison_min_deliveries"),
                           replace_pod=replace_pod, ready_workers=view.ready_workers,
                           min_healthy_workers=settings.min_healthy_workers)
        result.skipped = decision.skipped
        result.note("decided", Table(caption="Crashed workers: recover their entries now", rows=[p.row() for p in plans])
                    if plans else "No crashed worker: nothing to do.")
        if decision.skipped:
            result.note("decided", Table(caption="Left alone", rows=[s.model_dump() for s in decision.skipped]))
        deletions = approval.pod_deletions(settings, [p.target.pod for p in plans if p.replace], evict=evict)
        if not approval.approve(result, deletions, settings=settings, dry_run=dry_run):
            return conclude(result)
        # act, then verify, one crashed worker at a time
        ctx = WorkerRecovery(settings=settings, dry_run=dry_run, evict=evict, max_deliveries=max_deliveries,
                             timeout_s=setting(replacement_timeout_s, settings, "replacement_timeout_s"),
                             live=live_consumers(view.links, besides=[t.pod for t in decision.targets]),
                             known=sorted(view.pods))
        for plan in plans:
            out = _recover(result, plan, ctx)
            if out is not None and not dry_run:
                _verify(result, plan, out, ctx, wait_s=verify_consuming_s)
    return conclude(result)


def _recover(result: CrashRecovery, plan: CrashPlan, ctx: WorkerRecovery) -> CrashedWorker | None:
    """Act for one crashed worker: entries (poison to the DLQ, the rest requeued), pod, consumer, runs.
    Returns None when its entries were not taken (refused or failed): nothing else is done for it."""
    t, s, dry = plan.target, ctx.settings, ctx.dry_run
    out = CrashedWorker(pod=t.pod, consumer=t.consumer, cause=t.cause, root_cause=plan.root_cause,
                        entries=len(plan.entries), poison=plan.moves.poison)
    result.targets.append(out)
    if plan.entries:
        moved = result.perform(
            "recover-entries", t.pod, dry_run=dry, count=lambda r: r.moved, detail=lambda r: r.summary(),
            call=lambda: recover_worker_entries(settings=s, pod=t.pod, consumer=t.consumer, entries=plan.entries,
                                                poison=plan.poison, reason=f"poison: crashed {t.pod} ({t.cause})",
                                                max_deliveries=ctx.max_deliveries, dry_run=dry))
        if moved is None:
            return None
        out.requeued, out.dead_lettered, out.poison = moved.requeued, moved.dead_lettered, moved.poison
        if not dry:
            emit_recovery_event(action="entries-recovered", resource_id=f"pod.{t.pod}", payload={
                "consumer": t.consumer, "requeued": moved.requeued, "dead_lettered": moved.dead_lettered})
            for entry_id in moved.poison:
                emit_recovery_event(action="poison-dead-lettered", resource_id=f"entry.{entry_id}",
                                    payload={"pod": t.pod, "cause": plan.root_cause})
    else:  # nothing pending (e.g. a re-run after a run that took them died): nothing to take, the rest goes on
        result.act("recover-entries", t.pod, ActionStatus.UNCHANGED, detail=f"{t.consumer} holds no pending entries")
    # its runs are settled as soon as their steps are placed, before the (possibly long) wait for a replacement
    settled = settle_runs(result, pod=t.pod, run_ids=plan.run_ids, ctx=ctx) if plan.run_ids else None
    if settled is not None:
        out.runs_failed, out.runs_retried = settled.failed, settled.retried
    if plan.replace_refused:
        result.act("delete-pod", t.pod, ActionStatus.REFUSED, detail=plan.replace_refused)
    rep = None
    if plan.replace:
        deleted, rep = replace_pod(result, pod=t.pod, consumer=t.consumer, ctx=ctx, payload={"cause": t.cause})
        out.pod_deleted, out.replacement = deleted and not dry, rep.new_pod if rep else None
    if not dry and (not t.pod_exists or (rep is not None and rep.old_pod_gone)):  # a living pod re-creates it
        out.consumer_deleted = remove_consumer(result, consumer=t.consumer, ctx=ctx)
    return out


def _verify(result: CrashRecovery, plan: CrashPlan, out: CrashedWorker, ctx: WorkerRecovery, *, wait_s: float) -> None:
    """The crashed consumer holds nothing; its pod's replacement is Ready and its consumer reads from Redis
    (a pod that was already gone: a Ready worker is there to take the requeued entries)."""
    s, pod = ctx.settings, out.pod
    left = queue.inspect_queue_task(settings=s).pending_of(out.consumer)
    result.check(CONSUMER_EMPTY, left == 0, f"{out.consumer} holds {left} entries", target=pod)
    if out.pod_deleted:
        result.check(REPLACEMENT_READY, out.replacement is not None, f"{out.replacement} Ready" if out.replacement
                     else f"no new worker pod Ready within {ctx.timeout_s:g} s", target=pod)
        if out.replacement:
            reading, evidence = wait_consuming(settings=s, consumer=s.consumer_for_pod(out.replacement), wait_s=wait_s)
            result.check(REPLACEMENT_READING, reading, evidence, target=pod)
    elif not plan.target.pod_exists:
        ready = kube.ready_worker_count(settings=s)
        result.check(WORKERS_READY, ready >= max(1, s.min_healthy_workers), f"{ready} Ready worker pods", target=pod)
