"""`worker-failure-triage`: "something is wrong" — observe everything once, plan, run the right recoveries.

Observes once: worker pods (diagnosed) joined with their consumers, the queue, runs stuck in `running`, the
MCP server's health and recent LLM step failures per model. A pure planner (`tasks.correlate.plan_triage`)
picks which recovery flows apply and in which order — dependencies the workers need first (MCP, LLM), then
crashed workers, hung suspects, capacity, stuck runs — and always ends with `post-recovery-check`. The plan is
published first (and with `dry_run` it is the only thing that happens); then each step runs as a subflow, the
rest still running when one fails. Triage reads each subflow's typed result from its final state (never its
report): one action per subflow that acted and one check per subflow ("<flow> verified"), so its own outcome
is ``partial``/``not_verified``/``failed`` — and the run Failed — when any subflow's is, or a subflow ended
Failed. Last (unless ``timeline`` is off), `incident-timeline` assembles the incident of this run — alerts,
watcher events, each subflow's actions and checks, MTTR, counts, root-cause hints — as its own report and a
postmortem markdown file; its link and summary are in triage's result. It is read-only and never changes
triage's outcome.
"""

from __future__ import annotations

import importlib
import inspect
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows._ui import LoggedResult, Setting, describe_parameters, keep_typed_name, setting
from flows.incident_timeline import FLOW_NAME as TIMELINE
from flows.incident_timeline import TimelineSummary, incident_timeline, summarize
from tasks import runs
from tasks.correlate import PlanStep, TriageObservation, plan_triage
from tasks.errors import RETRY
from tasks.outcome import Action, ActionStatus, Outcome, RecoveryResult, Table
from tasks.probes import check_mcp_health
from tasks.recovery import observe_workers
from tasks.report import artifact_key, conclude, recording, scrub
from tasks.settings import Settings, get_settings

FLOW_NAME = "worker-failure-triage"
POST_CHECK = "post-recovery-check"
COMPLETED, SKIPPED = "completed", "skipped"

# flow name -> "module:function" of the recovery it runs (the entrypoints of prefect.yaml)
FLOWS: dict[str, str] = {
    "mcp-server-recovery": "flows.mcp_recovery:mcp_server_recovery",
    "llm-provider-failover": "flows.llm_failover:llm_provider_failover",
    "worker-crash-recovery": "flows.worker_crash:worker_crash_recovery",
    "worker-hang-recovery": "flows.worker_hang:worker_hang_recovery",
    "scale-workers": "flows.scale_workers:scale_workers",
    "stuck-runs-sweep": "flows.stuck_runs:stuck_runs_sweep",
    POST_CHECK: "flows.post_recovery_check:post_recovery_check",
}


def _run_name() -> str:
    alert = flow_run.parameters.get("alertname") or "manual"
    return f"triage {alert}" + (" (dry run)" if flow_run.parameters.get("dry_run", True) else "")


class StepResult(BaseModel):
    """One planned subflow: how its run ended and, when it returned one, its typed outcome (never its report)."""

    flow: str
    target: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    ignored_parameters: list[str] = Field(default_factory=list)
    state: str = Field(description="The subflow run's Prefect state type (completed, failed, crashed, cancelled) "
                                   "or skipped (stop_on_failure).")
    outcome: Outcome | None = Field(None, description="The subflow's typed outcome; failed when it raised; "
                                                      "None when skipped or it returned no typed result.")
    cause: str = ""
    actions: list[Action] = Field(default_factory=list, description="What the subflow did (its own actions).")
    flow_run_id: str | None = None

    @property
    def failing(self) -> bool:
        """The subflow ended Failed (or crashed, was cancelled) or its outcome is a failing one."""
        return self.state not in (COMPLETED, SKIPPED) or (self.outcome is not None and self.outcome.failing)


class TriageResult(LoggedResult):
    """The plan triage made from one observation, and how each planned subflow ended."""

    alertname: str | None = None
    plan: list[PlanStep] = Field(default_factory=list)
    steps: list[StepResult] = Field(default_factory=list)
    timeline: TimelineSummary | None = Field(None, description="The incident timeline of this run (last step).")

    @property
    def failing_steps(self) -> list[StepResult]:
        return [s for s in self.steps if s.failing]


@task(name="observe-llm-failures", **RETRY)
def failing_models(*, settings: Settings) -> list[str]:
    """Models whose recent LLM steps fail at or above the failover error rate (with enough samples)."""
    since = datetime.now(UTC) - timedelta(minutes=settings.llm_failure_window_minutes)
    stats = runs.llm_failures_by_model(settings=settings, since=since)
    return sorted(
        m for m, s in stats.items()
        if s["total"] >= settings.llm_failover_min_samples and s["failed"] / s["total"] >= settings.llm_failover_error_rate
    )


def observe(*, settings: Settings, check_mcp: bool, check_llm: bool, stuck_minutes: int) -> TriageObservation:
    """Everything once: pods + consumers + queue, stuck runs, MCP health, LLM failures."""
    view = observe_workers(settings=settings)
    cutoff = datetime.now(UTC) - timedelta(minutes=stuck_minutes)
    stuck = runs.count_stuck_runs(settings=settings, cutoff=cutoff)
    mcp = check_mcp_health(settings=settings, attempts=settings.mcp_check_attempts,
                           interval_s=settings.mcp_check_interval_s).healthy if check_mcp else None
    llm = failing_models(settings=settings) if check_llm else []
    return TriageObservation(links=view.links, lag=int(view.snapshot.lag or 0), pending=view.snapshot.pending,
                             stuck_runs=stuck, mcp_healthy=mcp, llm_failing_models=llm,
                             ready_workers=view.ready_workers)


def observation_rows(obs: TriageObservation, *, stuck_minutes: int) -> list[dict[str, Any]]:
    """Pure: what triage saw, one signal a row."""
    mcp = {True: "yes", False: "no", None: "not checked"}[obs.mcp_healthy]
    return [
        {"signal": "worker pods", "value": sum(1 for lnk in obs.links if lnk.pod_state)},
        {"signal": "Ready workers", "value": obs.ready_workers},
        {"signal": "consumers without a pod", "value": sum(1 for lnk in obs.links if not lnk.pod_state)},
        {"signal": "queue lag / pending", "value": f"{obs.lag} / {obs.pending}"},
        {"signal": f"runs running > {stuck_minutes} min", "value": obs.stuck_runs},
        {"signal": "MCP healthy", "value": mcp},
        {"signal": "LLM models failing", "value": ", ".join(obs.llm_failing_models) or "none"},
    ]


def _joined(parameters: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in parameters.items())


def plan_rows(plan: list[PlanStep]) -> list[dict[str, Any]]:
    """Pure: the plan, one step a row (parameters joined, no Python reprs)."""
    return [{"#": i + 1, "flow": s.flow, "parameters": _joined(s.parameters), "why": s.why} for i, s in enumerate(plan)]


def step_target(step: PlanStep) -> str:
    """Pure: what one step is about — the flow, and its pod when it has one (unique within a plan)."""
    pod = step.parameters.get("pod")
    return f"{step.flow} pod/{pod}" if pod else step.flow


def step_parameters(step: PlanStep, extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pure: the planned parameters, the caller's extras for that flow, and ``dry_run=False`` for recoveries."""
    params: dict[str, Any] = {**step.parameters, **extra.get(step.flow, {})}
    if step.flow != POST_CHECK:
        params.setdefault("dry_run", False)
    return params


_ACTION_FOR = {Outcome.RECOVERED: ActionStatus.DONE, Outcome.PARTIAL: ActionStatus.DONE,
               Outcome.FAILED: ActionStatus.FAILED, Outcome.REFUSED: ActionStatus.REFUSED,
               Outcome.DRY_RUN: ActionStatus.DRY_RUN}


def step_action(step: StepResult) -> ActionStatus | None:
    """Pure: the status of triage's action for one subflow, from the subflow's outcome; None when it acted on
    nothing (nothing to do, a read-only check, skipped), so only its check speaks for it."""
    if step.state == SKIPPED:
        return None
    if step.outcome is None:
        return None if step.state == COMPLETED else ActionStatus.FAILED
    if step.outcome is Outcome.NOT_VERIFIED:  # acted and could not verify, or needed to act and could not
        acted = any(a.status in (ActionStatus.DONE, ActionStatus.UNCHANGED) for a in step.actions)
        return ActionStatus.DONE if acted else None
    return _ACTION_FOR.get(step.outcome)


def step_verified(step: StepResult) -> bool:
    """Pure: the subflow ended Completed with a green outcome (recovered or nothing to do)."""
    return step.state == COMPLETED and step.outcome in (Outcome.RECOVERED, Outcome.NOTHING_TO_DO)


def record_step(result: TriageResult, step: StepResult) -> None:
    """Add one subflow to triage's result: the step, its action (if it acted) and its check."""
    result.steps.append(step)
    shown = {k: v for k, v in step.parameters.items() if k != "dry_run"}
    ignored = f"ignored parameters: {', '.join(step.ignored_parameters)}" if step.ignored_parameters else ""
    status = step_action(step)
    if status is not None:
        result.act(step.flow, step.target, status, detail="; ".join(x for x in (_joined(shown), ignored) if x))
    verified = step_verified(step)
    outcome = step.outcome.value if step.outcome else step.state
    result.check(f"{step.flow} verified", verified, outcome if verified else step.cause or outcome, target=step.target)


def _load(flow_name: str) -> Any:
    module, _, attr = FLOWS[flow_name].partition(":")
    return getattr(importlib.import_module(module), attr)


def split_parameters(fn: Any, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The parameters a recovery flow accepts, and the names it does not (reported, never passed)."""
    accepted = inspect.signature(fn.fn).parameters
    return {k: v for k, v in params.items() if k in accepted}, sorted(k for k in params if k not in accepted)


def run_step(step: PlanStep, params: dict[str, Any]) -> StepResult:
    """Run one planned recovery as a subflow and read its typed result from its final state; a subflow that
    raised (or could not start) is a failed step, never an exception here."""
    done = StepResult(flow=step.flow, target=step_target(step), parameters=params, state="failed")
    try:
        fn = _load(step.flow)
        accepted, done.ignored_parameters = split_parameters(fn, params)
        state = fn(**accepted, return_state=True)
        done.state, done.flow_run_id = state.type.value.lower(), str(state.state_details.flow_run_id)
        value = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - one failing recovery must not stop the rest; it is recorded
        value = e
    if isinstance(value, RecoveryResult):
        done.outcome, done.cause, done.actions = value.outcome, scrub(value.cause()), list(value.actions)
    elif isinstance(value, BaseException):
        done.outcome, done.cause = Outcome.FAILED, f"{type(value).__name__}: {scrub(str(value))[:300]}"
    else:
        done.cause = f"returned no typed result ({type(value).__name__}): cannot tell what it verified"
    if done.failing:
        get_run_logger().warning("triage step %s ended %s: %s", step.flow, done.state, done.cause)
    return done


def run_timeline(result: TriageResult, params: dict[str, Any]) -> None:
    """Last step: the incident timeline of this triage run, as a subflow; its link and summary go into the
    result (a note, never a check: it documents the incident and does not change triage's outcome)."""
    accepted, ignored = split_parameters(incident_timeline, {"flow_run_id": flow_run.get_id(), **params})
    try:
        result.timeline = summarize(incident_timeline(**accepted, return_state=True))
    except Exception as e:  # noqa: BLE001 - a timeline that cannot be assembled leaves the recovery as it is
        result.timeline = TimelineSummary(summary=f"not assembled: {type(e).__name__}: {scrub(str(e))[:300]}")
    t = result.timeline
    where = f"; file `{t.markdown_path}`" if t.markdown_path else ""
    link = f"; run {t.link}" if t.link else ""
    ignored_text = f" (ignored parameters: {', '.join(ignored)})" if ignored else ""
    result.note("observed", f"Incident timeline: {t.summary}{where}{link}{ignored_text}.")
    if t.outcome is None or t.outcome.failing:
        get_run_logger().warning("incident timeline: %s", t.summary)


@flow(name=FLOW_NAME, flow_run_name=keep_typed_name(_run_name))
@describe_parameters
def worker_failure_triage(
    dry_run: Annotated[bool, Field(title="Dry run", description="Only publish the plan; run nothing.")] = True,
    alertname: Annotated[str | None, Field(max_length=200, title="Alert name",
                                           description="The alert that started this, if any.")] = None,
    check_mcp: Annotated[bool, Field(title="Check the MCP server", description="Health-check the MCP server.")] = True,
    check_llm: Annotated[bool, Field(title="Check LLM failures",
                                     description="Look at recent LLM step failures per model.")] = True,
    stuck_older_than_minutes: Annotated[int, Field(ge=1, le=10_080, title="Runs stuck after (min)",
                                                   description="Runs `running` longer than this are stuck.")] = 30,
    hang_min_idle_ms: Annotated[int | None, Field(ge=0, title="Hang suspect after (ms)",
                                                  description="A consumer silent this long while holding entries "
                                                  "is a hang suspect."), Setting("hang_min_idle_ms")] = None,
    backlog_threshold: Annotated[int | None, Field(ge=0, title="Add workers above (steps)",
                                                   description="Lag above which triage plans a scale-up."),
                                 Setting("triage_backlog_threshold")] = None,
    subflow_parameters: Annotated[
        dict[str, dict[str, Any]] | None,
        Field(title="Parameters per planned flow",
              description="Extra parameters per planned flow, e.g. {\"worker-hang-recovery\": {\"samples\": 3}}; "
                          "also for the last step, e.g. {\"incident-timeline\": {\"lookback_minutes\": 5}}."),
    ] = None,
    stop_on_failure: Annotated[bool, Field(title="Stop on failure",
                                           description="Stop the plan at the first failing step.")] = False,
    timeline: Annotated[bool, Field(title="Incident timeline", description="End with the incident timeline of this "
                                    "run (report and postmortem markdown file).")] = True,
) -> TriageResult:
    """Observe pods, queue, runs, MCP and LLM once; plan the recoveries; publish the plan; run every step."""
    settings = get_settings()
    title = "Worker failure triage" + (f" for {alertname}" if alertname else "") + (" (dry run)" if dry_run else "")
    with recording(TriageResult(flow=FLOW_NAME, title=title, dry_run=dry_run, alertname=alertname)) as result:
        # observe
        obs = observe(settings=settings, check_mcp=check_mcp, check_llm=check_llm, stuck_minutes=stuck_older_than_minutes)
        result.note("observed", Table(rows=observation_rows(obs, stuck_minutes=stuck_older_than_minutes)))
        # decide (pure), and publish the plan before anything runs
        result.plan = plan_triage(
            obs=obs, consumer_for_pod=settings.consumer_for_pod,
            hang_min_idle_ms=setting(hang_min_idle_ms, settings, "hang_min_idle_ms"),
            hang_max_cpu_millicores=settings.hung_cpu_millicores,
            backlog_threshold=setting(backlog_threshold, settings, "triage_backlog_threshold"),
            max_replicas=settings.max_replicas,
        )
        rows = plan_rows(result.plan)
        result.note("decided", Table(caption="Plan", rows=rows))
        create_table_artifact(key=artifact_key(f"{FLOW_NAME}-plan"), table=rows,
                              description="What triage will run, in order, and why")
        if dry_run:
            for step in result.plan:
                result.act(step.flow, step_target(step), ActionStatus.DRY_RUN, detail=step.why)
            return conclude(result)
        # act + verify: each subflow in turn, the rest still run when one fails; its typed result is the check
        extra = subflow_parameters or {}
        for step in result.plan:
            params = step_parameters(step, extra)
            if stop_on_failure and result.failing_steps and step.flow != POST_CHECK:
                record_step(result, StepResult(flow=step.flow, target=step_target(step), parameters=params,
                                               state=SKIPPED, cause="skipped: an earlier step failed (stop_on_failure)"))
                continue
            record_step(result, run_step(step, params))
        if timeline:
            run_timeline(result, extra.get(TIMELINE, {}))
    return conclude(result)
