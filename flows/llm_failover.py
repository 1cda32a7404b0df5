"""Runbook "LLM Provider Outage": fail the workers over to a healthy model, and back once the primary recovers.

``llm-provider-failover`` (alert-started): observe the workers' ``LITELLM_MODEL``, recent LLM step failures per
model (runs database) and the providers' status pages -> decide (``tasks.llm_policy``) whether the current
model is down and which fallback is the first healthy one -> set it on Deployment ``worker`` through the guard
(kill switch, dry run, cooldown, budget: at most one model switch per 15 minutes) -> wait for the rollout ->
record the active model in a Prefect Variable -> verify -> report.

``llm-provider-failback`` (scheduled): while the workers run a fallback, remember since when the primary
looks healthy (a Prefect Variable); once that lasts ``healthy_for_minutes``, switch back the same guarded way.
Failover and failback share one cooldown and one budget, so the model cannot flap.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.variables import Variable
from pydantic import BaseModel, Field

from tasks import kube
from tasks.errors import RETRY
from tasks.events import emit_recovery_event
from tasks.guard import Verdict, check, llm_failover_budget
from tasks.llm_policy import (
    FailbackDecision,
    FailoverDecision,
    ModelHealth,
    Thresholds,
    as_failure_stats,
    assess_model,
    decide_failback,
    decide_failover,
    provider_of,
    validate_chain,
)
from tasks.probes import ProviderStatus, provider_statuses
from tasks.report import Report
from tasks.runs import llm_failures_by_model
from tasks.settings import Settings, get_settings

SWITCH_ACTION = "set-llm-model"  # one cooldown key for failover and failback: no flapping

EvidenceParam = Literal["any", "both", "failures", "status"]


class ModelSwitch(BaseModel):
    """What a failover/failback run did: the decision, the guard's verdict, the change and its verification."""

    flow: str
    action: str
    current: str | None
    target: str | None = None
    reason: str
    dry_run: bool
    verdict: str | None = None
    changed: bool = False
    rollout_complete: bool | None = None
    model_after: str | None = None
    verified: bool | None = None
    healthy_since: datetime | None = None


@task(
    name="count-llm-failures",
    **RETRY,
)
def count_llm_failures(*, settings: Settings, since: datetime) -> dict[str, Any]:
    """Finished-or-running LLM steps and failures per model since ``since`` (one GROUP BY in the runs DB)."""
    return dict(llm_failures_by_model(settings=settings, since=since))


@task(name="record-active-model", cache_policy=NO_CACHE)
def record_active_model(*, settings: Settings, model: str) -> None:
    """Remember the model the workers now use (Prefect Variable ``settings.llm_active_model_variable``)."""
    Variable.set(settings.llm_active_model_variable, model, overwrite=True)


@task(name="remember-primary-healthy-since", cache_policy=NO_CACHE)
def remember_healthy_since(*, settings: Settings, since: datetime | None) -> None:
    """Store (or forget, with None) since when the primary model looks healthy."""
    name = settings.llm_healthy_since_variable
    if since is None:
        if Variable.get(name, default=None) is not None:
            Variable.unset(name)
    else:
        Variable.set(name, since.astimezone(UTC).isoformat(), overwrite=True)


def read_healthy_since(*, settings: Settings) -> datetime | None:
    """The remembered "primary healthy since" (None when unset or unreadable)."""
    raw = Variable.get(settings.llm_healthy_since_variable, default=None)
    if not isinstance(raw, str):
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "forgotten"


def _thresholds(
    settings: Settings, min_samples: int | None, error_rate: float | None, evidence: str | None
) -> Thresholds:
    return Thresholds(
        min_samples=min_samples or settings.llm_failover_min_samples,
        max_error_rate=error_rate or settings.llm_failover_error_rate,
        evidence=evidence or settings.llm_failover_evidence,
    )


def observe_models(
    *, settings: Settings, models: list[str], window: timedelta, thresholds: Thresholds
) -> dict[str, ModelHealth]:
    """Failures per model in the window plus each provider's status page, judged per model."""
    failures = as_failure_stats(count_llm_failures(settings=settings, since=datetime.now(UTC) - window))
    statuses: dict[str, ProviderStatus] = provider_statuses(
        settings=settings, providers=[provider_of(m) for m in models]
    )
    return {
        m: assess_model(model=m, failures=failures, statuses=statuses, thresholds=thresholds) for m in models
    }


def health_rows(health: dict[str, ModelHealth], current: str | None) -> list[dict[str, Any]]:
    return [
        {
            "model": h.model + (" (current)" if h.model == current else ""),
            "failed / total": f"{h.failed} / {h.total}",
            "error rate": f"{h.error_rate:.0%}" if h.error_rate is not None else "-",
            "status page": h.indicator,
            "down": "yes" if h.down else "no",
            "usable as fallback": "yes" if h.clean else "no",
        }
        for h in health.values()
    ]


def switch_model(
    *,
    settings: Settings,
    report: Report,
    result: ModelSwitch,
    target: str,
    dry_run: bool,
    rollout_timeout_s: float,
    event: str,
) -> bool:
    """Guarded ``kubectl set env deployment/worker LITELLM_MODEL=<target>``, rollout wait, record, verify."""
    deployment = settings.worker_deployment
    verdict: Verdict = check(
        action=SWITCH_ACTION,
        target=f"deployment/{deployment}",
        dry_run=dry_run,
        settings=settings,
        budget=llm_failover_budget(settings),
    )
    result.verdict = verdict.reason
    if not verdict.allowed:
        report.outcome = "dry run" if verdict.dry_run else "refused"
        report.add("Done", f"Nothing changed — {verdict.reason} (`{settings.llm_model_env}={target}`).")
        return False
    env = kube.set_deployment_env(
        settings=settings,
        deployment=deployment,
        container=settings.worker_container,
        name=settings.llm_model_env,
        value=target,
        dry_run=False,
    )
    result.changed = env.changed
    report.add(
        "Done",
        f"Set `{settings.llm_model_env}={target}` on Deployment `{deployment}` "
        f"(was `{env.previous}`, changed: {env.changed}).",
    )
    rollout = kube.wait_for_rollout(settings=settings, deployment=deployment, timeout_s=rollout_timeout_s)
    result.rollout_complete = bool(rollout.complete)
    report.add("Done", f"Rollout of `{deployment}`: {rollout.message}.")
    record_active_model(settings=settings, model=target)
    report.add("Done", f"Recorded the active model in Prefect Variable `{settings.llm_active_model_variable}`.")
    emit_recovery_event(
        action=event,
        resource_id=f"deployment.{settings.namespace}.{deployment}",
        payload={"from": result.current, "to": target, "reason": result.reason},
    )
    after = kube.get_deployment_env(
        settings=settings, deployment=deployment, container=settings.worker_container, name=settings.llm_model_env
    )
    result.model_after = after
    result.verified = after == target and bool(rollout.complete)
    report.add(
        "Verified",
        f"Deployment `{deployment}` now has `{settings.llm_model_env}={after}`; rollout complete: "
        f"{bool(rollout.complete)} -> {'OK' if result.verified else 'NOT VERIFIED'}.",
    )
    if not result.verified:
        report.outcome = "not verified"
    return True


@flow(
    name="llm-provider-failover",
    flow_run_name="llm-failover dry_run={dry_run}",
    description="Runbook 'LLM Provider Outage': switch LITELLM_MODEL on the workers to the first healthy "
    "fallback when the current model is down (step failures and/or status pages).",
)
def llm_provider_failover(
    dry_run: Annotated[bool, Field(description="Only show what would change.")] = True,
    window_minutes: Annotated[int | None, Field(ge=1, le=1440, description="Failure window.")] = None,
    min_samples: Annotated[int | None, Field(ge=1, le=1_000_000, description="Min LLM steps.")] = None,
    error_rate: Annotated[float | None, Field(gt=0, le=1, description="Down at this error rate.")] = None,
    evidence: Annotated[EvidenceParam | None, Field(description="What proves the model down.")] = None,
    rollout_timeout_s: Annotated[float | None, Field(gt=0, le=3600, description="Rollout wait.")] = None,
) -> ModelSwitch:
    """Fail the workers over to the first healthy LLM model of the fallback chain when the current one is down.

    Args:
        dry_run: Only observe, decide and report what would change; change nothing anywhere.
        window_minutes: Judge models on LLM steps of the last N minutes (default FD_LLM_FAILURE_WINDOW_MINUTES).
        min_samples: Fewest LLM steps of a model in the window before its error rate counts
            (default FD_LLM_FAILOVER_MIN_SAMPLES).
        error_rate: Error rate (failed/total) at or above which a model is down (default FD_LLM_FAILOVER_ERROR_RATE).
        evidence: `any` (failures or status page), `both`, `failures` or `status` (default FD_LLM_FAILOVER_EVIDENCE).
        rollout_timeout_s: How long to wait for the workers' rollout (default FD_ROLLOUT_TIMEOUT_S).
    """
    settings = get_settings()
    chain = validate_chain(list(settings.llm_fallback_models))
    thresholds = _thresholds(settings, min_samples, error_rate, evidence)
    window = timedelta(minutes=window_minutes or settings.llm_failure_window_minutes)
    report = Report(title="LLM provider failover" + (" (dry run)" if dry_run else ""))

    current = kube.get_deployment_env(
        settings=settings,
        deployment=settings.worker_deployment,
        container=settings.worker_container,
        name=settings.llm_model_env,
    )
    models = chain + ([current] if current and current not in chain else [])
    health = observe_models(settings=settings, models=models, window=window, thresholds=thresholds)
    report.add(
        "Observed",
        f"Deployment `{settings.worker_deployment}` runs `{settings.llm_model_env}={current}`. Evidence over the "
        f"last {window.total_seconds() / 60:g} min (min {thresholds.min_samples} steps, down at "
        f">= {thresholds.max_error_rate:.0%} errors or status major/critical; mode `{thresholds.evidence}`):",
    )
    report.table("Observed", health_rows(health, current))

    decision: FailoverDecision = decide_failover(current=current, chain=chain, health=health)
    result = ModelSwitch(
        flow="llm-provider-failover",
        action=decision.action,
        current=current,
        target=decision.target,
        reason=decision.reason,
        dry_run=dry_run,
    )
    report.add("Decided", f"**{decision.action}**: {decision.reason}.")
    if decision.action == "failover" and decision.target:
        switch_model(
            settings=settings,
            report=report,
            result=result,
            target=decision.target,
            dry_run=dry_run,
            rollout_timeout_s=rollout_timeout_s or settings.rollout_timeout_s,
            event="llm-failover",
        )
    else:
        report.add("Done", "Nothing to do.")
        if decision.action == "no-fallback":
            report.outcome = "no healthy fallback"
            report.add("Verified", "The workers stay on a model that is down: a human must decide.")
        else:
            report.add("Verified", f"The workers stay on `{current}`.")
    report.publish(key="llm-provider-failover")
    get_run_logger().info("llm-provider-failover: %s (%s)", decision.action, report.outcome)
    return result


@flow(
    name="llm-provider-failback",
    flow_run_name="llm-failback dry_run={dry_run}",
    description="Scheduled: return the workers to the primary LLM model once it has been healthy long enough.",
)
def llm_provider_failback(
    dry_run: Annotated[bool, Field(description="Only show what would change.")] = True,
    healthy_for_minutes: Annotated[int | None, Field(ge=0, le=1440, description="Healthy this long.")] = None,
    window_minutes: Annotated[int | None, Field(ge=1, le=1440, description="Failure window.")] = None,
    min_samples: Annotated[int | None, Field(ge=1, le=1_000_000, description="Min LLM steps.")] = None,
    error_rate: Annotated[float | None, Field(gt=0, le=1, description="Down at this error rate.")] = None,
    rollout_timeout_s: Annotated[float | None, Field(gt=0, le=3600, description="Rollout wait.")] = None,
) -> ModelSwitch:
    """Return the workers to the primary LLM model once it has been positively healthy for a while.

    Args:
        dry_run: Only observe, decide and report; change nothing anywhere (not even the "healthy since" memory).
        healthy_for_minutes: The primary must look healthy this long first (default FD_LLM_HEALTHY_FOR_MINUTES).
        window_minutes: Judge the primary on LLM steps of the last N minutes (default FD_LLM_FAILURE_WINDOW_MINUTES).
        min_samples: Fewest LLM steps before an error rate counts (default FD_LLM_FAILOVER_MIN_SAMPLES).
        error_rate: Error rate at or above which the primary is still down (default FD_LLM_FAILOVER_ERROR_RATE).
        rollout_timeout_s: How long to wait for the workers' rollout (default FD_ROLLOUT_TIMEOUT_S).
    """
    settings = get_settings()
    chain = validate_chain(list(settings.llm_fallback_models))
    primary = chain[0]
    thresholds = _thresholds(settings, min_samples, error_rate, None)
    window = timedelta(minutes=window_minutes or settings.llm_failure_window_minutes)
    healthy_for = timedelta(
        minutes=settings.llm_healthy_for_minutes if healthy_for_minutes is None else healthy_for_minutes
    )
    report = Report(title="LLM provider failback" + (" (dry run)" if dry_run else ""))

    current = kube.get_deployment_env(
        settings=settings,
        deployment=settings.worker_deployment,
        container=settings.worker_container,
        name=settings.llm_model_env,
    )
    since = read_healthy_since(settings=settings)
    health = observe_models(settings=settings, models=[primary], window=window, thresholds=thresholds)[primary]
    report.add(
        "Observed",
        f"Deployment `{settings.worker_deployment}` runs `{settings.llm_model_env}={current}`; primary is "
        f"`{primary}`; remembered healthy since: {since.isoformat() if since else 'never'}.",
    )
    report.table("Observed", health_rows({primary: health}, current))

    decision: FailbackDecision = decide_failback(
        current=current,
        primary=primary,
        primary_health=health,
        healthy_since=since,
        now=datetime.now(UTC),
        healthy_for=healthy_for,
    )
    result = ModelSwitch(
        flow="llm-provider-failback",
        action=decision.action,
        current=current,
        target=primary if decision.action == "failback" else None,
        reason=decision.reason,
        dry_run=dry_run,
        healthy_since=decision.healthy_since,
    )
    report.add("Decided", f"**{decision.action}**: {decision.reason}.")
    if dry_run:
        report.add("Done", "Dry run: the \"healthy since\" memory is left as it was.")
    elif decision.healthy_since != since:
        remember_healthy_since(settings=settings, since=decision.healthy_since)
        report.add(
            "Done",
            f"Primary healthy since: {_iso(decision.healthy_since)} "
            f"(remembered in Prefect Variable `{settings.llm_healthy_since_variable}`).",
        )
    if decision.action == "failback":
        switched = switch_model(
            settings=settings,
            report=report,
            result=result,
            target=primary,
            dry_run=dry_run,
            rollout_timeout_s=rollout_timeout_s or settings.rollout_timeout_s,
            event="llm-failback",
        )
        if switched:
            remember_healthy_since(settings=settings, since=None)
    else:
        report.add("Done", "No model switch.")
        report.add("Verified", f"The workers stay on `{current}`.")
    report.publish(key="llm-provider-failback")
    get_run_logger().info("llm-provider-failback: %s (%s)", decision.action, report.outcome)
    return result
