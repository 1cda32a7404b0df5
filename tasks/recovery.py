"""Observations and actions the worker recovery flows share: a correlated view of pods and consumers,
samples over time for hang detection, a dead worker's pending entries (read once), recovering them, and
settling the runs they carried.

The pure decisions live in ``tasks.correlate``; this module only feeds them (``tasks.kube``, ``tasks.queue``,
``tasks.runs``) and carries out what they decided: the entries through the queue's atomic, ownership-checking
steps, the runs through the stuck-runs policy's verdicts (``tasks.stuck_policy``) with the live consumers
known — so no 5-minute idle wait and no 30-minute stuck-run wait either.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from pydantic import BaseModel, Field

from tasks import kube, queue
from tasks.correlate import Sample, WorkerLink, consumer_reading, correlate, plan_moves
from tasks.errors import RETRY
from tasks.events import emit_recovery_event
from tasks.guard import guarded
from tasks.kube_diagnosis import Classification, PodInfo
from tasks.outcome import ActionStatus, RecoveryResult, Table
from tasks.queue import PendingEntry
from tasks.settings import Settings

# ------------------------------------------------------------------------------------ observations


class WorkersView(BaseModel):
    """Pods joined with consumers, plus the queue numbers, at one moment."""

    links: list[WorkerLink]
    pods: dict[str, PodInfo]
    snapshot: queue.QueueSnapshot

    @property
    def ready_workers(self) -> int:
        return sum(1 for p in self.pods.values() if p.serving)

    def pod_rows(self) -> list[dict[str, Any]]:
        rows = []
        for lnk in self.links:
            p, c = lnk.pod_state, lnk.consumer_state
            rows.append({
                "pod": lnk.pod or "(gone)", "consumer": lnk.consumer,
                "phase": p.phase if p else "-", "ready": p.ready if p else "-",
                "class": (p.classification.value if p.classification else "-") if p else "pod gone",
                "restarts": p.restart_count if p else "-",
                "cpu m": "-" if p is None or p.cpu_millicores is None else f"{p.cpu_millicores:g}",
                "pending": c.pending if c else 0, "idle ms": c.idle_ms if c else "-",
            })
        return rows


def build_view(*, settings: Settings, pods: Iterable[PodInfo], snapshot: queue.QueueSnapshot) -> WorkersView:
    """Pure: join the (diagnosed) pods that exist with the group's consumers."""
    states = {p.name: p for p in pods if p.classification is not Classification.GONE}
    links = correlate(pods=list(states.values()), consumers=snapshot.consumers,
                      consumer_for_pod=settings.consumer_for_pod)
    return WorkersView(links=links, pods=states, snapshot=snapshot)


@task(name="observe-workers", **RETRY)
def observe_workers(*, settings: Settings, diagnose: bool = True) -> WorkersView:
    """Every worker pod (diagnosed: state, events/logs of unhealthy ones, CPU) joined with its consumer."""
    pods = kube.diagnose_pods.fn(settings=settings) if diagnose else kube.list_worker_pods.fn(settings=settings)
    snapshot = queue.inspect_queue(settings=settings)
    return build_view(settings=settings, pods=pods, snapshot=snapshot)


@task(name="sample-workers", **RETRY)
def sample_workers(*, settings: Settings, at: float) -> Sample:
    """One sample for hang detection: pods (one list call), CPU (one metrics call), the group's numbers."""
    pods = kube.list_worker_pods.fn(settings=settings)
    cpu = kube.pod_cpu_millicores.fn(settings=settings)
    snapshot = queue.inspect_queue(settings=settings)
    return Sample(at=at, lag=int(snapshot.lag or 0), consumers=snapshot.consumers,
                  pods=[p.model_copy(update={"cpu_millicores": cpu.get(p.name)}) for p in pods])


def take_samples(*, settings: Settings, count: int, interval_s: float) -> list[Sample]:
    """``count`` samples of pods, CPU and lag, ``interval_s`` apart (one task run each)."""
    samples: list[Sample] = []
    for i in range(count):
        if i:
            time.sleep(interval_s)
        samples.append(sample_workers(settings=settings, at=time.monotonic()))
    return samples


def lag_samples(*, settings: Settings, count: int, interval_s: float) -> list[int]:
    """``count`` readings of the queue lag, ``interval_s`` apart (to see whether it falls)."""
    lags: list[int] = []
    for i in range(count):
        if i:
            time.sleep(interval_s)
        lags.append(int(queue.inspect_queue_task(settings=settings).lag or 0))
    return lags


@task(name="read-consumer-entries", task_run_name="read entries of {consumer}", **RETRY)
def read_consumer_entries(*, settings: Settings, consumer: str, limit: int = 10_000) -> list[PendingEntry]:
    """The pending entries a consumer holds, each with its run, step and deliveries: one paged SCAN_PENDING
    read (fields read inside Redis), the only read of that list in a recovery; at most ``limit`` entries
    (the moves that follow still take every entry the consumer holds)."""
    out: list[PendingEntry] = []
    for page in queue.iter_pending(settings=settings, consumer=consumer, batch_size=1000):
        out.extend(page)
        if len(out) >= limit:
            return out[:limit]
    return out


@task(name="wait-consuming", task_run_name="wait for {consumer} to read", **RETRY)
def wait_consuming(*, settings: Settings, consumer: str, wait_s: float) -> tuple[bool, str]:
    """Poll the group until ``consumer`` appears in it (it read from Redis) or ``wait_s`` passes; with
    nothing waiting it cannot appear, which counts as reading (``correlate.consumer_reading``)."""
    deadline = time.monotonic() + wait_s
    while True:
        snap = queue.inspect_queue(settings=settings)
        seen = snap.consumer(consumer) is not None
        lag = int(snap.lag or 0)
        if seen or time.monotonic() >= deadline:
            ok = consumer_reading(seen=seen, lag=lag)
            why = ("appears in the group" if seen else "nothing waiting to read" if ok
                   else f"not in the group after {wait_s:g} s, {lag} entries waiting")
            return ok, f"{consumer}: {why}"
        time.sleep(0.2)  # poll


# ------------------------------------------------------------------------------------ recover entries


class EntriesRecovered(BaseModel):
    """What recovering one dead worker's entries did (in a dry run: would do)."""

    consumer: str
    dry_run: bool
    requeued: int = 0
    dead_lettered: int = Field(0, description="All entries sent to the DLQ, the poison included.")
    poison: list[str] = Field(default_factory=list, description="Ids of the poison entries dead-lettered.")
    orphans_acked: int = 0
    skipped: dict[str, str] = Field(default_factory=dict, description="Poison entries left, and why.")

    @property
    def moved(self) -> int:
        return self.requeued + self.dead_lettered + self.orphans_acked

    @property
    def changed(self) -> bool:
        return not self.dry_run and self.moved > 0

    def summary(self) -> str:
        verb = "would be " if self.dry_run else ""
        return (f"{self.requeued} {verb}requeued at once, {self.dead_lettered} {verb}dead-lettered"
                + (f" (poison {', '.join(self.poison)})" if self.poison else "")
                + (f", {self.orphans_acked} orphans {verb}acknowledged" if self.orphans_acked else ""))


@task(name="recover-worker-entries", task_run_name="recover entries of {pod}", **RETRY)
@guarded("recover-worker-entries", target=lambda kw: kw["pod"], cooldown=True)
def recover_worker_entries(
    *,
    settings: Settings,
    pod: str,
    consumer: str,
    entries: Sequence[PendingEntry],
    poison: Sequence[PendingEntry],
    reason: str,
    max_deliveries: int,
    dry_run: bool,
) -> EntriesRecovered:
    """Take a dead worker's pending entries now, once per pod (cooldown: a repeated or concurrent alert
    recovers it once): the poison to the DLQ (``queue.dead_letter_pending``), then every other entry requeued
    (over ``max_deliveries``: DLQ) by ``queue.recover_consumers``. Both re-check inside Redis, atomically, that
    each entry is still that consumer's, so an ACK or claim since ``entries`` were read makes it a no-op. A dry
    run previews from ``entries`` and reads nothing more."""
    if dry_run:
        moves = plan_moves(entries, consumer=consumer, poison=poison, max_deliveries=max_deliveries)
        return EntriesRecovered(consumer=consumer, dry_run=True, requeued=len(moves.requeue),
                                dead_lettered=len(moves.dead_lettered), poison=moves.poison,
                                orphans_acked=len(moves.orphan))
    result = EntriesRecovered(consumer=consumer, dry_run=False)
    if poison:
        statuses = queue.dead_letter_pending(settings=settings, consumer=consumer, entries=list(poison),
                                             reason=reason, dry_run=False)
        result.poison = [i for i, status in statuses.items() if status == "dead_lettered"]
        result.skipped = {i: status for i, status in statuses.items() if status != "dead_lettered"}
    rest = queue.recover_consumers(settings=settings, consumers=[consumer], max_deliveries=max_deliveries,
                                   dry_run=False)
    result.requeued = rest.done.get("requeued", 0)
    result.dead_lettered = len(result.poison) + rest.done.get("dead_lettered", 0)
    result.orphans_acked = rest.done.get("orphan_acked", 0)
    return result


# ------------------------------------------------------------------------------------ settle runs


class SettledRuns(BaseModel):
    """The stuck-runs policy applied to the runs a dead/hung worker held."""

    dry_run: bool
    decisions: list[dict[str, Any]] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    retried: list[str] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.failed or self.retried)

    def summary(self) -> str:
        verb = "would be " if self.dry_run else ""
        text = (f"{len(self.decisions)} runs decided: {len(self.failed)} {verb}failed"
                + (f" ({', '.join(self.failed)})" if self.failed else "")
                + f", {len(self.retried)} steps {verb}retried")
        return text + (f"; errors: {'; '.join(f'{k}: {v}' for k, v in self.errors.items())}" if self.errors else "")


def _unless_finished_meanwhile(*, settings: Settings, decisions: list[Any]) -> list[Any]:
    """Drop retries of steps that finished since they were read: a worker finishes a step in the database
    before it acknowledges the entry, so a step found nowhere in the queue but finished now was done, not lost."""
    from tasks import runs, stuck_policy

    wanted = [s for d in decisions if d.decision == stuck_policy.Decision.RETRY for s in d.retry_steps]
    if not wanted:
        return decisions
    status = runs.read_step_statuses(settings=settings, step_ids=wanted)
    out = []
    for d in decisions:
        if d.decision == stuck_policy.Decision.RETRY:
            left = [s for s in d.retry_steps if status.get(s) in runs.UNFINISHED_STEP_STATUSES]
            if not left:
                d = d.model_copy(update={"decision": stuck_policy.Decision.LEAVE, "retry_steps": [],
                                         "reason": "its step finished meanwhile: nothing to retry"})
            else:
                d = d.model_copy(update={"retry_steps": left})
        out.append(d)
    return out


@task(name="settle-worker-runs", **RETRY)
def settle_worker_runs(
    *,
    settings: Settings,
    run_ids: Sequence[str],
    live_consumers: Sequence[str],
    dry_run: bool,
    max_step_retries: int = 3,
) -> SettledRuns:
    """Decide each still-running run of these through the stuck-runs policy (live consumers known), then
    fail it (guarded UPDATE re-checking ``running``) or retry its steps through the gateway (guarded)."""
    from tasks import gateway, runs, stuck_policy

    result = SettledRuns(dry_run=dry_run)
    ids = sorted(set(r for r in run_ids if r))
    if not ids:
        return result
    current = runs.read_runs(settings=settings, run_ids=ids)
    running = [r for r in current.values() if r.status == runs.RUNNING]
    if not running:
        return result
    steps = runs.find_unfinished_steps(settings=settings, run_ids=[r.id for r in running])
    step_ids = [s.id for group in steps.values() for s in group]
    locations = queue.locate_steps(settings=settings, step_ids=step_ids) if step_ids else {}
    decisions = stuck_policy.decide(runs=running, steps=steps, locations=locations, action="auto",
                                    max_step_retries=max_step_retries, live_consumers=set(live_consumers))
    decisions = _unless_finished_meanwhile(settings=settings, decisions=decisions)
    result.decisions = [{"run": d.run_id, "decision": str(d.decision), "reason": d.reason} for d in decisions]
    to_fail = [d.run_id for d in decisions if d.decision == stuck_policy.Decision.FAIL]
    if to_fail:
        failed = runs.fail_runs(settings=settings, run_ids=to_fail, cutoff=None, dry_run=dry_run)
        result.failed = failed.would_change if dry_run else failed.changed
    targets = [(d.run_id, s) for d in decisions if d.decision == stuck_policy.Decision.RETRY for s in d.retry_steps]
    if targets:
        try:
            batch = gateway.retry_steps(settings=settings, targets=targets, dry_run=dry_run)
        except gateway.GatewayError as e:
            result.errors["gateway"] = str(e)
        else:
            result.retried = [f"{o.run_id}/{o.step_id}" for o in batch.outcomes if o.outcome == "retried"]
            result.errors.update(batch.errors)
    return result


# ------------------------------------------------------------------ steps the crash and hang recoveries share


@dataclass
class WorkerRecovery:
    """What a worker recovery shares across its targets: settings, options, and the workers as they change."""

    settings: Settings
    dry_run: bool
    evict: bool
    max_deliveries: int
    timeout_s: float
    known: list[str] = field(default_factory=list)  # pod names that are not a replacement
    live: list[str] = field(default_factory=list)  # consumers of live workers (replacements added as they come)


def replace_pod(
    result: RecoveryResult, *, pod: str, consumer: str, ctx: WorkerRecovery, payload: dict[str, Any]
) -> tuple[bool, kube.ReplacementResult | None]:
    """Delete (or evict) one worker pod through the guarded task and wait for its Ready replacement.

    Returns (whether the delete went ahead — done or previewed —, the replacement wait when it really happened).
    """
    s, dry = ctx.settings, ctx.dry_run
    deleted = result.perform("evict-pod" if ctx.evict else "delete-pod", pod, dry_run=dry, detail=lambda r: r.detail,
                             call=lambda: kube.delete_pod(settings=s, pod=pod, evict=ctx.evict, dry_run=dry))
    if deleted is None or dry:
        return deleted is not None, None
    emit_recovery_event(action="pod-deleted", resource_id=f"pod.{pod}", payload={"evict": ctx.evict, **payload})
    rep = kube.wait_for_replacement_ready(settings=s, old_pod=pod, previous_pods=ctx.known, timeout_s=ctx.timeout_s)
    ctx.live = [c for c in ctx.live if c != consumer]
    if rep.new_pod:
        ctx.known.append(rep.new_pod)
        ctx.live.append(s.consumer_for_pod(rep.new_pod))
    return True, rep


def remove_consumer(result: RecoveryResult, *, consumer: str, ctx: WorkerRecovery) -> bool:
    """Remove a dead worker's consumer from the group once it holds nothing (guarded; atomic re-check)."""
    cleanup = result.perform(
        "delete-consumer", consumer, dry_run=ctx.dry_run, count=lambda r: len(r.deleted),
        detail=lambda r: "deleted (empty)" if r.deleted else ", ".join(f"{k}: {v}" for k, v in r.kept.items()),
        call=lambda: queue.delete_empty_consumers_task(settings=ctx.settings, consumers=[consumer], min_idle_ms=0,
                                                       dry_run=ctx.dry_run))
    return cleanup is not None and consumer in cleanup.deleted


def settle_runs(result: RecoveryResult, *, pod: str, run_ids: Sequence[str], ctx: WorkerRecovery) -> SettledRuns | None:
    """Settle the runs a dead worker's entries carried (stuck-runs policy, live consumers known); a gateway
    error retrying a step is a failed action."""
    settled = result.perform(
        "settle-runs", pod, dry_run=ctx.dry_run, count=lambda r: len(r.failed) + len(r.retried),
        detail=lambda r: r.summary(),
        call=lambda: settle_worker_runs(settings=ctx.settings, run_ids=list(run_ids), live_consumers=ctx.live,
                                        dry_run=ctx.dry_run))
    if settled is None:
        return None
    result.note("decided", Table(caption=f"Runs held by {pod} (stuck-runs policy)", rows=settled.decisions))
    if settled.errors:
        result.act("retry-steps", pod, ActionStatus.FAILED,
                   detail="; ".join(f"{k}: {v}" for k, v in settled.errors.items()))
    for run_id in [] if ctx.dry_run else settled.failed:
        emit_recovery_event(action="run-failed", resource_id=f"run.{run_id}", payload={"pod": pod})
    return settled
