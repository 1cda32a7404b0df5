"""Redis Streams queue recovery: inspect the group, find steps, and move stuck pending entries safely.

API shape: every operation is a plain keyword-only function (``inspect_queue``, ``locate_steps``,
``sweep_pending``, ``recover_consumers``, ``delete_empty_consumers``, ``replay_dlq`` ...) that tests and
other tasks call directly, plus a Prefect ``@task`` wrapper named ``<function>_task`` for flows. Every
mutating operation is ``@guarded``: it needs ``dry_run=`` and, unless previewing, raises ``Refused`` while the
kill switch is on. ``verify_moves`` re-reads a bounded sample of what a sweep or replay moved, in one round trip.

Safety: an entry leaves the pending list only inside one Lua script that re-adds it (requeue) or writes it to
the DLQ in the same atomic step (``tasks.queue_scripts``); each script re-checks that the entry is still
pending and still idle enough / still owned by the same dead consumer, so a concurrent sweep or a late ACK
is harmless. Work is done in pages (``batch_size`` entries per round trip); memory is bounded by one page.

Costs do not grow with history: a step is found pending, queued or in the DLQ through indexes (``IndexKeys``,
the recovery's own keys: the DLQ index is written in the same Lua step as the DLQ entry and removed with it;
the stream index holds every pending or undelivered entry by step id; both take in only what was added after
their cursor, each entry once), so ``locate_steps`` costs O(steps asked), not O(pending + backlog + DLQ);
``inspect_queue`` is one round trip, and when Redis cannot say the lag it is counted inside Redis once and then
kept up to date from what was delivered since (``COUNT_LAG``); a sweep reads only the entries idle enough to
take (XPENDING IDLE) and the dead consumers' own lists; ``trim_dlq`` applies the DLQ retention in bounded steps.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import redis
from prefect import task
from pydantic import BaseModel, Field, field_validator, model_validator

from tasks import queue_scripts
from tasks.connections import redis_client
from tasks.errors import RETRY, RecoveryError
from tasks.guard import guarded
from tasks.settings import Settings

Action = Literal["requeue", "claim", "dead_letter", "orphan", "leave"]
Strategy = Literal["requeue", "claim"]
SAMPLE_LIMIT = 50
SAMPLE_PER_KIND = 10  # sample rows kept per decision/outcome, so rare ones (poison, orphans) show up too
DLQ_ERROR = "Max retries exceeded"
VERIFY_LIMIT = 50  # moved entries re-read after a sweep or replay (one pipelined round trip)

#: what each move is called as an action: by its status once done, by its decision in a dry run
MOVE_KINDS = {"requeued": "requeue", "dead_lettered": "dead-letter", "orphan_acked": "ack-orphan", "claimed": "claim"}
DECISION_KINDS = {"requeue": "requeue", "dead_letter": "dead-letter", "orphan": "ack-orphan", "claim": "claim"}


#: when Redis reports the group's lag as unknown, it is counted inside Redis, this many entries per call
LAG_COUNT_BUDGET = 20_000
LAG_COUNT_MAX_CALLS = 1_000
#: the stream index groups entries by entry time in buckets this wide (ms); a bucket is dropped once every entry
#: in it was delivered and none is pending
TAIL_BUCKET_MS = 600_000
#: entries the indexes take in per call when they are behind (one Lua call: ~10-20 ms of Redis time)
INDEX_BUDGET = 2_000

class QueueError(RecoveryError):
    """A queue recovery cannot proceed (missing stream or group, bad policy, Redis refused); ``temporary`` when
    Redis could not be reached."""

    @property
    def temporary(self) -> bool:  # type: ignore[override]
        return isinstance(self.__cause__, redis.ConnectionError | redis.TimeoutError)


# --------------------------------------------------------------------------------------------- models


class ConsumerInfo(BaseModel):
    """One consumer of the group: entries it holds and ms since it last talked to Redis."""

    name: str
    pending: int
    idle_ms: int


class QueueSnapshot(BaseModel):
    """The group at one moment: XLEN, XINFO GROUPS / CONSUMERS, XPENDING summary and DLQ length."""

    stream: str
    group: str
    dlq_stream: str
    stream_exists: bool
    group_exists: bool
    length: int = 0
    lag: int | None = None
    last_delivered_id: str | None = None
    entries_read: int | None = None
    pending: int = 0
    oldest_pending_id: str | None = None
    consumers: list[ConsumerInfo] = Field(default_factory=list)
    dlq_length: int = 0
    dlq_oldest_id: str | None = None
    lag_counted: bool = False  # Redis reported the lag unknown: it was counted (``COUNT_LAG``)
    server_ms: int | None = None  # Redis' clock when the snapshot was taken
    taken_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def consumer(self, name: str) -> ConsumerInfo | None:
        return next((c for c in self.consumers if c.name == name), None)

    def pending_of(self, name: str) -> int:
        found = self.consumer(name)
        return found.pending if found else 0

    def require_group(self) -> None:
        """Raise a clear QueueError when the stream or the consumer group does not exist."""
        if not self.stream_exists:
            raise QueueError(f"stream `{self.stream}` does not exist (check FD_STREAM / FD_REDIS_URL)")
        if not self.group_exists:
            raise QueueError(f"consumer group `{self.group}` does not exist on stream `{self.stream}`")

    def summary_rows(self) -> list[dict[str, Any]]:
        """Key numbers as table rows for reports."""
        return [
            {"metric": "stream length (XLEN)", "value": self.length},
            {"metric": "lag (not yet delivered)", "value": self.lag},
            {"metric": "pending (delivered, not acked)", "value": self.pending},
            {"metric": "last delivered id", "value": self.last_delivered_id},
            {"metric": "entries read", "value": self.entries_read},
            {"metric": "consumers", "value": len(self.consumers)},
            {"metric": "DLQ length", "value": self.dlq_length},
        ]


class StepLocation(BaseModel):
    """Where a step's queue entry is: in the PEL (with owner), the DLQ, still queued, or nowhere."""

    step_id: str
    where: Literal["pending", "dlq", "queued", "nowhere"]
    entry_id: str | None = None
    consumer: str | None = None
    idle_ms: int | None = None
    deliveries: int | None = None


class PendingEntry(NamedTuple):
    """One entry of the pending list (XPENDING) with what its fields say (attempts, job/step ids)."""

    entry_id: str
    consumer: str
    idle_ms: int
    deliveries: int
    exists: bool = True
    attempts: int = 0
    job_id: str = ""
    step_id: str = ""
    run_id: str = ""

    @property
    def total_deliveries(self) -> int:
        """Deliveries of this copy plus those of earlier copies (the carried `attempts` field)."""
        return self.attempts + self.deliveries


class Decision(NamedTuple):
    """What to do with one pending entry, and why (shown in reports and written to the DLQ)."""

    action: Action
    reason: str


class SweepPolicy(BaseModel):
    """What a sweep may take: the runbook's 5-minute idle rule, 3 failures, and consumers known dead."""

    model_config = {"frozen": True}

    min_idle_ms: int = Field(300_000, ge=0, description="Take entries idle at least this long.")
    max_deliveries: int = Field(3, ge=1, description="Dead-letter entries delivered this many times.")
    dead_consumers: frozenset[str] = Field(default_factory=frozenset, description="Take their entries now.")
    strategy: Strategy = "requeue"
    claim_consumer: str = Field("new-worker", min_length=1)

    @field_validator("dead_consumers", mode="before")
    @classmethod
    def _clean_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("dead_consumers must be a list of consumer names, not one string")
        names = [str(v).strip() for v in (value or [])]
        if any(not n for n in names):
            raise ValueError("dead_consumers contains an empty name")
        return frozenset(names)

    @model_validator(mode="after")
    def _claimer_alive(self) -> SweepPolicy:
        if self.strategy == "claim" and self.claim_consumer in self.dead_consumers:
            raise ValueError(f"claim_consumer `{self.claim_consumer}` is listed in dead_consumers")
        return self


class SweepResult(BaseModel):
    """What a sweep (or one page of it) saw, decided and did; counts plus a bounded sample."""

    dry_run: bool
    scanned: int = 0
    pages: int = 0
    decided: dict[str, int] = Field(default_factory=dict)
    done: dict[str, int] = Field(default_factory=dict)
    samples: list[dict[str, Any]] = Field(default_factory=list)
    cap_reached: bool = False
    next_start: str | None = None

    @property
    def moved(self) -> int:
        return sum(self.done.get(k, 0) for k in ("requeued", "dead_lettered", "orphan_acked", "claimed"))

    def merge(self, other: SweepResult) -> SweepResult:
        """Add another page's result to this one (samples stay bounded)."""
        self.scanned += other.scanned
        self.pages += other.pages
        self.decided = dict(Counter(self.decided) + Counter(other.decided))
        self.done = dict(Counter(self.done) + Counter(other.done))
        self.samples = pick_samples(self.samples + other.samples)
        self.cap_reached = self.cap_reached or other.cap_reached
        self.next_start = other.next_start
        return self


class ConsumerRecovery(SweepResult):
    """Result of taking every pending entry of the given consumers."""

    consumers: list[str] = Field(default_factory=list)


class ConsumerCleanup(BaseModel):
    """Result of XGROUP DELCONSUMER on consumers that own nothing."""

    dry_run: bool
    deleted: list[str] = Field(default_factory=list)
    would_delete: list[str] = Field(default_factory=list)
    kept: dict[str, str] = Field(default_factory=dict)


class ReplayFilter(BaseModel):
    """Which DLQ entries to replay; an entry must match every filter given (ids, job ids, reason, age)."""

    model_config = {"frozen": True}

    ids: frozenset[str] = frozenset()
    job_ids: frozenset[str] = frozenset()
    reason_contains: str | None = None
    min_age_ms: int = Field(0, ge=0)
    replay_all: bool = False

    @model_validator(mode="after")
    def _something_chosen(self) -> ReplayFilter:
        if not (self.ids or self.job_ids or self.reason_contains or self.min_age_ms or self.replay_all):
            raise ValueError("choose DLQ entries by ids, job_ids, reason or min_age_ms, or set replay_all")
        return self


class ReplayResult(BaseModel):
    """What a replay examined, chose and moved; counts per status plus a bounded sample."""

    dry_run: bool
    scanned: int = 0
    matched: int = 0
    done: dict[str, int] = Field(default_factory=dict)
    samples: list[dict[str, Any]] = Field(default_factory=list)
    cap_reached: bool = False

    @property
    def replayed(self) -> int:
        return self.done.get("replayed", 0)

    @property
    def changed(self) -> bool:
        """Whether an entry was replayed (all chosen ones already gone = an idempotent no-op)."""
        return self.replayed > 0


class Move(NamedTuple):
    """One entry a sweep or replay moved: status, its id where it was (pending list or DLQ), the owner it left
    (pending list only) and the id of its new copy ("" when none: ack, claim)."""

    status: str
    entry_id: str
    owner: str = ""
    new_id: str = ""
    source: Literal["pending", "dlq"] = "pending"


class MoveCheck(BaseModel):
    """A sample of moves of one status, re-read: how many left their old place and have their new copy."""

    status: str
    checked: int = 0
    held: int = 0
    failures: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and self.held == self.checked


class IndexKeys(NamedTuple):
    """The recovery's own keys (under ``FD_STATE_PREFIX``) that index the DLQ and the stream (``tail_*``: every
    pending or undelivered entry), and the ledger of a lag Redis cannot report."""

    dlq_index: str
    dlq_cursor: str
    tail_meta: str
    tail_buckets: str
    tail_bucket_prefix: str
    lag_ledger: str


def index_keys(settings: Settings) -> IndexKeys:
    """The index keys of these settings' stream, group and DLQ."""
    tail = f"{settings.state_prefix}:index:{settings.stream}:{settings.group}"
    return IndexKeys(
        dlq_index=f"{settings.state_prefix}:index:{settings.dlq_stream}",
        dlq_cursor=f"{settings.state_prefix}:index:{settings.dlq_stream}:cursor",
        tail_meta=f"{tail}:meta",
        tail_buckets=f"{tail}:buckets",
        tail_bucket_prefix=f"{tail}:b:",
        lag_ledger=f"{settings.state_prefix}:lag:{settings.stream}:{settings.group}",
    )


class IndexRefresh(BaseModel):
    """What one refresh of the indexes took in: stream (``tail``) and DLQ entries indexed, stream buckets dropped."""

    tail: int = 0
    dlq: int = 0
    pruned: int = 0
    calls: int = 0
    behind: bool = False  # still behind after the calls allowed (the next refresh or locate goes on)


class DlqRetention(BaseModel):
    """What one retention step trimmed from the DLQ (in a dry run: would trim), and why."""

    dry_run: bool
    max_age_ms: int
    max_length: int
    trimmed: int = 0
    by_age: int = 0
    by_length: int = 0
    first_id: str | None = None
    last_id: str | None = None
    first_ms: int | None = None
    last_ms: int | None = None
    job_ids: list[str] = Field(default_factory=list)  # a sample of the steps trimmed ...
    sample_ids: list[str] = Field(default_factory=list)  # ... and their DLQ entry ids
    more: bool = False  # the per-run bound was reached with entries still over the limit

    @property
    def changed(self) -> bool:
        return not self.dry_run and self.trimmed > 0

    def summary(self) -> str:
        """One line for the report: how many, why, which dead-letter times, a sample of steps."""
        verb = "would trim" if self.dry_run else "trimmed"
        if not self.trimmed:
            return f"{verb} nothing: no entry over the limit"
        why = ", ".join(p for p in (f"{self.by_age} older than {_days(self.max_age_ms)}" if self.by_age else "",
                                    f"{self.by_length} beyond {self.max_length} entries" if self.by_length else "") if p)
        when = f"dead-lettered {_when(self.first_ms)} .. {_when(self.last_ms)}"
        more = "; more over the limit: the next sweep goes on" if self.more else ""
        return f"{verb} {self.trimmed} ({why}); {when}; steps {', '.join(self.job_ids)}{more}"


def _days(ms: int) -> str:
    days = ms / 86_400_000
    return f"{days:g} day" + ("" if days == 1 else "s")


def _when(ms: int | None) -> str:
    return "-" if ms is None else f"{datetime.fromtimestamp(ms / 1000, UTC):%Y-%m-%d %H:%M}"


# --------------------------------------------------------------------------------------- pure logic


def decide(entry: PendingEntry, policy: SweepPolicy) -> Decision:
    """Requeue/claim, dead-letter, acknowledge (orphan) or leave one pending entry. Pure.

    An entry is only ever taken when its owner is known dead or it has been idle >= ``min_idle_ms``: a live
    worker's fresh entry is left even at its last allowed delivery, so it may still finish it.
    """
    dead = entry.consumer in policy.dead_consumers
    if not dead and entry.idle_ms < policy.min_idle_ms:
        return Decision("leave", f"owner `{entry.consumer}` may still be working (idle {entry.idle_ms} ms)")
    why = f"owner `{entry.consumer}` is dead" if dead else f"idle {entry.idle_ms} ms >= {policy.min_idle_ms}"
    if not entry.exists:
        return Decision("orphan", f"entry deleted or trimmed; {why}")
    if entry.total_deliveries >= policy.max_deliveries:
        return Decision(
            "dead_letter", f"delivered {entry.total_deliveries} times (max {policy.max_deliveries}); {why}"
        )
    return Decision(policy.strategy, why)


def move_counts(result: SweepResult) -> dict[str, int]:
    """Entries moved per action kind (``requeue``, ``dead-letter``, ``ack-orphan``, ``claim``); in a dry run,
    those that would be. Pure."""
    counts = result.decided if result.dry_run else result.done
    kinds = DECISION_KINDS if result.dry_run else MOVE_KINDS
    return {kinds[k]: n for k, n in counts.items() if k in kinds and n}


def consumers_to_delete(
    snapshot: QueueSnapshot, *, min_idle_ms: int, policy: SweepPolicy, swept: bool
) -> list[str]:
    """Consumers worth an XGROUP DELCONSUMER after a sweep: idle >= ``min_idle_ms`` and owning nothing, or
    (``swept``: the sweep ran to the end) owning only entries it took — a dead consumer's, or a consumer idle
    past the sweep's idle limit (its entries are at least as idle as it is). Pure; the delete re-checks.
    """
    return sorted(
        c.name
        for c in snapshot.consumers
        if c.idle_ms >= min_idle_ms
        and (c.pending == 0 or (swept and (c.name in policy.dead_consumers or c.idle_ms >= policy.min_idle_ms)))
    )


def sweep_moves(samples: Iterable[dict[str, Any]]) -> list[Move]:
    """The moved entries among a sweep's sample rows (skipped ones moved nothing). Pure."""
    return [
        Move(r["status"], r["entry_id"], r.get("consumer") or "", r.get("new_id") or "")
        for r in samples
        if r.get("status") in MOVE_KINDS
    ]


def replay_moves(samples: Iterable[dict[str, Any]]) -> list[Move]:
    """The replayed (or already gone) entries among a replay's sample rows. Pure."""
    return [
        Move(r["status"], r["dlq_id"], "", r.get("new_id") or "", "dlq")
        for r in samples
        if r.get("status") in ("replayed", "skipped_gone")
    ]


def matches_replay(fields: dict[str, str], entry_id: str, flt: ReplayFilter, *, now_ms: int) -> bool:
    """Whether a DLQ entry (its id and fields) is chosen by the replay filter. Pure."""
    if flt.ids and entry_id not in flt.ids:
        return False
    if flt.job_ids and (fields.get("job_id") or fields.get("step_id")) not in flt.job_ids:
        return False
    if flt.reason_contains:
        text = f"{fields.get('reason', '')} {fields.get('error', '')}".lower()
        if flt.reason_contains.lower() not in text:
            return False
    if flt.min_age_ms:
        at = fields.get("dead_lettered_at_ms") or entry_id.split("-", 1)[0]
        if now_ms - int(at) < flt.min_age_ms:
            return False
    return True


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def retention_due(snapshot: QueueSnapshot, *, max_age_ms: int, max_length: int) -> bool:
    """Whether the DLQ holds an entry over the retention limit: its oldest entry is older than ``max_age_ms``
    (by Redis' clock) or it is longer than ``max_length`` (0 = no such limit). Pure; O(1) from the snapshot."""
    if max_length and snapshot.dlq_length > max_length:
        return True
    if not (max_age_ms and snapshot.dlq_oldest_id and snapshot.server_ms):
        return False
    return _id_key(snapshot.dlq_oldest_id)[0] < snapshot.server_ms - max_age_ms


# ------------------------------------------------------------------------------------------- inspect


def inspect_queue(*, settings: Settings) -> QueueSnapshot:
    """Snapshot of stream, group, consumers and DLQ in ONE round trip (``SNAPSHOT``: O(consumers), one JSON reply);
    when Redis reports the lag unknown, it is counted inside Redis (a number travels, never the entries): from
    the kept count, only what was delivered since (``count_lag``)."""
    client = redis_client(settings)
    script = client.register_script(queue_scripts.SNAPSHOT)
    keys = [settings.stream, settings.dlq_stream, index_keys(settings).lag_ledger]
    try:
        snap = json.loads(script(keys=keys, args=[settings.group, LAG_COUNT_BUDGET]))
        if snap.get("lag_more"):
            snap["lag"] = count_lag(settings=settings)
    except redis.RedisError as e:
        raise QueueError(f"cannot inspect `{settings.stream}`: {e}") from e
    consumers = snap.get("consumers") or []
    return QueueSnapshot(
        stream=settings.stream,
        group=settings.group,
        dlq_stream=settings.dlq_stream,
        stream_exists=snap["exists"],
        group_exists=snap["group_exists"],
        length=snap["length"],
        lag=snap.get("lag"),
        lag_counted=bool(snap.get("lag_counted")),
        last_delivered_id=snap.get("last_delivered_id"),
        entries_read=snap.get("entries_read"),
        pending=snap.get("pending", 0),
        oldest_pending_id=snap.get("oldest_pending_id"),
        consumers=[ConsumerInfo(name=n, pending=p, idle_ms=i) for n, p, i in consumers],
        dlq_length=snap["dlq_length"],
        dlq_oldest_id=snap.get("dlq_oldest_id"),
        server_ms=snap["server_ms"],
    )


def count_lag(*, settings: Settings, budget: int = LAG_COUNT_BUDGET) -> int | None:
    """The group's lag when Redis reports it unknown, counted inside Redis (``queue_scripts.COUNT_LAG``).

    The first count reads the undelivered tail inside Redis, ``budget`` entries per call; later calls start
    from the kept count and read only what was delivered since (unless something was removed from the stream
    meanwhile). Writes only the recovery's own ledger key. None when it could not settle (the stream keeps
    changing under it for ``LAG_COUNT_MAX_CALLS`` calls).
    """
    client = redis_client(settings)
    script = client.register_script(queue_scripts.COUNT_LAG)
    for _ in range(LAG_COUNT_MAX_CALLS):
        reply = script(keys=[settings.stream, index_keys(settings).lag_ledger], args=[settings.group, budget])
        if isinstance(reply, int):
            return reply
    return None


# ---------------------------------------------------------------------------------------------- scan


def scan_pending(
    *,
    settings: Settings,
    start: str = "-",
    count: int = 1000,
    consumer: str | None = None,
    min_idle_ms: int | None = None,
) -> list[PendingEntry]:
    """One page of the pending list from ``start`` (``"(id"`` = after id), with attempts and job ids; with
    ``min_idle_ms`` only the entries idle at least that long (filtered inside Redis: XPENDING IDLE).

    One read-only Lua call: XPENDING of ``count`` entries plus one range XRANGE over their ids, O(count + log N)
    (sparse ranges fall back to per-id lookups); the reply is one JSON string, cheap to parse.
    """
    client = redis_client(settings)
    script = client.register_script(queue_scripts.SCAN_PENDING)
    idle = "" if min_idle_ms is None else str(min_idle_ms)
    try:
        flat = _json_list(script(keys=[settings.stream], args=[settings.group, start, count, consumer or "", idle]))
    except redis.RedisError as e:
        raise QueueError(
            f"cannot scan the pending list of `{settings.stream}`/`{settings.group}`: {e}"
        ) from e
    return [
        PendingEntry(
            flat[i],
            flat[i + 1],
            flat[i + 2],
            flat[i + 3],
            flat[i + 4] == 1,
            _int(flat[i + 5]),
            flat[i + 6],
            flat[i + 7],
            flat[i + 8],
        )
        for i in range(0, len(flat), 9)
    ]


def iter_pending(
    *, settings: Settings, batch_size: int = 1000, consumer: str | None = None, start: str = "-"
) -> Iterator[list[PendingEntry]]:
    """Pages of the pending list in id order; memory bounded by one page. O(P) for a PEL of P entries."""
    while True:
        page = scan_pending(settings=settings, start=start, count=batch_size, consumer=consumer)
        if not page:
            return
        yield page
        if len(page) < batch_size:
            return
        start = "(" + page[-1].entry_id


def _json_list(reply: str) -> list[Any]:
    data = json.loads(reply)
    return data if isinstance(data, list) else []  # cjson encodes an empty table as {}


def _int(value: Any) -> int:
    if value == "0":
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# ----------------------------------------------------------------------------------------------- act

_ACTION_CODE = {"requeue": "R", "dead_letter": "D", "orphan": "O", "claim": "C"}


def _apply_decisions(
    *, settings: Settings, decided: Sequence[tuple[PendingEntry, Decision]], policy: SweepPolicy
) -> list[tuple[PendingEntry, Decision, str, str]]:
    """Carry out decisions in ONE atomic Lua call; returns (entry, decision, status, new id) per entry.

    Entries taken because their owner is dead are re-checked for that owner; others for idle >= min_idle_ms.
    Safe to retry: a second run finds the entries gone from the pending list and skips them.
    """
    acting = [(e, d) for e, d in decided if d.action != "leave"]
    if not acting:
        return []
    args: list[Any] = [settings.group, policy.min_idle_ms, policy.claim_consumer]
    for entry, decision in acting:
        owner = entry.consumer if entry.consumer in policy.dead_consumers else ""
        reason = decision.reason if decision.action == "dead_letter" else ""
        args += [entry.entry_id, _ACTION_CODE[decision.action], owner, reason]
    client = redis_client(settings)
    script = client.register_script(queue_scripts.ACT_PENDING)
    try:
        keys = index_keys(settings)
        flat = _json_list(script(keys=[settings.stream, settings.dlq_stream, keys.dlq_index, keys.dlq_cursor],
                                 args=[json.dumps(args)]))
    except redis.RedisError as e:
        raise QueueError(f"cannot move pending entries of `{settings.stream}`: {e}") from e
    return [(e, d, flat[2 * i], flat[2 * i + 1]) for i, (e, d) in enumerate(acting)]


def pick_samples(
    rows: Iterable[dict[str, Any]], *, per_kind: int = SAMPLE_PER_KIND, limit: int = SAMPLE_LIMIT
) -> list[dict[str, Any]]:
    """At most ``per_kind`` rows per (decision, status), ``limit`` in all, in their original order."""
    seen: Counter[tuple[Any, Any]] = Counter()
    out: list[dict[str, Any]] = []
    for row in rows:
        kind = (row.get("decision"), row.get("status"))
        if seen[kind] < per_kind:
            seen[kind] += 1
            out.append(row)
            if len(out) >= limit:
                break
    return out


def _sample(entry: PendingEntry, decision: Decision, status: str = "", new_id: str = "") -> dict[str, Any]:
    row = {
        "entry_id": entry.entry_id,
        "job_id": entry.job_id or entry.step_id,
        "consumer": entry.consumer,
        "idle_ms": entry.idle_ms,
        "deliveries": entry.total_deliveries,
        "decision": decision.action,
        "reason": decision.reason,
    }
    if status:
        row["status"] = status
        row["new_id"] = new_id
    return row


def _sweep_page(
    *,
    settings: Settings,
    policy: SweepPolicy,
    start: str = "-",
    batch_size: int = 1000,
    max_actions: int | None = None,
    dry_run: bool,
    consumer: str | None = None,
    min_idle_ms: int | None = None,
    skip_owners: frozenset[str] = frozenset(),
) -> SweepResult:
    """Scan one page from ``start`` (of ``consumer``'s list, or of entries idle >= ``min_idle_ms``), decide each
    entry (pure; entries of ``skip_owners`` are not this page's), act on the batch unless ``dry_run``.

    ``next_start`` is the cursor of the following page, or None when the list is exhausted or ``max_actions``
    was reached (``cap_reached``).
    """
    page = scan_pending(settings=settings, start=start, count=batch_size, consumer=consumer, min_idle_ms=min_idle_ms)
    mine = [e for e in page if e.consumer not in skip_owners]
    result = SweepResult(dry_run=dry_run, scanned=len(mine), pages=1)
    decided: list[tuple[PendingEntry, Decision]] = []
    actions = 0
    for entry in mine:
        decision = decide(entry, policy)
        if decision.action != "leave":
            if max_actions is not None and actions >= max_actions:
                result.cap_reached = True
                result.scanned = len(decided)
                break
            actions += 1
        decided.append((entry, decision))
    result.decided = dict(Counter(d.action for _, d in decided))
    if dry_run:
        result.samples = pick_samples(_sample(e, d) for e, d in decided if d.action != "leave")
    elif any(d.action != "leave" for _, d in decided):
        outcomes = _apply_decisions(settings=settings, decided=decided, policy=policy)
        result.done = dict(Counter(status for *_, status, _ in outcomes))
        result.samples = pick_samples(_sample(*o) for o in outcomes)
    full = len(page) == batch_size and not result.cap_reached
    result.next_start = "(" + page[-1].entry_id if page and full else None
    return result


def _cursor(start: str) -> tuple[int, str]:
    """A sweep cursor ``"<phase>|<start>"`` (``"-"``: the beginning) as (phase, start within the phase)."""
    phase, sep, pos = start.partition("|")
    return (int(phase), pos) if sep else (0, start)


def _sweep_pending(
    *,
    settings: Settings,
    policy: SweepPolicy,
    batch_size: int = 1000,
    max_entries: int | None = None,
    dry_run: bool,
    consumer: str | None = None,
    start: str = "-",
    max_pages: int | None = None,
) -> SweepResult:
    """Sweep the pending list page by page (scan -> decide -> act); at most ``max_entries`` moves.

    Phases: each dead consumer's own list (every entry is taken), then the entries idle >= the policy's
    ``min_idle_ms`` (filtered inside Redis: entries held by busy live workers are never read); with
    ``consumer``, that consumer's list only. ``next_start`` (``"<phase>|<start>"``) says where to go on after
    ``max_pages`` pages. Cost: O(entries taken + dead consumers' entries) transferred, in pages of
    ``batch_size``; Redis filters the rest (O(P) inside one XPENDING per page); memory one page.
    """
    phases: list[str | None] = [consumer] if consumer else [*sorted(policy.dead_consumers), None]
    total = SweepResult(dry_run=dry_run, next_start=start)
    while total.next_start is not None and (max_pages is None or total.pages < max_pages):
        phase, pos = _cursor(total.next_start)
        owner = phases[phase]
        moves = sum(v for k, v in total.decided.items() if k != "leave")
        page = _sweep_page(
            settings=settings,
            policy=policy,
            start=pos,
            batch_size=batch_size,
            max_actions=None if max_entries is None else max_entries - moves,
            dry_run=dry_run,
            consumer=owner,
            min_idle_ms=policy.min_idle_ms if owner is None else None,
            skip_owners=policy.dead_consumers if owner is None else frozenset(),
        )
        if page.next_start is not None:
            page.next_start = f"{phase}|{page.next_start}"
        elif not page.cap_reached and phase + 1 < len(phases):
            page.next_start = f"{phase + 1}|-"
        total.merge(page)
    return total


sweep_pending = guarded("sweep-pending")(_sweep_pending)


@guarded("dead-letter-entries", target=lambda kw: kw["consumer"])
def dead_letter_pending(
    *, settings: Settings, consumer: str, entries: Sequence[PendingEntry], reason: str, dry_run: bool
) -> dict[str, str]:
    """Dead-letter these pending entries of a dead ``consumer`` (e.g. the poison) in one atomic Lua step that
    re-checks each is still owned by that consumer (a late ACK or a claim makes it a no-op).

    Returns entry id -> status (``dead_lettered``, or why not); in a dry run every entry is ``would_dead_letter``.
    """
    if dry_run:
        return {e.entry_id: "would_dead_letter" for e in entries}
    policy = SweepPolicy(min_idle_ms=0, dead_consumers=[consumer])
    outcomes = _apply_decisions(settings=settings, policy=policy,
                                decided=[(e, Decision("dead_letter", reason)) for e in entries])
    return {entry.entry_id: status for entry, _decision, status, _new_id in outcomes}


# ----------------------------------------------------------------------------- consumer-level helpers


@guarded("recover-consumers", target=lambda kw: ",".join(sorted(kw["consumers"])))
def recover_consumers(
    *,
    settings: Settings,
    consumers: list[str],
    max_deliveries: int = 3,
    dry_run: bool,
    batch_size: int = 1000,
) -> ConsumerRecovery:
    """Requeue every pending entry of these (dead) consumers now, whatever its idle time.

    Entries at/over ``max_deliveries`` go to the DLQ, orphans are acknowledged; same atomic Lua path as the
    sweep, re-checking inside Redis that each entry is still owned by that consumer. O(their pending).
    """
    names = sorted({c for c in consumers if c})
    policy = SweepPolicy(min_idle_ms=0, max_deliveries=max_deliveries, dead_consumers=names)
    result = ConsumerRecovery(dry_run=dry_run, consumers=names)
    for name in names:
        part = _sweep_pending(
            settings=settings, policy=policy, batch_size=batch_size, dry_run=dry_run, consumer=name
        )
        result.merge(part)
    return result


@guarded("delete-consumers")
def delete_empty_consumers(
    *, settings: Settings, consumers: list[str] | None, min_idle_ms: int, dry_run: bool
) -> ConsumerCleanup:
    """XGROUP DELCONSUMER for consumers (all when None) with zero pending entries, idle >= ``min_idle_ms``.

    The zero-pending re-check and the delete are one atomic Lua step: a consumer that owns entries is never
    deleted (DELCONSUMER would drop them). O(consumers).
    """
    if min_idle_ms < 0:
        raise QueueError("min_idle_ms must be >= 0")
    client = redis_client(settings)
    try:
        info = client.xinfo_consumers(settings.stream, settings.group)
    except redis.ResponseError as e:
        raise QueueError(f"cannot list consumers of `{settings.stream}`/`{settings.group}`: {e}") from e
    known = {c["name"]: c for c in info}
    wanted = sorted(known) if consumers is None else sorted(set(consumers))
    result = ConsumerCleanup(dry_run=dry_run)
    if dry_run:
        for name in wanted:
            c = known.get(name)
            if c is None:
                result.kept[name] = "skipped_gone"
            elif c["pending"] > 0:
                result.kept[name] = "kept_pending"
            elif c["idle"] < min_idle_ms:
                result.kept[name] = "kept_busy"
            else:
                result.would_delete.append(name)
        return result
    if not wanted:
        return result
    script = client.register_script(queue_scripts.DELETE_EMPTY_CONSUMERS)
    try:
        flat = script(keys=[settings.stream], args=[settings.group, min_idle_ms, *wanted])
    except redis.RedisError as e:
        raise QueueError(f"cannot delete consumers of `{settings.stream}`: {e}") from e
    for name, status in zip(flat[0::2], flat[1::2], strict=True):
        if status == "deleted":
            result.deleted.append(name)
        else:
            result.kept[name] = status
    return result


# ------------------------------------------------------------------------------------------- locate


def locate_steps(
    *, settings: Settings, step_ids: list[str], batch_size: int = 1000
) -> dict[str, StepLocation]:
    """Where each step's entry is now: pending (owner, idle, deliveries), queued, dlq, or nowhere.

    A step matches an entry by its ``job_id`` or ``step_id`` field. One Lua call (``INDEX_LOOKUP``) looks the
    steps up in the stream index (every pending or undelivered entry, by step id) and the DLQ index, after
    taking in what was added since their cursors; each hit is re-read by id. Cost: O(steps asked x live
    buckets), plus the entries added since the last lookup or sweep (each read once, ever) — never the pending
    list, the backlog or the DLQ; memory O(len(step_ids)). ``batch_size`` is kept for callers (unused).
    Precedence when a step has several copies: pending > queued > dlq > nowhere.
    """
    wanted = list(dict.fromkeys(s for s in step_ids if s))
    found: dict[str, StepLocation] = {}
    for key, where in (_index_lookup(settings=settings, wanted=wanted) if wanted else {}).items():
        if "pending" in where:
            entry_id, consumer, idle_ms, deliveries, attempts = where["pending"]
            found[key] = StepLocation(step_id=key, where="pending", entry_id=entry_id, consumer=consumer,
                                      idle_ms=idle_ms, deliveries=_int(attempts) + deliveries)
        elif "queued" in where:
            found[key] = StepLocation(step_id=key, where="queued", entry_id=where["queued"])
        else:
            entry_id, deliveries = where["dlq"][0]
            found[key] = StepLocation(step_id=key, where="dlq", entry_id=entry_id, deliveries=_int(deliveries))
    return {s: found.get(s) or StepLocation(step_id=s, where="nowhere") for s in step_ids}


def _index_call(settings: Settings, *, wanted: list[str], budget: int, dlq_only: bool = False) -> dict[str, Any]:
    """One ``INDEX_LOOKUP`` call: take in up to ``budget`` new entries of each index, then (when up to date)
    look the wanted steps up."""
    keys = index_keys(settings)
    client = redis_client(settings)
    script = client.register_script(queue_scripts.INDEX_LOOKUP)
    arg = {"group": settings.group, "wanted": wanted, "budget": budget,
           "bucket_prefix": keys.tail_bucket_prefix, "bucket_ms": TAIL_BUCKET_MS, "dlq_only": dlq_only}
    try:
        reply = script(keys=[settings.stream, settings.dlq_stream, keys.dlq_index, keys.dlq_cursor,
                             keys.tail_meta, keys.tail_buckets], args=[json.dumps(arg)])
    except redis.RedisError as e:
        raise QueueError(f"cannot read the queue indexes of `{settings.stream}`: {e}") from e
    return json.loads(reply)


def _index_lookup(*, settings: Settings, wanted: list[str], dlq_only: bool = False) -> dict[str, dict[str, Any]]:
    """Step -> ``{"queued": id}`` or ``{"dlq": [[id, deliveries], ...]}`` for the wanted steps found in the
    indexes (brought up to date first: exact, whatever was written meanwhile and by whom); ``dlq_only``: every
    DLQ copy, whether or not the step is also queued."""
    for _ in range(100_000):
        reply = _index_call(settings, wanted=wanted, budget=INDEX_BUDGET, dlq_only=dlq_only)
        if not reply["more"]:
            found = reply.get("found") or {}
            return found if isinstance(found, dict) else {}
    raise QueueError(f"the indexes of `{settings.stream}` could not catch up")


def refresh_indexes(*, settings: Settings, max_calls: int = 50, budget: int = INDEX_BUDGET) -> IndexRefresh:
    """Take in what was added to the DLQ and the stream since the indexes' cursors (at most ``max_calls`` x
    ``budget`` entries of each), and drop the stream buckets nothing waits in any more. Writes only the
    recovery's own index keys. Up to date: one Lua call, O(1)."""
    out = IndexRefresh()
    while out.calls < max_calls:
        reply = _index_call(settings, wanted=[], budget=budget)
        out.calls += 1
        out.tail += reply["tail"]
        out.dlq += reply["dlq"]
        out.pruned += reply["pruned"]
        out.behind = reply["more"]
        if not out.behind:
            break
    return out


def verify_moves(*, settings: Settings, moves: Sequence[Move], limit: int = VERIFY_LIMIT) -> list[MoveCheck]:
    """Re-read up to ``limit`` moved entries in ONE pipelined round trip: each left its old place (no longer
    pending to its old owner; a replayed one gone from the DLQ) and its new copy exists (the stream for a
    requeue or replay, the DLQ for a dead-letter). Read-only; one result per status, in first-seen order."""
    moves = list(moves)[:limit]
    copy_key = {"requeued": settings.stream, "replayed": settings.stream, "dead_lettered": settings.dlq_stream}
    client = redis_client(settings)
    try:
        with client.pipeline(transaction=False) as pipe:
            for m in moves:
                if m.source == "dlq":
                    pipe.xrange(settings.dlq_stream, min=m.entry_id, max=m.entry_id)
                else:
                    pipe.xpending_range(settings.stream, settings.group, min=m.entry_id, max=m.entry_id, count=1)
                if m.status in copy_key:
                    pipe.xrange(copy_key[m.status], min=m.new_id or "0-0", max=m.new_id or "0-0")
            replies = iter(pipe.execute())
    except redis.RedisError as e:
        raise QueueError(f"cannot re-read the moved entries of `{settings.stream}`: {e}") from e
    checks: dict[str, MoveCheck] = {}
    for m in moves:
        old = next(replies)
        left = not old if m.source == "dlq" else not old or old[0]["consumer"] != m.owner
        copied = bool(next(replies)) if m.status in copy_key else True
        check = checks.setdefault(m.status, MoveCheck(status=m.status))
        check.checked += 1
        if left and copied:
            check.held += 1
        elif len(check.failures) < 5:
            check.failures.append(f"{m.entry_id}: " + ("still in place" if not left else f"no copy {m.new_id}"))
    return list(checks.values())


def _iter_range(
    client: redis.Redis, key: str, *, start: str, count: int
) -> Iterator[tuple[str, dict[str, str]]]:
    """Entries of a stream from ``start`` in pages of ``count`` (XRANGE with an exclusive cursor)."""
    while True:
        try:
            page = client.xrange(key, min=start, max="+", count=count)
        except redis.RedisError as e:
            raise QueueError(f"cannot read `{key}`: {e}") from e
        yield from page
        if len(page) < count:
            return
        start = "(" + page[-1][0]


# ----------------------------------------------------------------------------------------- DLQ replay


@guarded("replay-dlq")
def replay_dlq(
    *,
    settings: Settings,
    flt: ReplayFilter,
    max_entries: int = 1000,
    batch_size: int = 1000,
    dry_run: bool,
) -> ReplayResult:
    """Move chosen DLQ entries back to the stream (attempts reset), deleting them from the DLQ atomically.

    Candidates: the given ids (one pipelined XRANGE per id), else the DLQ entries of the given job ids (from the
    DLQ index: O(job ids), the DLQ is not read), else the whole DLQ page by page (O(D): replay-all, by reason or
    age). Each is filtered with the pure ``matches_replay``; each batch is replayed in one Lua call that also
    removes the entries from the DLQ index.
    """
    client = redis_client(settings)
    result = ReplayResult(dry_run=dry_run)
    script = client.register_script(queue_scripts.REPLAY_DLQ)
    now_ms = _server_ms(client)
    batch: list[tuple[str, dict[str, str]]] = []

    def flush() -> None:
        if not batch:
            return
        if dry_run:
            result.samples += [_replay_row(i, f, "would_replay", "") for i, f in batch][
                : SAMPLE_LIMIT - len(result.samples)
            ]
        else:
            try:
                flat = script(keys=[settings.dlq_stream, settings.stream, index_keys(settings).dlq_index],
                              args=[i for i, _ in batch])
            except redis.RedisError as e:
                raise QueueError(f"cannot replay from `{settings.dlq_stream}`: {e}") from e
            statuses = Counter(flat[1::3])
            result.done = dict(Counter(result.done) + statuses)
            rows = [
                _replay_row(i, f, s, n) for (i, f), s, n in zip(batch, flat[1::3], flat[2::3], strict=True)
            ]
            result.samples += rows[: max(0, SAMPLE_LIMIT - len(result.samples))]
        batch.clear()

    for entry_id, fields in _dlq_candidates(client, settings, flt, batch_size):
        result.scanned += 1
        if not matches_replay(fields, entry_id, flt, now_ms=now_ms):
            continue
        if result.matched >= max_entries:
            result.cap_reached = True
            break
        result.matched += 1
        batch.append((entry_id, fields))
        if len(batch) >= batch_size:
            flush()
    flush()
    return result


def _dlq_candidates(
    client: redis.Redis, settings: Settings, flt: ReplayFilter, batch_size: int
) -> Iterable[tuple[str, dict[str, str]]]:
    ids: list[str] = sorted(flt.ids, key=_id_key)
    if not ids and flt.job_ids:
        found = _index_lookup(settings=settings, wanted=sorted(flt.job_ids), dlq_only=True)
        ids = sorted({i for where in found.values() for i, _ in where.get("dlq", [])}, key=_id_key)
        if not ids:
            return
    if ids:
        for i in range(0, len(ids), batch_size):
            with client.pipeline(transaction=False) as pipe:
                for entry_id in ids[i : i + batch_size]:
                    pipe.xrange(settings.dlq_stream, min=entry_id, max=entry_id)
                for got in pipe.execute():
                    yield from got
    else:
        yield from _iter_range(client, settings.dlq_stream, start="-", count=batch_size)


# -------------------------------------------------------------------------------------- DLQ retention


@guarded("trim-dlq", target=lambda kw: kw["settings"].dlq_stream)
def trim_dlq(
    *,
    settings: Settings,
    max_age_ms: int,
    max_length: int = 0,
    max_entries: int = 10_000,
    batch_size: int = 1000,
    dry_run: bool,
) -> DlqRetention:
    """Trim the DLQ entries over the retention limit — dead-lettered more than ``max_age_ms`` ago, or beyond the
    newest ``max_length`` (0 = no such limit) — oldest first, at most ``max_entries`` per call.

    Each batch is one Lua step (``TRIM_DLQ``) that re-reads the oldest entries, stops at the first one within
    every limit (an entry younger than the limit is never dropped), removes the rest with XTRIM MINID and their
    ids from the DLQ index in the same step. A dry run reads (up to ``max_entries``) and removes nothing.
    Cost: O(entries trimmed), never the whole DLQ.
    """
    if max_age_ms < 0 or max_length < 0 or max_entries < 1:
        raise QueueError("max_age_ms and max_length must be >= 0 and max_entries >= 1")
    out = DlqRetention(dry_run=dry_run, max_age_ms=max_age_ms, max_length=max_length)
    if not (max_age_ms or max_length):
        return out
    client = redis_client(settings)
    script = client.register_script(queue_scripts.TRIM_DLQ)
    keys = [settings.dlq_stream, index_keys(settings).dlq_index]
    while out.trimmed < max_entries:
        count = max_entries if dry_run else min(batch_size, max_entries - out.trimmed)
        try:
            step = json.loads(script(keys=keys, args=[max_age_ms, max_length, count, int(dry_run)]))
        except redis.RedisError as e:
            raise QueueError(f"cannot trim `{settings.dlq_stream}`: {e}") from e
        if not step["trimmed"]:
            break
        out.trimmed += step["trimmed"]
        out.by_age += step["by_age"]
        out.by_length += step["by_length"]
        out.first_id, out.first_ms = out.first_id or step["first"], out.first_ms or step["first_ms"]
        out.last_id, out.last_ms = step["last"], step["last_ms"]
        for job, entry_id in (step["jobs"] or [])[: 10 - len(out.job_ids)]:
            out.job_ids.append(job)
            out.sample_ids.append(entry_id)
        out.more = step["more"]
        if dry_run or not out.more:
            break
    return out


def verify_trim(*, settings: Settings, retention: DlqRetention) -> MoveCheck:
    """Re-read, in one round trip, what a retention step trimmed: no DLQ entry is left at or before the last
    trimmed id, and the DLQ index no longer points the sampled steps at their trimmed entries. Read-only."""
    check = MoveCheck(status="trimmed")
    if not retention.trimmed or retention.last_id is None:
        return check
    keys = index_keys(settings)
    client = redis_client(settings)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.xrange(settings.dlq_stream, min="-", max=retention.last_id, count=1)
            pipe.hmget(keys.dlq_index, retention.job_ids or ["-"])
            left, indexed = pipe.execute()
    except redis.RedisError as e:
        raise QueueError(f"cannot re-read `{settings.dlq_stream}`: {e}") from e
    stale = [i for i, ids in zip(retention.sample_ids, indexed, strict=False) if ids and i in ids.split()]
    check.checked = 1 + len(retention.sample_ids)
    check.held = check.checked - (1 if left else 0) - len(stale)
    if left:
        check.failures.append(f"{left[0][0]}: still in the DLQ")
    check.failures += [f"{i}: still in the DLQ index" for i in stale[:4]]
    return check


def _replay_row(entry_id: str, fields: dict[str, str], status: str, new_id: str) -> dict[str, Any]:
    return {
        "dlq_id": entry_id,
        "job_id": fields.get("job_id"),
        "reason": fields.get("reason") or fields.get("error"),
        "deliveries": fields.get("deliveries"),
        "status": status,
        "new_id": new_id,
    }


def _server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def dlq_fields(fields: dict[str, str]) -> dict[str, str]:
    """The original stream fields kept in a DLQ entry (its `fields` JSON)."""
    try:
        return json.loads(fields.get("fields") or "{}")
    except ValueError:
        return {}


def outcome_rows(result: SweepResult) -> list[dict[str, Any]]:
    """Counts per decision and per outcome, as report table rows."""
    rows = [{"kind": "decided", "what": k, "count": v} for k, v in sorted(result.decided.items())]
    rows += [{"kind": "done", "what": k, "count": v} for k, v in sorted(result.done.items())]
    return rows


# ------------------------------------------------------------------------------------- Prefect tasks


_RETRY: dict[str, Any] = RETRY

inspect_queue_task = task(name="inspect-queue", **_RETRY)(inspect_queue)
locate_steps_task = task(name="locate-steps", **_RETRY)(locate_steps)
verify_moves_task = task(name="verify-moves", **_RETRY)(verify_moves)


@task(name="sweep-pending", task_run_name="sweep-pending from {start}", **_RETRY)
def sweep_pages_task(
    *,
    settings: Settings,
    policy: SweepPolicy,
    start: str = "-",
    batch_size: int = 1000,
    max_entries: int | None = None,
    max_pages: int = 10,
    dry_run: bool,
) -> SweepResult:
    """Up to ``max_pages`` pages of a sweep from ``start``: scan, decide, act (guarded: a refusal raises ``Refused``)."""
    return sweep_pending(
        settings=settings,
        policy=policy,
        start=start,
        batch_size=batch_size,
        max_entries=max_entries,
        max_pages=max_pages,
        dry_run=dry_run,
    )


@task(name="recover-consumers", task_run_name="recover-consumers {consumers}", **_RETRY)
def recover_consumers_task(
    *, settings: Settings, consumers: list[str], max_deliveries: int = 3, dry_run: bool
) -> ConsumerRecovery:
    """``recover_consumers`` as a task (guarded: a refusal raises ``Refused``)."""
    return recover_consumers(settings=settings, consumers=consumers, max_deliveries=max_deliveries, dry_run=dry_run)


@task(name="delete-empty-consumers", **_RETRY)
def delete_empty_consumers_task(
    *, settings: Settings, consumers: list[str] | None, min_idle_ms: int, dry_run: bool
) -> ConsumerCleanup:
    """``delete_empty_consumers`` as a task (guarded: a refusal raises ``Refused``)."""
    return delete_empty_consumers(settings=settings, consumers=consumers, min_idle_ms=min_idle_ms, dry_run=dry_run)


refresh_indexes_task = task(name="refresh-queue-indexes", **_RETRY)(refresh_indexes)
verify_trim_task = task(name="verify-trim", **_RETRY)(verify_trim)


@task(name="trim-dlq", **_RETRY)
def trim_dlq_task(
    *, settings: Settings, max_age_ms: int, max_length: int = 0, max_entries: int = 10_000, dry_run: bool
) -> DlqRetention:
    """``trim_dlq`` as a task (guarded: a refusal raises ``Refused``)."""
    return trim_dlq(settings=settings, max_age_ms=max_age_ms, max_length=max_length, max_entries=max_entries,
                    dry_run=dry_run)


@task(name="replay-dlq", **_RETRY)
def replay_dlq_task(
    *, settings: Settings, flt: ReplayFilter, max_entries: int = 1000, batch_size: int = 1000, dry_run: bool
) -> ReplayResult:
    """``replay_dlq`` as a task (guarded: a refusal raises ``Refused``)."""
    return replay_dlq(
        settings=settings, flt=flt, max_entries=max_entries, batch_size=batch_size, dry_run=dry_run
    )
