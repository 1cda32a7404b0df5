"""`worker-failure-triage`: "something is wrong" — observe everything once, plan, run the right recoveries.

Observes once: worker pods (diagnosed) joined with their consumers, the queue, runs stuck in `running`, the
MCP server's health and recent LLM step failures per model. A pure planner (`tasks.correlate.plan_triage`)
picks which recovery flows apply and in which order — dependencies the workers need first (MCP, LLM), then
crashed workers, hung suspects, capacity, stuck runs — and always ends with `post-recovery-check`. The plan is
published first (and with `dry_run` it is the only thing that happens); then each step runs as a subflow.
"""

from __future__ import annotations

import importlib
import inspect
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows._ui import describe_parameters
from tasks import runs
from tasks.correlate import PlanStep, TriageObservation, plan_triage
from tasks.errors import RETRY
from tasks.probes import check_mcp_health
from tasks.recovery import observe_workers
from tasks.report import Report, artifact_key, markdown_table
from tasks.settings import Settings, get_settings

FLOW_NAME = "worker-failure-triage"

# flow name -> "module:function" of the recovery it runs (the entrypoints of prefect.yaml)
FLOWS: dict[str, str] = {
    "mcp-server-recovery": "flows.mcp_recovery:mcp_server_recovery",
    "llm-provider-failover": "flows.llm_failover:llm_provider_failover",
    "worker-crash-recovery": "flows.worker_crash:worker_crash_recovery",
    "worker-hang-recovery": "flows.worker_hang:worker_hang_recovery",
    "scale-workers": "flows.scale_workers:scale_workers",
    "stuck-runs-sweep": "flows.stuck_runs:stuck_runs_sweep",
    "post-recovery-check": "flows.post_recovery_check:post_recovery_check",
}


def _run_name() -> str:
    alert = flow_run.parameters.get("alertname") or "manual"
    return f"triage {alert}" + (" (dry run)" if flow_run.parameters.get("dry_run", True) else "")


class StepResult(BaseModel):
    flow: str
    parameters: dict[str, Any]
    status: str
    summary: str = ""


class TriageResult(BaseModel):
    dry_run: bool
    plan: list[PlanStep]
    steps: list[StepResult] = Field(default_factory=list)
    report: str = ""


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


def _load(flow_name: str) -> Any:
    module, _, attr = FLOWS[flow_name].partition(":")
    return getattr(importlib.import_module(module), attr)


def split_parameters(fn: Any, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The parameters a recovery flow accepts, and the names it does not (reported, never passed)."""
    accepted = inspect.signature(fn.fn).parameters
    return {k: v for k, v in params.items() if k in accepted}, sorted(k for k in params if k not in accepted)


def _summary(value: Any) -> str:
    for attr in ("outcome", "status"):
        if isinstance(getattr(value, attr, None), str):
            return getattr(value, attr)
    report = getattr(value, "report", None)
    if isinstance(report, str):
        line = next((ln for ln in report.splitlines() if ln.startswith("Outcome:")), "")
        return line.replace("Outcome:", "").split("·")[0].strip().strip("*")
    return type(value).__name__


@flow(name=FLOW_NAME, flow_run_name=_run_name)
@describe_parameters
def worker_failure_triage(
    dry_run: Annotated[bool, Field(description="Only publish the plan; run nothing.")] = True,
    alertname: Annotated[str | None, Field(max_length=200, description="The alert that started this, if any.")] = None,
    check_mcp: Annotated[bool, Field(description="Health-check the MCP server.")] = True,
    check_llm: Annotated[bool, Field(description="Look at recent LLM step failures per model.")] = True,
    stuck_older_than_minutes: Annotated[int, Field(ge=1, le=10_080, description="Runs `running` longer are stuck.")] = 30,
    hang_min_idle_ms: Annotated[int | None, Field(ge=0, description="Hang suspect: consumer silent this long.")] = None,
    backlog_threshold: Annotated[int | None, Field(ge=0, description="Lag above which to add workers.")] = None,
    subflow_parameters: Annotated[
        dict[str, dict[str, Any]] | None,
        Field(description="Extra parameters per planned flow, e.g. {\"worker-hang-recovery\": {\"samples\": 3}}."),
    ] = None,
    stop_on_failure: Annotated[bool, Field(description="Stop the plan at the first failing step.")] = False,
) -> TriageResult:
    """Observe pods, queue, runs, MCP and LLM once; plan the recoveries; publish the plan; run it."""
    settings = get_settings()
    log = get_run_logger()
    report = Report(title="Worker failure triage" + (f" for {alertname}" if alertname else "") + (" (dry run)" if dry_run else ""))
    obs = observe(settings=settings, check_mcp=check_mcp, check_llm=check_llm, stuck_minutes=stuck_older_than_minutes)
    report.table("Observed", [
        {"signal": "worker pods", "value": sum(1 for lnk in obs.links if lnk.pod_state)},
        {"signal": "Ready workers", "value": obs.ready_workers},
        {"signal": "consumers without a pod", "value": sum(1 for lnk in obs.links if not lnk.pod_state)},
        {"signal": "queue lag / pending", "value": f"{obs.lag} / {obs.pending}"},
        {"signal": f"runs running > {stuck_older_than_minutes} min", "value": obs.stuck_runs},
        {"signal": "MCP healthy", "value": obs.mcp_healthy if obs.mcp_healthy is not None else "not checked"},
        {"signal": "LLM models failing", "value": ", ".join(obs.llm_failing_models) or "none"},
    ])
    plan = plan_triage(
        obs=obs, consumer_for_pod=settings.consumer_for_pod,
        hang_min_idle_ms=settings.hang_min_idle_ms if hang_min_idle_ms is None else hang_min_idle_ms,
        hang_max_cpu_millicores=settings.hung_cpu_millicores,
        backlog_threshold=settings.triage_backlog_threshold if backlog_threshold is None else backlog_threshold,
        max_replicas=settings.max_replicas,
    )
    plan_rows = [{"#": i + 1, "flow": s.flow, "parameters": s.parameters or "", "why": s.why} for i, s in enumerate(plan)]
    report.table("Decided", plan_rows, caption="Plan")
    create_markdown_artifact(key=artifact_key(f"{FLOW_NAME}-plan"), markdown="# Triage plan\n\n" + markdown_table(plan_rows),
                             description="What triage will run, in order, and why")
    result = TriageResult(dry_run=dry_run, plan=plan)
    if dry_run:
        report.add("Done", "Dry run: the plan above was only shown; nothing ran.")
        report.outcome = "plan only (dry run)"
        result.report = report.publish(key=FLOW_NAME)
        return result

    extra = subflow_parameters or {}
    failed = False
    for step in plan:
        params: dict[str, Any] = {**step.parameters, **extra.get(step.flow, {})}
        if step.flow != "post-recovery-check":
            params.setdefault("dry_run", False)
        if failed and stop_on_failure and step.flow != "post-recovery-check":
            result.steps.append(StepResult(flow=step.flow, parameters=params, status="skipped", summary="an earlier step failed"))
            continue
        try:
            fn = _load(step.flow)
            params, dropped = split_parameters(fn, params)
            value = fn(**params)
        except Exception as e:  # noqa: BLE001 - one failing recovery must not hide the rest; reported below
            failed = True
            log.warning("triage step %s failed: %s", step.flow, type(e).__name__)
            result.steps.append(StepResult(flow=step.flow, parameters=params, status="failed",
                                           summary=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        note = f" (ignored unknown parameters: {', '.join(dropped)})" if dropped else ""
        result.steps.append(StepResult(flow=step.flow, parameters=params, status="completed",
                                       summary=_summary(value) + note))
    report.table("Done", [s.model_dump() for s in result.steps], caption="Subflows")
    final = result.steps[-1] if result.steps else None
    report.add("Verified", f"post-recovery-check: {final.summary if final else 'not run'}")
    report.outcome = "completed with failures" if failed else "completed"
    result.report = report.publish(key=FLOW_NAME)
    return result
