"""`queue-sweep`: the runbook's "Redis Queue Recovery" (XPENDING, reclaim after 5 minutes, DLQ after 3 failures).

Observe the consumer group, page through its pending list, decide per entry (requeue / claim, dead-letter,
acknowledge an orphan, or leave a live worker's entry alone), act in atomic batches, remove consumers that own
nothing, observe again and publish the report `queue-sweep`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, ValidationError

from flows._ui import describe_parameters
from tasks.events import emit_recovery_event
from tasks.guard import refuse_if_paused
from tasks.queue import (
    ConsumerCleanup,
    QueueError,
    QueueSnapshot,
    SweepPolicy,
    SweepResult,
    delete_empty_consumers_task,
    inspect_queue_task,
    outcome_rows,
    sweep_pages_task,
)
from tasks.report import Report
from tasks.settings import get_settings

PAGES_PER_TASK = 10  # one task run handles up to 10 pages; the kill switch is re-checked between task runs


class QueueSweepOutcome(BaseModel):
    """What one `queue-sweep` run saw and did (also returned to a calling flow)."""

    outcome: str
    before: QueueSnapshot
    after: QueueSnapshot
    result: SweepResult
    cleanup: ConsumerCleanup | None = None
    markdown: str = ""


def build_policy(
    *,
    min_idle_ms: int,
    max_deliveries: int,
    dead_consumers: list[str] | None,
    strategy: str,
    claim_consumer: str,
) -> SweepPolicy:
    """Validate the sweep's parameters into a policy; a bad combination is a clear QueueError."""
    try:
        return SweepPolicy(
            min_idle_ms=min_idle_ms,
            max_deliveries=max_deliveries,
            dead_consumers=dead_consumers or [],
            strategy=strategy,
            claim_consumer=claim_consumer,
        )
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'parameters'}: {err['msg']}" for err in e.errors()
        )
        raise QueueError(f"invalid queue-sweep parameters: {problems}") from None


@flow(
    name="queue-sweep",
    flow_run_name="queue-sweep {strategy} idle>={min_idle_ms}ms dry_run={dry_run}",
    description=__doc__,
)
@describe_parameters
def queue_sweep(
    min_idle_ms: Annotated[
        int,
        Field(
            ge=0,
            le=7 * 24 * 3_600_000,
            description="Take entries idle at least this long (ms); runbook: 5 min.",
        ),
    ] = 300_000,
    max_deliveries: Annotated[
        int,
        Field(
            ge=1, le=100, description="Dead-letter entries delivered this many times in total (runbook: 3)."
        ),
    ] = 3,
    dead_consumers: Annotated[
        list[str] | None,
        Field(
            max_length=1000, description="Consumers known dead (pods gone): their entries are taken at once."
        ),
    ] = None,
    strategy: Annotated[
        Literal["requeue", "claim"],
        Field(
            description="requeue: re-add a copy for any worker and ack the original; claim: XCLAIM to one consumer."
        ),
    ] = "requeue",
    claim_consumer: Annotated[
        str,
        Field(
            min_length=1,
            max_length=200,
            description="Consumer that receives claimed entries (strategy claim).",
        ),
    ] = "new-worker",
    batch_size: Annotated[
        int, Field(ge=10, le=10_000, description="Pending entries handled per atomic step / task run.")
    ] = 1000,
    max_entries: Annotated[
        int,
        Field(
            ge=1, le=10_000_000, description="At most this many entries moved per run (a blast-radius cap)."
        ),
    ] = 100_000,
    delete_idle_consumers_ms: Annotated[
        int | None,
        Field(
            ge=0,
            description="Also delete consumers owning nothing and idle this long (ms); empty = keep all.",
        ),
    ] = 3_600_000,
    dry_run: Annotated[bool, Field(description="Only report what would happen; change nothing.")] = True,
) -> QueueSweepOutcome:
    """Recover the step queue's pending list: requeue stale or dead-owned steps, dead-letter poison, ack orphans."""
    log = get_run_logger()
    settings = get_settings()
    policy = build_policy(
        min_idle_ms=min_idle_ms,
        max_deliveries=max_deliveries,
        dead_consumers=dead_consumers,
        strategy=strategy,
        claim_consumer=claim_consumer,
    )
    report = Report(title=f"queue-sweep of `{settings.stream}` / `{settings.group}`")

    before = inspect_queue_task(settings=settings)
    before.require_group()
    report.table("Observed", before.summary_rows(), caption="Before")
    report.table(
        "Observed", [c.model_dump() for c in before.consumers], caption="Consumers (pending, idle ms)"
    )

    verdict = refuse_if_paused(dry_run=dry_run, settings=settings)
    acting = verdict.allowed
    report.add(
        "Decided",
        f"Policy: take entries idle >= {policy.min_idle_ms} ms or owned by a dead consumer "
        f"({', '.join(sorted(policy.dead_consumers)) or 'none given'}); dead-letter at {policy.max_deliveries} "
        f"deliveries; strategy `{policy.strategy}`; at most {max_entries} moves. Guard: {verdict.reason}.",
    )

    total = SweepResult(dry_run=not acting)
    start: str | None = "-"
    while start is not None:
        if acting and total.pages:
            again = refuse_if_paused(dry_run=False, settings=settings)
            if again.refused:
                report.add("Done", f"Stopped after {total.pages} pages: {again.reason}.")
                break
        moves = sum(v for k, v in total.decided.items() if k != "leave")
        part = sweep_pages_task(
            settings=settings,
            policy=policy,
            start=start,
            batch_size=batch_size,
            max_entries=max_entries - moves,
            max_pages=PAGES_PER_TASK,
            dry_run=not acting,
        )
        total.merge(part)
        start = part.next_start

    cleanup = None
    if delete_idle_consumers_ms is not None:
        cleanup = delete_empty_consumers_task(
            settings=settings, consumers=None, min_idle_ms=delete_idle_consumers_ms, dry_run=not acting
        )

    report.table("Decided", outcome_rows(total), caption=f"Counts ({total.scanned} pending entries scanned)")
    if total.cap_reached:
        report.add("Decided", f"Cap reached: {max_entries} entries this run; the next run continues.")
    report.table("Done" if acting else "Decided", total.samples, caption="Sample of entries taken, and why")
    if cleanup is not None:
        deleted = cleanup.deleted if acting else cleanup.would_delete
        kept = ", ".join(f"{n} ({why})" for n, why in sorted(cleanup.kept.items())) or "none"
        report.add(
            "Done" if acting else "Decided",
            f"Consumers {'deleted' if acting else 'that would be deleted'} (no pending entries, idle >= "
            f"{delete_idle_consumers_ms} ms): {', '.join(deleted) or 'none'}. Kept: {kept}.",
        )
    if not acting:
        report.add("Done", f"Nothing changed: {verdict.reason}.")

    after = inspect_queue_task(settings=settings)
    report.table("Verified", after.summary_rows(), caption="After")
    report.add(
        "Verified",
        f"Pending {before.pending} -> {after.pending}; DLQ {before.dlq_length} -> {after.dlq_length} "
        f"(dead-lettered now: {total.done.get('dead_lettered', 0)}); stream length {before.length} -> "
        f"{after.length} (requeued now: {total.done.get('requeued', 0)}). Skipped because a worker or another "
        f"sweep got there first: {sum(v for k, v in total.done.items() if k.startswith('skipped'))}.",
    )
    outcome = "completed" if acting else ("dry run" if verdict.dry_run else verdict.reason)
    report.outcome = outcome
    markdown = report.publish(key="queue-sweep")
    if acting and total.moved:
        emit_recovery_event(
            action="queue-sweep",
            resource_id=f"queue.{settings.stream}",
            payload={"done": total.done, "scanned": total.scanned},
        )
    log.info(
        "queue-sweep %s: scanned %d, decided %s, done %s", outcome, total.scanned, total.decided, total.done
    )
    return QueueSweepOutcome(
        outcome=outcome, before=before, after=after, result=total, cleanup=cleanup, markdown=markdown
    )
