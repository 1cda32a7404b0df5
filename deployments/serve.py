"""Serve every deployment of ``prefect.yaml`` from one process (``fd-recovery serve``).

``prefect.yaml`` stays the single source of truth: this module reads it and turns each entry into a
``RunnerDeployment`` with the same name, description, tags, parameters, schedules, triggers and concurrency
limit, so small installations need no work pool while larger ones run ``prefect deploy --all``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
FAST_POLL_SECONDS = 1
IN_PROCESS_POLL_SECONDS = 0.25  # one small API query per poll


def read_deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments:`` entries of a prefect.yaml (YAML anchors resolved)."""
    spec = yaml.safe_load(path.read_text())
    deployments = spec.get("deployments") or []
    if not deployments:
        raise ValueError(f"{path} defines no deployments")
    return deployments


def _schedules(entries: list[dict[str, Any]] | None) -> list[Any]:
    from prefect.schedules import Cron, Interval

    schedules = []
    for entry in entries or []:
        if "interval" in entry:
            schedules.append(Interval(entry["interval"]))
        elif "cron" in entry:
            schedules.append(Cron(entry["cron"], timezone=entry.get("timezone")))
        else:
            raise ValueError(f"unsupported schedule {entry!r}: use interval or cron")
    return schedules


def deployment_triggers(deployment_name: str, specs: list[dict[str, Any]] | None) -> list[Any]:
    """The ``triggers:`` of a prefect.yaml entry as Prefect trigger objects, named as ``prefect deploy`` names them
    (``<deployment>__automation_<n>`` unless named), through Prefect's public trigger types."""
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    return [adapter.validate_python({"name": f"{deployment_name}__automation_{i}", **spec})
            for i, spec in enumerate(specs or [], start=1)]


def build_served_flows(path: Path = PREFECT_YAML, *, names: list[str] | None = None) -> list[tuple[Any, Any]]:
    """(RunnerDeployment, Flow) for every (or the named) deployment in prefect.yaml."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.flows import load_flow_from_entrypoint

    deployments = []
    for spec in read_deployment_specs(path):
        if names and spec["name"] not in names:
            continue
        flow = load_flow_from_entrypoint(str(PROJECT_ROOT / spec["entrypoint"]))
        limit = spec.get("concurrency_limit")
        deployments.append((
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=_schedules(spec.get("schedules")),
                triggers=deployment_triggers(spec["name"], spec.get("triggers")),
                concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit,
            ),
            flow,
        ))
    return deployments


def build_runner_deployments(path: Path = PREFECT_YAML, *, names: list[str] | None = None) -> list[Any]:
    """RunnerDeployments for every (or the named) deployment in prefect.yaml, ready for ``prefect.serve``."""
    return [deployment for deployment, _ in build_served_flows(path, names=names)]


def _apply_notifications() -> None:
    """Create or update the notification automations the FD_NOTIFY_* settings ask for; never stops serving."""
    from deployments.notifications import apply_notifications
    from tasks.settings import get_settings

    try:
        apply_notifications(get_settings())
    except Exception as e:  # noqa: BLE001 - notification setup must not stop the recoveries
        logging.getLogger(__name__).warning("notifications not applied: %s", e)


def serve_all(
    *,
    names: list[str] | None = None,
    limit: int | None = None,
    poll_seconds: float | None = None,
    subprocess: bool = False,
) -> None:
    """Serve the deployments until interrupted. By default flow runs run in this process (already imported,
    polled every ``IN_PROCESS_POLL_SECONDS``: an alert's run starts in well under a second); ``subprocess``
    uses Prefect's Runner instead (a fresh process per run: isolation, 2-4 s start; polls every second or
    ``PREFECT_RUNNER_POLL_FREQUENCY``)."""
    _apply_notifications()
    if not subprocess:
        from deployments.inprocess_runner import serve_in_process

        serve_in_process(build_served_flows(names=names), limit=limit, poll_seconds=poll_seconds or IN_PROCESS_POLL_SECONDS)
        return
    from prefect import serve

    poll = poll_seconds or float(os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", FAST_POLL_SECONDS))
    serve(*build_runner_deployments(names=names), limit=limit, query_seconds=poll, prefetch_seconds=poll)
