"""FerrumDeck's runs database: table definitions, the stuck-run queries and the guarded, set-based fail.

FerrumDeck owns the real schema; ``create_schema`` builds the same tables for the sandbox, the demo and tests.
Table names come from settings (``FD_RUNS_TABLE`` / ``FD_STEPS_TABLE``). ``error`` is ``jsonb`` on PostgreSQL
and JSON on SQLite; both dialects pass the same tests. Times are stored and returned as UTC.

``steps.attempts`` counts how many times the step was re-enqueued through the gateway (0 for the first
delivery); ``steps.kind`` ('llm' | 'tool' | ...) and ``steps.model`` feed the LLM-failover counts.

Plain functions do the work (tests and the sandbox call them directly); the ``*_task`` objects at the bottom
are the same functions as Prefect tasks that retry only temporary errors (connection loss, serialization
failure, deadlock, SQLite busy), raised as ``RunsTemporaryError``; anything else is a ``RunsError``.
The two writes a recovery makes, ``fail_runs`` and ``fail_stuck_runs``, are ``@guarded``: they need
``dry_run=`` (a dry run returns what they would fail, changing nothing) and refuse while the kill switch is on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

import sqlalchemy as sa
from prefect import task
from pydantic import BaseModel
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

from tasks.connections import db_engine
from tasks.errors import RETRY, RecoveryError
from tasks.guard import guarded
from tasks.settings import Settings

RUNNING = "running"
UNFINISHED_STEP_STATUSES = ("running", "queued", "pending")
QUEUED_STEP_STATUSES = ("queued", "pending")
WORKER_TIMEOUT = {"code": "WORKER_TIMEOUT", "message": "Worker did not respond"}


class RunsError(RecoveryError):
    """A runs-database operation failed for a reason that retrying will not fix."""


class RunsTemporaryError(RunsError):
    """A runs-database operation failed for a passing reason (connection lost, serialization, lock, busy)."""

    temporary = True


# --- schema -------------------------------------------------------------------------------------------


class UTCDateTime(sa.types.TypeDecorator):
    """A timestamp stored as UTC (``timestamptz`` on PostgreSQL, naive UTC text on SQLite), read back aware."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# none_as_null: a Python None is SQL NULL ("no error"), never the JSON value null
JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


@dataclass(frozen=True)
class RunsTables:
    """The two tables of one configuration (their names come from settings)."""

    metadata: sa.MetaData
    runs: sa.Table
    steps: sa.Table


_tables_lock = threading.Lock()
_tables_cache: dict[tuple[str, str], RunsTables] = {}


def tables(settings: Settings) -> RunsTables:
    """The SQLAlchemy Core tables named by ``settings.runs_table`` / ``settings.steps_table``."""
    key = (settings.runs_table, settings.steps_table)
    with _tables_lock:
        found = _tables_cache.get(key)
        if found is None:
            found = _tables_cache[key] = _define(*key)
        return found


def _define(runs_name: str, steps_name: str) -> RunsTables:
    md = sa.MetaData()
    runs = sa.Table(
        runs_name,
        md,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("completed_at", UTCDateTime, nullable=True),
        sa.Column("agent_version_id", sa.Text, nullable=True),
        sa.Column("error", JSONDoc, nullable=True),
        # (status, started_at) serves the stuck-run predicate; the trailing id matches the keyset order and
        # lets the find read the index alone (an index-only scan), never the table's pages.
        sa.Index(f"ix_{runs_name}_status_started_at", "status", "started_at", "id"),
    )
    steps = sa.Table(
        steps_name,
        md,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=True),
        sa.Column("model", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("completed_at", UTCDateTime, nullable=True),
        sa.Column("error", JSONDoc, nullable=True),
        sa.Index(f"ix_{steps_name}_run_id_status", "run_id", "status"),
        sa.Index(f"ix_{steps_name}_kind_started_at", "kind", "started_at"),
    )
    return RunsTables(metadata=md, runs=runs, steps=steps)


def create_schema(*, settings: Settings) -> None:
    """Create the runs and steps tables and their indexes if missing (sandbox, demo, tests)."""
    with _errors("create the runs schema"):
        tables(settings).metadata.create_all(db_engine(settings), checkfirst=True)


def drop_schema(*, settings: Settings) -> None:
    """Drop the runs and steps tables if present (tests and the sandbox clean up after themselves)."""
    with _errors("drop the runs schema"):
        tables(settings).metadata.drop_all(db_engine(settings), checkfirst=True)


# --- errors -------------------------------------------------------------------------------------------

_TEMPORARY_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03"}


def is_temporary_db_error(error: BaseException) -> bool:
    """True for database errors a retry can fix: lost connections, serialization failures, deadlocks, busy SQLite."""
    if isinstance(error, sa.exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "sqlstate", None)
        if sqlstate:
            return sqlstate in _TEMPORARY_SQLSTATES or sqlstate.startswith("08")
        if isinstance(error, sa.exc.OperationalError):
            text = str(error.orig).lower()
            return "locked" in text or "busy" in text or "connection" in text or "server closed" in text
        return isinstance(error, sa.exc.InterfaceError)
    return isinstance(error, sa.exc.DisconnectionError | ConnectionError | TimeoutError)


class _errors:
    """Turn SQLAlchemy errors into ``RunsTemporaryError`` / ``RunsError`` saying what was being done."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, RunsError) or not isinstance(exc, Exception):
            return False
        kind = RunsTemporaryError if is_temporary_db_error(exc) else RunsError
        detail = type(getattr(exc, "orig", None) or exc).__name__
        raise kind(f"could not {self.what}: {detail}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else ""


# --- results ------------------------------------------------------------------------------------------


class RunRow(BaseModel):
    """One run as the stuck-run queries see it."""

    id: str
    status: str
    started_at: datetime | None = None
    completed_at: datetime | None = None
    agent_version_id: str | None = None
    error: Any = None


class StepRow(BaseModel):
    """One step of a run."""

    id: str
    run_id: str
    status: str
    kind: str | None = None
    model: str | None = None
    attempts: int = 0
    started_at: datetime | None = None


class FailResult(BaseModel):
    """What one fail call changed: ``changed`` runs were failed now; the others were left as they were."""

    requested: int
    changed: list[str]
    unchanged: list[str]
    would_change: list[str] = []


class ModelFailures(TypedDict):
    """Recent LLM steps of one model: how many failed, of how many."""

    failed: int
    total: int


# --- queries ------------------------------------------------------------------------------------------


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _id_in(column: sa.ColumnElement, ids: Sequence[str], dialect: str) -> sa.ColumnElement[bool]:
    """``column IN ids`` as one array parameter on PostgreSQL (``= ANY(:ids)``), expanding elsewhere."""
    if dialect == "postgresql":
        return column == sa.any_(sa.bindparam("ids", list(ids), type_=postgresql.ARRAY(sa.Text)))
    return column.in_(list(ids))


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise RunsError("timestamps must be timezone-aware (UTC)")
    return value


def stuck_runs_query(
    *, settings: Settings, cutoff: datetime, after: tuple[datetime, str] | None = None
) -> sa.Select:
    """One page's SELECT of ``find_stuck_runs`` (without LIMIT): runs ``running`` since before ``cutoff``,
    ordered by (started_at, id), starting after the key ``after`` (also used to EXPLAIN it)."""
    r = tables(settings).runs
    started = r.c.started_at
    if settings.database_url.get_secret_value().startswith("postgres"):
        # psycopg already returns aware datetimes: skip the per-row Python conversion (tens of thousands of rows)
        started = sa.type_coerce(r.c.started_at, sa.DateTime(timezone=True)).label("started_at")
    stmt = (
        sa.select(r.c.id, started)
        .where(r.c.status == RUNNING, r.c.started_at < _aware(cutoff))
        .order_by(r.c.started_at, r.c.id)
    )
    if after is not None:  # a row comparison is one index condition: the page starts right after the key
        stmt = stmt.where(sa.tuple_(r.c.started_at, r.c.id) > sa.tuple_(*after, types=[UTCDateTime, sa.Text]))
    return stmt


def find_stuck_runs(*, settings: Settings, cutoff: datetime, limit: int | None = None) -> list[str]:
    """Ids of the runs ``running`` since before ``cutoff``, oldest first, at most ``limit``.

    Keyset-paged on (started_at, id) in pages of ``runs_batch_size``, each page an index-only range scan of
    the (status, started_at, id) index: cost grows with the stuck runs returned, not with the table. Only
    ids are kept (a sweep may find tens of thousands); ``read_runs`` gives the full rows when needed.
    """
    page = settings.runs_batch_size
    found: list[str] = []
    last: tuple[datetime, str] | None = None
    engine = db_engine(settings)
    # autocommit: each page is its own short statement (no snapshot or locks held between pages, and no
    # BEGIN/ROLLBACK round trips)
    with _errors("find stuck runs"), engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        while limit is None or len(found) < limit:
            size = page if limit is None else min(page, limit - len(found))
            stmt = stuck_runs_query(settings=settings, cutoff=cutoff, after=last).limit(size)
            rows = conn.execute(stmt).all()
            found += [row[0] for row in rows]
            if len(rows) < size:
                break
            last = (rows[-1][1], rows[-1][0])
    return found


def count_stuck_runs(*, settings: Settings, cutoff: datetime) -> int:
    """How many runs are ``running`` since before ``cutoff`` (one index-only count)."""
    r = tables(settings).runs
    stmt = sa.select(sa.func.count()).where(r.c.status == RUNNING, r.c.started_at < _aware(cutoff))
    with _errors("count stuck runs"), db_engine(settings).connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def find_unfinished_steps(*, settings: Settings, run_ids: Sequence[str]) -> dict[str, list[StepRow]]:
    """The running / queued / pending steps of these runs, by run id (one query per batch of runs)."""
    s = tables(settings).steps
    out: dict[str, list[StepRow]] = {run_id: [] for run_id in run_ids}
    engine = db_engine(settings)
    with _errors("find the steps of stuck runs"), engine.connect() as conn:
        for chunk in _chunks(list(dict.fromkeys(run_ids)), settings.runs_batch_size):
            stmt = (
                sa.select(s.c.id, s.c.run_id, s.c.status, s.c.kind, s.c.model, s.c.attempts, s.c.started_at)
                .where(
                    _id_in(s.c.run_id, chunk, engine.dialect.name), s.c.status.in_(UNFINISHED_STEP_STATUSES)
                )
                .order_by(s.c.run_id, s.c.started_at, s.c.id)
            )
            for row in conn.execute(stmt).mappings():
                out[row["run_id"]].append(StepRow.model_validate(dict(row)))
    return out


def read_runs(*, settings: Settings, run_ids: Sequence[str]) -> dict[str, RunRow]:
    """These runs as they are now (missing ids are absent from the result); used to verify."""
    r = tables(settings).runs
    out: dict[str, RunRow] = {}
    engine = db_engine(settings)
    with _errors("read runs"), engine.connect() as conn:
        for chunk in _chunks(list(dict.fromkeys(run_ids)), settings.runs_batch_size):
            stmt = sa.select(r).where(_id_in(r.c.id, chunk, engine.dialect.name))
            for row in conn.execute(stmt).mappings():
                out[row["id"]] = RunRow.model_validate(dict(row))
    return out


def read_run_statuses(*, settings: Settings, run_ids: Sequence[str]) -> dict[str, str]:
    """Run id -> status now, for these runs (missing ids are absent): the set-based re-read a flow verifies
    with after acting (one query per ``runs_batch_size`` ids, primary-key lookups only)."""
    r = tables(settings).runs
    return _statuses(settings, r, run_ids, what="read run statuses")


def read_step_statuses(*, settings: Settings, step_ids: Sequence[str]) -> dict[str, str]:
    """Step id -> status now, for these steps (missing ids are absent); one query per batch."""
    return _statuses(settings, tables(settings).steps, step_ids, what="read step statuses")


def _statuses(settings: Settings, table: sa.Table, ids: Sequence[str], *, what: str) -> dict[str, str]:
    """``id -> status`` for ``ids``. On PostgreSQL each id is looked up by primary key (``unnest`` of one array
    parameter, a scalar subquery per id): a plain ``id = ANY(:ids)`` of thousands of ids is planned as a scan of
    the whole table (10 000 of 1 000 000 runs: ~0.3 s instead of ~0.06 s)."""
    out: dict[str, str] = {}
    engine = db_engine(settings)
    postgres = engine.dialect.name == "postgresql"
    with _errors(what), engine.connect() as conn:
        for chunk in _chunks(list(dict.fromkeys(ids)), settings.runs_batch_size):
            if postgres:
                wanted = sa.func.unnest(sa.bindparam("ids", list(chunk), type_=postgresql.ARRAY(sa.Text)))
                t = wanted.table_valued("id").render_derived(name="wanted")
                status = sa.select(table.c.status).where(table.c.id == t.c.id).scalar_subquery()
                stmt = sa.select(t.c.id, status).select_from(t)
            else:
                stmt = sa.select(table.c.id, table.c.status).where(table.c.id.in_(list(chunk)))
            out.update((key, value) for key, value in conn.execute(stmt).all() if value is not None)
    return out


def still_running(*, settings: Settings, run_ids: Sequence[str], cutoff: datetime) -> list[str]:
    """Which of these runs are still ``running`` since before ``cutoff`` (the verify of a fail: expected none).

    Read through the (status, started_at, id) index with the ids as a filter, so its cost follows the runs still
    stuck, not the number of ids nor the size of the table (10 000 ids of 1 000 000 runs: ~10 ms)."""
    r = tables(settings).runs
    out: list[str] = []
    engine = db_engine(settings)
    with _errors("re-read failed runs"), engine.connect() as conn:
        for chunk in _chunks(list(dict.fromkeys(run_ids)), settings.runs_batch_size):
            stmt = sa.select(r.c.id).where(
                r.c.status == RUNNING, r.c.started_at < _aware(cutoff), _id_in(r.c.id, chunk, engine.dialect.name)
            )
            out += conn.execute(stmt).scalars().all()
    return out


def read_step(*, settings: Settings, run_id: str, step_id: str) -> StepRow | None:
    """One step of one run, or None when the run has no such step."""
    s = tables(settings).steps
    stmt = sa.select(s.c.id, s.c.run_id, s.c.status, s.c.kind, s.c.model, s.c.attempts, s.c.started_at).where(
        s.c.id == step_id, s.c.run_id == run_id
    )
    with _errors("read a step"), db_engine(settings).connect() as conn:
        row = conn.execute(stmt).mappings().first()
    return StepRow.model_validate(dict(row)) if row else None


@guarded("fail-runs")
def fail_runs(
    *,
    settings: Settings,
    run_ids: Sequence[str],
    cutoff: datetime | None,
    error: dict[str, Any] | None = None,
    now: datetime | None = None,
    dry_run: bool,
) -> FailResult:
    """Fail these runs in one transaction, one guarded ``UPDATE ... RETURNING`` per batch.

    Each UPDATE re-checks ``status = 'running'`` (and ``started_at < cutoff`` when a cutoff is given), so a run
    that completed after it was found is never touched; the result says exactly which runs changed.
    Ids are taken in sorted order, so batches are deterministic and the primary-key index is walked in order;
    a concurrent fail of the same runs waits on the row lock and then skips them (they are no longer running).
    A dry run changes nothing: ``would_change`` lists the runs the UPDATE would fail now.
    """
    ids = sorted(set(run_ids))
    if not ids:
        return FailResult(requested=0, changed=[], unchanged=[])
    if dry_run:
        current = read_runs(settings=settings, run_ids=ids)
        would = [i for i in ids if (row := current.get(i)) is not None and row.status == RUNNING
                 and (cutoff is None or (row.started_at is not None and _aware(row.started_at) < _aware(cutoff)))]
        return FailResult(requested=len(ids), changed=[], unchanged=[i for i in ids if i not in set(would)],
                          would_change=would)
    r = tables(settings).runs
    error = dict(WORKER_TIMEOUT if error is None else error)
    now = _aware(now) if now is not None else datetime.now(UTC)
    predicate = [r.c.status == RUNNING]
    if cutoff is not None:
        predicate.append(r.c.started_at < _aware(cutoff))
    changed: list[str] = []
    engine = db_engine(settings)
    with _errors("fail runs"), engine.begin() as conn:
        for chunk in _chunks(ids, settings.runs_batch_size):
            stmt = (
                sa.update(r)
                .where(_id_in(r.c.id, chunk, engine.dialect.name), *predicate)
                .values(status="failed", error=error, completed_at=now)
                .returning(r.c.id)
            )
            changed += conn.execute(stmt).scalars().all()
    done = set(changed)
    return FailResult(requested=len(ids), changed=changed, unchanged=[i for i in ids if i not in done])


def fail_stuck_runs_statement(
    *, settings: Settings, cutoff: datetime, limit: int, error: dict[str, Any], now: datetime
) -> sa.Update | sa.Select:
    """The one statement of ``fail_stuck_runs`` (also used to EXPLAIN it). On PostgreSQL::

        WITH failed AS (
            UPDATE runs SET ... WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM runs WHERE status = 'running' AND started_at < :cutoff
                    ORDER BY started_at, id LIMIT :n FOR UPDATE SKIP LOCKED))
                AND status = 'running' AND started_at < :cutoff RETURNING id, started_at)
        SELECT id FROM failed ORDER BY started_at, id

    The pick walks the (status, started_at, id) index oldest first and locks what it picks (rows another sweep
    holds are skipped); ``ARRAY(...)`` runs it exactly once (an InitPlan) and the UPDATE fetches the picked rows by
    their physical address (a TID scan), instead of looking 10 000 ids up again in the primary key. The address
    cannot go stale: the rows stay locked by this statement until it updates them (a row another transaction
    changed between this statement's snapshot and its lock is not updated: left for the next sweep). (A plain
    ``id IN (subquery)`` is wrong here: the planner may rescan the subquery per row, and each rescan skips the
    rows this UPDATE already changed and picks new ones, failing more than ``limit``.)
    SQLite: ``WHERE id IN (SELECT id ... ORDER BY started_at, id LIMIT :n) AND <same predicate>`` (no row locks;
    the subquery is evaluated once), ``RETURNING id, started_at`` sorted by the caller.
    """
    r = tables(settings).runs
    pick = r.alias("stuck")  # an alias: the pick must not correlate with the UPDATE's table
    stuck = (pick.c.status == RUNNING, pick.c.started_at < cutoff)
    if settings.database_url.get_secret_value().startswith("postgres"):
        oldest = (
            sa.select(sa.column("ctid", _selectable=pick))
            .where(*stuck)
            .order_by(pick.c.started_at, pick.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        chosen = sa.column("ctid", _selectable=r) == sa.any_(sa.func.array(oldest.scalar_subquery()))
    else:
        oldest = sa.select(pick.c.id).where(*stuck).order_by(pick.c.started_at, pick.c.id).limit(limit)
        chosen = r.c.id.in_(oldest.scalar_subquery())
    update = (
        sa.update(r)
        .where(chosen, r.c.status == RUNNING, r.c.started_at < cutoff)
        .values(status="failed", error=error, completed_at=now)
        .returning(r.c.id, r.c.started_at)
    )
    if settings.database_url.get_secret_value().startswith("postgres"):
        # PostgreSQL orders the changed rows itself and sends back only their ids (no timestamps to parse)
        failed = update.cte("failed")
        return sa.select(failed.c.id).order_by(failed.c.started_at, failed.c.id)
    return update


@guarded("fail-stuck-runs")
def fail_stuck_runs(
    *,
    settings: Settings,
    cutoff: datetime,
    limit: int,
    error: dict[str, Any] | None = None,
    now: datetime | None = None,
    dry_run: bool,
) -> list[str]:
    """Fail the (at most ``limit``) oldest runs ``running`` since before ``cutoff`` in ONE statement.

    Set-based: no ids travel to the database, only the changed ids come back (oldest first). The UPDATE
    re-checks ``status = 'running' AND started_at < cutoff`` on every row it changes, so a run that completed
    concurrently is never touched; on PostgreSQL rows locked by another sweep are skipped, not waited for.
    Running it again fails nothing more (idempotent). A dry run returns the ids it would fail, changing nothing.
    """
    if limit < 1:
        raise RunsError(f"limit must be >= 1, got {limit}")
    if dry_run:
        return find_stuck_runs(settings=settings, cutoff=cutoff, limit=limit)
    stmt = fail_stuck_runs_statement(
        settings=settings,
        cutoff=_aware(cutoff),
        limit=limit,
        error=dict(WORKER_TIMEOUT if error is None else error),
        now=_aware(now) if now is not None else datetime.now(UTC),
    )
    with _errors("fail stuck runs"), db_engine(settings).begin() as conn:
        rows = conn.execute(stmt).all()
    if isinstance(stmt, sa.Update):  # SQLite: RETURNING has no order; oldest first, as chosen
        rows.sort(key=lambda row: (row[1], row[0]))
    return [row[0] for row in rows]


def llm_failures_by_model(*, settings: Settings, since: datetime) -> dict[str, ModelFailures]:
    """Per model: LLM steps started since ``since`` and how many of them failed (one GROUP BY)."""
    s = tables(settings).steps
    failed = sa.func.sum(sa.case((s.c.status == "failed", 1), else_=0))
    stmt = (
        sa.select(s.c.model, failed, sa.func.count())
        .where(s.c.kind == "llm", s.c.started_at >= _aware(since), s.c.model.is_not(None))
        .group_by(s.c.model)
    )
    with _errors("count LLM failures"), db_engine(settings).connect() as conn:
        rows = conn.execute(stmt).all()
    return {model: ModelFailures(failed=int(f or 0), total=int(t)) for model, f, t in rows}



# --- Prefect tasks (the same functions, retried only on temporary errors) --------------------------------

_TASK_OPTIONS: dict[str, Any] = RETRY

find_stuck_runs_task = task(name="find-stuck-runs", **_TASK_OPTIONS)(find_stuck_runs)
find_unfinished_steps_task = task(name="find-run-steps", **_TASK_OPTIONS)(find_unfinished_steps)
read_runs_task = task(name="read-runs", **_TASK_OPTIONS)(read_runs)
count_stuck_runs_task = task(name="count-stuck-runs", **_TASK_OPTIONS)(count_stuck_runs)
read_step_task = task(name="read-step", **_TASK_OPTIONS)(read_step)
read_run_statuses_task = task(name="read-run-statuses", **_TASK_OPTIONS)(read_run_statuses)
read_step_statuses_task = task(name="read-step-statuses", **_TASK_OPTIONS)(read_step_statuses)
still_running_task = task(name="still-running", **_TASK_OPTIONS)(still_running)
fail_runs_task = task(name="fail-runs", **_TASK_OPTIONS)(fail_runs)
fail_stuck_runs_task = task(name="fail-stuck-runs", **_TASK_OPTIONS)(fail_stuck_runs)
