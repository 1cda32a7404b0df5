"""Pure LLM failover/failback policy: is a model down, which fallback to use, when to return to the primary.

Evidence per model: recent LLM step failures from the runs database (failed/total over a window; judged only
above a minimum sample size) and the provider's Statuspage indicator. ``evidence`` chooses how the current
model is judged down: ``any`` (either source), ``both`` (both agree), ``failures`` or ``status`` alone.
A fallback candidate must be *clean* (no evidence against it); failback needs *positive* evidence that the
primary works again (its status page says ``none``, or enough recent good samples) for ``healthy_for``.
After a switch, ``judge_new_model`` says whether the new model's own steps prove it works.
No I/O here: the flows feed observations in and act on the decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.probes import ProviderStatus

Evidence = Literal["any", "both", "failures", "status"]
DOWN_INDICATORS: frozenset[str] = frozenset({"major", "critical"})


class PolicyError(ValueError):
    """The failover configuration cannot be used (empty or duplicated fallback chain, bad thresholds)."""


class FailureStats(BaseModel):
    """LLM steps of one model in the window: how many failed out of how many finished."""

    failed: int = Field(0, ge=0)
    total: int = Field(0, ge=0)


class Thresholds(BaseModel):
    """When failures or a status page mean "down"."""

    min_samples: int = Field(10, ge=1)
    max_error_rate: float = Field(0.5, gt=0, le=1)
    evidence: Evidence = "any"


class ModelHealth(BaseModel):
    """Everything known about one model, and the verdicts the policy draws from it."""

    model: str
    provider: str
    failed: int = 0
    total: int = 0
    error_rate: float | None = None
    indicator: str = "unknown"
    failures_say_down: bool = False
    status_says_down: bool = False
    down: bool = False
    clean: bool = True
    positively_healthy: bool = False

    def evidence_text(self) -> str:
        """``12/20 failed (60%), status major`` — the evidence in one phrase."""
        rate = f" ({self.error_rate:.0%})" if self.error_rate is not None else ""
        return f"{self.failed}/{self.total} LLM steps failed{rate}, status page `{self.indicator}`"


class FailoverDecision(BaseModel):
    """What the failover flow should do: ``stay``, ``failover`` (to ``target``) or ``no-fallback``."""

    action: Literal["stay", "failover", "no-fallback"]
    current: str | None
    target: str | None = None
    reason: str


class FailbackDecision(BaseModel):
    """What the failback flow should do, and the new "primary healthy since" to remember (None = forget)."""

    action: Literal["on-primary", "primary-unhealthy", "no-evidence", "wait", "failback"]
    current: str | None
    primary: str
    healthy_since: datetime | None = None
    reason: str


def provider_of(model: str) -> str:
    """The provider of a LiteLLM model name: the part before the first ``/`` (``openai/gpt-4o`` -> ``openai``)."""
    return model.split("/", 1)[0] if "/" in model else model


def validate_chain(chain: list[str]) -> list[str]:
    """The fallback chain, checked: at least one model, no blanks, no duplicates."""
    if not chain:
        raise PolicyError("the LLM fallback chain (FD_LLM_FALLBACK_MODELS) is empty")
    if any(not m or m != m.strip() for m in chain):
        raise PolicyError(f"the LLM fallback chain has a blank or padded model name: {chain!r}")
    if len(set(chain)) != len(chain):
        raise PolicyError(f"the LLM fallback chain names a model twice: {chain!r}")
    return chain


def as_failure_stats(raw: Mapping[str, Any]) -> dict[str, FailureStats]:
    """Normalise ``{model: {failed, total}}`` (dicts or objects with those attributes) to ``FailureStats``."""
    out: dict[str, FailureStats] = {}
    for model, value in raw.items():
        if isinstance(value, Mapping):
            out[model] = FailureStats(failed=int(value.get("failed", 0)), total=int(value.get("total", 0)))
        else:
            out[model] = FailureStats(failed=int(value.failed), total=int(value.total))
    return out


def assess_model(
    *,
    model: str,
    failures: Mapping[str, FailureStats],
    statuses: Mapping[str, ProviderStatus],
    thresholds: Thresholds,
) -> ModelHealth:
    """Judge one model from its failure counts and its provider's status page."""
    provider = provider_of(model)
    stats = failures.get(model, FailureStats())
    rate = stats.failed / stats.total if stats.total else None
    enough = stats.total >= thresholds.min_samples
    failures_down = enough and rate is not None and rate >= thresholds.max_error_rate
    status = statuses.get(provider)
    indicator = status.indicator if status is not None else "unknown"
    status_down = indicator in DOWN_INDICATORS
    mode = thresholds.evidence
    if mode == "any":
        down, clean = failures_down or status_down, not (failures_down or status_down)
    elif mode == "both":
        down, clean = failures_down and status_down, not (failures_down or status_down)
    elif mode == "failures":
        down, clean = failures_down, not failures_down
    else:
        down, clean = status_down, not status_down
    good_samples = enough and rate is not None and rate < thresholds.max_error_rate
    positive = clean and (indicator == "none" or good_samples)
    return ModelHealth(
        model=model,
        provider=provider,
        failed=stats.failed,
        total=stats.total,
        error_rate=rate,
        indicator=indicator,
        failures_say_down=failures_down,
        status_says_down=status_down,
        down=down,
        clean=clean,
        positively_healthy=positive,
    )


def decide_failover(
    *, current: str | None, chain: list[str], health: Mapping[str, ModelHealth]
) -> FailoverDecision:
    """Stay while the current model is not down; else switch to the first clean model of the chain."""
    validate_chain(chain)
    if current is None:
        return FailoverDecision(
            action="stay",
            current=None,
            reason="LITELLM_MODEL is not set on the workers: nothing to fail over from",
        )
    now = health.get(current)
    if now is None or not now.down:
        why = now.evidence_text() if now is not None else "no evidence"
        return FailoverDecision(action="stay", current=current, reason=f"`{current}` is not down: {why}")
    for candidate in chain:
        if candidate == current:
            continue
        h = health.get(candidate)
        if h is not None and h.clean:
            return FailoverDecision(
                action="failover",
                current=current,
                target=candidate,
                reason=f"`{current}` is down ({now.evidence_text()}); `{candidate}` is the first healthy "
                f"model of the chain ({h.evidence_text()})",
            )
    return FailoverDecision(
        action="no-fallback",
        current=current,
        reason=f"`{current}` is down ({now.evidence_text()}) but no other model of the chain is healthy",
    )


def decide_failback(
    *,
    current: str | None,
    primary: str,
    primary_health: ModelHealth,
    healthy_since: datetime | None,
    now: datetime,
    healthy_for: timedelta,
) -> FailbackDecision:
    """Return to the primary once it has been positively healthy for ``healthy_for``; track since when."""
    if current == primary:
        return FailbackDecision(
            action="on-primary",
            current=current,
            primary=primary,
            reason=f"the workers already use `{primary}`",
        )
    evidence = primary_health.evidence_text()
    if not primary_health.clean:
        return FailbackDecision(
            action="primary-unhealthy",
            current=current,
            primary=primary,
            reason=f"primary `{primary}` is still unhealthy: {evidence}",
        )
    if not primary_health.positively_healthy:
        return FailbackDecision(
            action="no-evidence",
            current=current,
            primary=primary,
            reason=f"no positive evidence that `{primary}` works again ({evidence}); need status `none` "
            "or enough good recent steps",
        )
    since = healthy_since if healthy_since is not None and healthy_since <= now else now
    healthy_for_now = now - since
    if healthy_for_now >= healthy_for:
        return FailbackDecision(
            action="failback",
            current=current,
            primary=primary,
            healthy_since=since,
            reason=f"primary `{primary}` healthy since {since:%H:%M:%S} UTC "
            f"({_minutes(healthy_for_now)} >= {_minutes(healthy_for)}): {evidence}",
        )
    return FailbackDecision(
        action="wait",
        current=current,
        primary=primary,
        healthy_since=since,
        reason=f"primary `{primary}` healthy since {since:%H:%M:%S} UTC, only {_minutes(healthy_for_now)} of "
        f"{_minutes(healthy_for)}: {evidence}",
    )


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:.1f} min"


def judge_new_model(*, model: str, stats: FailureStats, min_steps: int, max_error_rate: float) -> tuple[bool, str]:
    """Whether the model the workers switched to works: at least ``min_steps`` of its LLM steps started since the
    switch, failing below ``max_error_rate`` (the failover threshold). Returns (verified, evidence)."""
    if stats.total < min_steps:
        return False, (f"only {stats.total} LLM steps of `{model}` since the switch ({stats.failed} failed); "
                       f"need {min_steps} to confirm it works")
    rate = stats.failed / stats.total
    ok = rate < max_error_rate
    return ok, (f"{stats.failed}/{stats.total} LLM steps of `{model}` failed since the switch ({rate:.0%} "
                f"{'<' if ok else '>='} {max_error_rate:.0%})")
