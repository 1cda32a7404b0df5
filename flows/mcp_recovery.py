"""Runbook "MCP Server Unavailable": health-check the MCP server, restart it when sick, re-check until healthy.

observe: ``GET FD_MCP_URL`` several times (status, latency) -> decide: healthy when a strict majority answer
2xx (then nothing to do, and the report says so) -> act: guarded ``kubectl rollout restart deployment
mcp-server`` (kill switch, dry run, per-deployment cooldown so an alert storm restarts it once) -> wait for the
rollout -> verify: re-check health until it answers or the deadline passes -> report. Workers reconnect by
themselves. A restart that does not bring the server back fails the flow run (after the report).
"""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from tasks import kube
from tasks.events import emit_recovery_event
from tasks.guard import check
from tasks.probes import HealthReport, check_mcp_health, wait_mcp_healthy
from tasks.report import Report
from tasks.settings import get_settings


class McpRecoveryFailed(Exception):
    """The MCP server was restarted but did not answer healthy before the deadline."""


class McpRecovery(BaseModel):
    """What an MCP recovery run saw and did."""

    outcome: Literal["healthy", "recovered", "still-unhealthy", "refused", "dry-run"]
    healthy_before: bool
    checks_before: str
    verdict: str | None = None
    restarted: bool = False
    rollout_complete: bool | None = None
    healthy_after: bool | None = None
    seconds_to_healthy: float | None = None


def _check_rows(report: HealthReport) -> list[dict[str, object]]:
    return [
        {
            "attempt": c.attempt,
            "ok": "yes" if c.ok else "no",
            "HTTP status": c.status_code if c.status_code is not None else "-",
            "latency ms": f"{c.latency_ms:.0f}",
            "error": c.error or "",
        }
        for c in report.checks
    ]


@flow(
    name="mcp-server-recovery",
    flow_run_name="mcp-recovery dry_run={dry_run}",
    description="Runbook 'MCP Server Unavailable': health-check the MCP server several times; if unhealthy, "
    "rollout-restart Deployment mcp-server and re-check until healthy or a deadline; no-op when healthy.",
)
def mcp_server_recovery(
    dry_run: Annotated[bool, Field(description="Only show what would change.")] = True,
    attempts: Annotated[int | None, Field(ge=1, le=20, description="Health checks.")] = None,
    interval_s: Annotated[float | None, Field(ge=0, le=60, description="Seconds between checks.")] = None,
    deadline_s: Annotated[float | None, Field(gt=0, le=3600, description="Re-check deadline.")] = None,
    rollout_timeout_s: Annotated[float | None, Field(gt=0, le=3600, description="Rollout wait.")] = None,
) -> McpRecovery:
    """Check the MCP server's health; if unhealthy, restart its Deployment and re-check until it answers.

    Args:
        dry_run: Only check and report what would be done; restart nothing.
        attempts: Health checks before deciding (default FD_MCP_CHECK_ATTEMPTS); healthy = a strict majority ok.
        interval_s: Seconds between health checks (default FD_MCP_CHECK_INTERVAL_S).
        deadline_s: After the restart, re-check health for at most this long (default FD_MCP_RECOVERY_DEADLINE_S).
        rollout_timeout_s: How long to wait for the restart's rollout (default FD_ROLLOUT_TIMEOUT_S).
    """
    settings = get_settings()
    attempts = attempts or settings.mcp_check_attempts
    interval = settings.mcp_check_interval_s if interval_s is None else interval_s
    deadline = deadline_s or settings.mcp_recovery_deadline_s
    deployment = settings.mcp_deployment
    report = Report(title="MCP server recovery" + (" (dry run)" if dry_run else ""))

    before = check_mcp_health(settings=settings, attempts=attempts, interval_s=interval)
    report.add("Observed", f"`GET {settings.mcp_url}`: {before.summary()}.")
    report.table("Observed", _check_rows(before))
    result = McpRecovery(outcome="healthy", healthy_before=before.healthy, checks_before=before.summary())

    if before.healthy:
        report.add("Decided", "The MCP server is healthy: nothing to do (no restart).")
        report.add("Done", "Nothing.")
        report.add("Verified", f"Healthy: {before.summary()}.")
        report.outcome = "healthy, no-op"
        report.publish(key="mcp-server-recovery")
        return result

    report.add("Decided", f"Unhealthy ({before.summary()}): rollout-restart Deployment `{deployment}`.")
    verdict = check(action="rollout-restart", target=f"deployment/{deployment}", dry_run=dry_run, settings=settings)
    result.verdict = verdict.reason
    if not verdict.allowed:
        result.outcome = "dry-run" if verdict.dry_run else "refused"
        report.outcome = "dry run" if verdict.dry_run else "refused"
        report.add("Done", f"Nothing changed — {verdict.reason}.")
        report.add("Verified", "The MCP server is still unhealthy.")
        report.publish(key="mcp-server-recovery")
        return result

    restart = kube.rollout_restart(settings=settings, deployment=deployment, dry_run=False)
    result.restarted = True
    report.add("Done", f"Rollout restart of Deployment `{deployment}` requested ({_describe(restart)}).")
    rollout = kube.wait_for_rollout(
        settings=settings, deployment=deployment, timeout_s=rollout_timeout_s or settings.rollout_timeout_s
    )
    result.rollout_complete = bool(rollout.complete)
    report.add("Done", f"Rollout of `{deployment}`: {rollout.message}.")
    emit_recovery_event(
        action="mcp-restart",
        resource_id=f"deployment.{settings.namespace}.{deployment}",
        payload={"checks_before": before.summary(), "rollout_complete": bool(rollout.complete)},
    )

    after = wait_mcp_healthy(settings=settings, deadline_s=deadline, interval_s=max(interval, 0.2))
    result.healthy_after = after.healthy
    last = after.last
    last_text = f"HTTP {last.status_code}" if last and last.status_code else (last.error if last else "no check")
    if after.healthy:
        result.outcome = "recovered"
        result.seconds_to_healthy = round(after.seconds, 2)
        report.outcome = "recovered"
        report.add("Verified", f"MCP healthy again after {after.seconds:.1f} s ({after.checks} checks, {last_text}).")
    else:
        result.outcome = "still-unhealthy"
        report.outcome = "still unhealthy"
        report.add(
            "Verified",
            f"MCP still unhealthy {after.seconds:.1f} s after the restart ({after.checks} checks, last: "
            f"{last_text}): escalate to a human.",
        )
    report.publish(key="mcp-server-recovery")
    get_run_logger().info("mcp-server-recovery: %s", result.outcome)
    if not after.healthy:
        raise McpRecoveryFailed(f"MCP server still unhealthy {deadline:g} s after restarting `{deployment}`")
    return result


def _describe(result: object) -> str:
    changed = getattr(result, "changed", None)
    return f"changed: {changed}" if changed is not None else "done"
