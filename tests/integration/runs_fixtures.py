"""Fixtures shared by the runs / gateway / stuck-runs tests: the same tests on PostgreSQL and SQLite.

Each test gets its own table names (``runs_<hex>`` / ``steps_<hex>``, dropped afterwards) in the session's
private PostgreSQL database or in a session SQLite file; the sandbox gateway is started once per module and
follows the settings in force (``get_settings``), so each test's own tables and stream are used.
Import the fixtures into a test module by assignment (``runs_settings = runs_fixtures.runs_settings``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from sandbox.gateway import GatewayServer
from tasks import runs
from tasks.connections import db_engine
from tasks.settings import Settings, get_settings, use_settings

GATEWAY_KEY = "fd-test-gateway-key-" + uuid.uuid4().hex


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('runs-db') / 'runs.db'}"


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The runs database URL: the session's private PostgreSQL database, then a SQLite file."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_database_url")


@pytest.fixture
def runs_settings(settings: Settings, db_url: str) -> Iterator[Settings]:
    """``settings`` (private Redis keys) plus private runs/steps tables, created now and dropped after."""
    tag = uuid.uuid4().hex[:10]
    s = settings.model_copy(
        update={
            "database_url": SecretStr(db_url),
            "runs_table": f"runs_{tag}",
            "steps_table": f"steps_{tag}",
            "gateway_api_key": SecretStr(GATEWAY_KEY),
            "gateway_backoff_s": 0.01,
            "gateway_retry_after_cap_s": 0.05,
            "target_cooldown_s": 0,
        }
    )
    runs.create_schema(settings=s)
    yield s
    runs.drop_schema(settings=s)


@pytest.fixture(scope="module")
def gateway_server() -> Iterator[GatewayServer]:
    """The sandbox gateway on a free port, acting on whatever settings are in force per request."""
    with GatewayServer(settings=get_settings, api_key=GATEWAY_KEY) as server:
        yield server


@pytest.fixture
def gw_settings(runs_settings: Settings, gateway_server: GatewayServer) -> Iterator[Settings]:
    """``runs_settings`` pointing at the sandbox gateway, put in force for flows and the gateway."""
    s = runs_settings.model_copy(update={"gateway_url": gateway_server.url})
    gateway_server.app.state.faults.clear()
    with use_settings(s):
        yield s


def ago(minutes: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


def _uniform(rows: list[dict], defaults: dict) -> list[dict]:
    """Give every row the same keys (an executemany INSERT takes its columns from the first row)."""
    keys = {k for row in rows for k in row}
    return [{k: row.get(k, defaults.get(k)) for k in keys} for row in rows]


def add_runs(settings: Settings, rows: list[dict]) -> None:
    """Insert runs (``id``, ``status``, ``started_at`` ...) in one statement."""
    with db_engine(settings).begin() as conn:
        conn.execute(sa.insert(runs.tables(settings).runs), _uniform(rows, {}))


def add_steps(settings: Settings, rows: list[dict]) -> None:
    """Insert steps (``id``, ``run_id``, ``status`` ...) in one statement."""
    with db_engine(settings).begin() as conn:
        conn.execute(sa.insert(runs.tables(settings).steps), _uniform(rows, {"attempts": 0}))


def statuses(settings: Settings) -> dict[str, str]:
    """Every run's status, by id."""
    r = runs.tables(settings).runs
    with db_engine(settings).connect() as conn:
        return dict(conn.execute(sa.select(r.c.id, r.c.status)).all())


# --- what a FerrumDeck worker writes (test doubles of the workers, not product code) -----------------


def _upsert(conn: Connection, table: sa.Table, values: dict[str, Any], update: dict[str, Any]) -> None:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table).values(**values)
    conn.execute(stmt.on_conflict_do_update(index_elements=[table.c.id], set_=update))


def record_step_running(
    *,
    settings: Settings,
    run_id: str,
    step_id: str,
    kind: str | None = None,
    model: str | None = None,
    agent_version_id: str | None = None,
    now: datetime | None = None,
) -> None:
    """A worker took a step: the run is ``running`` (kept started_at if known) and the step ``running``."""
    t = runs.tables(settings)
    now = now or datetime.now(UTC)
    with db_engine(settings).begin() as conn:
        _upsert(
            conn,
            t.runs,
            {"id": run_id, "status": runs.RUNNING, "started_at": now, "agent_version_id": agent_version_id},
            {"status": runs.RUNNING, "started_at": sa.func.coalesce(t.runs.c.started_at, now)},
        )
        _upsert(
            conn,
            t.steps,
            {
                "id": step_id,
                "run_id": run_id,
                "status": runs.RUNNING,
                "kind": kind,
                "model": model,
                "started_at": now,
            },
            {"status": runs.RUNNING, "kind": kind, "model": model, "started_at": now, "completed_at": None},
        )


def record_step_finished(
    *,
    settings: Settings,
    run_id: str,
    step_id: str,
    status: str = "completed",
    error: dict[str, Any] | None = None,
    finish_run: bool = True,
    now: datetime | None = None,
) -> None:
    """A worker finished a step (``completed`` or ``failed``); with ``finish_run`` the run ends the same way,
    but only if it is still ``running`` (a run the sweep already failed keeps its error)."""
    t = runs.tables(settings)
    now = now or datetime.now(UTC)
    with db_engine(settings).begin() as conn:
        conn.execute(
            sa.update(t.steps)
            .where(t.steps.c.id == step_id, t.steps.c.run_id == run_id)
            .values(status=status, error=error, completed_at=now)
        )
        if finish_run:
            conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.status == runs.RUNNING)
                .values(status=status, error=error, completed_at=now)
            )
