"""Runbook "LLM Provider Outage": fail the workers over to a healthy model, and back once the primary recovers.

``llm-provider-failover`` (alert-started): observe the workers' ``LITELLM_MODEL``, recent LLM step failures per
model (runs database) and the providers' status pages -> decide (``tasks.llm_policy``) whether the current
model is down and which fallback is the first healthy one -> act: ``kubectl set env`` on Deployment ``worker``
(guarded inside the task: kill switch, dry run, a cooldown on the Deployment and the LLM failover budget, at
most one model switch per 15 minutes) -> record the active model in a Prefect Variable -> verify: the rollout
finished, the Deployment's env names the new model, and the new model's own LLM steps succeed (at least
``verify_steps`` started after the switch, within ``verify_within_s``, failing below the failover error rate).
No healthy fallback changes nothing and ends the run Failed (``not_verified``): the workers stay on a model
that is down and a human must decide.

``llm-provider-failback`` (scheduled): while the workers run a fallback, remember since when the primary
looks healthy (a Prefect Variable); once that lasts ``healthy_for_minutes``, switch back and verify the same
way. Failover and failback are the same guarded action on the same Deployment, so they share one cooldown and
one budget: the model cannot flap.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.variables import Variable
from pydantic import Field

from flows._ui import LoggedResult, Setting, describe_parameters, keep_typed_name, setting
from tasks import approval, kube
from tasks.approval import ApprovalRecord
from tasks.errors import RETRY
from tasks.events import emit_recovery_event
from tasks.llm_policy import (
    FailureStats,
    ModelHealth,
    Thresholds,
    as_failure_stats,
    assess_model,
    decide_failback,
    decide_failover,
    judge_new_model,
    provider_of,
    validate_chain,
)
from tasks.outcome import Table
from tasks.probes import provider_statuses
from tasks.report import conclude, recording
from tasks.runs import llm_failures_by_model
from tasks.settings import Settings, get_settings

FAILOVER, FAILBACK = "llm-provider-failover", "llm-provider-failback"
VERIFY_POLL_S = 1.0

EvidenceParam = Literal["any", "both", "failures", "status"]
Decision = Literal["stay", "failover", "no-fallback", "on-primary", "primary-unhealthy", "no-evidence", "wait",
                   "failback"]

# parameters both flows take (one description each, shown in the Prefect UI form)
Window = Annotated[int | None, Field(ge=1, le=1440, title="Judging window (min)",
                                     description="Judge models on the LLM steps of the last N minutes."),
                   Setting("llm_failure_window_minutes")]
MinSamples = Annotated[int | None, Field(ge=1, le=1_000_000, title="Minimum samples (steps)",
                                         description="Fewest LLM steps of a model in the window before its error "
                                         "rate counts."), Setting("llm_failover_min_samples")]
ErrorRate = Annotated[float | None, Field(gt=0, le=1, title="Down at error rate (0-1)",
                                          description="Error rate (failed/total, 0-1) at or above which a model is "
                                          "down."), Setting("llm_failover_error_rate")]
RolloutTimeout = Annotated[float | None, Field(gt=0, le=3600, title="Rollout timeout (s)",
                                               description="How long to wait for the workers' rollout."),
                           Setting("rollout_timeout_s")]
VerifySteps = Annotated[int, Field(ge=1, le=10_000, title="Verify with (steps)",
                                   description="After a switch, this many LLM steps of the new model must start and "
                                   "fail below the failover error rate to verify it.")]
VerifyWithin = Annotated[float, Field(gt=0, le=3600, title="Verify within (s)",
                                      description="Wait at most this long for those steps; fewer arrive (no "
                                      "traffic) and the run ends not_verified.")]
DryRun = Annotated[bool, Field(title="Dry run", description="Only observe, decide and report what would change; "
                               "change nothing anywhere.")]


class ModelSwitch(LoggedResult):
    """What a failover/failback run saw, decided, did and verified."""

    decision: Decision | None = None
    current: str | None = None
    target: str | None = None
    reason: str = ""
    switched: bool = False
    rollout_complete: bool | None = None
    model_after: str | None = None
    steps_after: FailureStats | None = None
    healthy_since: datetime | None = None
    approval: ApprovalRecord | None = None


@task(name="count-llm-failures", **RETRY)
def count_llm_failures(*, settings: Settings, since: datetime) -> dict[str, FailureStats]:
    """Finished-or-running LLM steps and failures per model since ``since`` (one GROUP BY in the runs DB)."""
    return as_failure_stats(llm_failures_by_model(settings=settings, since=since))


@task(name="wait-for-model-steps", **RETRY)
def wait_for_model_steps(*, settings: Settings, model: str, since: datetime, min_steps: int,
                         timeout_s: float) -> FailureStats:
    """Poll the runs DB until ``min_steps`` LLM steps of ``model`` started since ``since``, or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = as_failure_stats(llm_failures_by_model(settings=settings, since=since)).get(model, FailureStats())
        remaining = deadline - time.monotonic()
        if stats.total >= min_steps or remaining <= 0:
            return stats
        time.sleep(min(VERIFY_POLL_S, remaining))  # poll: new steps of the model


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


def _thresholds(settings: Settings, min_samples: int | None, error_rate: float | None,
                evidence: str | None) -> Thresholds:
    return Thresholds(min_samples=setting(min_samples, settings, "llm_failover_min_samples"),
                      max_error_rate=setting(error_rate, settings, "llm_failover_error_rate"),
                      evidence=setting(evidence, settings, "llm_failover_evidence"))


def workers_model(settings: Settings) -> str | None:
    """The ``LITELLM_MODEL`` of the workers' Deployment template."""
    return kube.get_deployment_env(settings=settings, deployment=settings.worker_deployment,
                                   container=settings.worker_container, name=settings.llm_model_env)


def observe_models(*, settings: Settings, models: list[str], window: timedelta,
                   thresholds: Thresholds) -> dict[str, ModelHealth]:
    """Failures per model in the window plus each provider's status page, judged per model."""
    failures = count_llm_failures(settings=settings, since=datetime.now(UTC) - window)
    statuses = provider_statuses(settings=settings, providers=[provider_of(m) for m in models])
    return {m: assess_model(model=m, failures=failures, statuses=statuses, thresholds=thresholds) for m in models}


def health_table(health: dict[str, ModelHealth], *, current: str | None, caption: str) -> Table:
    """One row per model: failures, error rate, status page, and the policy's verdicts."""
    return Table(caption=caption, rows=[
        {"model": h.model + (" (current)" if h.model == current else ""),
         "failed / total": f"{h.failed} / {h.total}",
         "error rate": f"{h.error_rate:.0%}" if h.error_rate is not None else "-",
         "status page": h.indicator, "down": "yes" if h.down else "no",
         "usable as fallback": "yes" if h.clean else "no"}
        for h in health.values()
    ])


def switch_model(result: ModelSwitch, *, settings: Settings, target: str, dry_run: bool, rollout_timeout_s: float,
                 verify_steps: int, verify_within_s: float, max_error_rate: float, event: str) -> bool:
    """Act and verify one switch (shared by failover and failback): guarded set env, record, event; then the
    rollout, the Deployment's env and the new model's own steps. True when the env was set (not refused)."""
    deployment, name = settings.worker_deployment, settings.llm_model_env
    ask = approval.llm_switch(settings, deployment=deployment, current=result.current, target=target)
    if not approval.approve(result, ask, settings=settings, dry_run=dry_run):
        return False
    switched_at = datetime.now(UTC)
    env = result.perform("set-deployment-env", f"deployment/{deployment}", dry_run=dry_run,
                         call=lambda: kube.set_deployment_env(settings=settings, deployment=deployment,
                                                              container=settings.worker_container, name=name,
                                                              value=target, dry_run=dry_run),
                         detail=lambda e: f"{name}={target} (was {e.previous})")
    if env is None or dry_run:
        return False
    result.switched = env.changed
    record_active_model(settings=settings, model=target)
    result.note("decided", f"Recorded `{target}` as the active model (Prefect Variable "
                f"`{settings.llm_active_model_variable}`).")
    emit_recovery_event(action=event, resource_id=f"deployment.{settings.namespace}.{deployment}",
                        payload={"from": result.current, "to": target, "reason": result.reason})
    # verify
    rollout = kube.wait_for_rollout(settings=settings, deployment=deployment, timeout_s=rollout_timeout_s)
    result.rollout_complete = rollout.complete
    result.check("rollout finished", rollout.complete, rollout.message)
    result.model_after = workers_model(settings)
    result.check(f"Deployment `{deployment}` has {name}={target}", result.model_after == target,
                 f"{name}={result.model_after}")
    if rollout.complete:
        result.steps_after = wait_for_model_steps(settings=settings, model=target, since=switched_at,
                                                  min_steps=verify_steps, timeout_s=verify_within_s)
        ok, evidence = judge_new_model(model=target, stats=result.steps_after, min_steps=verify_steps,
                                       max_error_rate=max_error_rate)
        result.check(f"LLM steps of `{target}` succeed", ok, f"{evidence} (waited at most {verify_within_s:g} s)")
    return True


@flow(name=FAILOVER, flow_run_name=keep_typed_name("llm-failover dry_run={dry_run}"),
      description="Runbook 'LLM Provider Outage': switch LITELLM_MODEL on the workers to the first healthy "
      "fallback when the current model is down (step failures and/or status pages), and verify its steps work.")
@describe_parameters
def llm_provider_failover(
    dry_run: DryRun = True,
    window_minutes: Window = None,
    min_samples: MinSamples = None,
    error_rate: ErrorRate = None,
    evidence: Annotated[EvidenceParam | None, Field(title="Evidence", description="What proves the current model "
                        "down: `any` (failures or status page), `both`, `failures` or `status`."),
                        Setting("llm_failover_evidence")] = None,
    rollout_timeout_s: RolloutTimeout = None,
    verify_steps: VerifySteps = 5,
    verify_within_s: VerifyWithin = 300.0,
) -> ModelSwitch:
    """Fail the workers over to the first healthy LLM model of the fallback chain when the current one is down."""
    settings = get_settings()
    title = "LLM provider failover" + (" (dry run)" if dry_run else "")
    with recording(ModelSwitch(flow=FAILOVER, title=title, dry_run=dry_run)) as result:
        chain = validate_chain(list(settings.llm_fallback_models))
        thresholds = _thresholds(settings, min_samples, error_rate, evidence)
        window = timedelta(minutes=setting(window_minutes, settings, "llm_failure_window_minutes"))
        # observe
        result.current = current = workers_model(settings)
        models = chain + ([current] if current and current not in chain else [])
        health = observe_models(settings=settings, models=models, window=window, thresholds=thresholds)
        result.note("observed", health_table(health, current=current, caption=(
            f"Workers run {settings.llm_model_env}={current}. LLM steps of the last {window.total_seconds() / 60:g}"
            f" min (min {thresholds.min_samples} steps, down at >= {thresholds.max_error_rate:.0%} errors or status "
            f"major/critical; evidence `{thresholds.evidence}`)")))
        # decide
        decision = decide_failover(current=current, chain=chain, health=health)
        result.decision, result.target, result.reason = decision.action, decision.target, decision.reason
        result.note("decided", f"{decision.action}: {decision.reason}.")
        if decision.action == "no-fallback":
            result.blocked = "no healthy fallback: the workers stay on a model that is down, a human must decide"
            result.check("a healthy fallback model is available", False, decision.reason)
        elif decision.action == "stay" and current is not None:
            result.check(f"`{current}` is not down", True, health[current].evidence_text())
        elif decision.action == "failover" and decision.target:
            # act, verify
            switch_model(result, settings=settings, target=decision.target, dry_run=dry_run,
                         rollout_timeout_s=setting(rollout_timeout_s, settings, "rollout_timeout_s"),
                         verify_steps=verify_steps, verify_within_s=verify_within_s,
                         max_error_rate=thresholds.max_error_rate, event="llm-failover")
    return conclude(result)


@flow(name=FAILBACK, flow_run_name=keep_typed_name("llm-failback dry_run={dry_run}"),
      description="Scheduled: return the workers to the primary LLM model once it has been healthy long enough.")
@describe_parameters
def llm_provider_failback(
    dry_run: Annotated[bool, Field(title="Dry run", description="Only observe, decide and report; change nothing "
                                   "anywhere (not even the \"healthy since\" memory).")] = True,
    healthy_for_minutes: Annotated[int | None, Field(ge=0, le=1440, title="Healthy for (min)",
                                                     description="The primary must look healthy this long first."),
                                   Setting("llm_healthy_for_minutes")] = None,
    window_minutes: Window = None,
    min_samples: MinSamples = None,
    error_rate: ErrorRate = None,
    rollout_timeout_s: RolloutTimeout = None,
    verify_steps: VerifySteps = 5,
    verify_within_s: VerifyWithin = 300.0,
) -> ModelSwitch:
    """Return the workers to the primary LLM model once it has been positively healthy for a while."""
    settings = get_settings()
    title = "LLM provider failback" + (" (dry run)" if dry_run else "")
    with recording(ModelSwitch(flow=FAILBACK, title=title, dry_run=dry_run)) as result:
        primary = validate_chain(list(settings.llm_fallback_models))[0]
        thresholds = _thresholds(settings, min_samples, error_rate, None)
        window = timedelta(minutes=setting(window_minutes, settings, "llm_failure_window_minutes"))
        healthy_for = timedelta(minutes=setting(healthy_for_minutes, settings, "llm_healthy_for_minutes"))
        # observe
        result.current = current = workers_model(settings)
        since = read_healthy_since(settings=settings)
        health = observe_models(settings=settings, models=[primary], window=window, thresholds=thresholds)
        result.note("observed", health_table(health, current=current, caption=(
            f"Workers run {settings.llm_model_env}={current}; primary `{primary}` remembered healthy since "
            f"{since.isoformat(timespec='seconds') if since else 'never'}")))
        # decide
        decision = decide_failback(current=current, primary=primary, primary_health=health[primary],
                                   healthy_since=since, now=datetime.now(UTC), healthy_for=healthy_for)
        result.decision, result.reason, result.healthy_since = decision.action, decision.reason, decision.healthy_since
        result.note("decided", f"{decision.action}: {decision.reason}.")
        if not dry_run and decision.healthy_since != since:
            remember_healthy_since(settings=settings, since=decision.healthy_since)
            result.note("decided", f"Primary healthy since: {_iso(decision.healthy_since)} (Prefect Variable "
                        f"`{settings.llm_healthy_since_variable}`).")
        if decision.action == "failback":
            # act, verify
            result.target = primary
            if switch_model(result, settings=settings, target=primary, dry_run=dry_run,
                            rollout_timeout_s=setting(rollout_timeout_s, settings, "rollout_timeout_s"),
                            verify_steps=verify_steps, verify_within_s=verify_within_s,
                            max_error_rate=thresholds.max_error_rate, event="llm-failback"):
                remember_healthy_since(settings=settings, since=None)
    return conclude(result)


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "forgotten"

