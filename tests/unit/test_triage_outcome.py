"""Triage's own outcome from its subflows' typed results (pure: no Prefect, no servers)."""

from __future__ import annotations

import pytest

from flows.triage import (
    StepResult,
    TriageResult,
    plan_rows,
    record_step,
    step_action,
    step_parameters,
    step_target,
)
from tasks.correlate import PlanStep
from tasks.outcome import Action, ActionStatus, Outcome

DONE = [Action(kind="rollout-restart", target="deployment/mcp-server", status=ActionStatus.DONE)]


def step(flow: str, outcome: Outcome | None, *, state: str = "completed", acted: bool = True, pod: str = "") -> StepResult:
    failed_state = outcome is not None and outcome.failing
    return StepResult(flow=flow, target=flow + (f" pod/{pod}" if pod else ""), state="failed" if failed_state else state,
                      outcome=outcome, cause="" if outcome in (Outcome.RECOVERED, Outcome.NOTHING_TO_DO) else "why",
                      actions=DONE if acted and outcome not in (Outcome.NOTHING_TO_DO, None) else [])


CRASH_OK = step("worker-crash-recovery", Outcome.RECOVERED, pod="w-1")
CHECK_OK = step("post-recovery-check", Outcome.NOTHING_TO_DO)
CHECK_BAD = step("post-recovery-check", Outcome.NOT_VERIFIED, acted=False)
MCP_UNCURED = step("mcp-server-recovery", Outcome.NOT_VERIFIED)
MCP_RAISED = step("mcp-server-recovery", Outcome.FAILED)
MCP_REFUSED = step("mcp-server-recovery", Outcome.REFUSED, acted=False)
UNTYPED = step("scale-workers", None)


@pytest.mark.parametrize(("steps", "outcome"), [
    ([CRASH_OK, CHECK_OK], Outcome.RECOVERED),
    ([CHECK_OK], Outcome.NOTHING_TO_DO),  # nothing planned but the check, and it holds: not "recovered"
    ([CHECK_BAD], Outcome.NOT_VERIFIED),
    ([CRASH_OK, CHECK_BAD], Outcome.PARTIAL),
    ([MCP_UNCURED, CRASH_OK, CHECK_OK], Outcome.PARTIAL),
    ([MCP_UNCURED, CHECK_BAD], Outcome.NOT_VERIFIED),
    ([MCP_RAISED, CRASH_OK, CHECK_OK], Outcome.FAILED),
    ([MCP_REFUSED, CHECK_OK], Outcome.REFUSED),  # kill switch: refused, like the subflow itself
    ([MCP_REFUSED, CRASH_OK, CHECK_OK], Outcome.PARTIAL),  # the plan was carried out only in part
    ([UNTYPED, CHECK_OK], Outcome.NOT_VERIFIED),  # a result that says nothing verifiable is not green
])
def test_triage_outcome_follows_its_subflows(steps, outcome):
    result = TriageResult(flow="worker-failure-triage", title="t")
    for s in steps:
        record_step(result, s)
    assert result.outcome is outcome
    if any(s.failing for s in steps):  # a failing subflow always fails triage
        assert result.outcome.failing
    assert [c.name for c in result.checks] == [f"{s.flow} verified" for s in steps]
    assert len({c.target for c in result.checks}) == len(steps)


def test_one_action_per_subflow_that_acted_with_its_status_and_the_failing_ones_named():
    result = TriageResult(flow="worker-failure-triage", title="t")
    for s in (MCP_RAISED, CRASH_OK, MCP_REFUSED, CHECK_BAD):
        record_step(result, s)
    assert [(a.kind, a.target, a.status) for a in result.actions] == [
        ("mcp-server-recovery", "mcp-server-recovery", ActionStatus.FAILED),
        ("worker-crash-recovery", "worker-crash-recovery pod/w-1", ActionStatus.DONE),
        ("mcp-server-recovery", "mcp-server-recovery", ActionStatus.REFUSED),
    ]
    assert [s.flow for s in result.failing_steps] == ["mcp-server-recovery", "post-recovery-check"]
    assert [c.ok for c in result.checks] == [False, True, False, False]
    assert result.checks[0].detail == "why" and result.checks[1].detail == "recovered"


def test_step_action_of_a_subflow_that_needed_to_act_but_did_nothing_is_none():
    assert step_action(step("worker-hang-recovery", Outcome.NOT_VERIFIED, acted=False)) is None
    assert step_action(step("worker-hang-recovery", Outcome.NOT_VERIFIED)) is ActionStatus.DONE
    assert step_action(StepResult(flow="x", target="x", state="crashed")) is ActionStatus.FAILED
    assert step_action(StepResult(flow="x", target="x", state="skipped")) is None


def test_parameters_targets_and_plan_rows():
    crash = PlanStep(flow="worker-crash-recovery", parameters={"pod": "w-1"}, why="w-1: oom-killed")
    check = PlanStep(flow="post-recovery-check", why="always")
    extra = {"worker-crash-recovery": {"verify_consuming_s": 0}, "post-recovery-check": {"max_queue_depth": 5}}
    assert step_parameters(crash, extra) == {"pod": "w-1", "verify_consuming_s": 0, "dry_run": False}
    assert step_parameters(check, extra) == {"max_queue_depth": 5}  # read-only: no dry_run forced on it
    assert step_target(crash) == "worker-crash-recovery pod/w-1" and step_target(check) == "post-recovery-check"
    assert plan_rows([crash, check]) == [
        {"#": 1, "flow": "worker-crash-recovery", "parameters": "pod=w-1", "why": "w-1: oom-killed"},
        {"#": 2, "flow": "post-recovery-check", "parameters": "", "why": "always"},
    ]
