"""The sandbox gateway over real HTTP, real Redis and the runs DB (PostgreSQL and SQLite), and the client against it.

The gateway decides with its own reads (its SQL, its scan of the stream), so these tests check the rows and
the stream directly, not through the recovery's own readers.
"""

from __future__ import annotations

import threading

import httpx
import pytest
import sqlalchemy as sa

from tasks import runs
from tasks.connections import db_engine
from tasks.gateway import GatewayTemporaryError, _retry_step
from tests.integration import runs_fixtures as rf
from tests.integration.runs_fixtures import GATEWAY_KEY, add_runs, add_steps, ago

sqlite_url = rf.sqlite_url
db_url = rf.db_url
runs_settings = rf.runs_settings
gateway_server = rf.gateway_server
gw_settings = rf.gw_settings

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}


@pytest.fixture
def seeded(gw_settings):
    add_runs(
        gw_settings,
        [
            {"id": "run_1", "status": "running", "started_at": ago(45)},
            {"id": "run_2", "status": "completed", "started_at": ago(45)},
        ],
    )
    add_steps(
        gw_settings,
        [
            {"id": "st_1", "run_id": "run_1", "status": "running", "started_at": ago(44)},
            {"id": "st_2", "run_id": "run_2", "status": "failed", "started_at": ago(44)},
        ],
    )
    return gw_settings


def _step(settings, step_id: str) -> dict:
    """The step's row as stored (status, attempts, error), read with plain SQL."""
    query = sa.text(f'SELECT status, attempts, error FROM "{settings.steps_table}" WHERE id = :id')
    with db_engine(settings).connect() as conn:
        return dict(conn.execute(query, {"id": step_id}).mappings().one())


def _post(settings, run_id, step_id, headers=AUTH) -> httpx.Response:
    return httpx.post(
        f"{settings.gateway_url}/v1/runs/{run_id}/steps/{step_id}/retry", headers=headers, timeout=5
    )


def test_retry_reenqueues_the_step_once(seeded, redis):
    first = _post(seeded, "run_1", "st_1")
    assert first.status_code == 202 and first.json()["attempts"] == 1
    assert redis.xrange(seeded.stream) == [
        (first.json()["entry_id"], {"job_id": "st_1", "run_id": "run_1", "step_id": "st_1"})
    ]
    assert _step(seeded, "st_1") == {"status": "queued", "attempts": 1, "error": None}
    again = _post(seeded, "run_1", "st_1")
    assert again.status_code == 409 and redis.xlen(seeded.stream) == 1


def test_step_pending_with_a_worker_is_409(seeded, redis):
    redis.xgroup_create(seeded.stream, seeded.group, id="0", mkstream=True)
    redis.xadd(seeded.stream, {"job_id": "st_1", "run_id": "run_1", "step_id": "st_1"})
    redis.xreadgroup(seeded.group, "w-1", {seeded.stream: ">"}, count=10)
    answer = _post(seeded, "run_1", "st_1")
    assert answer.status_code == 409 and "pending" in answer.json()["error"]
    assert redis.xlen(seeded.stream) == 1
    assert _step(seeded, "st_1")["attempts"] == 0


def test_step_waiting_undelivered_in_the_stream_is_409(seeded, redis):
    redis.xgroup_create(seeded.stream, seeded.group, id="0", mkstream=True)
    redis.xadd(seeded.stream, {"job_id": "st_1", "run_id": "run_1", "step_id": "st_1"})
    answer = _post(seeded, "run_1", "st_1")
    assert answer.status_code == 409 and "queued in the queue" in answer.json()["error"]
    assert redis.xlen(seeded.stream) == 1 and _step(seeded, "st_1")["attempts"] == 0


def test_step_held_behind_pages_of_acknowledged_entries_is_409(seeded, redis):
    """The scan starts at the oldest pending entry and pages on: a held step far behind it is found."""
    redis.xgroup_create(seeded.stream, seeded.group, id="0", mkstream=True)
    redis.xadd(seeded.stream, {"job_id": "st_old", "run_id": "run_x", "step_id": "st_old"})  # held, oldest
    acked = [redis.xadd(seeded.stream, {"job_id": f"o_{i}", "run_id": "run_x", "step_id": f"o_{i}"})
             for i in range(1200)]  # more than two scan pages, delivered and acknowledged
    redis.xadd(seeded.stream, {"job_id": "st_1", "run_id": "run_1", "step_id": "st_1"})  # held
    redis.xreadgroup(seeded.group, "w-1", {seeded.stream: ">"}, count=2000)
    redis.xack(seeded.stream, seeded.group, *acked)
    answer = _post(seeded, "run_1", "st_1")
    assert answer.status_code == 409 and "pending" in answer.json()["error"]
    assert redis.xlen(seeded.stream) == 1202 and _step(seeded, "st_1")["attempts"] == 0


def test_retry_of_a_failed_step_clears_its_error(seeded, redis):
    add_steps(seeded, [{"id": "st_3", "run_id": "run_1", "status": "failed", "started_at": ago(44),
                        "completed_at": ago(43), "error": {"code": "WORKER_TIMEOUT"}}])
    assert _step(seeded, "st_3")["status"] == "failed"
    assert _post(seeded, "run_1", "st_3").status_code == 202
    assert _step(seeded, "st_3") == {"status": "queued", "attempts": 1, "error": None}


def test_step_delivered_and_acknowledged_or_dead_lettered_is_retried(seeded, redis):
    """Copies that no consumer holds and none waits for (acknowledged, or in the DLQ) do not block a retry."""
    redis.xgroup_create(seeded.stream, seeded.group, id="0", mkstream=True)
    old = redis.xadd(seeded.stream, {"job_id": "st_1", "run_id": "run_1", "step_id": "st_1"})
    redis.xreadgroup(seeded.group, "w-1", {seeded.stream: ">"}, count=10)
    redis.xack(seeded.stream, seeded.group, old)
    redis.xadd(seeded.dlq_stream, {"job_id": "st_1", "run_id": "run_1", "step_id": "st_1"})
    answer = _post(seeded, "run_1", "st_1")
    assert answer.status_code == 202 and answer.json()["attempts"] == 1
    assert [e for e, _ in redis.xrange(seeded.stream)] == [old, answer.json()["entry_id"]]


@pytest.mark.parametrize("run_id,step_id", [("run_9", "st_1"), ("run_1", "st_9"), ("run_1", "st_2")])
def test_unknown_run_or_step_is_404(seeded, redis, run_id, step_id):
    assert _post(seeded, run_id, step_id).status_code == 404
    assert redis.xlen(seeded.stream) == 0


def test_finished_run_is_409(seeded, redis):
    assert _post(seeded, "run_2", "st_2").status_code == 409 and redis.xlen(seeded.stream) == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": GATEWAY_KEY}])
def test_missing_or_wrong_key_is_401(seeded, redis, headers):
    answer = _post(seeded, "run_1", "st_1", headers=headers)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert GATEWAY_KEY not in answer.text and redis.xlen(seeded.stream) == 0


@pytest.mark.parametrize("run_id", ["run_1%3B%20DROP%20TABLE%20runs", "..%2Fadmin", "%2E%2E", "run_1'--"])
def test_hostile_ids_are_400_and_change_nothing(seeded, redis, run_id):
    answer = _post(seeded, run_id, "st_1")
    assert answer.status_code in (400, 404)
    assert answer.status_code == 400 or run_id.startswith("..")  # a raw '../' never reaches the route
    assert redis.xlen(seeded.stream) == 0
    assert sa.inspect(db_engine(seeded)).has_table(seeded.runs_table)
    assert _step(seeded, "st_1")["status"] == "running"


def test_concurrent_retries_enqueue_exactly_once(seeded, redis):
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda: codes.append(_post(seeded, "run_1", "st_1").status_code))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(codes) == [202] + [409] * 5
    assert redis.xlen(seeded.stream) == 1
    assert _step(seeded, "st_1")["attempts"] == 1


def test_client_retries_503_then_succeeds_honouring_capped_retry_after(seeded, gateway_server, redis):
    gateway_server.inject_fault(status=503, times=2, retry_after="1")
    slept: list[float] = []
    calls = gateway_server.stats["calls"]
    out = _retry_step(settings=seeded, run_id="run_1", step_id="st_1", sleep=slept.append)
    assert out.outcome == "retried" and out.attempts == 3
    assert slept == [seeded.gateway_retry_after_cap_s] * 2  # Retry-After 1 s, capped by the setting
    assert gateway_server.stats["calls"] - calls == 3 and redis.xlen(seeded.stream) == 1


def test_client_honours_retry_after_below_the_cap(seeded, gateway_server):
    gateway_server.inject_fault(status=429, times=1, retry_after="1")
    slept: list[float] = []
    s = seeded.model_copy(update={"gateway_retry_after_cap_s": 30.0})
    assert _retry_step(settings=s, run_id="run_1", step_id="st_1", sleep=slept.append).changed
    assert slept == [1.0]


def test_backend_failure_is_503_and_the_client_gives_up_clearly(seeded, gateway_server):
    runs.drop_schema(settings=seeded)  # the runs database loses its tables: the gateway answers 503
    try:
        with pytest.raises(GatewayTemporaryError, match="HTTP 503 after"):
            _retry_step(settings=seeded, run_id="run_1", step_id="st_1", sleep=lambda s: None)
    finally:
        runs.create_schema(settings=seeded)
