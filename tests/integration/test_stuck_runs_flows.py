"""The three stuck-runs flows end to end: Prefect test server, real Redis queue, runs DB (PostgreSQL and SQLite),
the sandbox gateway over HTTP. Each policy branch with the queue in the matching state; guard; reports; secrets."""

from __future__ import annotations

import logging
import uuid

import pytest
import sqlalchemy as sa
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.exceptions import ParameterTypeError
from prefect.logging.handlers import APILogHandler
from prefect.variables import Variable
from pydantic import SecretStr

from flows.stuck_runs import fail_run, retry_step, stuck_runs_sweep
from tasks import runs
from tasks.gateway import GatewayAuthError, InvalidIdError
from tasks.settings import use_settings
from tests.integration import runs_fixtures as rf
from tests.integration.runs_fixtures import GATEWAY_KEY, add_runs, add_steps, ago, statuses
from tests.polling import wait_for

sqlite_url = rf.sqlite_url
db_url = rf.db_url
runs_settings = rf.runs_settings
gateway_server = rf.gateway_server
gw_settings = rf.gw_settings

# run id -> (minutes running, step status, where its step is in the queue, attempts)
SCENARIO = {
    "run_live": (90, "running", "pending:w-live", 0),
    "run_sweep": (85, "running", "pending:w-dead", 0),
    "run_queued": (80, "queued", "queued", 1),
    "run_dlq": (75, "running", "dlq", 0),
    "run_nowhere": (70, "running", "nowhere", 1),
    "run_exhausted": (65, "running", "nowhere", 3),
    "run_nostep": (60, None, None, 0),
}
EXPECTED_AUTO = {
    "run_live": "leave",
    "run_sweep": "leave-for-queue-sweep",
    "run_queued": "leave",
    "run_dlq": "fail",
    "run_nowhere": "retry",
    "run_exhausted": "fail",
    "run_nostep": "fail",
}


def step_of(run_id: str) -> str:
    return "st_" + run_id.removeprefix("run_")


@pytest.fixture
def world(gw_settings, redis):
    """The scenario: stuck runs whose steps sit in each queue state, plus runs the sweep must not see."""
    s = gw_settings
    rows = [{"id": rid, "status": "running", "started_at": ago(m)} for rid, (m, *_) in SCENARIO.items()]
    rows += [
        {"id": "run_recent", "status": "running", "started_at": ago(5)},
        {"id": "run_done", "status": "completed", "started_at": ago(95)},
    ]
    add_runs(s, rows)
    add_steps(
        s,
        [
            {"id": step_of(rid), "run_id": rid, "status": st, "started_at": ago(m - 1), "attempts": a}
            for rid, (m, st, _, a) in SCENARIO.items()
            if st is not None
        ]
        + [{"id": "st_recent", "run_id": "run_recent", "status": "running", "started_at": ago(4)}],
    )
    redis.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    fields = {rid: {"job_id": step_of(rid), "run_id": rid, "step_id": step_of(rid)} for rid in SCENARIO}
    redis.xadd(s.stream, fields["run_live"])
    redis.xreadgroup(s.group, "w-live", {s.stream: ">"}, count=1)
    sweep_id = redis.xadd(s.stream, fields["run_sweep"])
    redis.xreadgroup(s.group, "w-dead", {s.stream: ">"}, count=1)
    redis.xclaim(s.stream, s.group, "w-dead", 0, [sweep_id], idle=600_000)  # backdate: idle for 10 minutes
    redis.xadd(s.stream, fields["run_queued"])  # delivered to nobody yet
    redis.xadd(s.dlq_stream, {**fields["run_dlq"], "error": "Max retries exceeded"})
    return s


def _queue_state(s, redis):
    pel = {e["message_id"]: e["consumer"] for e in redis.xpending_range(s.stream, s.group, "-", "+", 100)}
    return redis.xlen(s.stream), redis.xlen(s.dlq_stream), pel


def _artifacts(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return "\n".join(a.data for a in found if isinstance(a.data, str))


def test_auto_sweep_takes_each_branch_with_the_queue_in_that_state(world, redis):
    s = world
    queue_before = _queue_state(s, redis)
    state = stuck_runs_sweep(dry_run=False, return_state=True)
    result = state.result()
    assert result.found == len(SCENARIO)  # run_recent and run_done are not stuck
    assert sorted(result.failed) == ["run_dlq", "run_exhausted", "run_nostep"] and result.not_failed == []
    assert result.retried == ["st_nowhere"] and result.retry_outcomes == {"run_nowhere/st_nowhere": "retried"}
    assert result.decisions == {"leave": 2, "leave-for-queue-sweep": 1, "fail": 3, "retry": 1}

    now = runs.read_runs(settings=s, run_ids=list(SCENARIO) + ["run_recent", "run_done"])
    for rid, decision in EXPECTED_AUTO.items():
        assert now[rid].status == ("failed" if decision == "fail" else "running"), rid
    assert now["run_dlq"].error == runs.WORKER_TIMEOUT and now["run_dlq"].completed_at is not None
    assert now["run_recent"].status == "running" and now["run_done"].status == "completed"
    # the queue: only one new entry (the retried step), the pending list and the DLQ untouched
    length, dlq, pel = _queue_state(s, redis)
    assert (length, dlq, pel) == (queue_before[0] + 1, queue_before[1], queue_before[2])
    assert redis.xrange(s.stream)[-1][1] == {
        "job_id": "st_nowhere",
        "run_id": "run_nowhere",
        "step_id": "st_nowhere",
    }
    assert runs.read_step(settings=s, run_id="run_nowhere", step_id="st_nowhere").attempts == 2

    report = _artifacts(state.state_details.flow_run_id)
    for rid, decision in EXPECTED_AUTO.items():
        assert f"| {rid} | {decision} |" in report, rid
    assert "live owner w-live" in report and "dead or idle owner w-dead" in report
    assert "| run_dlq | failed (WORKER_TIMEOUT) | step dead-lettered" in report
    assert (
        "failed 3 run(s) with WORKER_TIMEOUT" in report
        and "1/1 retried step(s) are back in the queue" in report
    )

    again = stuck_runs_sweep(dry_run=False)  # idempotent: nothing more to change
    assert again.failed == [] and again.retried == [] and again.found == 4
    assert redis.xlen(s.stream) == length and statuses(s) == {i: r.status for i, r in now.items()}


def test_dry_run_by_default_changes_nothing(world, redis):
    before = (statuses(world), _queue_state(world, redis))
    result = stuck_runs_sweep()
    assert result.dry_run and result.failed == [] and result.retried == [] and result.decisions["fail"] == 3
    assert (statuses(world), _queue_state(world, redis)) == before


def test_kill_switch_refuses_and_changes_nothing(world, redis):
    before = (statuses(world), _queue_state(world, redis))
    Variable.set(world.kill_switch_variable, True, overwrite=True)
    try:
        state = stuck_runs_sweep(dry_run=False, return_state=True)
    finally:
        Variable.unset(world.kill_switch_variable)
    result = state.result()
    assert "kill switch" in result.guard and result.failed == [] and result.retried == []
    assert (statuses(world), _queue_state(world, redis)) == before
    assert "refused: kill switch" in _artifacts(state.state_details.flow_run_id)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the policy's input, not the database
def test_live_consumers_from_the_caller_decide_who_is_alive(world):
    result = stuck_runs_sweep(dry_run=True, live_consumers=["w-dead"])
    # w-dead is declared alive (e.g. its pod is Ready), w-live is not in the list: roles swap
    assert result.decisions["leave"] == 2 and result.decisions["leave-for-queue-sweep"] == 1
    result = stuck_runs_sweep(dry_run=True, min_idle_ms=1)  # every owner counts as idle
    assert result.decisions["leave-for-queue-sweep"] == 2


def test_action_fail_respects_max_runs(world):
    result = stuck_runs_sweep(action="fail", max_runs=2, dry_run=False)
    assert result.more_than_max_runs and sorted(result.failed) == ["run_live", "run_sweep"]  # the two oldest
    assert statuses(world)["run_queued"] == "running"


def _task_names(flow_run_id, expected: int) -> list[str]:
    """The task runs the server recorded for a flow run (they arrive as events: poll until all are there)."""

    def read() -> list[str]:
        with get_client(sync_client=True) as client:
            found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        names = sorted(t.name.rsplit("-", 1)[0] for t in found)
        return names if len(names) >= expected else []

    return wait_for(read, what=f"{expected} task runs of flow run {flow_run_id}")


def test_action_fail_fails_every_stuck_run_in_one_statement_without_shipping_ids(world, redis):
    s = world
    queue_before = _queue_state(s, redis)
    state = stuck_runs_sweep(action="fail", dry_run=False, return_state=True)
    result = state.result()
    oldest_first = list(SCENARIO)  # SCENARIO is ordered by minutes running, longest first
    assert result.failed == oldest_first and result.not_failed == [] and result.retried == []
    assert result.found == 7 and not result.more_than_max_runs and result.decisions == {"fail": 7}
    now = runs.read_runs(settings=s, run_ids=oldest_first + ["run_recent", "run_done"])
    assert all(now[i].status == "failed" and now[i].error == runs.WORKER_TIMEOUT for i in oldest_first)
    assert now["run_recent"].status == "running" and now["run_done"].status == "completed"
    assert _queue_state(s, redis) == queue_before  # action=fail never touches the queue

    report = _artifacts(state.state_details.flow_run_id)
    for rid in oldest_first:  # the report still names every failed run
        assert f"| {rid} | failed (WORKER_TIMEOUT) | action=fail |" in report, rid
    assert "failed 7 run(s) with WORKER_TIMEOUT" in report
    assert "0 run(s) still `running` since before the cutoff (expected 0)" in report
    # count, fail in one statement, count: no find of ids, no per-run steps/queue lookups, no fail-by-ids
    names = _task_names(state.state_details.flow_run_id, expected=3)
    assert names == ["count-stuck-runs", "count-stuck-runs", "fail-stuck-runs"], names

    again = stuck_runs_sweep(action="fail", dry_run=False)  # idempotent
    assert again.found == 0 and again.failed == [] and statuses(s) == {i: r.status for i, r in now.items()}


def test_action_fail_dry_run_lists_what_it_would_fail_and_changes_nothing(world, redis):
    before = (statuses(world), _queue_state(world, redis))
    state = stuck_runs_sweep(action="fail", max_runs=5, return_state=True)
    result = state.result()
    assert result.dry_run and result.failed == [] and result.decisions == {"fail": 5}
    assert result.found == 5 and result.more_than_max_runs
    assert (statuses(world), _queue_state(world, redis)) == before
    report = _artifacts(state.state_details.flow_run_id)
    assert "dry run: nothing changed: would fail 5 run(s)" in report
    for rid in list(SCENARIO)[:5]:
        assert f"| {rid} | fail (WORKER_TIMEOUT) | action=fail |" in report, rid
    assert "| run_exhausted |" not in report and "| run_nostep |" not in report  # beyond max_runs


def test_action_retry_never_fails(world, redis):
    result = stuck_runs_sweep(action="retry", dry_run=False)
    assert result.failed == [] and result.retried == ["st_nowhere"]
    assert all(v == "running" for k, v in statuses(world).items() if k != "run_done")


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # refused before the database: one dialect is enough
def test_bad_parameters_are_refused_before_anything(world, redis):
    before = (statuses(world), _queue_state(world, redis))
    for bad in ({"older_than_minutes": 0}, {"action": "delete"}, {"max_runs": 0}, {"max_step_retries": -1}):
        with pytest.raises(ParameterTypeError):
            stuck_runs_sweep(dry_run=False, **bad)
    assert (statuses(world), _queue_state(world, redis)) == before


def test_fail_run_dry_run_then_real_then_idempotent(world):
    preview = fail_run(run_id="run_live")
    assert not preview.changed and statuses(world)["run_live"] == "running"
    done = fail_run(run_id="run_live", code="OPERATOR_ABORT", message="failed by on-call", dry_run=False)
    assert done.changed and done.status_before == "running" and done.status_after == "failed"
    row = runs.read_runs(settings=world, run_ids=["run_live"])["run_live"]
    assert row.error == {"code": "OPERATOR_ABORT", "message": "failed by on-call"}
    again = fail_run(run_id="run_live", dry_run=False)
    assert not again.changed and "already `failed`" in again.reason
    assert runs.read_runs(settings=world, run_ids=["run_live"])["run_live"].error["code"] == "OPERATOR_ABORT"
    assert not fail_run(run_id="run_done", dry_run=False).changed
    assert not fail_run(run_id="run_missing", dry_run=False).changed


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # refused before the database: one dialect is enough
def test_manual_flows_reject_hostile_ids_before_anything(world, redis):
    before = (statuses(world), _queue_state(world, redis))
    for hostile in ("run_1; DROP TABLE runs", "../admin", "run_live' OR '1'='1", "a..b"):
        with pytest.raises((ParameterTypeError, InvalidIdError)):
            fail_run(run_id=hostile, dry_run=False)
        with pytest.raises((ParameterTypeError, InvalidIdError)):
            retry_step(run_id="run_nowhere", step_id=hostile, dry_run=False)
    assert (statuses(world), _queue_state(world, redis)) == before
    assert sa.inspect(runs.db_engine(world)).has_table(world.runs_table)


def test_retry_step_dry_run_then_real_then_already_queued(world, redis, gateway_server):
    length = redis.xlen(world.stream)
    preview = retry_step(run_id="run_nowhere", step_id="st_nowhere")
    assert not preview.changed and preview.outcome == "dry-run" and redis.xlen(world.stream) == length
    done = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False)
    assert done.changed and done.where_before == "nowhere" and done.where_after == "queued"
    assert redis.xlen(world.stream) == length + 1
    calls = gateway_server.stats["calls"]
    again = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False)
    assert not again.changed and again.outcome == "already_queued" and gateway_server.stats["calls"] == calls
    held = retry_step(run_id="run_live", step_id="st_live", dry_run=False)  # a live worker holds it
    assert held.outcome == "already_queued" and redis.xlen(world.stream) == length + 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # where the key comes from, not the database
def test_retry_step_reads_the_key_from_a_prefect_secret_block(world, redis):
    name = f"fd-test-gw-{uuid.uuid4().hex[:8]}"
    Secret(value=GATEWAY_KEY).save(name)
    s = world.model_copy(update={"gateway_api_key": None, "gateway_api_key_secret": name})
    with use_settings(s):
        done = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False)
    assert done.changed and redis.xrange(s.stream)[-1][1]["step_id"] == "st_nowhere"


def test_rejected_key_is_a_clear_failure_and_appears_nowhere(world, redis, caplog):
    wrong = "sk-wrong-" + uuid.uuid4().hex
    s = world.model_copy(update={"gateway_api_key": SecretStr(wrong)})
    caplog.set_level(logging.DEBUG)
    length = redis.xlen(s.stream)
    with use_settings(s):
        state = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False, return_state=True)
        sweep_state = stuck_runs_sweep(dry_run=False, return_state=True)
    assert state.is_failed() and sweep_state.is_failed() and redis.xlen(s.stream) == length
    errors = [state.result(raise_on_failure=False), sweep_state.result(raise_on_failure=False)]
    assert all(
        isinstance(e, GatewayAuthError) and "rejected the API key (HTTP 401)" in str(e) for e in errors
    )

    APILogHandler().flush()
    ids = [state.state_details.flow_run_id, sweep_state.state_details.flow_run_id]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
    log_text = "\n".join(entry.message for entry in logs)
    reports = _artifacts(ids[0]) + _artifacts(ids[1])
    assert "rejected the API key" in log_text and "rejected the API key" in reports  # they were captured
    assert (
        statuses(s)["run_dlq"] == "failed"
    )  # the sweep failed the runs it had to before the gateway refused
    for text in (log_text, reports, caplog.text, *map(str, errors), *map(repr, errors), repr(s), str(state)):
        assert wrong not in text and GATEWAY_KEY not in text
