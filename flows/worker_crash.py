"""`worker-crash-recovery`: the runbook's "Worker Process Crash", automated end to end.

Observe every worker pod (status, events, previous logs, CPU) joined with its Redis consumer (a pod's name is
its consumer name). Decide which workers crashed: crash-looping / OOM-killed / failed pods, and consumers whose
pod is gone. For each: dead-letter the poison (an entry in its pending list delivered >= 2 times — the one its
crash log names, else the oldest), requeue the rest AT ONCE (no 5-minute wait: the owner is known dead),
replace the pod (guarded: kill switch, per-pod cooldown, pod-deletion budget), remove the consumer once empty,
settle its runs through the stuck-runs policy with the live consumers known, verify a worker is Ready and
consuming, and report the likely cause.
A healthy, Ready worker is never a target: its entries are never taken.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows._ui import describe_parameters
from tasks import kube, queue
from tasks.correlate import CrashTarget, decide_crash, poison_entries, root_cause
from tasks.events import emit_recovery_event
from tasks.guard import check, may_remove_worker
from tasks.recovery import (
    WorkersView,
    dead_letter_entries,
    guard_pod_deletion,
    observe_workers,
    read_consumer_entries,
    settle_worker_runs,
)
from tasks.report import Report
from tasks.settings import get_settings

FLOW_NAME = "worker-crash-recovery"


def _run_name() -> str:
    return f"recover {flow_run.parameters.get('pod') or 'crashed workers'}"


class TargetOutcome(BaseModel):
    """What happened to one crashed worker."""

    pod: str
    consumer: str
    cause: str
    root_cause: str
    refused: str | None = None
    requeued: int = 0
    dead_lettered: list[str] = Field(default_factory=list)
    pod_action: str = "none"
    replacement: str | None = None
    consumer_deleted: bool = False
    runs_failed: list[str] = Field(default_factory=list)
    runs_retried: list[str] = Field(default_factory=list)


class CrashRecoveryResult(BaseModel):
    dry_run: bool
    targets: list[TargetOutcome] = Field(default_factory=list)
    skipped: list[dict[str, str]] = Field(default_factory=list)
    verified: dict[str, Any] = Field(default_factory=dict)
    report: str = ""


@flow(name=FLOW_NAME, flow_run_name=_run_name, log_prints=False)
@describe_parameters
def worker_crash_recovery(
    pod: Annotated[
        str | None,
        Field(max_length=253, description="Worker pod that crashed (e.g. from the alert); empty = every crashed worker."),
    ] = None,
    dry_run: Annotated[bool, Field(description="Only report what would be done; change nothing.")] = True,
    replace_pod: Annotated[
        bool, Field(description="Delete a crash-looping pod so its Deployment starts a fresh one (guarded).")
    ] = True,
    evict: Annotated[bool, Field(description="Replace through the Eviction API (respects PodDisruptionBudgets).")] = False,
    max_deliveries: Annotated[
        int, Field(ge=1, le=100, description="Dead-letter any entry delivered this often (runbook: 3).")
    ] = 3,
    poison_min_deliveries: Annotated[
        int | None,
        Field(ge=2, le=100, description="A crashed consumer's entry delivered this often is poison (default setting)."),
    ] = None,
    replacement_timeout_s: Annotated[
        float | None, Field(gt=0, le=3600, description="Wait this long for a Ready replacement (default setting).")
    ] = None,
    verify_consuming_s: Annotated[
        float, Field(ge=0, le=600, description="Wait this long for the replacement's consumer to read from Redis.")
    ] = 30.0,
) -> CrashRecoveryResult:
    """Recover crashed workers: poison to the DLQ, their steps requeued at once, pod replaced, runs settled."""
    settings = get_settings()
    log = get_run_logger()
    poison_n = poison_min_deliveries or settings.poison_min_deliveries
    timeout_s = replacement_timeout_s or settings.replacement_timeout_s
    report = Report(title=f"Worker crash recovery: {pod or 'all crashed workers'}" + (" (dry run)" if dry_run else ""))
    result = CrashRecoveryResult(dry_run=dry_run)

    # observe
    view: WorkersView = observe_workers(settings=settings)
    report.table("Observed", view.pod_rows(), caption="Worker pods and their consumers")
    report.table("Observed", view.snapshot.summary_rows(), caption="Queue")

    # decide
    decision = decide_crash(links=view.links, pod=pod, consumer_for_pod=settings.consumer_for_pod)
    result.skipped = [s.model_dump() for s in decision.skipped]
    for s in decision.skipped:
        report.add("Decided", f"- `{s.pod}`: {s.reason}")
    if not decision.targets:
        report.add("Decided", "No crashed worker: nothing to do.")
    plans: list[tuple[CrashTarget, list, list]] = []
    for t in decision.targets:
        entries = read_consumer_entries(settings=settings, consumer=t.consumer) if t.pending else []
        state = view.pods.get(t.pod)
        poison = poison_entries(entries, consumer=t.consumer, min_deliveries=poison_n,
                                log_lines=state.log_tail if state else ()) if t.cause != "pod-gone" else []
        cause = root_cause(cause=t.cause, state=state, poison=poison)
        plans.append((t, entries, poison))
        result.targets.append(TargetOutcome(pod=t.pod, consumer=t.consumer, cause=t.cause, root_cause=cause))
        report.add("Decided", f"- `{t.pod}` ({t.cause}): recover its {len(entries)} pending entries now"
                   + (f", dead-letter the poison suspect {', '.join(e.entry_id for e in poison)}" if poison else "")
                   + (", replace the pod" if t.replace_pod and replace_pod else "")
                   + f". Likely root cause: {cause}")

    # act
    live = sorted(
        settings.consumer_for_pod(name) for name, p in view.pods.items()
        if p.ready and not p.terminating and name not in {t.pod for t in decision.targets}
    )
    for (t, entries, poison), out in zip(plans, result.targets, strict=True):
        verdict = check(action="recover-crashed-worker", target=t.pod, dry_run=dry_run, settings=settings)
        if verdict.refused and not verdict.dry_run:
            out.refused = verdict.reason
            report.add("Done", f"- `{t.pod}`: {verdict.reason}")
            continue
        acting = verdict.allowed
        poison_ids = [e.entry_id for e in poison]
        if not acting:  # dry run: what the two steps below would do, from the entries just read
            over = [e.entry_id for e in entries if e.entry_id not in poison_ids and e.deliveries >= max_deliveries]
            out.dead_lettered = poison_ids + over
            out.requeued = len(entries) - len(out.dead_lettered)
        else:
            if poison_ids:
                dead = dead_letter_entries(settings=settings, consumer=t.consumer, entry_ids=poison_ids,
                                           reason=f"poison: crashed {t.pod} ({t.cause})", dry_run=False)
                if dead.refused:
                    out.refused = dead.refused
                    report.add("Done", f"- `{t.pod}`: {dead.refused}")
                    continue
                out.dead_lettered = dead.dead_lettered
            recovery = queue.recover_consumers_task(settings=settings, consumers=[t.consumer],
                                                    max_deliveries=max_deliveries, dry_run=False)
            if recovery.refused:
                out.refused = recovery.refused
                report.add("Done", f"- `{t.pod}`: {recovery.refused}")
                continue
            out.requeued = recovery.done.get("requeued", 0)
            out.dead_lettered += [s["entry_id"] for s in recovery.samples if s.get("status") == "dead_lettered"]
        verb = "" if acting else "would be "
        report.add("Done", f"- `{t.pod}`: {out.requeued} entries {verb}requeued at once, "
                   f"{len(out.dead_lettered)} {verb}dead-lettered"
                   + (f" ({', '.join(out.dead_lettered[:5])})" if out.dead_lettered else ""))
        if acting:
            emit_recovery_event(action="entries-recovered", resource_id=f"pod.{t.pod}",
                                payload={"consumer": t.consumer, "requeued": out.requeued,
                                         "dead_lettered": out.dead_lettered})
            for entry_id in (i for i in out.dead_lettered if i in poison_ids):
                emit_recovery_event(action="poison-dead-lettered", resource_id=f"entry.{entry_id}",
                                    payload={"pod": t.pod, "cause": out.root_cause})

        # replace the pod
        replaced = False
        if t.replace_pod and replace_pod:
            state = view.pods.get(t.pod)
            if state is not None and state.ready and not may_remove_worker(
                ready_workers=view.ready_workers, min_healthy_workers=settings.min_healthy_workers
            ):
                out.pod_action = f"refused: would leave fewer than {settings.min_healthy_workers} Ready workers"
            elif not acting:
                out.pod_action = f"dry run: would {'evict' if evict else 'delete'} the pod"
            else:
                pod_verdict = guard_pod_deletion(settings=settings, pod=t.pod, dry_run=False)
                if pod_verdict.refused:
                    out.pod_action = pod_verdict.reason
                else:
                    before = sorted(view.pods)
                    deleted = kube.delete_pod(settings=settings, pod=t.pod, evict=evict, dry_run=False)
                    out.pod_action = deleted.detail
                    emit_recovery_event(action="pod-deleted", resource_id=f"pod.{t.pod}",
                                        payload={"evict": evict, "cause": t.cause})
                    rep = kube.wait_for_replacement_ready(settings=settings, old_pod=t.pod, previous_pods=before,
                                                          timeout_s=timeout_s)
                    out.replacement = rep.new_pod
                    replaced = rep.old_pod_gone
                    live.extend(settings.consumer_for_pod(p) for p in [rep.new_pod] if p)
            report.add("Done", f"- `{t.pod}`: pod {out.pod_action}"
                       + (f"; replacement `{out.replacement}` Ready" if out.replacement else ""))

        # remove the consumer once empty (only when its pod is gone: a restarting pod re-creates it anyway)
        if acting and (not t.pod_exists or replaced):
            cleanup = queue.delete_empty_consumers_task(settings=settings, consumers=[t.consumer], min_idle_ms=0,
                                                        dry_run=False)
            out.consumer_deleted = t.consumer in cleanup.deleted
            report.add("Done", f"- consumer `{t.consumer}`: "
                       + ("deleted (empty)" if out.consumer_deleted else f"kept ({cleanup.kept.get(t.consumer)})"))

        # settle the runs it held
        run_ids = sorted({e.run_id for e in entries if e.run_id})
        if run_ids:
            settled = settle_worker_runs(settings=settings, run_ids=run_ids, live_consumers=live, dry_run=not acting)
            out.runs_failed, out.runs_retried = settled.failed, settled.retried
            report.table("Done", settled.decisions, caption=f"Runs held by `{t.pod}` (stuck-runs policy)")
            if settled.failed or settled.retried:
                report.add("Done", f"- runs failed: {settled.failed or 'none'}; steps retried: {settled.retried or 'none'}")
            for run_id in settled.failed:
                emit_recovery_event(action="run-failed", resource_id=f"run.{run_id}", payload={"pod": t.pod})

    # verify
    if decision.targets:
        result.verified = _verify(result=result, settings=settings, wait_s=verify_consuming_s if not dry_run else 0)
        for key, value in result.verified.items():
            report.add("Verified", f"- {key}: {value}")
    else:
        report.add("Verified", "Nothing was changed.")
    report.outcome = _outcome(result)
    result.report = report.publish(key=FLOW_NAME)
    log.info("worker-crash-recovery: %s", report.outcome)
    return result


def _verify(*, result: CrashRecoveryResult, settings, wait_s: float) -> dict[str, Any]:
    """Each target's consumer holds nothing now; a worker is Ready; the replacement's consumer reads Redis."""
    snap = queue.inspect_queue_task(settings=settings)
    verified: dict[str, Any] = {}
    for out in result.targets:
        verified[f"`{out.consumer}` pending now"] = snap.pending_of(out.consumer)
    ready = kube.ready_worker_count(settings=settings)
    verified["Ready workers"] = ready
    replacements = [o.replacement for o in result.targets if o.replacement]
    if replacements:
        consuming = _wait_consuming(settings=settings, consumers=[settings.consumer_for_pod(p) for p in replacements],
                                    wait_s=wait_s)
        verified["replacements consuming"] = consuming or "not seen reading Redis yet"
    return verified


def _wait_consuming(*, settings, consumers: list[str], wait_s: float) -> list[str]:
    """Poll the group until the given consumers appear (they read from Redis) or ``wait_s`` passes."""
    deadline = time.monotonic() + wait_s
    while True:
        snap = queue.inspect_queue(settings=settings)
        seen = [c for c in consumers if snap.consumer(c) is not None]
        if len(seen) == len(consumers) or time.monotonic() >= deadline:
            return seen
        time.sleep(0.2)  # poll


def _outcome(result: CrashRecoveryResult) -> str:
    if not result.targets:
        return "nothing to do"
    if result.dry_run:
        return "dry run"
    if all(o.refused for o in result.targets):
        return "refused"
    return "recovered"
