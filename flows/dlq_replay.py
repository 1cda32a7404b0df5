"""`dlq-replay`: move chosen dead-lettered steps back to the step stream, with their attempt count reset.

observe the group and the DLQ -> decide which entries (DLQ entry ids, job ids, a reason substring and/or a
minimum age: every filter given must match; ``tasks.queue.matches_replay``) -> act through the guarded replay
task (each batch re-added to the stream and deleted from the DLQ in one atomic step, so an entry is never lost
or replayed twice) -> verify (a sample of the replayed entries re-read in one round trip: gone from the DLQ,
present in the stream) -> report `dlq-replay`.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field, ValidationError

from flows._ui import LoggedResult, describe_parameters, keep_typed_name
from tasks import approval
from tasks.approval import ApprovalRecord
from tasks.events import emit_recovery_event
from tasks.outcome import Table
from tasks.queue import (
    QueueError,
    QueueSnapshot,
    ReplayFilter,
    ReplayResult,
    inspect_queue_task,
    pick_samples,
    replay_dlq_task,
    replay_moves,
    verify_moves_task,
)
from tasks.report import conclude, recording
from tasks.settings import Settings, get_settings

FLOW_NAME = "dlq-replay"


class DlqReplay(LoggedResult):
    """What one `dlq-replay` run saw, replayed and verified."""

    before: QueueSnapshot | None = None
    after: QueueSnapshot | None = None
    replay: ReplayResult | None = None
    approval: ApprovalRecord | None = None


def replay_target(settings: Settings) -> str:
    return f"{settings.dlq_stream} -> {settings.stream}"


def replay_bound(flt: ReplayFilter, *, max_entries: int, dlq_length: int) -> int:
    """Pure: the most entries a replay can move (the cap, the DLQ's length, the ids named: every filter must
    match); at or under the approval threshold there is nothing to ask, so nothing to count first."""
    return min(max_entries, dlq_length, len(flt.ids) if flt.ids else max_entries)


def _approved_cap(result: DlqReplay, flt: ReplayFilter, *, settings: Settings, max_entries: int,
                  batch_size: int, dry_run: bool) -> int | None:
    """The approval gate: the replay's cap (at most what a person approved), or None when it was refused.
    Over the threshold, a dry-run pass counts the entries that match first (the plan a person approves)."""
    bound = replay_bound(flt, max_entries=max_entries, dlq_length=result.before.dlq_length if result.before else 0)
    source = replay_target(settings)
    if dry_run or not approval.over(bound, settings.approval_dlq_replays):
        return max_entries
    preview = replay_dlq_task(settings=settings, flt=flt, max_entries=max_entries, batch_size=batch_size,
                              dry_run=True)
    samples = [str(s.get("job_id") or s.get("dlq_id") or "") for s in pick_samples(preview.samples, limit=10)]
    ask = approval.dlq_replays(settings, preview.matched, source=source, sample=[s for s in samples if s])
    if not approval.approve(result, ask, settings=settings, dry_run=dry_run):
        return None
    return max(1, min(max_entries, preview.matched))


def build_filter(
    *, ids: list[str] | None, job_ids: list[str] | None, reason_contains: str | None, min_age_ms: int,
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
        raise QueueError(f"invalid dlq-replay parameters: {'; '.join(err['msg'] for err in e.errors())}") from None


def filter_rows(flt: ReplayFilter, max_entries: int) -> list[dict[str, object]]:
    """The chosen filter as report rows."""
    chosen = {"ids": len(flt.ids) or "any", "job ids": ", ".join(sorted(flt.job_ids)[:20]) or "any",
              "reason contains": flt.reason_contains or "any", "min age ms": flt.min_age_ms,
              "replay all": "yes" if flt.replay_all else "no", "max entries": max_entries}
    return [{"filter": k, "value": v} for k, v in chosen.items()]


@flow(name=FLOW_NAME, flow_run_name=keep_typed_name("dlq-replay max={max_entries} dry_run={dry_run}"),
      description=__doc__)
@describe_parameters
def dlq_replay(
    ids: Annotated[list[str] | None, Field(max_length=100_000, title="DLQ entry ids",
                                           description="Replay these DLQ entries (their stream ids).")] = None,
    job_ids: Annotated[list[str] | None, Field(max_length=100_000, title="Job ids",
                                               description="Replay the DLQ entries of these jobs (step ids).")] = None,
    reason_contains: Annotated[str | None, Field(max_length=200, title="Reason contains",
                                                 description="Replay entries whose reason or error contains this "
                                                 "text; empty: any reason.")] = None,
    min_age_ms: Annotated[int, Field(ge=0, le=365 * 24 * 3_600_000, title="Minimum age (ms)",
                                     description="Replay only entries dead-lettered at least this long ago.")] = 0,
    replay_all: Annotated[bool, Field(title="Replay all",
                                      description="Replay every DLQ entry (required when no other filter is "
                                      "given).")] = False,
    max_entries: Annotated[int, Field(ge=1, le=1_000_000, title="Max entries (entries)",
                                      description="At most this many entries per run (the next run continues). "
                                      "More than FD_APPROVAL_DLQ_REPLAYS waits for a person's approval.")] = 1000,
    batch_size: Annotated[int, Field(ge=10, le=10_000, title="Batch size (entries)",
                                     description="Entries moved per atomic step.")] = 1000,
    dry_run: Annotated[bool, Field(title="Dry run",
                                   description="Only report what would be replayed; change nothing.")] = True,
) -> DlqReplay:
    """Replay chosen dead-lettered steps onto the step stream (attempts reset), removing them from the DLQ."""
    settings = get_settings()
    flt = build_filter(ids=ids, job_ids=job_ids, reason_contains=reason_contains, min_age_ms=min_age_ms,
                       replay_all=replay_all)
    title = f"dlq-replay from {settings.dlq_stream} to {settings.stream}" + (" (dry run)" if dry_run else "")
    with recording(DlqReplay(flow=FLOW_NAME, title=title, dry_run=dry_run)) as result:
        # observe
        result.before = before = inspect_queue_task(settings=settings)
        before.require_group()
        result.note("observed", Table(caption="Before", rows=before.summary_rows()))
        # decide (which entries: the filter, applied to each DLQ entry as the replay pages through it)
        result.note("decided", Table(caption="Chosen entries", rows=filter_rows(flt, max_entries)))
        if not before.dlq_length:
            result.note("decided", "The DLQ is empty: nothing to replay.")
            return conclude(result)
        # decide: more than FD_APPROVAL_DLQ_REPLAYS entries waits for a person (rejected: nothing moves)
        cap = _approved_cap(result, flt, settings=settings, max_entries=max_entries, batch_size=batch_size,
                            dry_run=dry_run)
        if cap is None:
            return conclude(result)
        # act
        result.replay = replay = result.perform(
            "replay", replay_target(settings), dry_run=dry_run,
            call=lambda: replay_dlq_task(settings=settings, flt=flt, max_entries=cap,
                                         batch_size=batch_size, dry_run=dry_run),
            count=lambda r: r.matched if dry_run else r.replayed,
            detail=lambda r: ", ".join(f"{k}: {n}" for k, n in sorted(r.done.items())))
        if replay is None:
            return conclude(result)
        result.note("decided", f"{replay.matched} of {replay.scanned} DLQ entries examined match"
                    + (f" (cap of {max_entries} reached; the next run continues)." if replay.cap_reached else "."))
        result.note("decided", Table(caption="Sample of entries", rows=pick_samples(replay.samples, limit=10)))
        if dry_run:  # says so when a real run would first wait for a person's approval
            approval.approve(result, approval.dlq_replays(settings, replay.matched, source=replay_target(settings)),
                             settings=settings, dry_run=True)
        if dry_run or not replay.matched:
            return conclude(result)
        if replay.replayed:
            emit_recovery_event(action="dlq-replay", resource_id=f"queue.{settings.dlq_stream}",
                                payload={"done": replay.done})
        # verify
        result.after = after = inspect_queue_task(settings=settings)
        counts = (f"DLQ {before.dlq_length} -> {after.dlq_length}; "
                  f"stream length {before.length} -> {after.length}")
        for c in verify_moves_task(settings=settings, moves=replay_moves(replay.samples)):
            name = ("replayed entries left the DLQ and are in the stream" if c.status == "replayed"
                    else "entries another run replayed first are gone from the DLQ")
            result.check(name, c.ok, f"{c.held}/{c.checked} sampled of {replay.done.get(c.status, 0)} re-read; "
                         + "; ".join([*c.failures, counts]), target=c.status)
    return conclude(result)
