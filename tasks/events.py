"""Prefect events the recoveries emit (``ferrumdeck.recovery.<action>``), so users can chain automations."""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event

from tasks.report import scrub


def emit_recovery_event(*, action: str, resource_id: str, payload: dict[str, Any] | None = None) -> None:
    """Emit ``ferrumdeck.recovery.<action>`` about one resource (a pod, run, entry or deployment)."""
    emit_event(
        event=f"ferrumdeck.recovery.{action}",
        resource={"prefect.resource.id": f"ferrumdeck.{scrub(resource_id)}"},
        payload=payload or {},
    )
