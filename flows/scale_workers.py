"""Runbook "Worker Scaling for Recovery": scale the workers up (capped), watch the queue drain, maybe scale back.

observe: the worker Deployment's replicas and the queue (lag + pending) -> decide: the target count, capped at
``FD_MAX_REPLICAS`` and never below ``FD_MIN_HEALTHY_WORKERS`` -> act: guarded ``kubectl scale`` (kill
switch, dry run; scaling is absolute, so a repeated alert changes nothing twice) -> wait for the rollout ->
watch: sample the queue every ``sample_interval_s`` with a Prefect progress artifact until the backlog is at
or under ``drain_target`` or ``timeout_s`` passes -> optionally scale back to the previous count (only once
drained) -> report.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from tasks import kube
from tasks.events import emit_recovery_event
from tasks.guard import check
from tasks.queue import QueueSnapshot, inspect_queue_task
from tasks.report import Report, artifact_key
from tasks.settings import Settings, get_settings

SAMPLE_ROWS = 30


class ScaleError(ValueError):
    """The requested scaling is not allowed (below the minimum of healthy workers)."""


class DrainSample(BaseModel):
    """One look at the queue while it drains."""

    second: float
    lag: int | None
    pending: int
    backlog: int


class ScaleOutcome(BaseModel):
    """What a scale-workers run did and saw."""

    previous: int
    requested: int
    target: int
    capped: bool
    dry_run: bool
    verdict: str | None = None
    scaled: bool = False
    ready_after_scale: int | None = None
    initial_backlog: int
    final_backlog: int | None = None
    drained: bool | None = None
    samples: list[DrainSample] = Field(default_factory=list)
    scaled_back: bool = False
    scale_back_note: str | None = None


def backlog_of(snapshot: QueueSnapshot) -> int:
    """Steps not finished yet: not yet delivered (lag) plus delivered but not acknowledged (pending)."""
    return (snapshot.lag or 0) + snapshot.pending


def drain_progress(*, initial: int, current: int, target: int) -> float:
    """Percent of the way from the initial backlog down to the drain target (0..100)."""
    if current <= target:
        return 100.0
    span = initial - target
    if span <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (initial - current) / span))


def plan_target(*, requested: int, settings: Settings) -> tuple[int, bool]:
    """The replica count to set: ``requested`` capped at ``max_replicas``; below the healthy minimum is an error."""
    if requested < settings.min_healthy_workers:
        raise ScaleError(
            f"refusing to scale `{settings.worker_deployment}` to {requested}: below FD_MIN_HEALTHY_WORKERS="
            f"{settings.min_healthy_workers}"
        )
    target = min(requested, settings.max_replicas)
    return target, target != requested


def _run_name() -> str:
    params = flow_run.parameters
    replicas = params.get("replicas")
    return f"scale workers to {replicas if replicas is not None else 'default'} dry_run={params.get('dry_run')}"


@flow(
    name="scale-workers",
    flow_run_name=_run_name,
    description="Runbook 'Worker Scaling for Recovery': scale Deployment worker (capped at FD_MAX_REPLICAS), "
    "watch the queue drain with a progress artifact, optionally scale back once drained.",
)
def scale_workers(
    replicas: Annotated[int | None, Field(ge=0, le=1000, description="Workers wanted.")] = None,
    drain_target: Annotated[int, Field(ge=0, le=100_000_000, description="Drained at this backlog.")] = 100,
    timeout_s: Annotated[float, Field(ge=0, le=86_400, description="Watch at most this long.")] = 900.0,
    sample_interval_s: Annotated[float, Field(ge=0.05, le=300, description="Sampling interval.")] = 5.0,
    scale_back: Annotated[bool, Field(description="Scale back once drained.")] = False,
    dry_run: Annotated[bool, Field(description="Only show what would change.")] = True,
    rollout_timeout_s: Annotated[float | None, Field(gt=0, le=3600, description="Rollout wait.")] = None,
) -> ScaleOutcome:
    """Scale the workers to `replicas` (capped), then watch the queue drain; optionally scale back afterwards.

    Args:
        replicas: Worker replicas wanted (default FD_SCALE_UP_REPLICAS, the runbook's 10); capped at
            FD_MAX_REPLICAS, refused below FD_MIN_HEALTHY_WORKERS.
        drain_target: The queue counts as drained when lag + pending is at or under this.
        timeout_s: Stop watching the drain after this many seconds.
        sample_interval_s: Seconds between queue samples (each updates the progress artifact).
        scale_back: Once drained, scale back to the replica count found at the start.
        dry_run: Only observe and report what would change; change nothing anywhere.
        rollout_timeout_s: How long to wait for the scaled Deployment to be ready (default FD_ROLLOUT_TIMEOUT_S).
    """
    settings = get_settings()
    log = get_run_logger()
    deployment = settings.worker_deployment
    requested = settings.scale_up_replicas if replicas is None else replicas
    target, capped = plan_target(requested=requested, settings=settings)
    rollout_timeout = rollout_timeout_s or settings.rollout_timeout_s
    report = Report(title=f"Scale workers to {target}" + (" (dry run)" if dry_run else ""))

    # observe (the dry-run scale call only reads the current count)
    current = kube.scale_deployment(settings=settings, deployment=deployment, replicas=target, dry_run=True)
    snapshot = inspect_queue_task(settings=settings)
    snapshot.require_group()
    initial = backlog_of(snapshot)
    outcome = ScaleOutcome(
        previous=current.previous, requested=requested, target=target, capped=capped, dry_run=dry_run,
        initial_backlog=initial,
    )
    report.add(
        "Observed",
        f"Deployment `{deployment}` has {current.previous} replicas. Queue `{settings.stream}`: lag "
        f"{snapshot.lag if snapshot.lag is not None else 'unknown'}, pending {snapshot.pending} "
        f"-> backlog {initial} (drain target {drain_target}).",
    )
    cap_note = f" (requested {requested}, capped at FD_MAX_REPLICAS={settings.max_replicas})" if capped else ""
    if target == current.previous:
        report.add("Decided", f"Already at {target} replicas{cap_note}: no scaling; watch the drain.")
    else:
        report.add("Decided", f"Scale `{deployment}` from {current.previous} to {target}{cap_note}, then watch the drain.")

    if target != current.previous:
        verdict = check(
            action="scale", target=f"deployment/{deployment}", dry_run=dry_run, settings=settings, cooldown_s=0
        )
        outcome.verdict = verdict.reason
        if not verdict.allowed:
            report.outcome = "dry run" if verdict.dry_run else "refused"
            report.add("Done", f"Nothing changed — {verdict.reason}.")
            report.add("Verified", f"`{deployment}` stays at {current.previous} replicas.")
            report.publish(key="scale-workers")
            return outcome
        scaled = kube.scale_deployment(
            settings=settings, deployment=deployment, replicas=target, max_replicas=settings.max_replicas,
            dry_run=False,
        )
        outcome.scaled = scaled.changed
        report.add("Done", f"Scaled `{deployment}` from {scaled.previous} to {target} (changed: {scaled.changed}).")
        emit_recovery_event(
            action="scale-workers",
            resource_id=f"deployment.{settings.namespace}.{deployment}",
            payload={"from": scaled.previous, "to": target, "capped": capped},
        )
        rollout = kube.wait_for_rollout(settings=settings, deployment=deployment, timeout_s=rollout_timeout)
        outcome.ready_after_scale = rollout.ready_replicas
        report.add("Done", f"Rollout: {rollout.message} ({rollout.ready_replicas} ready).")
    elif dry_run:
        outcome.verdict = "dry run: nothing to change"

    if dry_run:
        report.outcome = "dry run"
        report.add("Done", "Dry run: nothing changed, the drain is not watched.")
        report.publish(key="scale-workers")
        return outcome

    # watch the drain
    outcome.drained, outcome.final_backlog = _watch_drain(
        settings=settings, outcome=outcome, initial=initial, drain_target=drain_target, timeout_s=timeout_s,
        interval_s=sample_interval_s,
    )
    rows = [s.model_dump() for s in outcome.samples]
    if len(rows) > SAMPLE_ROWS:
        rows = rows[: SAMPLE_ROWS // 2] + rows[-SAMPLE_ROWS // 2 :]
    report.table("Verified", rows, caption=f"Queue samples ({len(outcome.samples)} taken)")
    report.add(
        "Verified",
        f"Backlog {initial} -> {outcome.final_backlog}: "
        + ("drained" if outcome.drained else f"NOT drained to {drain_target} within {timeout_s:g} s")
        + ".",
    )
    ready = kube.ready_worker_count(settings=settings)
    report.add("Verified", f"{ready} worker pods Ready.")

    # optionally scale back
    if scale_back:
        _scale_back(settings=settings, report=report, outcome=outcome, rollout_timeout=rollout_timeout)
    if not outcome.drained:
        report.outcome = "not drained"
    report.publish(key="scale-workers")
    log.info("scale-workers: %s -> %s, drained=%s", outcome.previous, target, outcome.drained)
    return outcome


def _watch_drain(
    *, settings: Settings, outcome: ScaleOutcome, initial: int, drain_target: int, timeout_s: float,
    interval_s: float,
) -> tuple[bool, int]:
    """Sample the queue until the backlog is at/under ``drain_target`` or the timeout; keep a progress artifact."""
    started = time.monotonic()
    artifact_id = create_progress_artifact(
        progress=drain_progress(initial=initial, current=initial, target=drain_target),
        key=artifact_key("scale-workers-drain"),
        description=f"Queue drain of `{settings.stream}`: backlog {initial} -> target {drain_target}",
    )
    while True:
        snap: Any = inspect_queue_task(settings=settings)
        backlog = backlog_of(snap)
        elapsed = time.monotonic() - started
        outcome.samples.append(
            DrainSample(second=round(elapsed, 2), lag=snap.lag, pending=snap.pending, backlog=backlog)
        )
        update_progress_artifact(
            artifact_id=artifact_id,
            progress=drain_progress(initial=initial, current=backlog, target=drain_target),
            description=f"backlog {backlog} (lag {snap.lag}, pending {snap.pending}) after {elapsed:.0f} s",
        )
        if backlog <= drain_target:
            return True, backlog
        if elapsed + interval_s > timeout_s:
            return False, backlog
        time.sleep(interval_s)  # poll: sampling interval of the drain


def _scale_back(*, settings: Settings, report: Report, outcome: ScaleOutcome, rollout_timeout: float) -> None:
    deployment = settings.worker_deployment
    if not outcome.scaled:
        outcome.scale_back_note = "nothing to scale back: this run did not scale"
    elif not outcome.drained:
        outcome.scale_back_note = "not scaled back: the queue did not drain; the extra workers stay"
    else:
        verdict = check(
            action="scale", target=f"deployment/{deployment}", dry_run=False, settings=settings, cooldown_s=0
        )
        if not verdict.allowed:
            outcome.scale_back_note = f"not scaled back — {verdict.reason}"
        else:
            back = kube.scale_deployment(
                settings=settings, deployment=deployment, replicas=outcome.previous, dry_run=False
            )
            kube.wait_for_rollout(settings=settings, deployment=deployment, timeout_s=rollout_timeout)
            outcome.scaled_back = back.changed
            outcome.scale_back_note = f"scaled back from {back.previous} to {outcome.previous}"
            emit_recovery_event(
                action="scale-workers",
                resource_id=f"deployment.{settings.namespace}.{deployment}",
                payload={"from": back.previous, "to": outcome.previous, "scale_back": True},
            )
    report.add("Done", f"Scale back: {outcome.scale_back_note}.")
