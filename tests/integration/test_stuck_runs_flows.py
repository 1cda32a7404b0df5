"""The three stuck-runs flows end to end: Prefect test server, real Redis queue, runs DB (PostgreSQL and SQLite),
the sandbox gateway over HTTP. Each policy branch with the queue in the matching state; typed outcomes computed
from what was re-read after acting; guard; lost steps converge (issue 11); a sweep whose database is down still
publishes its report; secrets."""

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
from tasks import gateway, runs
from tasks.connections import db_engine
from tasks.gateway import InvalidIdError
from tasks.outcome import ActionStatus, Outcome
from tasks.settings import use_settings
from tests.integration import runs_fixtures as rf
from tests.integration import runs_fixtures as rf_worker
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


def _report(state, key: str) -> str:
    """The keyed report artifact of one flow run (asserts it exists)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])), limit=1)
    assert found, f"no `{key}` report for this flow run"
    return found[0].data


def _actions(result) -> list[tuple[str, ActionStatus, int | None]]:
    return [(a.kind, a.status, a.count) for a in result.actions]


def test_auto_sweep_takes_each_branch_with_the_queue_in_that_state(world, redis):
    s = world
    queue_before = _queue_state(s, redis)
    state = stuck_runs_sweep(dry_run=False, return_state=True)
    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.RECOVERED
    assert result.found == len(SCENARIO)  # run_recent and run_done are not stuck
    assert sorted(result.failed) == ["run_dlq", "run_exhausted", "run_nostep"] and result.not_failed == []
    assert result.retried == ["st_nowhere"] and result.retry_outcomes == {"run_nowhere/st_nowhere": "retried"}
    assert result.decisions == {"leave": 2, "leave-for-queue-sweep": 1, "fail": 3, "retry": 1}
    assert _actions(result) == [("fail-runs", ActionStatus.DONE, 3), ("retry-steps", ActionStatus.DONE, 1)]
    # verified from the re-read: failed runs read `failed`, the retried step is queued, left runs untouched
    assert all(c.ok for c in result.checks) and len(result.checks) == 3
    assert [c.detail.split(":")[0] for c in result.checks] == ["3/3", "1/1", "3/3"]

    now = runs.read_runs(settings=s, run_ids=list(SCENARIO) + ["run_recent", "run_done"])
    for rid, decision in EXPECTED_AUTO.items():
        assert now[rid].status == ("failed" if decision == "fail" else "running"), rid
    assert now["run_dlq"].error == runs.WORKER_TIMEOUT and now["run_dlq"].completed_at is not None
    assert now["run_recent"].status == "running" and now["run_done"].status == "completed"
    # the queue: only one new entry (the retried step), the pending list and the DLQ untouched
    length, dlq, pel = _queue_state(s, redis)
    assert (length, dlq, pel) == (queue_before[0] + 1, queue_before[1], queue_before[2])
    assert redis.xrange(s.stream)[-1][1] == {"job_id": "st_nowhere", "run_id": "run_nowhere", "step_id": "st_nowhere"}
    assert runs.read_step(settings=s, run_id="run_nowhere", step_id="st_nowhere").attempts == 2

    report = _report(state, "stuck-runs-sweep")  # what a person reads: the outcome and why per run
    assert "**Outcome: recovered**" in report and "| run_dlq | fail | st_dlq | dlq |" in report
    assert "live owner w-live" in report and "dead or idle owner w-dead" in report

    again = stuck_runs_sweep(dry_run=False)  # idempotent: nothing more to change
    assert again.outcome is Outcome.NOTHING_TO_DO and again.actions == [] and again.found == 4
    assert redis.xlen(s.stream) == length and statuses(s) == {i: r.status for i, r in now.items()}


def test_dry_run_by_default_changes_nothing(world, redis):
    before = (statuses(world), _queue_state(world, redis))
    result = stuck_runs_sweep()
    assert result.outcome is Outcome.DRY_RUN and result.dry_run and result.failed == [] and result.retried == []
    assert sorted(result.would_fail) == ["run_dlq", "run_exhausted", "run_nostep"]
    assert result.would_retry == ["st_nowhere"] and result.decisions["fail"] == 3
    assert _actions(result) == [("fail-runs", ActionStatus.DRY_RUN, 3), ("retry-steps", ActionStatus.DRY_RUN, 1)]
    assert (statuses(world), _queue_state(world, redis)) == before


def test_kill_switch_refuses_and_changes_nothing(world, redis, gateway_server):
    before = (statuses(world), _queue_state(world, redis))
    calls = gateway_server.stats["calls"]
    Variable.set(world.kill_switch_variable, True, overwrite=True)
    try:
        state = stuck_runs_sweep(dry_run=False, return_state=True)
    finally:
        Variable.unset(world.kill_switch_variable)
    result = state.result()
    assert state.is_completed() and result.outcome is Outcome.REFUSED and result.checks == []
    assert [(a.kind, a.status) for a in result.actions] == [
        ("fail-runs", ActionStatus.REFUSED), ("retry-steps", ActionStatus.REFUSED)]
    assert all("kill switch" in a.detail for a in result.actions) and result.failed == result.retried == []
    assert (statuses(world), _queue_state(world, redis)) == before and gateway_server.stats["calls"] == calls
    assert "kill switch" in _report(state, "stuck-runs-sweep")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the policy's input, not the database
def test_live_consumers_from_the_caller_decide_who_is_alive(world):
    result = stuck_runs_sweep(dry_run=True, live_consumers=["w-dead"])
    # w-dead is declared alive (e.g. its pod is Ready), w-live is not in the list: roles swap
    assert result.decisions["leave"] == 2 and result.decisions["leave-for-queue-sweep"] == 1
    result = stuck_runs_sweep(dry_run=True, min_idle_ms=1)  # every owner counts as idle
    assert result.decisions["leave-for-queue-sweep"] == 2


def test_action_fail_respects_max_runs(world):
    result = stuck_runs_sweep(action="fail", max_runs=2, dry_run=False)
    assert result.outcome is Outcome.RECOVERED
    assert result.more_than_max_runs and result.failed == ["run_live", "run_sweep"]  # the two oldest
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
    assert result.outcome is Outcome.RECOVERED and result.failed == oldest_first and result.retried == []
    assert result.found == 7 and not result.more_than_max_runs and result.decisions == {"fail": 7}
    assert _actions(result) == [("fail-stuck-runs", ActionStatus.DONE, 7)]
    [check] = result.checks  # none still running, and the sample read back `failed`
    assert check.ok and check.detail.startswith("7/7") and "7 of the sample read `failed`" in check.name
    now = runs.read_runs(settings=s, run_ids=oldest_first + ["run_recent", "run_done"])
    assert all(now[i].status == "failed" and now[i].error == runs.WORKER_TIMEOUT for i in oldest_first)
    assert now["run_recent"].status == "running" and now["run_done"].status == "completed"
    assert _queue_state(s, redis) == queue_before  # action=fail never touches the queue
    # count, fail in one statement, re-read what it failed: no find, no per-run steps/queue lookups
    names = _task_names(state.state_details.flow_run_id, expected=4)
    assert names == ["count-stuck-runs", "fail-stuck-runs", "read-run-statuses", "still-running"], names

    again = stuck_runs_sweep(action="fail", dry_run=False)  # idempotent
    assert again.outcome is Outcome.NOTHING_TO_DO and again.found == 0 and again.failed == []
    assert statuses(s) == {i: r.status for i, r in now.items()}


def test_action_fail_dry_run_lists_what_it_would_fail_and_changes_nothing(world, redis):
    before = (statuses(world), _queue_state(world, redis))
    state = stuck_runs_sweep(action="fail", max_runs=5, return_state=True)
    result = state.result()
    assert result.outcome is Outcome.DRY_RUN and result.failed == [] and result.decisions == {"fail": 5}
    assert result.would_fail == list(SCENARIO)[:5] and result.found == 5 and result.more_than_max_runs
    assert _actions(result) == [("fail-stuck-runs", ActionStatus.DRY_RUN, 5)]
    assert (statuses(world), _queue_state(world, redis)) == before
    report = _report(state, "stuck-runs-sweep")
    assert "would fail run_live, run_sweep, run_queued, run_dlq, run_nowhere" in report
    assert "run_exhausted" not in report  # beyond max_runs


def test_action_retry_never_fails(world, redis):
    result = stuck_runs_sweep(action="retry", dry_run=False)
    assert result.outcome is Outcome.RECOVERED and result.failed == [] and result.retried == ["st_nowhere"]
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


# --- issue 11: a step `queued` in the database but in no stream ------------------------------------------------


def _lost_world(s, redis, n: int) -> list[str]:
    """``n`` stuck runs whose only step is `queued` in the database while no stream has it (and one dead-lettered
    run, so the first sweep has something it can verify)."""
    ids = [f"run_lost{i}" for i in range(n)]
    add_runs(s, [{"id": rid, "status": "running", "started_at": ago(60 + i)} for i, rid in enumerate(ids)]
             + [{"id": "run_dlq", "status": "running", "started_at": ago(50)}])
    add_steps(s, [{"id": f"st_{rid}", "run_id": rid, "status": "queued", "started_at": ago(59), "attempts": 0}
                  for rid in ids] + [{"id": "st_dlq", "run_id": "run_dlq", "status": "running", "started_at": ago(49)}])
    redis.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    redis.xadd(s.dlq_stream, {"job_id": "st_dlq", "run_id": "run_dlq", "step_id": "st_dlq", "error": "poison"})
    return ids


def test_lost_steps_are_not_retried_forever_the_sweep_converges_to_failing_their_runs(gw_settings, redis,
                                                                                       gateway_server):
    s = gw_settings
    lost = _lost_world(s, redis, n=10)  # as measured in issue 11: 10 runs stayed running through 3 sweeps
    calls = gateway_server.stats["calls"]
    outcomes = []
    for sweep in (1, 2, 3):
        state = stuck_runs_sweep(dry_run=False, max_step_retries=3, return_state=True)
        result = state.result(raise_on_failure=False)
        outcomes.append(result.outcome)
        # the gateway answers 409 "already queued" for each: unchanged, and verification says the step is lost
        assert state.is_failed() and result.decisions["retry"] == 10
        assert set(result.retry_outcomes.values()) == {"already_queued"} and result.retried == []
        assert ("retry-steps", ActionStatus.UNCHANGED, 0) in _actions(result)
        assert result.lost_retries == {f"st_{rid}": sweep for rid in lost}  # counted against max_step_retries
        [bad] = result.failed_checks
        assert bad.detail.startswith("10/10 not:") and "lost" in bad.detail
        assert all(statuses(s)[rid] == "running" for rid in lost)
        assert redis.xlen(s.stream) == 0  # nothing was ever enqueued twice
    # sweep 1 also failed the dead-lettered run (verified), so it was partial; then nothing else verified
    assert outcomes == [Outcome.PARTIAL, Outcome.NOT_VERIFIED, Outcome.NOT_VERIFIED]
    assert gateway_server.stats["calls"] == calls + 30
    report = _report(state, "stuck-runs-sweep")
    assert "**Outcome: not_verified**" in report and "lost" in report

    final = stuck_runs_sweep(dry_run=False, max_step_retries=3, return_state=True)
    result = final.result()
    assert final.is_completed() and result.outcome is Outcome.RECOVERED
    assert result.decisions == {"fail": 10} and sorted(result.failed) == sorted(lost)
    assert all("retries exhausted (3/3)" in row["reason"] for row in result.decided[1].rows)
    assert all(statuses(s)[rid] == "failed" for rid in lost) and gateway_server.stats["calls"] == calls + 30
    assert stuck_runs_sweep(dry_run=False).outcome is Outcome.NOTHING_TO_DO  # and stays converged


def test_lost_retries_are_counted_per_step_and_read_in_one_go(gw_settings):
    s = gw_settings
    assert gateway.lost_retries(settings=s, step_ids=["a", "b"]) == {}
    assert gateway.count_lost_retries(settings=s, step_ids=["a", "b", "a"]) == {"a": 1, "b": 1}
    assert gateway.count_lost_retries(settings=s, step_ids=["a"]) == {"a": 2}
    assert gateway.lost_retries(settings=s, step_ids=["a", "b", "c"]) == {"a": 2, "b": 1}
    assert 0 < gateway.redis_client(s).ttl(f"{s.state_prefix}:lost-retry:a") <= gateway.LOST_RETRY_TTL_S


# --- the runs database down: the sweep still publishes its report ---------------------------------------------


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("action", ["auto", "fail"])
def test_a_sweep_with_the_runs_database_down_fails_after_publishing_its_report(world, action):
    down = world.model_copy(update={"database_url": SecretStr("postgresql+psycopg://postgres@127.0.0.1:9/runs")})
    with use_settings(down):  # nothing listens on port 9: every connection is refused
        state = stuck_runs_sweep(action=action, dry_run=False, return_state=True)
    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.FAILED and result.actions == [] and "RunsTemporaryError" in result.error
    assert "could not" in result.error and "stuck runs" in result.error
    report = _report(state, "stuck-runs-sweep")
    assert "**Outcome: failed**" in report and "The run failed" in report
    assert statuses(world)["run_dlq"] == "running"


def test_a_sweep_whose_database_goes_down_after_acting_reports_what_it_did(world, mocker):
    def down(**_):
        raise runs.RunsTemporaryError("could not read run statuses: OperationalError: connection refused")

    mocker.patch.object(runs, "read_run_statuses_task", down)
    state = stuck_runs_sweep(dry_run=False, return_state=True)
    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.FAILED and "connection refused" in result.error
    assert _actions(result) == [("fail-runs", ActionStatus.DONE, 3), ("retry-steps", ActionStatus.DONE, 1)]
    assert statuses(world)["run_dlq"] == "failed"  # it did act; the report says so
    report = _report(state, "stuck-runs-sweep")
    assert "| fail-runs | 3 run(s) | done | 3 |" in report and "The run failed" in report


# --- fail-run -------------------------------------------------------------------------------------------------


def test_fail_run_dry_run_then_real_then_idempotent(world):
    preview = fail_run(run_id="run_live")
    assert preview.outcome is Outcome.DRY_RUN and not preview.changed and statuses(world)["run_live"] == "running"
    done = fail_run(run_id="run_live", code="OPERATOR_ABORT", message="failed by on-call", dry_run=False)
    assert done.outcome is Outcome.RECOVERED and done.changed
    assert (done.status_before, done.status_after) == ("running", "failed") and done.checks[0].ok
    row = runs.read_runs(settings=world, run_ids=["run_live"])["run_live"]
    assert row.error == {"code": "OPERATOR_ABORT", "message": "failed by on-call"}
    again = fail_run(run_id="run_live", dry_run=False)
    assert again.outcome is Outcome.NOTHING_TO_DO and not again.changed and again.actions == []
    assert again.status_before == "failed" and again.checks[0].ok
    assert runs.read_runs(settings=world, run_ids=["run_live"])["run_live"].error["code"] == "OPERATOR_ABORT"
    assert fail_run(run_id="run_done", dry_run=False).outcome is Outcome.NOTHING_TO_DO
    missing = fail_run(run_id="run_missing", dry_run=False)
    assert missing.outcome is Outcome.NOTHING_TO_DO and missing.status_before is None


def test_fail_run_of_a_run_that_finishes_meanwhile_is_an_unchanged_no_op(world, mocker):
    real = runs.read_runs_task

    def read_then_worker_finishes(**kwargs):
        seen = real(**kwargs)
        if not mocker_state["finished"]:  # the worker completes the run right after the flow looked
            mocker_state["finished"] = True
            rf_worker.record_step_finished(settings=world, run_id="run_live", step_id="st_live", status="completed")
        return seen

    mocker_state = {"finished": False}
    mocker.patch.object(runs, "read_runs_task", read_then_worker_finishes)
    state = fail_run(run_id="run_live", dry_run=False, return_state=True)
    result = state.result()
    assert state.is_completed() and not result.changed and result.status_before == "running"
    assert _actions(result) == [("fail-run", ActionStatus.UNCHANGED, None)]
    assert result.status_after == "completed" and [c.ok for c in result.checks] == [True]
    row = runs.read_runs(settings=world, run_ids=["run_live"])["run_live"]
    assert row.status == "completed" and row.error is None  # the worker's outcome stands


def test_fail_run_refused_by_the_kill_switch(world):
    Variable.set(world.kill_switch_variable, True, overwrite=True)
    try:
        result = fail_run(run_id="run_live", dry_run=False)
    finally:
        Variable.unset(world.kill_switch_variable)
    assert result.outcome is Outcome.REFUSED and statuses(world)["run_live"] == "running"


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


# --- retry-step -----------------------------------------------------------------------------------------------


def test_retry_step_dry_run_then_real_then_already_queued(world, redis, gateway_server):
    length = redis.xlen(world.stream)
    preview = retry_step(run_id="run_nowhere", step_id="st_nowhere")
    assert preview.outcome is Outcome.DRY_RUN and not preview.changed and redis.xlen(world.stream) == length
    done = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False)
    assert done.outcome is Outcome.RECOVERED and done.changed and done.answer == "retried"
    assert (done.where_before, done.where_after) == ("nowhere", "queued")
    assert redis.xlen(world.stream) == length + 1
    calls = gateway_server.stats["calls"]
    again = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False)
    assert again.outcome is Outcome.NOTHING_TO_DO and not again.changed and again.actions == []
    assert gateway_server.stats["calls"] == calls  # already queued: the gateway is not even asked
    held = retry_step(run_id="run_live", step_id="st_live", dry_run=False)  # a live worker holds it
    assert held.outcome is Outcome.NOTHING_TO_DO and held.where_before == "pending"
    assert redis.xlen(world.stream) == length + 1


def test_retry_step_of_a_lost_step_is_unchanged_and_not_verified(world, redis, gateway_server):
    with db_engine(world).begin() as conn:  # the database says queued; no stream has it
        steps = runs.tables(world).steps
        conn.execute(sa.update(steps).where(steps.c.id == "st_nowhere").values(status="queued"))
    state = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False, return_state=True)
    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert result.outcome is Outcome.NOT_VERIFIED and result.answer == "already_queued" and not result.changed
    assert _actions(result) == [("retry-steps", ActionStatus.UNCHANGED, 0)] and result.lost_retries == 1
    assert "lost" in result.failed_checks[0].detail
    assert gateway.lost_retries(settings=world, step_ids=["st_nowhere"]) == {"st_nowhere": 1}


def test_retry_step_of_an_unknown_step_is_not_verified(world, gateway_server):
    calls = gateway_server.stats["calls"]
    state = retry_step(run_id="run_nowhere", step_id="st_typo", dry_run=False, return_state=True)
    assert state.is_failed() and state.result(raise_on_failure=False).outcome is Outcome.NOT_VERIFIED
    assert gateway_server.stats["calls"] == calls


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # where the key comes from, not the database
def test_retry_step_reads_the_key_from_a_prefect_secret_block(world, redis):
    name = f"fd-test-gw-{uuid.uuid4().hex[:8]}"
    Secret(value=GATEWAY_KEY).save(name)
    s = world.model_copy(update={"gateway_api_key": None, "gateway_api_key_secret": name})
    with use_settings(s):
        done = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False)
    assert done.outcome is Outcome.RECOVERED and redis.xrange(s.stream)[-1][1]["step_id"] == "st_nowhere"


def test_rejected_key_is_a_clear_failure_and_appears_nowhere(world, redis, caplog):
    wrong = "sk-wrong-" + uuid.uuid4().hex
    s = world.model_copy(update={"gateway_api_key": SecretStr(wrong)})
    caplog.set_level(logging.DEBUG)
    length = redis.xlen(s.stream)
    with use_settings(s):
        state = retry_step(run_id="run_nowhere", step_id="st_nowhere", dry_run=False, return_state=True)
        sweep_state = stuck_runs_sweep(dry_run=False, return_state=True)
    assert state.is_failed() and sweep_state.is_failed() and redis.xlen(s.stream) == length
    results = [state.result(raise_on_failure=False), sweep_state.result(raise_on_failure=False)]
    assert all(r.outcome is Outcome.FAILED for r in results)
    failed = [a for r in results for a in r.actions if a.status is ActionStatus.FAILED]
    assert len(failed) == 2 and all("rejected the API key (HTTP 401)" in a.detail for a in failed)
    # the sweep failed the runs it had to (verified) before the gateway refused
    assert statuses(s)["run_dlq"] == "failed" and results[1].failed_checks == []

    APILogHandler().flush()
    ids = [state.state_details.flow_run_id, sweep_state.state_details.flow_run_id]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
    log_text = "\n".join(entry.message for entry in logs)
    reports = _artifacts(ids[0]) + _artifacts(ids[1])
    assert "rejected the API key" in log_text and "rejected the API key" in reports  # they were captured
    dumps = [r.model_dump_json() for r in results]
    for text in (log_text, reports, caplog.text, *dumps, repr(s), str(state)):
        assert wrong not in text and GATEWAY_KEY not in text
