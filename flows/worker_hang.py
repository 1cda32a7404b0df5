"""`worker-hang-recovery`: the runbook's "Worker Hung (Deadlock)", automated end to end.

observe: a few samples over a short window of the worker pods, their CPU (metrics.k8s.io) and the group's
consumers and lag -> decide (pure, ``tasks.correlate.decide_hang``): a hung worker is Running and Ready but
does no work — its consumer holds pending entries and has not read for longer than a threshold, its CPU is
near zero, and the queue lag grows -> act, one hung pod at a time: never below `min_healthy_workers` Ready;
delete or evict it (guarded: kill switch, per-pod cooldown, pod-deletion budget), wait for the replacement,
requeue the entries it held at once, remove its consumer once empty, settle its runs -> verify, per replaced
pod: a Ready replacement, the hung consumer holds nothing, the lag falls -> report. A busy worker (CPU above
the threshold, or reading recently) is never touched. Acted but not verified ends the run Failed.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows._ui import LoggedResult, Setting, describe_parameters, keep_typed_name, setting
from tasks import approval, kube, queue
from tasks.approval import ApprovalRecord
from tasks.correlate import HangDecision, HangVerdict, Sample, decide_hang, lag_falling, removal_refused
from tasks.events import emit_recovery_event
from tasks.outcome import ActionStatus, Table
from tasks.recovery import (
    WorkerRecovery,
    lag_samples,
    read_consumer_entries,
    recover_worker_entries,
    remove_consumer,
    replace_pod,
    settle_runs,
    take_samples,
)
from tasks.report import conclude, recording
from tasks.settings import get_settings

FLOW_NAME = "worker-hang-recovery"
# what each replaced pod is verified by (check names)
REPLACEMENT_READY = "Ready replacement"
CONSUMER_EMPTY = "hung consumer's pending list empty"
LAG_FALLING = "queue lag falls"


def _run_name() -> str:
    return f"recover {flow_run.parameters.get('pod') or 'hung workers'}"


class HungWorker(BaseModel):
    """What happened to one hung worker (counts are previews in a dry run)."""

    pod: str
    consumer: str
    evidence: str
    entries: int = 0
    pod_deleted: bool = False
    replacement: str | None = None
    requeued: int = 0
    dead_lettered: int = 0
    consumer_deleted: bool = False
    runs_failed: list[str] = Field(default_factory=list)


class HangRecovery(LoggedResult):
    """What a hang recovery run saw, decided, did and verified."""

    decision: HangDecision | None = None
    workers: list[HungWorker] = Field(default_factory=list)
    lag_after: list[int] = Field(default_factory=list)
    lag_falling: bool | None = None
    approval: ApprovalRecord | None = None


def sample_rows(sample: Sample, *, consumer_for_pod: Any) -> list[dict[str, Any]]:
    """Pure: the report's pod table of one sample (phase, readiness, CPU, what its consumer holds)."""
    consumers = {c.name: c for c in sample.consumers}
    rows = []
    for p in sample.pods:
        c = consumers.get(consumer_for_pod(p.name))
        rows.append({"pod": p.name, "phase": p.phase, "ready": p.ready,
                     "cpu m": "-" if p.cpu_millicores is None else f"{p.cpu_millicores:g}",
                     "pending": c.pending if c else 0, "idle ms": c.idle_ms if c else "-"})
    return rows


@flow(name=FLOW_NAME, flow_run_name=keep_typed_name(_run_name))
@describe_parameters
def worker_hang_recovery(
    pod: Annotated[
        str | None, Field(max_length=253, title="Suspected pod",
                          description="Worker pod suspected hung (e.g. from the alert); empty: every worker.")
    ] = None,
    dry_run: Annotated[bool, Field(title="Dry run", description="Only report what would be done; change nothing.")] = True,
    samples: Annotated[int, Field(ge=2, le=30, title="Samples (count)",
                                  description="Samples of CPU, pending entries and lag taken before deciding.")] = 3,
    sample_interval_s: Annotated[float, Field(ge=0, le=300, title="Sample interval (s)",
                                              description="Seconds between two samples.")] = 10.0,
    min_idle_ms: Annotated[
        int | None, Field(ge=0, title="Consumer silent for (ms)",
                          description="A hung worker's consumer has not read for at least this long while holding "
                          "entries."),
        Setting("hang_min_idle_ms"),
    ] = None,
    max_cpu_millicores: Annotated[
        float | None, Field(ge=0, title="Near-zero CPU (millicores)",
                            description="CPU at or below this counts as near zero."),
        Setting("hung_cpu_millicores"),
    ] = None,
    require_lag_growth: Annotated[
        bool, Field(title="Require a growing lag",
                    description="Act only when the queue lag grows across the samples (the runbook's symptom).")
    ] = True,
    evict: Annotated[bool, Field(title="Evict instead of delete",
                                 description="Use the Eviction API (respects PodDisruptionBudgets).")] = False,
    replacement_timeout_s: Annotated[
        float | None, Field(gt=0, le=3600, title="Replacement timeout (s)",
                            description="Wait this long for a Ready replacement pod."),
        Setting("replacement_timeout_s"),
    ] = None,
    max_deliveries: Annotated[int, Field(ge=1, le=100, title="Dead-letter after (deliveries)",
                                         description="Dead-letter a requeued entry delivered this often.")] = 3,
    verify_samples: Annotated[int, Field(ge=1, le=30, title="Verification samples (count)",
                                         description="Lag samples taken after the recovery.")] = 3,
    verify_interval_s: Annotated[float, Field(ge=0, le=300, title="Verification interval (s)",
                                              description="Seconds between verification samples.")] = 5.0,
) -> HangRecovery:
    """Replace hung workers (Ready, idle entries, CPU ~0, lag growing) and recover what they held."""
    settings, pod = get_settings(), pod or None
    idle = setting(min_idle_ms, settings, "hang_min_idle_ms")
    cpu_max = setting(max_cpu_millicores, settings, "hung_cpu_millicores")
    title = f"Worker hang recovery: {pod or 'all workers'}" + (" (dry run)" if dry_run else "")
    with recording(HangRecovery(flow=FLOW_NAME, title=title, dry_run=dry_run)) as result:
        # observe
        series = take_samples(settings=settings, count=samples, interval_s=sample_interval_s)
        last = series[-1]
        result.note("observed", Table(caption=f"Worker pods (last of {len(series)} samples)",
                                      rows=sample_rows(last, consumer_for_pod=settings.consumer_for_pod)))
        result.note("observed", f"Queue lag across the samples: {', '.join(str(s.lag) for s in series)}")
        # decide (pure)
        decision = result.decision = decide_hang(
            samples=series, consumer_for_pod=settings.consumer_for_pod, pod=pod, min_idle_ms=idle,
            max_cpu_millicores=cpu_max, require_lag_growth=require_lag_growth)
        result.note("decided", Table(
            caption=f"Hang verdicts (idle >= {idle} ms, CPU <= {cpu_max:g}m, lag growth required: {require_lag_growth})",
            rows=[{"pod": v.pod, "hung": v.hung, "reason": v.reason} for v in decision.verdicts]))
        deletions = approval.pod_deletions(settings, [v.pod for v in decision.hung], evict=evict)
        if not approval.approve(result, deletions, settings=settings, dry_run=dry_run):
            return conclude(result)
        # act, one hung pod at a time (each waits for its replacement before the next is taken)
        ctx = WorkerRecovery(settings=settings, dry_run=dry_run, evict=evict, max_deliveries=max_deliveries,
                             timeout_s=setting(replacement_timeout_s, settings, "replacement_timeout_s"),
                             known=[p.name for p in last.pods],
                             live=[settings.consumer_for_pod(p.name) for p in last.pods if p.serving])
        for verdict in decision.hung:
            _replace(result, verdict, ctx)
        # verify, per replaced pod: a Ready replacement, its consumer empty, the lag falling
        replaced = [w for w in result.workers if w.pod_deleted]
        if replaced:
            result.lag_after = lag_samples(settings=settings, count=verify_samples, interval_s=verify_interval_s)
            result.lag_falling = lag_falling([decision.lag_series[-1], *result.lag_after],
                                             normal=settings.post_check_max_queue_depth)
            snap = queue.inspect_queue_task(settings=settings)
            lags = (f"lag before {decision.lag_series[-1]}, after {', '.join(map(str, result.lag_after))} (normal: "
                    f"<= {settings.post_check_max_queue_depth}, FD_POST_CHECK_MAX_QUEUE_DEPTH)")
            for w in replaced:
                result.check(REPLACEMENT_READY, w.replacement is not None, f"{w.replacement} Ready"
                             if w.replacement else f"none Ready within {ctx.timeout_s:g} s", target=w.pod)
                left = snap.pending_of(w.consumer)
                result.check(CONSUMER_EMPTY, left == 0, f"{w.consumer} holds {left} entries", target=w.pod)
                result.check(LAG_FALLING, bool(result.lag_falling), lags, target=w.pod)
    return conclude(result)


def _replace(result: HangRecovery, v: HangVerdict, ctx: WorkerRecovery) -> None:
    """Act for one hung worker: the pod (never below the minimum Ready), its entries, its consumer, its runs."""
    s, dry = ctx.settings, ctx.dry_run
    w = HungWorker(pod=v.pod, consumer=v.consumer, evidence=v.reason)
    result.workers.append(w)
    refused = removal_refused(pod=v.pod, ready_workers=kube.ready_worker_count(settings=s),
                              min_healthy_workers=s.min_healthy_workers)
    if refused:
        result.act("delete-pod", v.pod, ActionStatus.REFUSED, detail=refused)
        return
    entries = read_consumer_entries(settings=s, consumer=v.consumer)
    w.entries = len(entries)
    deleted, rep = replace_pod(result, pod=v.pod, consumer=v.consumer, ctx=ctx,
                               payload={"cause": "hung", "evidence": v.reason})
    if not deleted:
        return
    w.pod_deleted, w.replacement = not dry, rep.new_pod if rep else None
    moved = result.perform(
        "recover-entries", v.pod, dry_run=dry, count=lambda r: r.moved, detail=lambda r: r.summary(),
        call=lambda: recover_worker_entries(settings=s, pod=v.pod, consumer=v.consumer, entries=entries, poison=[],
                                            reason="hung worker replaced", max_deliveries=ctx.max_deliveries,
                                            dry_run=dry))
    if moved is None or dry:
        return
    w.requeued, w.dead_lettered = moved.requeued, moved.dead_lettered
    emit_recovery_event(action="entries-recovered", resource_id=f"pod.{v.pod}", payload={
        "consumer": v.consumer, "requeued": moved.requeued, "dead_lettered": moved.dead_lettered})
    w.consumer_deleted = remove_consumer(result, consumer=v.consumer, ctx=ctx)
    run_ids = sorted({e.run_id for e in entries if e.run_id})
    settled = settle_runs(result, pod=v.pod, run_ids=run_ids, ctx=ctx) if run_ids else None
    w.runs_failed = settled.failed if settled else []
