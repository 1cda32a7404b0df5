"""The one renderer: every flow's keyed markdown report comes from its typed ``RecoveryResult``.

Flows never assemble markdown. ``recording`` wraps a flow's body so a run that raises still publishes what it
saw and did up to the failure; ``conclude`` publishes the report and returns the run's final state (Failed for
``partial``, ``not_verified`` and ``failed``, with the typed result as the state's data).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from tasks.outcome import Block, Outcome, RecoveryResult, Table

if TYPE_CHECKING:
    from prefect.states import State

R = TypeVar("R", bound=RecoveryResult)

SECTIONS = ("Observed", "Decided", "Done", "Verified")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^/@\s]+)@", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def scrub(text: str) -> str:
    """Remove credentials from URLs and bearer tokens from free text before it is shown anywhere."""
    return _BEARER.sub(r"\1***", _URL_CREDENTIALS.sub(r"\g<scheme>***@", text))


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return scrub(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Mapping[str, Any]], *, limit: int = 50) -> str:
    """Render dict rows as a markdown table (at most ``limit`` rows, then a count of the rest)."""
    rows = list(rows)
    if not rows:
        return "_none_"
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n_... and {len(rows) - limit} more_")
    return "\n".join(lines)


def _block(block: Block) -> str:
    if isinstance(block, Table):
        return (f"**{scrub(block.caption)}**\n\n" if block.caption else "") + markdown_table(block.rows)
    return scrub(block)


_MARK = {True: "✅", False: "❌"}


def render(result: RecoveryResult, *, waiting_for: str | None = None) -> str:
    """The report of one run: outcome first (with its cause when not green), then the four sections.
    ``waiting_for``: the run has no outcome yet, it waits (e.g. for a person's approval) — said instead."""
    outcome = result.outcome
    status = (f"**Status: waiting for {scrub(waiting_for)}**" if waiting_for else f"**Outcome: {outcome.value}**"
              + (f" — {scrub(result.cause())}" if outcome not in (Outcome.RECOVERED, Outcome.NOTHING_TO_DO) else ""))
    head = [f"# {scrub(result.title)}", "", status + f" · {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"]
    done = [{"action": a.kind, "target": a.target, "status": a.status.value,
             "count": "" if a.count is None else a.count, "detail": a.detail} for a in result.actions]
    verified = [{"check": c.name, "ok": _MARK[c.ok], "evidence": c.detail} for c in result.checks]
    sections = {
        "Observed": [_block(b) for b in result.observed],
        "Decided": [_block(b) for b in result.decided] + ([f"Blocked: {scrub(result.blocked)}"] if result.blocked else []),
        "Done": [markdown_table(done)] if done else [],
        "Verified": [markdown_table(verified)] if verified else [],
    }
    if result.error:
        sections["Done"].append(f"**The run failed:** {scrub(result.error)}")
    body: list[str] = []
    for name in SECTIONS:
        body += ["", f"## {name}", "", "\n\n".join(sections[name]) or "_nothing_"]
    return "\n".join(head + body) + "\n"


def publish(result: RecoveryResult, *, key: str | None = None, waiting_for: str | None = None) -> str:
    """Create (or update) the run's keyed markdown artifact from its result; return the markdown."""
    from prefect.artifacts import create_markdown_artifact

    markdown = render(result, waiting_for=waiting_for)
    status = f"waiting for {waiting_for}" if waiting_for else result.outcome.value
    create_markdown_artifact(key=artifact_key(key or result.flow), markdown=markdown,
                             description=f"{result.title}: {scrub(status)}")
    return markdown


class recording(AbstractContextManager):  # noqa: N801 - used as ``with recording(result):``
    """Run a flow body; if it raises, record the error on the result (outcome ``failed``) and carry on to
    ``conclude`` so the report of what was seen and done is still published and the run still ends Failed."""

    def __init__(self, result: R) -> None:
        self.result = result

    def __enter__(self) -> R:
        return self.result

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        log = logging.getLogger(__name__)
        with suppress(Exception):
            from prefect import get_run_logger

            log = get_run_logger()  # type: ignore[assignment]
        log.error("%s failed: %s: %s", self.result.flow, type(exc).__name__, scrub(str(exc))[:500],
                  exc_info=(exc_type, exc, tb))
        self.result.error = f"{type(exc).__name__}: {scrub(str(exc))[:300]}"
        return True


#: the one event every concluded run emits (notifications and the incident timeline match on it)
OUTCOME_EVENT = "ferrumdeck.recovery.outcome"
_MAX_LABEL = 200


def targets(result: RecoveryResult) -> str:
    """What a run acted on (its actions' targets, else its checks'), joined: the ``target`` of its event."""
    names = [a.target for a in result.actions if a.target and a.target != "-"]
    names = names or [c.target for c in result.checks if c.target]
    unique = list(dict.fromkeys(scrub(n) for n in names))
    text = ", ".join(unique[:5]) + (f" (+{len(unique) - 5} more)" if len(unique) > 5 else "")
    return text[:_MAX_LABEL] or "-"


def outcome_event(result: RecoveryResult, *, flow_run_id: str | None, flow_run_name: str | None = None) -> dict[str, Any]:
    """Pure: the ``ferrumdeck.recovery.outcome`` event of a run (keyword arguments of ``emit_event``).

    Resource ``ferrumdeck.recovery.<flow>`` with labels ``ferrumdeck.flow`` / ``.outcome`` / ``.target`` /
    ``.dry-run`` (what automations match on); related: the flow run; payload: outcome, one-line cause, flow run id,
    and who approved or rejected its plan when a person was asked.
    """
    outcome = result.outcome.value
    counts: dict[str, int] = {}
    for action in result.actions:
        counts[action.status.value] = counts.get(action.status.value, 0) + 1
    related = []
    if flow_run_id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run",
                        **({"prefect.resource.name": flow_run_name} if flow_run_name else {})})
    approval = getattr(result, "approval", None)  # tasks.approval.ApprovalRecord, on the flows that ask
    return {
        "event": OUTCOME_EVENT,
        "resource": {
            "prefect.resource.id": f"ferrumdeck.recovery.{result.flow}",
            "prefect.resource.name": scrub(result.title)[:_MAX_LABEL],
            "ferrumdeck.flow": result.flow,
            "ferrumdeck.outcome": outcome,
            "ferrumdeck.target": targets(result),
            "ferrumdeck.dry-run": "true" if result.dry_run else "false",
        },
        "related": related,
        "payload": {
            "outcome": outcome,
            "cause": scrub(result.cause())[:500],
            "flow_run_id": flow_run_id,
            "title": scrub(result.title),
            "actions": counts,
            "checks": {"passed": sum(c.ok for c in result.checks), "failed": len(result.failed_checks)},
            **({"approval": {"decision": approval.decision, "approver": approval.approver,
                             "reason": scrub(approval.reason)[:500]}} if approval is not None else {}),
        },
    }


def announce(result: RecoveryResult, *, emit: bool = True) -> None:
    """Record the run's metrics and (``emit``) its outcome event; never raises (a recovery outlives its
    telemetry). A run that publishes no report of its own (an idle sweep) calls it with ``emit=False``."""
    from prefect.context import FlowRunContext

    run = getattr(FlowRunContext.get(), "flow_run", None)
    started = None
    if run is not None:
        started = run.start_time or (run.state.timestamp if run.state is not None and run.state.is_running() else None)
    try:
        from tasks import metrics

        metrics.record_run(result, started=started)
        created_by = getattr(run, "created_by", None)
        if run is not None and started is not None and getattr(created_by, "type", None) == "AUTOMATION":
            metrics.observe_alert_to_start_later(flow=result.flow, flow_run_id=str(run.id), started=started)
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("metrics of %s not recorded: %s: %s", result.flow, type(e).__name__, e)
    if not emit:
        return
    try:
        spec = outcome_event(result, flow_run_id=str(run.id) if run is not None else None,
                             flow_run_name=getattr(run, "name", None))
        try:  # through the recovery events' outbox, which relates the run itself, when there is one
            from tasks.events import emit_reliably
            from tasks.settings import get_settings
        except ImportError:
            from prefect.events import emit_event

            emit_event(**spec)
        else:
            emit_reliably({**spec, "related": []}, settings=get_settings())
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("outcome event of %s not emitted: %s: %s", result.flow, type(e).__name__, e)


def conclude(result: R, *, key: str | None = None) -> R | State:
    """Publish the report, record the run's metrics and emit its outcome event; return the result (Completed)
    or a Failed state carrying it when the outcome fails."""
    from prefect import get_run_logger
    from prefect.states import Failed

    publish(result, key=key)
    get_run_logger().info("%s: %s — %s", result.flow, result.outcome.value, scrub(result.cause()))
    announce(result)
    if result.outcome.failing:
        return Failed(message=f"{result.outcome.value}: {scrub(result.cause())}"[:500], data=result)
    return result


def artifact_key(text: str) -> str:
    """Turn any text into a valid Prefect artifact key."""
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return key[:100] or "report"
