"""The runs database on real PostgreSQL and SQLite: find, guarded fail, races, hostile ids, counts, EXPLAIN."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tasks import runs
from tasks.connections import db_engine
from tests.integration import runs_fixtures as rf
from tests.integration import runs_fixtures as rf_worker
from tests.integration.runs_fixtures import add_runs, add_steps, ago, statuses

sqlite_url = rf.sqlite_url
db_url = rf.db_url
runs_settings = rf.runs_settings


def _seed(settings, n_stuck=7):
    rows = [{"id": f"run_s{i}", "status": "running", "started_at": ago(40 + i)} for i in range(n_stuck)]
    rows += [
        {"id": "run_recent", "status": "running", "started_at": ago(5)},
        {"id": "run_done", "status": "completed", "started_at": ago(90), "completed_at": ago(80)},
        {"id": "run_failed", "status": "failed", "started_at": ago(90)},
        {"id": "run_nostart", "status": "running", "started_at": None},
    ]
    add_runs(settings, rows)


def test_schema_creation_is_idempotent(runs_settings):
    runs.create_schema(settings=runs_settings)
    names = set(sa.inspect(db_engine(runs_settings)).get_table_names())
    assert {runs_settings.runs_table, runs_settings.steps_table} <= names
    idx = sa.inspect(db_engine(runs_settings)).get_indexes(runs_settings.runs_table)
    assert any(i["column_names"][:2] == ["status", "started_at"] for i in idx)


def test_find_pages_oldest_first_and_only_stuck_runs(runs_settings):
    s = runs_settings.model_copy(update={"runs_batch_size": 3})  # 7 stuck runs -> 3 pages
    _seed(s)
    found = runs.find_stuck_runs(settings=s, cutoff=ago(30))
    assert found == [f"run_s{i}" for i in reversed(range(7))]
    assert runs.find_stuck_runs(settings=s, cutoff=ago(30), limit=4) == [
        "run_s6",
        "run_s5",
        "run_s4",
        "run_s3",
    ]
    assert runs.count_stuck_runs(settings=s, cutoff=ago(30)) == 7


def test_find_pages_through_equal_start_times(runs_settings):
    s = runs_settings.model_copy(update={"runs_batch_size": 2})
    same = ago(60)
    add_runs(s, [{"id": f"run_{c}", "status": "running", "started_at": same} for c in "edcba"])
    assert runs.find_stuck_runs(settings=s, cutoff=ago(30)) == [f"run_{c}" for c in "abcde"]


def test_fail_changes_exactly_the_stuck_runs_and_is_idempotent(runs_settings):
    _seed(runs_settings)
    ids = runs.find_stuck_runs(settings=runs_settings, cutoff=ago(30))
    asked = ids + ["run_recent", "run_done", "run_missing"]
    result = runs.fail_runs(settings=runs_settings, run_ids=asked, cutoff=ago(30), dry_run=False)
    assert sorted(result.changed) == sorted(ids)
    assert sorted(result.unchanged) == ["run_done", "run_missing", "run_recent"]
    now = runs.read_runs(settings=runs_settings, run_ids=asked)
    assert all(now[i].status == "failed" and now[i].error == runs.WORKER_TIMEOUT for i in ids)
    assert all(now[i].completed_at is not None for i in ids)
    assert now["run_recent"].status == "running" and now["run_done"].status == "completed"
    again = runs.fail_runs(settings=runs_settings, run_ids=asked, cutoff=ago(30), dry_run=False)
    assert again.changed == [] and statuses(runs_settings) == {i: r.status for i, r in now.items()} | {
        "run_failed": "failed",
        "run_nostart": "running",
    }


def test_run_completed_between_find_and_fail_keeps_its_status(runs_settings):
    """A real second transaction completes a run after it was found: the guarded UPDATE leaves it alone."""
    _seed(runs_settings, n_stuck=3)
    found = runs.find_stuck_runs(settings=runs_settings, cutoff=ago(30))
    r = runs.tables(runs_settings).runs
    other = sa.create_engine(db_engine(runs_settings).url)  # a separate pool: a truly separate connection
    try:
        with other.begin() as conn:
            conn.execute(
                sa.update(r)
                .where(r.c.id == "run_s1")
                .values(status="completed", completed_at=datetime.now(UTC))
            )
        result = runs.fail_runs(settings=runs_settings, run_ids=found, cutoff=ago(30), dry_run=False)
    finally:
        other.dispose()
    assert "run_s1" not in result.changed and result.unchanged == ["run_s1"]
    after = runs.read_runs(settings=runs_settings, run_ids=["run_s1"])["run_s1"]
    assert after.status == "completed" and after.error is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_fail_waits_for_a_concurrent_completion_and_then_skips_it(runs_settings):
    """PostgreSQL: the completing transaction holds the row lock while fail_runs runs; after its commit the
    UPDATE re-evaluates the predicate on the new row version and skips the run."""
    _seed(runs_settings, n_stuck=3)
    found = runs.find_stuck_runs(settings=runs_settings, cutoff=ago(30))
    r = runs.tables(runs_settings).runs
    other = sa.create_engine(db_engine(runs_settings).url)
    result: dict = {}
    try:
        with other.connect() as conn, other.connect() as watch:
            tx = conn.begin()
            conn.execute(sa.update(r).where(r.c.id == "run_s2").values(status="completed"))
            worker = threading.Thread(
                target=lambda: result.update(
                    res=runs.fail_runs(settings=runs_settings, run_ids=found, cutoff=ago(30), dry_run=False)
                )
            )
            worker.start()
            deadline = time.monotonic() + 10
            while True:  # wait until fail_runs is blocked on our row lock
                watch.rollback()  # a fresh pg_stat_activity snapshot each time
                waiting = watch.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database() AND query LIKE 'UPDATE%'"
                    )
                ).scalar_one()
                if waiting or time.monotonic() > deadline:
                    break
                time.sleep(0.02)  # poll
            assert waiting, "fail_runs never blocked on the concurrent transaction"
            tx.commit()
        worker.join(timeout=10)
    finally:
        other.dispose()
    assert sorted(result["res"].changed) == ["run_s0", "run_s1"] and result["res"].unchanged == ["run_s2"]
    assert statuses(runs_settings)["run_s2"] == "completed"


@pytest.mark.parametrize("hostile", ["../admin", "run_1; DROP TABLE runs", "' OR '1'='1", "run_s0' --"])
def test_hostile_run_ids_are_plain_values(runs_settings, hostile):
    _seed(runs_settings, n_stuck=2)
    result = runs.fail_runs(settings=runs_settings, run_ids=[hostile], cutoff=None, dry_run=False)
    assert result.changed == [] and result.unchanged == [hostile]
    assert statuses(runs_settings)["run_s0"] == "running"  # nothing else touched, table still there
    add_runs(runs_settings, [{"id": hostile, "status": "running", "started_at": ago(45)}])
    assert runs.fail_runs(settings=runs_settings, run_ids=[hostile], cutoff=ago(30), dry_run=False).changed == [hostile]
    assert statuses(runs_settings)[hostile] == "failed" and statuses(runs_settings)["run_s1"] == "running"


def test_unfinished_steps_by_run(runs_settings):
    _seed(runs_settings, n_stuck=2)
    add_steps(
        runs_settings,
        [
            {"id": "st_a", "run_id": "run_s0", "status": "completed", "started_at": ago(50)},
            {"id": "st_b", "run_id": "run_s0", "status": "running", "started_at": ago(45), "kind": "llm"},
            {"id": "st_c", "run_id": "run_s1", "status": "queued", "started_at": ago(44), "attempts": 2},
        ],
    )
    got = runs.find_unfinished_steps(settings=runs_settings, run_ids=["run_s0", "run_s1", "run_recent"])
    assert [s.id for s in got["run_s0"]] == ["st_b"] and got["run_s0"][0].kind == "llm"
    assert [(s.id, s.attempts) for s in got["run_s1"]] == [("st_c", 2)]
    assert got["run_recent"] == []


def test_worker_records_and_a_failed_run_keeps_its_error(runs_settings):
    rf_worker.record_step_running(
        settings=runs_settings, run_id="run_w", step_id="st_w", kind="llm", model="openai/gpt-4o"
    )
    assert runs.fail_runs(settings=runs_settings, run_ids=["run_w"], cutoff=None, dry_run=False).changed == ["run_w"]
    rf_worker.record_step_finished(settings=runs_settings, run_id="run_w", step_id="st_w", status="completed")
    run = runs.read_runs(settings=runs_settings, run_ids=["run_w"])["run_w"]
    assert run.status == "failed" and run.error == runs.WORKER_TIMEOUT


def test_llm_failures_by_model(runs_settings):
    rows = []
    for i in range(6):
        rows.append(
            {
                "id": f"a{i}",
                "run_id": "r",
                "status": "failed" if i < 4 else "completed",
                "kind": "llm",
                "model": "openai/gpt-4o",
                "started_at": ago(2),
            }
        )
    rows += [
        {
            "id": "b0",
            "run_id": "r",
            "status": "completed",
            "kind": "llm",
            "model": "anthropic/claude",
            "started_at": ago(3),
        },
        {
            "id": "b1",
            "run_id": "r",
            "status": "failed",
            "kind": "llm",
            "model": "anthropic/claude",
            "started_at": ago(90),
        },
        {"id": "c0", "run_id": "r", "status": "failed", "kind": "tool", "model": None, "started_at": ago(1)},
    ]
    add_steps(runs_settings, rows)
    got = runs.llm_failures_by_model(settings=runs_settings, since=ago(15))
    assert got == {"openai/gpt-4o": {"failed": 4, "total": 6}, "anthropic/claude": {"failed": 0, "total": 1}}


def test_missing_table_is_a_clear_permanent_error(runs_settings):
    broken = runs_settings.model_copy(update={"runs_table": "no_such_runs_table"})
    with pytest.raises(runs.RunsError, match="could not find stuck runs") as info:
        runs.find_stuck_runs(settings=broken, cutoff=ago(30))
    assert not isinstance(info.value, runs.RunsTemporaryError)


def test_naive_cutoff_is_refused(runs_settings):
    with pytest.raises(runs.RunsError, match="timezone-aware"):
        runs.find_stuck_runs(settings=runs_settings, cutoff=datetime.now() - timedelta(minutes=30))


def _seed_20000_runs(settings) -> None:
    """20 000 runs, 1 % of them running, one second apart (PostgreSQL), vacuumed and analyzed as on a long-lived
    table (visibility map set), so the planner's choice is the one production sees."""
    with db_engine(settings).begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {settings.runs_table} (id, status, started_at) SELECT 'run_' || g, "
                "CASE WHEN g % 100 = 0 THEN 'running' ELSE 'completed' END, now() - g * interval '1 second' "
                "FROM generate_series(1, 20000) g"
            )
        )
    with db_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f"VACUUM ANALYZE {settings.runs_table}"))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_explain_uses_the_status_started_at_index(runs_settings):
    r = runs_settings.runs_table
    _seed_20000_runs(runs_settings)
    first = runs.stuck_runs_query(settings=runs_settings, cutoff=ago(30)).limit(runs_settings.runs_batch_size)
    later = runs.stuck_runs_query(settings=runs_settings, cutoff=ago(30), after=(ago(100), "run_150"))
    engine = db_engine(runs_settings)
    for stmt in (first, later.limit(runs_settings.runs_batch_size)):
        sql = stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
        with engine.connect() as conn:
            plan = "\n".join(row[0] for row in conn.execute(sa.text(f"EXPLAIN {sql}")))
        assert f"Index Only Scan using ix_{r}_status_started_at" in plan, plan
        assert "Seq Scan" not in plan and "Sort" not in plan, plan


def _flaky_updates(mocker, error: Exception, times: int, kinds: tuple[type, ...] = (sa.Update,)) -> dict:
    """Make the first ``times`` UPDATEs (statements of ``kinds``) fail with ``error`` (a fault injected under
    the real database)."""
    real = sa.engine.Connection.execute
    seen = {"raised": 0}

    def execute(self, statement, *args, **kwargs):
        if isinstance(statement, kinds) and seen["raised"] < times:
            seen["raised"] += 1
            raise error
        return real(self, statement, *args, **kwargs)

    mocker.patch.object(sa.engine.Connection, "execute", execute)
    return seen


def _fail_in_a_flow(settings, run_ids):
    from prefect import flow

    @flow
    def fail_flow():
        return runs.fail_runs_task.with_options(retry_delay_seconds=0)(
            settings=settings, run_ids=run_ids, cutoff=ago(30), dry_run=False
        )

    return fail_flow()


def test_connection_loss_is_retried_by_the_task(runs_settings, mocker):
    _seed(runs_settings, n_stuck=3)
    lost = sa.exc.OperationalError(
        "UPDATE", {}, Exception("server closed the connection unexpectedly"), connection_invalidated=True
    )
    seen = _flaky_updates(mocker, lost, times=2)
    result = _fail_in_a_flow(runs_settings, ["run_s0", "run_s1", "run_s2"])
    assert seen["raised"] == 2 and sorted(result.changed) == ["run_s0", "run_s1", "run_s2"]
    assert [statuses(runs_settings)[f"run_s{i}"] for i in range(3)] == ["failed"] * 3


def test_permanent_errors_are_not_retried(runs_settings, mocker):
    _seed(runs_settings, n_stuck=1)
    bad = sa.exc.ProgrammingError("UPDATE", {}, Exception('column "nope" does not exist'))
    seen = _flaky_updates(mocker, bad, times=10)
    with pytest.raises(runs.RunsError, match="could not fail runs") as info:
        _fail_in_a_flow(runs_settings, ["run_s0"])
    assert seen["raised"] == 1 and not isinstance(info.value, runs.RunsTemporaryError)
    assert statuses(runs_settings)["run_s0"] == "running"


def test_a_step_finished_without_error_stores_sql_null_not_json_null(runs_settings):
    rf_worker.record_step_running(settings=runs_settings, run_id="run_ok", step_id="step_ok", kind="llm")
    rf_worker.record_step_finished(settings=runs_settings, run_id="run_ok", step_id="step_ok", status="completed")
    t = runs.tables(runs_settings)
    with db_engine(runs_settings).connect() as conn:
        null_errors = conn.execute(
            sa.select(sa.func.count()).select_from(t.steps).where(t.steps.c.id == "step_ok", t.steps.c.error.is_(None))
        ).scalar_one()
    assert null_errors == 1


# --- fail_stuck_runs: pick and fail in one statement ------------------------------------------------------


def test_fail_stuck_runs_fails_the_oldest_up_to_limit_and_is_idempotent(runs_settings):
    _seed(runs_settings)  # run_s6 is the oldest stuck run, run_s0 the youngest
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=4, error=None, now=when, dry_run=False)
    assert first == ["run_s6", "run_s5", "run_s4", "run_s3"]
    now = runs.read_runs(settings=runs_settings, run_ids=first)
    assert all(now[i].status == "failed" and now[i].error == runs.WORKER_TIMEOUT for i in first)
    assert all(now[i].completed_at == when for i in first)
    assert {i: s for i, s in statuses(runs_settings).items() if s == "running"} == {
        "run_s0": "running",
        "run_s1": "running",
        "run_s2": "running",
        "run_recent": "running",  # running, but not for long enough
        "run_nostart": "running",  # no started_at: never matches the cutoff
    }
    custom = {"code": "OPERATOR_SWEEP", "message": "failed by on-call"}
    rest = runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=100, error=custom, dry_run=False)
    assert rest == ["run_s2", "run_s1", "run_s0"]
    assert runs.read_runs(settings=runs_settings, run_ids=["run_s0"])["run_s0"].error == custom
    before = runs.read_runs(settings=runs_settings, run_ids=list(statuses(runs_settings)))
    assert runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=100, error=None, dry_run=False) == []
    assert runs.read_runs(settings=runs_settings, run_ids=list(before)) == before  # nothing rewritten
    assert runs.read_runs(settings=runs_settings, run_ids=["run_s6"])["run_s6"].error == runs.WORKER_TIMEOUT


def test_fail_stuck_runs_breaks_equal_start_times_by_id(runs_settings):
    same = ago(60)
    add_runs(runs_settings, [{"id": f"run_{c}", "status": "running", "started_at": same} for c in "edcba"])
    assert runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=3, error=None, dry_run=False) == [
        "run_a",
        "run_b",
        "run_c",
    ]
    assert statuses(runs_settings) == {"run_a": "failed", "run_b": "failed", "run_c": "failed"} | {
        "run_d": "running",
        "run_e": "running",
    }


def test_fail_stuck_runs_leaves_a_run_completed_by_another_connection(runs_settings):
    _seed(runs_settings, n_stuck=3)
    r = runs.tables(runs_settings).runs
    other = sa.create_engine(db_engine(runs_settings).url)  # a separate pool: a truly separate connection
    try:
        with other.begin() as conn:
            conn.execute(sa.update(r).where(r.c.id == "run_s1").values(status="completed"))
        changed = runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=3, error=None, dry_run=False)
    finally:
        other.dispose()
    assert changed == ["run_s2", "run_s0"]  # the limit is not spent on the completed run
    after = runs.read_runs(settings=runs_settings, run_ids=["run_s1"])["run_s1"]
    assert after.status == "completed" and after.error is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_fail_stuck_runs_skips_a_run_locked_by_a_concurrent_completion(runs_settings):
    """PostgreSQL: a transaction completing run_s1 holds its row lock; the sweep does not wait for it (SKIP
    LOCKED), fails the others, and the completion then commits untouched."""
    _seed(runs_settings, n_stuck=3)
    r = runs.tables(runs_settings).runs
    other = sa.create_engine(db_engine(runs_settings).url)
    result: dict = {}
    try:
        with other.connect() as conn:
            tx = conn.begin()
            conn.execute(sa.update(r).where(r.c.id == "run_s1").values(status="completed"))
            worker = threading.Thread(
                target=lambda: result.update(
                    ids=runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=10, error=None, dry_run=False)
                )
            )
            worker.start()
            worker.join(timeout=10)
            finished_while_locked = not worker.is_alive()
            tx.commit()
        worker.join(timeout=10)
    finally:
        other.dispose()
    assert finished_while_locked, "fail_stuck_runs waited on the locked row instead of skipping it"
    assert result["ids"] == ["run_s2", "run_s0"]
    assert {i: statuses(runs_settings)[i] for i in ("run_s0", "run_s1", "run_s2")} == {
        "run_s0": "failed",
        "run_s1": "completed",
        "run_s2": "failed",
    }


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_concurrent_fail_stuck_runs_split_the_runs(runs_settings):
    """PostgreSQL: a sweep holding the oldest runs' locks (uncommitted) does not block a second sweep, which takes
    the next ones; no run is failed twice."""
    _seed(runs_settings, n_stuck=5)
    stmt = runs.fail_stuck_runs_statement(
        settings=runs_settings, cutoff=ago(30), limit=2, error=dict(runs.WORKER_TIMEOUT), now=datetime.now(UTC)
    )
    other = sa.create_engine(db_engine(runs_settings).url)
    try:
        with other.connect() as conn:
            tx = conn.begin()
            first = [row[0] for row in conn.execute(stmt)]  # the first sweep, still open
            second = runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=2, error=None, dry_run=False)
            tx.commit()
    finally:
        other.dispose()
    assert first == ["run_s4", "run_s3"] and second == ["run_s2", "run_s1"]
    assert statuses(runs_settings)["run_s0"] == "running"


def test_fail_stuck_runs_refuses_bad_arguments_before_touching_anything(runs_settings):
    _seed(runs_settings, n_stuck=2)
    with pytest.raises(runs.RunsError, match="limit must be >= 1"):
        runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=0, error=None, dry_run=False)
    with pytest.raises(runs.RunsError, match="timezone-aware"):
        runs.fail_stuck_runs(
            settings=runs_settings, cutoff=datetime.now() - timedelta(minutes=30), limit=5, error=None, dry_run=False
        )
    assert statuses(runs_settings)["run_s0"] == statuses(runs_settings)["run_s1"] == "running"


def test_fail_stuck_runs_task_retries_a_lost_connection_but_not_a_permanent_error(runs_settings, mocker):
    from prefect import flow

    _seed(runs_settings, n_stuck=3)
    task = runs.fail_stuck_runs_task.with_options(retry_delay_seconds=0)

    @flow
    def sweep():
        return task(settings=runs_settings, cutoff=ago(30), limit=10, error=None, dry_run=False)

    lost = sa.exc.OperationalError(
        "UPDATE", {}, Exception("server closed the connection unexpectedly"), connection_invalidated=True
    )
    fail_statement = (sa.Update, sa.Select)  # on PostgreSQL the UPDATE is a CTE of a SELECT
    seen = _flaky_updates(mocker, lost, times=2, kinds=fail_statement)
    assert sweep() == ["run_s2", "run_s1", "run_s0"] and seen["raised"] == 2
    mocker.stopall()
    add_runs(runs_settings, [{"id": "run_late", "status": "running", "started_at": ago(45)}])
    bad = sa.exc.ProgrammingError("UPDATE", {}, Exception('column "nope" does not exist'))
    seen = _flaky_updates(mocker, bad, times=10, kinds=fail_statement)
    with pytest.raises(runs.RunsError, match="could not fail stuck runs") as info:
        sweep()
    assert seen["raised"] == 1 and not isinstance(info.value, runs.RunsTemporaryError)
    mocker.stopall()
    assert statuses(runs_settings)["run_late"] == "running"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_explain_fail_stuck_runs_uses_the_status_started_at_index(runs_settings):
    from psycopg.types.json import Jsonb

    r = runs_settings.runs_table
    _seed_20000_runs(runs_settings)
    engine = db_engine(runs_settings)
    stmt = runs.fail_stuck_runs_statement(
        settings=runs_settings, cutoff=ago(30), limit=100, error=dict(runs.WORKER_TIMEOUT), now=datetime.now(UTC)
    )
    compiled = stmt.compile(dialect=engine.dialect)
    params = {k: Jsonb(v) if isinstance(v, dict) else v for k, v in compiled.construct_params().items()}
    with engine.connect() as conn:
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {compiled}", params))
    assert "FOR UPDATE SKIP LOCKED" in str(compiled) and "LockRows" in plan and "InitPlan" in plan, plan
    assert f"ix_{r}_status_started_at" in plan and "Seq Scan" not in plan, plan


# --- the guard and the verifying re-reads ------------------------------------------------------------------


def test_dry_runs_preview_what_they_would_fail_and_change_nothing(runs_settings):
    _seed(runs_settings, n_stuck=3)
    before = runs.read_runs(settings=runs_settings, run_ids=list(statuses(runs_settings)))
    asked = ["run_s0", "run_s2", "run_recent", "run_done", "run_missing"]
    preview = runs.fail_runs(settings=runs_settings, run_ids=asked, cutoff=ago(30), dry_run=True)
    assert preview.would_change == ["run_s0", "run_s2"] and preview.changed == []
    assert sorted(preview.unchanged) == ["run_done", "run_missing", "run_recent"]
    oldest = runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=2, error=None, dry_run=True)
    assert oldest == ["run_s2", "run_s1"]
    assert runs.read_runs(settings=runs_settings, run_ids=list(before)) == before  # not a byte changed


def test_kill_switch_refuses_both_fails_and_changes_nothing(runs_settings):
    from prefect.variables import Variable

    from tasks.errors import Refused

    _seed(runs_settings, n_stuck=2)
    before = runs.read_runs(settings=runs_settings, run_ids=list(statuses(runs_settings)))
    Variable.set(runs_settings.kill_switch_variable, True, overwrite=True)
    try:
        with pytest.raises(Refused, match="kill switch"):
            runs.fail_runs(settings=runs_settings, run_ids=["run_s0"], cutoff=None, dry_run=False)
        with pytest.raises(Refused, match="kill switch"):
            runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=5, error=None, dry_run=False)
        # a dry run is still allowed: it changes nothing
        assert runs.fail_stuck_runs(settings=runs_settings, cutoff=ago(30), limit=5, dry_run=True) == [
            "run_s1", "run_s0"]
    finally:
        Variable.unset(runs_settings.kill_switch_variable)
    assert runs.read_runs(settings=runs_settings, run_ids=list(before)) == before


def test_status_reads_are_set_based_and_batched(runs_settings):
    s = runs_settings.model_copy(update={"runs_batch_size": 2})  # 5 ids -> 3 batches, one answer
    _seed(s, n_stuck=3)
    add_steps(s, [{"id": "st_a", "run_id": "run_s0", "status": "queued"},
                  {"id": "st_b", "run_id": "run_s1", "status": "completed"}])
    got = runs.read_run_statuses(settings=s, run_ids=["run_s0", "run_s1", "run_done", "run_failed", "run_missing",
                                                      "run_s0"])
    assert got == {"run_s0": "running", "run_s1": "running", "run_done": "completed", "run_failed": "failed"}
    assert runs.read_step_statuses(settings=s, step_ids=["st_a", "st_b", "st_x"]) == {
        "st_a": "queued", "st_b": "completed"}
    assert runs.read_run_statuses(settings=s, run_ids=[]) == {}


def test_still_running_names_only_the_given_runs_that_still_match_the_stuck_predicate(runs_settings):
    s = runs_settings.model_copy(update={"runs_batch_size": 2})
    _seed(s, n_stuck=4)
    runs.fail_runs(settings=s, run_ids=["run_s0", "run_s1"], cutoff=None, dry_run=False)
    asked = ["run_s0", "run_s1", "run_s2", "run_recent", "run_done", "run_missing"]
    assert sorted(runs.still_running(settings=s, run_ids=asked, cutoff=ago(30))) == ["run_s2"]  # not run_s3
    assert runs.still_running(settings=s, run_ids=[], cutoff=ago(30)) == []
