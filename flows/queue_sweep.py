"""`queue-sweep`: the runbook's "Redis Queue Recovery" (XPENDING, reclaim after 5 minutes, DLQ after 3 failures).

observe the consumer group -> decide per pending entry (requeue / claim, dead-letter, acknowledge an orphan, or
leave a live worker's entry alone; ``tasks.queue.decide``) -> act in atomic batches through the guarded sweep
task (each call re-checks the kill switch, so engaging it mid-sweep stops the remaining batches), then remove
idle consumers that own nothing, and apply the DLQ retention (``FD_DLQ_MAX_AGE_DAYS`` / ``FD_DLQ_MAX_LENGTH``, at
most ``FD_DLQ_TRIM_PER_RUN`` entries a run) -> verify (a sample of the moved entries re-read in one round trip:
gone from their old owner, their copies present; dead consumers empty; deleted consumers gone; trimmed entries
gone from the DLQ and its index) -> report `queue-sweep`.

Idle is quiet: a sweep with nothing to do reads the group in one round trip, the entries idle enough to take in
one more (filtered inside Redis), keeps the queue indexes current in one more, emits no event, and updates ONE
report in place (key `queue-sweep-idle`) instead of adding a new one every minute; the `queue-sweep` report
keeps the last run that did something.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from prefect import flow
from pydantic import Field, ValidationError

from flows._ui import LoggedResult, describe_parameters, keep_typed_name
from tasks.errors import RecoveryError, Refused
from tasks.events import emit_recovery_event
from tasks.outcome import ActionStatus, Outcome, Table
from tasks.queue import (
    ConsumerCleanup,
    DlqRetention,
    IndexRefresh,
    QueueError,
    QueueSnapshot,
    SweepPolicy,
    SweepResult,
    consumers_to_delete,
    delete_empty_consumers_task,
    inspect_queue_task,
    move_counts,
    outcome_rows,
    pick_samples,
    refresh_indexes_task,
    retention_due,
    sweep_moves,
    sweep_pages_task,
    trim_dlq_task,
    verify_moves_task,
    verify_trim_task,
)
from tasks.report import artifact_key, conclude, recording, render
from tasks.settings import Settings, get_settings

if TYPE_CHECKING:
    from prefect.states import State

FLOW_NAME = "queue-sweep"
IDLE_KEY = "queue-sweep-idle"  # the one report an idle sweep updates in place
PAGES_PER_TASK = 10  # one guarded task call handles up to 10 pages; the kill switch is re-checked per call
MOVE_CHECKS = {
    "requeued": "requeued entries left their old owner; their copies are in the stream",
    "dead_lettered": "dead-lettered entries left their old owner; they are in the DLQ",
    "orphan_acked": "orphans are no longer pending",
    "claimed": "claimed entries left their old owner",
}


class QueueSweep(LoggedResult):
    """What one `queue-sweep` run saw, moved and verified (also returned to a calling flow)."""

    before: QueueSnapshot | None = None
    after: QueueSnapshot | None = None
    sweep: SweepResult | None = None
    cleanup: ConsumerCleanup | None = None
    retention: DlqRetention | None = None
    indexes: IndexRefresh | None = None

    @property
    def idle(self) -> bool:
        """Nothing was done or needed: no action of any kind, nothing failed."""
        return not self.actions and self.outcome is Outcome.NOTHING_TO_DO


def build_policy(
    *, min_idle_ms: int, max_deliveries: int, dead_consumers: list[str] | None, strategy: str, claim_consumer: str
) -> SweepPolicy:
    """Validate the sweep's parameters into a policy; a bad combination is a clear QueueError."""
    try:
        return SweepPolicy(min_idle_ms=min_idle_ms, max_deliveries=max_deliveries,
                           dead_consumers=dead_consumers or [], strategy=strategy, claim_consumer=claim_consumer)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'parameters'}: {err['msg']}" for err in e.errors())
        raise QueueError(f"invalid queue-sweep parameters: {problems}") from None


def policy_text(policy: SweepPolicy, max_entries: int) -> str:
    """The sweep's rules in one sentence, for the report."""
    dead = ", ".join(sorted(policy.dead_consumers)) or "none given"
    return (f"Take entries idle >= {policy.min_idle_ms} ms or owned by a dead consumer ({dead}); dead-letter at "
            f"{policy.max_deliveries} deliveries; strategy `{policy.strategy}`; at most {max_entries} moves.")


def sweep_in_batches(
    result: QueueSweep, *, settings: Settings, policy: SweepPolicy, batch_size: int, max_entries: int, dry_run: bool,
    pending: int,
) -> SweepResult:
    """Sweep the pending list, PAGES_PER_TASK pages per guarded task call; record one action per kind of move
    (with its count), and a refusal or error that stopped the remaining batches (what moved stays done). The
    sweep reads only entries it may take; the rest of the ``pending`` entries are counted as left."""
    total = SweepResult(dry_run=dry_run, next_start="-")
    stop: RecoveryError | None = None
    while total.next_start is not None and stop is None:
        moves = sum(n for k, n in total.decided.items() if k != "leave")
        try:
            total.merge(sweep_pages_task(settings=settings, policy=policy, start=total.next_start,
                                         batch_size=batch_size, max_entries=max_entries - moves,
                                         max_pages=PAGES_PER_TASK, dry_run=dry_run))
        except RecoveryError as e:
            stop = e
    if total.next_start is None and not total.cap_reached and pending > total.scanned:
        total.decided["leave"] = total.decided.get("leave", 0) + pending - total.scanned
    target = f"{settings.stream}/{settings.group}"
    for kind, count in move_counts(total).items():
        where = settings.dlq_stream if kind == "dead-letter" else target
        result.act(kind, where, ActionStatus.DRY_RUN if dry_run else ActionStatus.DONE, count=count)
    if stop is not None:
        status = ActionStatus.REFUSED if isinstance(stop, Refused) else ActionStatus.FAILED
        result.act("sweep-pending", f"{target} from {total.next_start}", status, detail=str(stop))
    skipped = {k: n for k, n in total.done.items() if k.startswith("skipped")}
    result.note("decided", Table(caption=f"Counts ({pending} pending; {total.scanned} idle enough or a dead "
                                         "consumer's read)", rows=outcome_rows(total)))
    if skipped:
        result.note("decided", f"Skipped because a worker or another sweep got there first: {sum(skipped.values())}.")
    if total.cap_reached:
        result.note("decided", f"Cap reached: {max_entries} entries this run; the next run continues.")
    result.note("decided", Table(caption="Sample of entries taken, and why",
                                 rows=pick_samples(total.samples, per_kind=2, limit=10)))
    return total


def verify_sweep(result: QueueSweep, *, settings: Settings, policy: SweepPolicy) -> None:
    """Record the checks: sampled moves re-read, dead consumers own nothing (sweep complete), deleted ones gone."""
    sweep, after = result.sweep, result.after or result.before
    if after is None:
        return
    if sweep is not None and sweep.moved:
        found = {c.status: c for c in verify_moves_task(settings=settings, moves=sweep_moves(sweep.samples))}
        for status, moved in sweep.done.items():
            if status in MOVE_CHECKS and moved:
                c = found.get(status)
                evidence = f"{c.held}/{c.checked} sampled of {moved} re-read" if c else "no sampled entry to re-read"
                if c and c.failures:
                    evidence += "; " + "; ".join(c.failures)
                result.check(MOVE_CHECKS[status], bool(c and c.ok), evidence, target=status)
        if sweep.next_start is None and not sweep.cap_reached:
            for name in sorted(policy.dead_consumers):
                left = after.pending_of(name)
                result.check("dead consumer owns nothing", left == 0, f"{name}: {left} pending", target=name)
    if result.retention is not None and result.retention.changed:
        c = verify_trim_task(settings=settings, retention=result.retention)
        result.check("trimmed DLQ entries are gone, from the DLQ and its index", c.ok,
                     f"{c.held}/{c.checked} re-read" + ("; " + "; ".join(c.failures) if c.failures else ""),
                     target="dlq-retention")
    if result.cleanup is not None:
        deleted = result.cleanup.deleted
        still = sorted(set(deleted) & {c.name for c in after.consumers})
        result.check("deleted consumers are gone", not still,
                     f"deleted: {', '.join(deleted) or 'none'}" + (f"; still there: {', '.join(still)}" if still else ""),
                     target="consumers")


def apply_retention(result: QueueSweep, *, settings: Settings, before: QueueSnapshot, dry_run: bool) -> None:
    """Trim the DLQ entries over the retention limit (guarded, bounded per run) when the snapshot shows one."""
    max_age_ms = round(settings.dlq_max_age_days * 86_400_000)
    if not retention_due(before, max_age_ms=max_age_ms, max_length=settings.dlq_max_length):
        return
    result.note("decided", f"DLQ retention: keep {settings.dlq_max_age_days:g} days"
                + (f" and at most {settings.dlq_max_length} entries" if settings.dlq_max_length else "")
                + f"; trim at most {settings.dlq_trim_per_run} entries per run.")
    result.retention = result.perform(
        "trim-dlq", settings.dlq_stream, dry_run=dry_run,
        call=lambda: trim_dlq_task(settings=settings, max_age_ms=max_age_ms, max_length=settings.dlq_max_length,
                                   max_entries=settings.dlq_trim_per_run, dry_run=dry_run),
        count=lambda r: r.trimmed, detail=lambda r: r.summary())


def keep_indexes(result: QueueSweep, *, settings: Settings, dry_run: bool) -> None:
    """Keep the queue indexes current (the recovery's own keys; bounded), unless previewing or refused."""
    if not dry_run and not any(a.status is ActionStatus.REFUSED for a in result.actions):
        result.indexes = refresh_indexes_task(settings=settings)


def finish(result: QueueSweep) -> QueueSweep | State:
    """Publish the report: an idle run updates the one idle report in place; any other run concludes as usual."""
    if not result.idle:
        return conclude(result)
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    key, markdown = artifact_key(IDLE_KEY), render(result)
    description = f"{result.title}: {result.outcome.value} (the last idle sweep)"
    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key])), limit=1)
        if latest:
            client.update_artifact(latest[0].latest_id, ArtifactUpdate(data=markdown, description=description))
        else:
            create_markdown_artifact(key=key, markdown=markdown, description=description)
    return result


@flow(name=FLOW_NAME, flow_run_name=keep_typed_name("queue-sweep {strategy} idle>={min_idle_ms}ms dry_run={dry_run}"),
      description=__doc__)
@describe_parameters
def queue_sweep(
    min_idle_ms: Annotated[int, Field(ge=0, le=7 * 24 * 3_600_000, title="Take entries idle for (ms)",
                                      description="Take entries idle at least this long; runbook: 5 min.")] = 300_000,
    max_deliveries: Annotated[int, Field(ge=1, le=100, title="Dead-letter after (deliveries)",
                                         description="Dead-letter an entry delivered this many times in total "
                                         "(runbook: 3).")] = 3,
    dead_consumers: Annotated[list[str] | None, Field(max_length=1000, title="Dead consumers",
                                                      description="Consumers known dead (pods gone): their entries "
                                                      "are taken at once, however fresh.")] = None,
    strategy: Annotated[Literal["requeue", "claim"], Field(
        title="Strategy", description="requeue: re-add a copy for any worker and acknowledge the original; claim: "
        "XCLAIM to one consumer.")] = "requeue",
    claim_consumer: Annotated[str, Field(min_length=1, max_length=200, title="Claim to consumer",
                                         description="Consumer that receives claimed entries (strategy claim).")
                              ] = "new-worker",
    batch_size: Annotated[int, Field(ge=10, le=10_000, title="Batch size (entries)",
                                     description="Pending entries handled per atomic step / task run.")] = 1000,
    max_entries: Annotated[int, Field(ge=1, le=10_000_000, title="Max entries (entries)",
                                      description="At most this many entries moved per run (a blast-radius cap; "
                                      "the next run continues).")] = 100_000,
    delete_idle_consumers: Annotated[bool, Field(title="Delete idle consumers",
                                                 description="Also delete consumers that own nothing and have "
                                                 "been idle for the time below.")] = True,
    delete_idle_consumers_ms: Annotated[int, Field(ge=0, le=30 * 24 * 3_600_000, title="Consumer idle for (ms)",
                                                   description="With 'Delete idle consumers': how long a consumer "
                                                   "owning nothing must have been idle (1 h = 3600000).")
                                        ] = 3_600_000,
    dry_run: Annotated[bool, Field(title="Dry run", description="Only report what would happen; change nothing.")
                       ] = True,
) -> QueueSweep:
    """Recover the step queue's pending list: requeue stale or dead-owned steps, dead-letter poison, ack orphans."""
    settings = get_settings()
    policy = build_policy(min_idle_ms=min_idle_ms, max_deliveries=max_deliveries, dead_consumers=dead_consumers,
                          strategy=strategy, claim_consumer=claim_consumer)
    title = f"queue-sweep of {settings.stream} / {settings.group}" + (" (dry run)" if dry_run else "")
    with recording(QueueSweep(flow=FLOW_NAME, title=title, dry_run=dry_run)) as result:
        # observe
        result.before = before = inspect_queue_task(settings=settings)
        before.require_group()
        result.note("observed", Table(caption="Before", rows=before.summary_rows()))
        result.note("observed", Table(caption="Consumers (pending, idle ms)",
                                      rows=[c.model_dump() for c in before.consumers]))
        # decide (per entry, in each batch) and act
        result.note("decided", policy_text(policy, max_entries))
        if before.pending:
            result.sweep = sweep_in_batches(result, settings=settings, policy=policy, batch_size=batch_size,
                                            max_entries=max_entries, dry_run=dry_run, pending=before.pending)
        swept = result.sweep is None or (result.sweep.next_start is None and not result.sweep.cap_reached)
        idle = [] if not delete_idle_consumers else consumers_to_delete(
            before, min_idle_ms=delete_idle_consumers_ms, policy=policy, swept=swept and not dry_run)
        if idle:
            result.cleanup = result.perform(
                "delete-consumers", ", ".join(idle), dry_run=dry_run,
                call=lambda: delete_empty_consumers_task(settings=settings, consumers=idle,
                                                         min_idle_ms=delete_idle_consumers_ms, dry_run=dry_run),
                count=lambda c: len(c.would_delete if dry_run else c.deleted),
                detail=lambda c: "; ".join(f"{n}: {why}" for n, why in sorted(c.kept.items())))
        apply_retention(result, settings=settings, before=before, dry_run=dry_run)
        keep_indexes(result, settings=settings, dry_run=dry_run)
        moved = result.sweep.moved if result.sweep else 0
        if dry_run or not (moved or result.cleanup or (result.retention and result.retention.changed)):
            return finish(result)
        if moved:
            emit_recovery_event(action="queue-sweep", resource_id=f"queue.{settings.stream}",
                                payload={"done": result.sweep.done, "scanned": result.sweep.scanned})
        if result.retention and result.retention.changed:
            emit_recovery_event(action="dlq-trimmed", resource_id=f"queue.{settings.dlq_stream}",
                                payload={"trimmed": result.retention.trimmed, "last_id": result.retention.last_id})
        # verify
        result.after = after = inspect_queue_task(settings=settings)
        result.note("observed", Table(caption="After", rows=after.summary_rows()))
        verify_sweep(result, settings=settings, policy=policy)
    return finish(result)
