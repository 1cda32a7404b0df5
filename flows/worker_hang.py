"""`worker-hang-recovery`: the runbook's "Worker Hung (Deadlock)", automated end to end.

A hung worker is Running and Ready but does no work: its consumer holds pending entries and has not read for
longer than a threshold, its CPU is near zero (metrics.k8s.io), and the queue lag grows across a few samples
taken over a short window. For each such pod: delete or evict it (guarded: kill switch, never below
`min_healthy_workers` Ready, the pod-deletion budget per hour, a per-pod cooldown), wait for the replacement
to be Ready, requeue the entries it held at once, remove its consumer once empty, and verify the lag falls.
A busy worker (CPU above the threshold, or reading recently) is never touched.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows._ui import describe_parameters
from tasks import kube, queue
from tasks.correlate import HangDecision, Sample, decide_hang, lag_falling
from tasks.events import emit_recovery_event
from tasks.guard import may_remove_worker
from tasks.recovery import guard_pod_deletion, read_consumer_entries, sample_workers, settle_worker_runs
from tasks.report import Report
from tasks.settings import get_settings

FLOW_NAME = "worker-hang-recovery"


def _run_name() -> str:
    return f"recover {flow_run.parameters.get('pod') or 'hung workers'}"


class HangOutcome(BaseModel):
    pod: str
    consumer: str
    refused: str | None = None
    pod_action: str = "none"
    replacement: str | None = None
    requeued: int = 0
    dead_lettered: int = 0
    consumer_deleted: bool = False
    runs_failed: list[str] = Field(default_factory=list)


class HangRecoveryResult(BaseModel):
    dry_run: bool
    decision: HangDecision
    outcomes: list[HangOutcome] = Field(default_factory=list)
    lag_after: list[int] = Field(default_factory=list)
    lag_falling: bool | None = None
    report: str = ""


def take_samples(*, settings, count: int, interval_s: float) -> list[Sample]:
    """``count`` samples of pods, CPU and lag, ``interval_s`` apart (one task run each)."""
    samples: list[Sample] = []
    for i in range(count):
        if i:
            time.sleep(interval_s)
        samples.append(sample_workers(settings=settings, at=time.monotonic()))
    return samples


@flow(name=FLOW_NAME, flow_run_name=_run_name)
@describe_parameters
def worker_hang_recovery(
    pod: Annotated[
        str | None, Field(max_length=253, description="Worker pod suspected hung (e.g. from the alert); empty = all.")
    ] = None,
    dry_run: Annotated[bool, Field(description="Only report what would be done; change nothing.")] = True,
    samples: Annotated[int, Field(ge=2, le=30, description="Samples of CPU, pending and lag before deciding.")] = 3,
    sample_interval_s: Annotated[float, Field(ge=0, le=300, description="Seconds between samples.")] = 10.0,
    min_idle_ms: Annotated[
        int | None, Field(ge=0, description="Consumer silent at least this long while holding entries (default setting).")
    ] = None,
    max_cpu_millicores: Annotated[
        float | None, Field(ge=0, description="CPU at or below this counts as near zero (default setting).")
    ] = None,
    require_lag_growth: Annotated[
        bool, Field(description="Act only when the queue lag grows across the samples (runbook symptom).")
    ] = True,
    evict: Annotated[bool, Field(description="Use the Eviction API (respects PodDisruptionBudgets) instead of delete.")] = False,
    replacement_timeout_s: Annotated[
        float | None, Field(gt=0, le=3600, description="Wait this long for a Ready replacement (default setting).")
    ] = None,
    max_deliveries: Annotated[int, Field(ge=1, le=100, description="Dead-letter entries delivered this often.")] = 3,
    verify_samples: Annotated[int, Field(ge=1, le=30, description="Lag samples taken after the recovery.")] = 3,
    verify_interval_s: Annotated[float, Field(ge=0, le=300, description="Seconds between verification samples.")] = 5.0,
) -> HangRecoveryResult:
    """Replace hung workers (Ready, idle entries, CPU ~0, lag growing) and recover what they held."""
    settings = get_settings()
    log = get_run_logger()
    idle = settings.hang_min_idle_ms if min_idle_ms is None else min_idle_ms
    cpu_max = settings.hung_cpu_millicores if max_cpu_millicores is None else max_cpu_millicores
    timeout_s = replacement_timeout_s or settings.replacement_timeout_s
    report = Report(title=f"Worker hang recovery: {pod or 'all workers'}" + (" (dry run)" if dry_run else ""))

    # observe
    series = take_samples(settings=settings, count=samples, interval_s=sample_interval_s)
    last = series[-1]
    pending = {c.name: c for c in last.consumers}
    report.table("Observed", [
        {"pod": p.name, "phase": p.phase, "ready": p.ready, "cpu m": p.cpu_millicores,
         "pending": getattr(pending.get(settings.consumer_for_pod(p.name)), "pending", 0),
         "idle ms": getattr(pending.get(settings.consumer_for_pod(p.name)), "idle_ms", "-")}
        for p in last.pods
    ], caption=f"Worker pods (last of {len(series)} samples)")
    report.add("Observed", f"Queue lag across samples: {[s.lag for s in series]}")

    # decide
    decision = decide_hang(samples=series, consumer_for_pod=settings.consumer_for_pod, pod=pod, min_idle_ms=idle,
                           max_cpu_millicores=cpu_max, require_lag_growth=require_lag_growth)
    result = HangRecoveryResult(dry_run=dry_run, decision=decision)
    report.table("Decided", [{"pod": v.pod, "hung": v.hung, "reason": v.reason} for v in decision.verdicts],
                 caption=f"Hang verdicts (idle >= {idle} ms, CPU <= {cpu_max:g}m, lag growing required: "
                         f"{require_lag_growth})")

    # act, one hung pod at a time (each waits for its replacement before the next is taken)
    for v in decision.hung:
        out = HangOutcome(pod=v.pod, consumer=v.consumer)
        result.outcomes.append(out)
        ready = kube.ready_worker_count(settings=settings)
        if not may_remove_worker(ready_workers=ready, min_healthy_workers=settings.min_healthy_workers):
            out.refused = (f"refused: {ready} Ready worker(s); removing `{v.pod}` would go below "
                           f"min_healthy_workers={settings.min_healthy_workers}")
        else:
            verdict = guard_pod_deletion(settings=settings, pod=v.pod, dry_run=dry_run)
            if verdict.refused:
                out.refused = verdict.reason
        if out.refused:
            if not out.refused.startswith("dry run"):
                report.add("Done", f"- `{v.pod}`: {out.refused}")
            else:
                preview = queue.recover_consumers_task(settings=settings, consumers=[v.consumer],
                                                       max_deliveries=max_deliveries, dry_run=True)
                report.add("Done", f"- `{v.pod}`: dry run: would {'evict' if evict else 'delete'} the pod, wait for "
                           f"its replacement, requeue {preview.decided.get('requeue', 0)} entries, dead-letter "
                           f"{preview.decided.get('dead_letter', 0)}, remove consumer `{v.consumer}`")
            continue
        entries = read_consumer_entries(settings=settings, consumer=v.consumer)
        before = [p.name for p in last.pods]
        deleted = kube.delete_pod(settings=settings, pod=v.pod, evict=evict, dry_run=False)
        out.pod_action = deleted.detail
        emit_recovery_event(action="pod-deleted", resource_id=f"pod.{v.pod}",
                            payload={"evict": evict, "cause": "hung", "evidence": v.reason})
        rep = kube.wait_for_replacement_ready(settings=settings, old_pod=v.pod, previous_pods=before,
                                              timeout_s=timeout_s)
        out.replacement = rep.new_pod
        recovery = queue.recover_consumers_task(settings=settings, consumers=[v.consumer],
                                                max_deliveries=max_deliveries, dry_run=False)
        out.requeued = recovery.done.get("requeued", 0)
        out.dead_lettered = recovery.done.get("dead_lettered", 0)
        emit_recovery_event(action="entries-recovered", resource_id=f"pod.{v.pod}",
                            payload={"consumer": v.consumer, "requeued": out.requeued,
                                     "dead_lettered": out.dead_lettered})
        cleanup = queue.delete_empty_consumers_task(settings=settings, consumers=[v.consumer], min_idle_ms=0,
                                                    dry_run=False)
        out.consumer_deleted = v.consumer in cleanup.deleted
        run_ids = sorted({e.run_id for e in entries if e.run_id})
        if run_ids:
            live = [settings.consumer_for_pod(p.name) for p in last.pods if p.name != v.pod]
            live += [settings.consumer_for_pod(rep.new_pod)] if rep.new_pod else []
            settled = settle_worker_runs(settings=settings, run_ids=run_ids, live_consumers=live, dry_run=False)
            out.runs_failed = settled.failed
            report.table("Done", settled.decisions, caption=f"Runs held by `{v.pod}` (stuck-runs policy)")
        report.add("Done", f"- `{v.pod}`: pod {out.pod_action}; replacement "
                   + (f"`{rep.new_pod}` Ready after {rep.seconds:.1f}s" if rep.ready else f"not Ready within {timeout_s:g}s")
                   + f"; {out.requeued} entries requeued, {out.dead_lettered} dead-lettered; consumer `{v.consumer}` "
                   + ("deleted" if out.consumer_deleted else f"kept ({cleanup.kept.get(v.consumer)})"))
    if not decision.hung:
        report.add("Done", "No hung worker: nothing changed.")

    # verify
    acted = [o for o in result.outcomes if not o.refused]
    if acted:
        lags: list[int] = []
        for i in range(verify_samples):
            if i:
                time.sleep(verify_interval_s)
            lags.append(int(queue.inspect_queue_task(settings=settings).lag or 0))
        result.lag_after = lags
        result.lag_falling = lag_falling([decision.lag_series[-1], *lags])
        snap = queue.inspect_queue_task(settings=settings)
        report.add("Verified", f"- lag before {decision.lag_series[-1]}, after {lags}: "
                   + ("falling" if result.lag_falling else "NOT falling yet"))
        for o in acted:
            report.add("Verified", f"- `{o.consumer}` pending now: {snap.pending_of(o.consumer)}; "
                       f"replacement: {o.replacement or 'none Ready'}")
    else:
        report.add("Verified", "Nothing was changed.")
    report.outcome = _outcome(result)
    result.report = report.publish(key=FLOW_NAME)
    log.info("worker-hang-recovery: %s", report.outcome)
    return result


def _outcome(result: HangRecoveryResult) -> str:
    if not result.decision.hung:
        return "no hung worker"
    if result.dry_run:
        return "dry run"
    done = [o for o in result.outcomes if not o.refused]
    if not done:
        return "refused"
    return "recovered" + ("" if result.lag_falling else " (lag not falling yet)")


def outcome_rows(result: HangRecoveryResult) -> list[dict[str, Any]]:
    return [o.model_dump() for o in result.outcomes]
