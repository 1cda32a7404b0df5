"""Runs-database error classification and the UTC timestamp type, without a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tasks import runs
from tasks.settings import Settings


class _PgError(Exception):
    def __init__(self, sqlstate: str | None, text: str = "pg error") -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


def _wrapped(cls, orig, invalidated=False):
    return cls("UPDATE runs ...", {}, orig, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    "error,temporary",
    [
        (_wrapped(sa.exc.OperationalError, _PgError("40001", "could not serialize access")), True),
        (_wrapped(sa.exc.OperationalError, _PgError("40P01", "deadlock detected")), True),
        (_wrapped(sa.exc.OperationalError, _PgError("08006", "connection failure")), True),
        (
            _wrapped(
                sa.exc.OperationalError, _PgError(None, "server closed the connection"), invalidated=True
            ),
            True,
        ),
        (_wrapped(sa.exc.OperationalError, Exception("database is locked")), True),
        (_wrapped(sa.exc.ProgrammingError, _PgError("42P01", 'relation "runs" does not exist')), False),
        (_wrapped(sa.exc.IntegrityError, _PgError("23505", "duplicate key")), False),
        (_wrapped(sa.exc.OperationalError, Exception("no such table: runs")), False),
        (ValueError("nope"), False),
    ],
)
def test_temporary_errors_are_told_apart(error, temporary):
    assert runs.is_temporary_db_error(error) is temporary


def test_errors_are_wrapped_with_what_was_being_done_and_the_cause():
    orig = _PgError("40001", "could not serialize access due to concurrent update")
    with pytest.raises(
        runs.RunsTemporaryError, match="could not fail runs: _PgError: could not serialize"
    ) as info, runs._errors("fail runs"):
        raise _wrapped(sa.exc.OperationalError, orig)
    assert info.value.__cause__ is not None


def test_retry_condition_only_retries_temporary_errors():
    from prefect.states import Failed

    from tasks.errors import retry_if_temporary

    assert retry_if_temporary(None, None, Failed(data=runs.RunsTemporaryError("x")))
    assert not retry_if_temporary(None, None, Failed(data=runs.RunsError("x")))
    assert not retry_if_temporary(None, None, Failed(data=ValueError("x")))


@pytest.mark.parametrize("dialect", [postgresql.dialect(), sqlite.dialect()])
def test_timestamps_go_in_as_utc_and_come_back_aware(dialect):
    t = runs.UTCDateTime()
    paris = datetime(2026, 11, 27, 21, 0, tzinfo=timezone(timedelta(hours=1)))
    bound = t.process_bind_param(paris, dialect)
    assert bound.replace(tzinfo=None) == datetime(2026, 11, 27, 20, 0)
    assert (bound.tzinfo is None) == (dialect.name == "sqlite")
    assert t.process_result_value(datetime(2026, 11, 27, 20, 0), dialect) == datetime(
        2026, 11, 27, 20, 0, tzinfo=UTC
    )
    assert t.process_bind_param(None, dialect) is None


def test_table_names_come_from_settings_and_are_cached():
    s = Settings(runs_table="runs_x", steps_table="steps_x")
    t = runs.tables(s)
    assert t.runs.name == "runs_x" and t.steps.name == "steps_x" and runs.tables(s) is t
    assert {"kind", "model", "attempts"} <= set(t.steps.c.keys())
    assert isinstance(t.runs.c.error.type.dialect_impl(postgresql.dialect()), postgresql.JSONB)
    assert [tuple(i.columns.keys()) for i in t.runs.indexes] == [("status", "started_at", "id")]


def test_empty_fail_does_nothing_without_a_database(mocker):
    mocker.patch("tasks.guard.kill_switch_engaged", return_value=False)  # the guard's Prefect read, not tested here
    s = Settings(database_url="postgresql://nobody@127.0.0.1:1/none")
    assert runs.fail_runs(settings=s, run_ids=[], cutoff=None, dry_run=False).requested == 0
    assert runs.fail_runs(settings=s, run_ids=[], cutoff=None, dry_run=True).requested == 0


def test_runs_errors_share_the_one_error_root_and_its_temporary_flag():
    """Issue 11: every module (recovery's settling of runs too) must see a lost database as temporary."""
    from tasks.errors import RecoveryError, is_temporary

    assert issubclass(runs.RunsError, RecoveryError)
    assert is_temporary(runs.RunsTemporaryError("x")) and not is_temporary(runs.RunsError("x"))
    refused = _wrapped(sa.exc.OperationalError, Exception('connection to server at "127.0.0.1", port 9 failed'))
    with pytest.raises(runs.RunsError) as info, runs._errors("find stuck runs"):
        raise refused
    assert is_temporary(info.value)  # a database that refuses connections is retried, then reported
