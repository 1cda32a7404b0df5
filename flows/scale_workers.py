"""Runbook "Worker Scaling for Recovery": scale the workers up (capped), watch the queue drain, maybe scale back.

observe: the worker Deployment's replicas and the queue (lag + pending) -> decide (``tasks.scale_policy``): the
target count, capped at ``FD_MAX_REPLICAS``, refused below ``FD_MIN_HEALTHY_WORKERS`` -> act: ``kubectl scale``
(guarded inside the task: kill switch, dry run; scaling is absolute, so a repeated alert changes nothing twice)
-> verify: the rollout finished, then the backlog reaches ``drain_target`` before ``timeout_s`` (sampled every
``sample_interval_s``, shown live in the progress artifact ``scale-workers-drain``) -> with ``scale_back``, once
drained, scale back to the count found at the start and verify the replicas returned. A drain that times out
ends the run Failed (``not_verified``) and keeps the extra workers.
"""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows._ui import LoggedResult, Setting, describe_parameters, keep_typed_name, setting
from tasks import kube
from tasks.events import emit_recovery_event
from tasks.outcome import ActionStatus, Table
from tasks.queue import inspect_queue_task
from tasks.report import artifact_key, conclude, recording
from tasks.scale_policy import DrainSample, backlog, drain_progress, plan_scale, sample_rows
from tasks.settings import Settings, get_settings

FLOW_NAME = "scale-workers"


class ScaleWorkers(LoggedResult):
    """What a scale-workers run saw, did and verified."""

    previous: int | None = None
    requested: int | None = None
    target: int | None = None
    capped: bool = False
    scaled: bool = False
    ready_after_scale: int | None = None
    drain_target: int
    initial_backlog: int | None = None
    final_backlog: int | None = None
    drained: bool | None = None
    samples: list[DrainSample] = Field(default_factory=list)
    scaled_back: bool = False


class DrainWatch(BaseModel):
    """How the backlog moved while the flow watched it."""

    drained: bool
    final: int
    seconds: float
    samples: list[DrainSample]


def _run_name() -> str:
    params = flow_run.parameters
    replicas = params.get("replicas")
    return f"scale workers to {replicas if replicas is not None else 'default'} dry_run={params.get('dry_run')}"


@flow(
    name=FLOW_NAME,
    flow_run_name=keep_typed_name(_run_name),
    description="Runbook 'Worker Scaling for Recovery': scale Deployment worker (capped at FD_MAX_REPLICAS), "
    "watch the queue drain with a progress artifact, optionally scale back once drained.",
)
@describe_parameters
def scale_workers(
    replicas: Annotated[int | None, Field(ge=0, le=1000, title="Replicas (pods)", description="Worker replicas "
                        "wanted (the runbook's 10); capped at FD_MAX_REPLICAS, refused below "
                        "FD_MIN_HEALTHY_WORKERS."), Setting("scale_up_replicas")] = None,
    drain_target: Annotated[int, Field(ge=0, le=100_000_000, title="Drained at (entries)", description="The queue "
                            "counts as drained when lag + pending is at or under this.")] = 100,
    timeout_s: Annotated[float, Field(ge=0, le=86_400, title="Drain timeout (s)", description="Stop watching the "
                         "drain after this long (not drained by then: the run ends not_verified).")] = 900.0,
    sample_interval_s: Annotated[float, Field(ge=0.05, le=300, title="Sample interval (s)", description="Time "
                                 "between queue samples (each updates the progress artifact).")] = 5.0,
    scale_back: Annotated[bool, Field(title="Scale back when drained", description="Once drained, scale back to "
                          "the replica count found at the start.")] = False,
    dry_run: Annotated[bool, Field(title="Dry run", description="Only observe and report what would change; "
                       "change nothing anywhere.")] = True,
    rollout_timeout_s: Annotated[float | None, Field(gt=0, le=3600, title="Rollout timeout (s)", description="How "
                                 "long to wait for the scaled Deployment to be ready."),
                                 Setting("rollout_timeout_s")] = None,
) -> ScaleWorkers:
    """Scale the workers to `replicas` (capped), verify the queue drains, optionally scale back afterwards."""
    settings = get_settings()
    deployment, target_name = settings.worker_deployment, f"deployment/{settings.worker_deployment}"
    requested = setting(replicas, settings, "scale_up_replicas")
    rollout_timeout = setting(rollout_timeout_s, settings, "rollout_timeout_s")
    title = f"Scale workers to {requested}" + (" (dry run)" if dry_run else "")
    with recording(ScaleWorkers(flow=FLOW_NAME, title=title, dry_run=dry_run, drain_target=drain_target,
                                requested=requested)) as result:
        # observe (a dry-run scale only reads the current count; the queue must exist before anything changes)
        current = kube.scale_deployment(settings=settings, deployment=deployment, dry_run=True,
                                        replicas=min(requested, settings.max_replicas)).previous
        snapshot = inspect_queue_task(settings=settings)
        snapshot.require_group()
        result.previous, result.initial_backlog = current, backlog(lag=snapshot.lag, pending=snapshot.pending)
        result.note("observed", Table(caption=f"Deployment `{deployment}` and queue `{settings.stream}`", rows=[
            {"replicas": current, "lag": "unknown" if snapshot.lag is None else snapshot.lag,
             "pending": snapshot.pending, "backlog": result.initial_backlog, "drain target": drain_target}]))
        # decide
        plan = plan_scale(deployment=deployment, requested=requested, current=current,
                          min_healthy=settings.min_healthy_workers, max_replicas=settings.max_replicas)
        result.target, result.capped = plan.target, plan.capped
        result.note("decided", plan.reason)
        if plan.refused:
            result.act("scale-deployment", target_name, ActionStatus.REFUSED, detail=plan.refused)
            return conclude(result)
        # act
        if plan.scale:
            scaled = result.perform("scale-deployment", target_name, dry_run=dry_run,
                                    call=lambda: kube.scale_deployment(settings=settings, deployment=deployment,
                                                                       replicas=plan.target, dry_run=dry_run),
                                    detail=lambda r: f"{r.previous} -> {plan.target} replicas")
            if scaled is None or dry_run:
                return conclude(result)
            result.scaled = scaled.changed
            _scaled_event(settings, previous=current, to=plan.target, capped=plan.capped)
            rollout = kube.wait_for_rollout(settings=settings, deployment=deployment, timeout_s=rollout_timeout)
            result.ready_after_scale = rollout.ready_replicas
            result.check(f"{plan.target} workers rolled out", rollout.complete,
                         f"{rollout.ready_replicas} ready: {rollout.message}")
        elif dry_run:
            return conclude(result)
        # verify
        drain = watch_drain(settings=settings, initial=result.initial_backlog, drain_target=drain_target,
                            timeout_s=timeout_s, interval_s=sample_interval_s)
        result.samples, result.drained, result.final_backlog = drain.samples, drain.drained, drain.final
        result.note("observed", Table(caption=f"Queue samples ({len(drain.samples)} taken)",
                                      rows=sample_rows(drain.samples)))
        result.check(f"backlog drained to {drain_target}", drain.drained,
                     f"backlog {result.initial_backlog} -> {drain.final} in {drain.seconds:.1f} s "
                     f"(timeout {timeout_s:g} s)")
        if scale_back:
            _scale_back(result, settings=settings, rollout_timeout=rollout_timeout)
    return conclude(result)


def watch_drain(*, settings: Settings, initial: int, drain_target: int, timeout_s: float,
                interval_s: float) -> DrainWatch:
    """Sample the queue until the backlog is at/under ``drain_target`` or the timeout; keep a progress artifact."""
    started = time.monotonic()
    artifact_id = create_progress_artifact(
        progress=drain_progress(initial=initial, current=initial, target=drain_target),
        key=artifact_key("scale-workers-drain"),
        description=f"Queue drain of `{settings.stream}`: backlog {initial} -> target {drain_target}",
    )
    samples: list[DrainSample] = []
    while True:
        snap = inspect_queue_task(settings=settings)
        now = backlog(lag=snap.lag, pending=snap.pending)
        elapsed = time.monotonic() - started
        samples.append(DrainSample(second=round(elapsed, 2), lag=snap.lag, pending=snap.pending, backlog=now))
        update_progress_artifact(
            artifact_id=artifact_id,
            progress=drain_progress(initial=initial, current=now, target=drain_target),
            description=f"backlog {now} (lag {snap.lag}, pending {snap.pending}) after {elapsed:.0f} s",
        )
        if now <= drain_target or elapsed + interval_s > timeout_s:
            return DrainWatch(drained=now <= drain_target, final=now, seconds=round(elapsed, 2), samples=samples)
        time.sleep(interval_s)  # poll: sampling interval of the drain


def _scale_back(result: ScaleWorkers, *, settings: Settings, rollout_timeout: float) -> None:
    """Return to the replica count found at the start, only after this run scaled and the queue drained."""
    deployment, previous = settings.worker_deployment, result.previous or 0
    if not result.scaled:
        result.note("decided", "Nothing to scale back: this run did not scale.")
        return
    if not result.drained:
        result.note("decided", "Not scaled back: the queue did not drain; the extra workers stay.")
        return
    back = result.perform("scale-deployment", f"deployment/{deployment}", dry_run=False,
                          call=lambda: kube.scale_deployment(settings=settings, deployment=deployment,
                                                             replicas=previous, dry_run=False),
                          detail=lambda r: f"scale back {r.previous} -> {previous} replicas")
    if back is None:
        return
    result.scaled_back = back.changed
    _scaled_event(settings, previous=back.previous, to=previous, scale_back=True)
    rollout = kube.wait_for_rollout(settings=settings, deployment=deployment, timeout_s=rollout_timeout)
    result.check(f"scaled back to {previous} replicas", rollout.complete and rollout.replicas == previous,
                 f"{rollout.replicas} replicas, {rollout.ready_replicas} ready: {rollout.message}")


def _scaled_event(settings: Settings, *, previous: int, to: int, **payload: bool) -> None:
    emit_recovery_event(action="scale-workers",
                        resource_id=f"deployment.{settings.namespace}.{settings.worker_deployment}",
                        payload={"from": previous, "to": to, **payload})
