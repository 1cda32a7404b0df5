"""Pure worker-scaling policy: the replica count to set, the backlog, and how far the queue has drained.

``plan_scale`` caps a request at ``FD_MAX_REPLICAS`` and refuses one below ``FD_MIN_HEALTHY_WORKERS`` (a safety
rule: the run records it as refused, nothing changes). No I/O here: ``flows.scale_workers`` feeds the
observations in and acts on the plan.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel


class ScalePlan(BaseModel):
    """What scale-workers should do: scale to ``target`` (``scale``), only watch, or refuse (``refused``)."""

    requested: int
    target: int
    capped: bool
    scale: bool
    refused: str | None = None
    reason: str


class DrainSample(BaseModel):
    """One look at the queue while it drains."""

    second: float
    lag: int | None
    pending: int
    backlog: int


def plan_scale(*, deployment: str, requested: int, current: int, min_healthy: int, max_replicas: int) -> ScalePlan:
    """The replica count to set: ``requested`` capped at ``max_replicas``; below ``min_healthy`` is refused."""
    if requested < min_healthy:
        why = f"scaling `{deployment}` to {requested} is below FD_MIN_HEALTHY_WORKERS={min_healthy}"
        return ScalePlan(requested=requested, target=current, capped=False, scale=False, refused=why,
                         reason=f"Refused: {why}.")
    target = min(requested, max_replicas)
    capped = target != requested
    cap = f" (requested {requested}, capped at FD_MAX_REPLICAS={max_replicas})" if capped else ""
    if target == current:
        return ScalePlan(requested=requested, target=target, capped=capped, scale=False,
                         reason=f"Already at {target} replicas{cap}: no scaling; watch the drain.")
    return ScalePlan(requested=requested, target=target, capped=capped, scale=True,
                     reason=f"Scale `{deployment}` from {current} to {target}{cap}, then watch the drain.")


def backlog(*, lag: int | None, pending: int) -> int:
    """Steps not finished yet: not yet delivered (lag) plus delivered but not acknowledged (pending)."""
    return (lag or 0) + pending


def drain_progress(*, initial: int, current: int, target: int) -> float:
    """Percent of the way from the initial backlog down to the drain target (0..100)."""
    if current <= target:
        return 100.0
    span = initial - target
    if span <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (initial - current) / span))


def sample_rows(samples: Sequence[DrainSample], *, limit: int = 30) -> list[dict[str, object]]:
    """The drain samples as report rows: all of them up to ``limit``, else the first and last halves."""
    rows = [{"second": s.second, "lag": "unknown" if s.lag is None else s.lag, "pending": s.pending,
             "backlog": s.backlog} for s in samples]
    return rows if len(rows) <= limit else rows[: limit // 2] + rows[-(limit // 2):]
