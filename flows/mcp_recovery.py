"""Runbook "MCP Server Unavailable": health-check the MCP server, restart it when sick, re-check until healthy.

observe: ``GET FD_MCP_URL`` several times (status, latency) -> decide: healthy when a strict majority answer
2xx (then nothing to do) -> act: ``kubectl rollout restart deployment mcp-server`` (guarded inside the task:
kill switch, dry run, per-deployment cooldown so an alert storm restarts it once) -> verify: the rollout
finished and health answers again before the deadline -> report. Workers reconnect by themselves. A restart
that does not cure it ends the run Failed (``not_verified``), after the report.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from flows._ui import LoggedResult, Setting, describe_parameters, keep_typed_name, setting
from tasks import kube
from tasks.events import emit_recovery_event
from tasks.outcome import Table
from tasks.probes import HealthReport, check_mcp_health, wait_mcp_healthy
from tasks.report import conclude, recording
from tasks.settings import get_settings

FLOW_NAME = "mcp-server-recovery"


class McpRecovery(LoggedResult):
    """What an MCP recovery run saw, did and verified."""

    healthy_before: bool | None = None
    restarted: bool = False
    rollout_complete: bool | None = None
    healthy_after: bool | None = None
    seconds_to_healthy: float | None = None


def check_rows(report: HealthReport) -> list[dict[str, object]]:
    """One row per health check: attempt, ok, HTTP status, latency, error."""
    return [
        {"attempt": c.attempt, "ok": "yes" if c.ok else "no",
         "HTTP status": c.status_code if c.status_code is not None else "-",
         "latency ms": f"{c.latency_ms:.0f}", "error": c.error or ""}
        for c in report.checks
    ]


@flow(
    name=FLOW_NAME,
    flow_run_name=keep_typed_name("mcp-recovery dry_run={dry_run}"),
    description="Runbook 'MCP Server Unavailable': health-check the MCP server several times; if unhealthy, "
    "rollout-restart Deployment mcp-server and re-check until healthy or a deadline; no-op when healthy.",
)
@describe_parameters
def mcp_server_recovery(
    dry_run: Annotated[bool, Field(title="Dry run",
                                   description="Only check and report what would be done; restart nothing.")] = True,
    attempts: Annotated[int | None, Field(ge=1, le=20, title="Health checks (checks)",
                                          description="Health checks before deciding; healthy = a strict majority "
                                          "answers 2xx."), Setting("mcp_check_attempts")] = None,
    interval_s: Annotated[float | None, Field(ge=0, le=60, title="Check interval (s)",
                                              description="Time between two health checks."),
                          Setting("mcp_check_interval_s")] = None,
    deadline_s: Annotated[float | None, Field(gt=0, le=3600, title="Re-check deadline (s)",
                                              description="After the restart, re-check health for at most this long."),
                          Setting("mcp_recovery_deadline_s")] = None,
    rollout_timeout_s: Annotated[float | None, Field(gt=0, le=3600, title="Rollout timeout (s)",
                                                     description="How long to wait for the restart's rollout."),
                                 Setting("rollout_timeout_s")] = None,
) -> McpRecovery:
    """Check the MCP server's health; if unhealthy, restart its Deployment and re-check until it answers."""
    settings = get_settings()
    interval = setting(interval_s, settings, "mcp_check_interval_s")
    deployment = settings.mcp_deployment
    title = "MCP server recovery" + (" (dry run)" if dry_run else "")
    with recording(McpRecovery(flow=FLOW_NAME, title=title, dry_run=dry_run)) as result:
        # observe
        before = check_mcp_health(settings=settings, attempts=setting(attempts, settings, "mcp_check_attempts"),
                                  interval_s=interval)
        result.healthy_before = before.healthy
        result.note("observed", Table(caption=f"GET {settings.mcp_url}: {before.summary()}", rows=check_rows(before)))
        # decide
        if before.healthy:
            result.note("decided", "The MCP server is healthy: nothing to do (no restart).")
            result.check("MCP server healthy", True, before.summary())
            return conclude(result)
        result.note("decided", f"Unhealthy ({before.summary()}): rollout-restart Deployment `{deployment}`.")
        # act
        restart = result.perform("rollout-restart", f"deployment/{deployment}", dry_run=dry_run,
                                 call=lambda: kube.rollout_restart(settings=settings, deployment=deployment,
                                                                   dry_run=dry_run))
        if restart is None or dry_run:
            return conclude(result)
        result.restarted = True
        emit_recovery_event(action="mcp-restart", resource_id=f"deployment.{settings.namespace}.{deployment}",
                            payload={"checks_before": before.summary()})
        # verify
        rollout = kube.wait_for_rollout(settings=settings, deployment=deployment,
                                        timeout_s=setting(rollout_timeout_s, settings, "rollout_timeout_s"))
        result.rollout_complete = bool(rollout.complete)
        result.check("rollout of the restart finished", rollout.complete, rollout.message)
        after = wait_mcp_healthy(settings=settings, deadline_s=setting(deadline_s, settings, "mcp_recovery_deadline_s"),
                                 interval_s=max(interval, 0.2))
        result.healthy_after = after.healthy
        last = after.last
        last_text = f"HTTP {last.status_code}" if last and last.status_code else (last.error if last else "no check")
        if after.healthy:
            result.seconds_to_healthy = round(after.seconds, 2)
        result.check("MCP server healthy after the restart", after.healthy,
                     f"{after.checks} checks over {after.seconds:.1f} s, last: {last_text}")
    return conclude(result)
