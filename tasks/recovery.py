"""Observations and actions the worker recovery flows share: a correlated view of pods and consumers,
samples over time for hang detection, the runs a consumer's entries carry, and settling those runs.

The pure decisions live in ``tasks.correlate``; this module only feeds them (``tasks.kube``, ``tasks.queue``,
``tasks.runs``) and applies the stuck-runs policy's verdicts (``tasks.stuck_policy``) for the runs a dead or
hung worker held, with the live consumers known — so no 30-minute wait either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from prefect import task
from pydantic import BaseModel, Field

from tasks import queue
from tasks.connections import redis_client
from tasks.correlate import ConsumerState, PendingEntry, PodState, Sample, WorkerLink, correlate
from tasks.errors import RETRY
from tasks.guard import Verdict, check, pod_deletion_budget
from tasks.settings import Settings

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- pure conversions


def pod_state(diag: Any) -> PodState:
    """A ``tasks.kube`` PodInfo / PodDiagnosis as the correlation's ``PodState``."""
    last = getattr(diag, "last_termination", None) or getattr(diag, "current_termination", None)
    classification = getattr(diag, "classification", None)
    return PodState(
        name=diag.name,
        phase=diag.phase or "Unknown",
        ready=bool(diag.ready),
        classification=str(getattr(classification, "value", classification) or ("healthy" if diag.ready else "not-ready")),
        restarts=int(getattr(diag, "restart_count", 0) or 0),
        terminating=bool(getattr(diag, "terminating", False)),
        cpu_millicores=getattr(diag, "cpu_millicores", None),
        last_reason=getattr(last, "reason", None),
        last_exit_code=getattr(last, "exit_code", None),
        summary=getattr(diag, "summary", "") or "",
        log_tail=list(getattr(diag, "log_tail", []) or []),
    )


def consumer_states(snapshot: queue.QueueSnapshot) -> list[ConsumerState]:
    return [ConsumerState(name=c.name, pending=c.pending, idle_ms=c.idle_ms) for c in snapshot.consumers]


def to_pending(entry: queue.PendingEntry) -> PendingEntry:
    """A queue pending entry with its total deliveries (carried attempts + this copy's deliveries)."""
    return PendingEntry(entry_id=entry.entry_id, consumer=entry.consumer, idle_ms=entry.idle_ms,
                        deliveries=entry.total_deliveries, step_id=entry.step_id or entry.job_id or None)


class WorkersView(BaseModel):
    """Pods joined with consumers, plus the queue numbers, at one moment."""

    links: list[WorkerLink]
    pods: dict[str, PodState]
    snapshot: queue.QueueSnapshot

    @property
    def ready_workers(self) -> int:
        return sum(1 for p in self.pods.values() if p.ready and not p.terminating)

    def pod_rows(self) -> list[dict[str, Any]]:
        rows = []
        for lnk in self.links:
            p, c = lnk.pod_state, lnk.consumer_state
            rows.append({
                "pod": lnk.pod or "(gone)", "consumer": lnk.consumer,
                "phase": p.phase if p else "-", "ready": p.ready if p else "-",
                "class": p.classification if p else "pod gone", "restarts": p.restarts if p else "-",
                "cpu m": p.cpu_millicores if p else "-",
                "pending": c.pending if c else 0, "idle ms": c.idle_ms if c else "-",
            })
        return rows


def build_view(*, settings: Settings, pods: Iterable[Any], snapshot: queue.QueueSnapshot) -> WorkersView:
    states = {d.name: pod_state(d) for d in pods if str(getattr(d, "classification", "")) != "gone"}
    links = correlate(pods=list(states.values()), consumers=consumer_states(snapshot),
                      consumer_for_pod=settings.consumer_for_pod)
    return WorkersView(links=links, pods=states, snapshot=snapshot)


# ------------------------------------------------------------------------------------ observations


@task(name="observe-workers", **RETRY)
def observe_workers(*, settings: Settings, diagnose: bool = True) -> WorkersView:
    """Every worker pod (diagnosed: state, events/logs of unhealthy ones, CPU) joined with its consumer."""
    from tasks import kube

    pods = kube.diagnose_pods.fn(settings=settings) if diagnose else kube.list_worker_pods.fn(settings=settings)
    snapshot = queue.inspect_queue(settings=settings)
    return build_view(settings=settings, pods=pods, snapshot=snapshot)


@task(name="sample-workers", **RETRY)
def sample_workers(*, settings: Settings, at: float) -> Sample:
    """One sample for hang detection: pods (one list call), CPU (one metrics call), the group's numbers."""
    from tasks import kube

    pods = kube.list_worker_pods.fn(settings=settings)
    cpu = kube.pod_cpu_millicores.fn(settings=settings)
    snapshot = queue.inspect_queue(settings=settings)
    states = []
    for p in pods:
        s = pod_state(p)
        states.append(s.model_copy(update={"cpu_millicores": cpu.get(s.name)}))
    return Sample(at=at, lag=int(snapshot.lag or 0), pods=states, consumers=consumer_states(snapshot))


@task(name="read-consumer-entries", **RETRY)
def read_consumer_entries(*, settings: Settings, consumer: str, limit: int = 10_000) -> list[PendingEntry]:
    """The pending entries a consumer holds (paged scan) with the run and step each carries.

    One paged XPENDING scan for the consumer plus one pipelined XRANGE per page for the ``run_id`` field:
    O(its pending) in pending/1000 round trips; at most ``limit`` entries are returned (the report says so).
    """
    client = redis_client(settings)
    out: list[PendingEntry] = []
    for page in queue.iter_pending(settings=settings, consumer=consumer, batch_size=1000):
        entries = [to_pending(e) for e in page]
        try:
            with client.pipeline(transaction=False) as pipe:
                for e in entries:
                    pipe.xrange(settings.stream, min=e.entry_id, max=e.entry_id, count=1)
                ranges = pipe.execute()
        except redis.RedisError as e:
            raise queue.QueueError(f"cannot read the entries of consumer `{consumer}`: {e}") from e
        for entry, found in zip(entries, ranges, strict=True):
            if found:
                fields = found[0][1]
                entry.run_id = fields.get("run_id") or None
                entry.step_id = entry.step_id or fields.get("step_id") or fields.get("job_id") or None
        out.extend(entries)
        if len(out) >= limit:
            return out[:limit]
    return out


class DeadLettered(BaseModel):
    dry_run: bool
    refused: str | None = None
    dead_lettered: list[str] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)


@task(name="dead-letter-entries", task_run_name="dead-letter {entry_ids}", **RETRY)
def dead_letter_entries(
    *, settings: Settings, consumer: str, entry_ids: Sequence[str], reason: str, dry_run: bool
) -> DeadLettered:
    """Dead-letter these pending entries of a dead consumer (the poison), through the queue's atomic Lua step
    that re-checks each is still owned by that consumer (a late ACK or a claim makes it a no-op)."""
    result = DeadLettered(dry_run=dry_run)
    wanted = set(entry_ids)
    found = [e for page in queue.iter_pending(settings=settings, consumer=consumer) for e in page
             if e.entry_id in wanted]
    result.skipped = {i: "no longer pending" for i in wanted - {e.entry_id for e in found}}
    statuses = queue.dead_letter_pending(settings=settings, consumer=consumer, entries=found, reason=reason,
                                         dry_run=dry_run)
    for entry_id, status in statuses.items():
        if status in ("dead_lettered", "would_dead_letter"):
            result.dead_lettered.append(entry_id)
        else:
            result.skipped[entry_id] = status
    return result


# ------------------------------------------------------------------------------------ pod deletions


def guard_pod_deletion(*, settings: Settings, pod: str, dry_run: bool) -> Verdict:
    """``guard.check`` for deleting/evicting one worker pod (kill switch, dry run, per-pod cooldown, budget)."""
    return check(
        action="delete-pod", target=pod, dry_run=dry_run, settings=settings, budget=pod_deletion_budget(settings)
    )


# ------------------------------------------------------------------------------------ settle runs


class SettledRuns(BaseModel):
    """The stuck-runs policy applied to the runs a dead/hung worker held."""

    dry_run: bool
    refused: str | None = None
    decisions: list[dict[str, Any]] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    retried: list[str] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict)


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
    fail (guarded UPDATE re-checking ``running``) or retry its steps through the gateway."""
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
