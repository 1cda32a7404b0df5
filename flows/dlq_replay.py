"""`dlq-replay`: move chosen dead-lettered steps back to the step stream, with their attempt count reset.

Choose entries by DLQ entry ids, job ids, a reason substring and/or a minimum age (every filter given must
match). Each batch is re-added to the stream and deleted from the DLQ in one atomic step, so an entry is
never lost or replayed twice. Publishes the report `dlq-replay`.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, ValidationError

from flows._ui import describe_parameters
from tasks.events import emit_recovery_event
from tasks.guard import refuse_if_paused
from tasks.queue import (
    QueueError,
    QueueSnapshot,
    ReplayFilter,
    ReplayResult,
    inspect_queue_task,
    replay_dlq_task,
)
from tasks.report import Report
from tasks.settings import get_settings


class DlqReplayOutcome(BaseModel):
    outcome: str
    before: QueueSnapshot
    after: QueueSnapshot
    result: ReplayResult
    markdown: str = ""


def build_filter(
    *,
    ids: list[str] | None,
    job_ids: list[str] | None,
    reason_contains: str | None,
    min_age_ms: int,
    replay_all: bool,
) -> ReplayFilter:
    """Validate the replay's choice of entries; choosing nothing is a clear QueueError (never 'replay all')."""
    try:
        return ReplayFilter(
            ids=frozenset(i.strip() for i in ids or [] if i.strip()),
            job_ids=frozenset(j.strip() for j in job_ids or [] if j.strip()),
            reason_contains=(reason_contains or "").strip() or None,
            min_age_ms=min_age_ms,
            replay_all=replay_all,
        )
    except ValidationError as e:
        problems = "; ".join(err["msg"] for err in e.errors())
        raise QueueError(f"invalid dlq-replay parameters: {problems}") from None


@flow(
    name="dlq-replay",
    flow_run_name="dlq-replay max={max_entries} dry_run={dry_run}",
    description=__doc__,
)
@describe_parameters
def dlq_replay(
    ids: Annotated[
        list[str] | None, Field(max_length=100_000, description="DLQ entry ids to replay.")
    ] = None,
    job_ids: Annotated[
        list[str] | None, Field(max_length=100_000, description="Replay DLQ entries of these job (step) ids.")
    ] = None,
    reason_contains: Annotated[
        str | None, Field(max_length=200, description="Replay entries whose reason/error contains this text.")
    ] = None,
    min_age_ms: Annotated[
        int,
        Field(
            ge=0,
            le=365 * 24 * 3_600_000,
            description="Replay only entries dead-lettered at least this long ago (ms).",
        ),
    ] = 0,
    replay_all: Annotated[
        bool, Field(description="Replay every DLQ entry (required when no other filter is given).")
    ] = False,
    max_entries: Annotated[
        int, Field(ge=1, le=1_000_000, description="At most this many entries per run.")
    ] = 1000,
    batch_size: Annotated[int, Field(ge=10, le=10_000, description="Entries per atomic step.")] = 1000,
    dry_run: Annotated[bool, Field(description="Only report what would be replayed; change nothing.")] = True,
) -> DlqReplayOutcome:
    """Replay chosen dead-lettered steps onto the step stream (attempts reset), removing them from the DLQ."""
    log = get_run_logger()
    settings = get_settings()
    flt = build_filter(
        ids=ids,
        job_ids=job_ids,
        reason_contains=reason_contains,
        min_age_ms=min_age_ms,
        replay_all=replay_all,
    )
    report = Report(title=f"dlq-replay from `{settings.dlq_stream}` to `{settings.stream}`")

    before = inspect_queue_task(settings=settings)
    before.require_group()
    report.table("Observed", before.summary_rows(), caption="Before")

    verdict = refuse_if_paused(dry_run=dry_run, settings=settings)
    acting = verdict.allowed
    chosen = {
        "ids": len(flt.ids) or "any",
        "job_ids": ", ".join(sorted(flt.job_ids)[:20]) or "any",
        "reason contains": flt.reason_contains or "any",
        "min age ms": flt.min_age_ms,
        "replay all": flt.replay_all,
        "max entries": max_entries,
    }
    report.table("Decided", [{"filter": k, "value": v} for k, v in chosen.items()], caption="Chosen entries")
    report.add("Decided", f"Guard: {verdict.reason}.")

    result = replay_dlq_task(
        settings=settings, flt=flt, max_entries=max_entries, batch_size=batch_size, dry_run=not acting
    )
    report.add(
        "Decided",
        f"{result.matched} of {result.scanned} DLQ entries examined match"
        + (f" (cap of {max_entries} reached; the next run continues)" if result.cap_reached else "")
        + ".",
    )
    report.table("Done" if acting else "Decided", result.samples, caption="Sample of entries")
    if acting:
        report.add(
            "Done", "Outcomes: " + (", ".join(f"{k}: {v}" for k, v in sorted(result.done.items())) or "none")
        )
    else:
        report.add("Done", f"Nothing changed: {verdict.reason}.")

    after = inspect_queue_task(settings=settings)
    report.table("Verified", after.summary_rows(), caption="After")
    report.add(
        "Verified",
        f"DLQ {before.dlq_length} -> {after.dlq_length}; stream length {before.length} -> {after.length} "
        f"(replayed now: {result.done.get('replayed', 0)}).",
    )
    outcome = "completed" if acting else ("dry run" if verdict.dry_run else verdict.reason)
    report.outcome = outcome
    markdown = report.publish(key="dlq-replay")
    if acting and result.done.get("replayed"):
        emit_recovery_event(
            action="dlq-replay", resource_id=f"queue.{settings.dlq_stream}", payload={"done": result.done}
        )
    log.info("dlq-replay %s: matched %d, done %s", outcome, result.matched, result.done)
    return DlqReplayOutcome(outcome=outcome, before=before, after=after, result=result, markdown=markdown)
