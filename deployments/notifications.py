"""Notifications through Prefect's own automations and notification blocks (``fd-recovery notifications apply``).

A person hears about every recovery that needs one: each concluded run emits ``ferrumdeck.recovery.outcome``
(``tasks.report.outcome_event``: resource labels ``ferrumdeck.flow`` / ``.outcome`` / ``.target``, payload
``cause``, related flow run), and Prefect's server — not our code — sends the message:

- automation ``<prefix>: notify on recovery outcome`` fires on that event when the outcome is one of
  ``FD_NOTIFY_OUTCOMES`` (not_verified, partial, failed, refused);
- automation ``<prefix>: notify on crashed recovery run`` fires on ``prefect.flow-run.Crashed`` of a run tagged
  ``ferrumdeck`` (every deployment in prefect.yaml is): such a run never reached its report;
- automation ``<prefix>: notify when a recovery waits for approval`` fires on
  ``ferrumdeck.recovery.approval-requested`` (``tasks.approval``): the plan, why a person is asked, the deadline
  and a link to the paused run, whose Resume form approves or rejects it — unanswered, it changes nothing.

Each sends one message per configured block — a ``Slack Webhook`` block (FD_NOTIFY_SLACK_WEBHOOK_URL) and a
``Custom Webhook`` block POSTing JSON ``{"subject", "text", "source"}`` (FD_NOTIFY_WEBHOOK_URL, optional Bearer
FD_NOTIFY_WEBHOOK_TOKEN; URL and token kept as block secrets) — with the target, the outcome, the one-line cause
and a link to the run. ``apply_notifications`` creates or updates the blocks and automations by name, so running
it again changes nothing; with no URL set it removes the automations. A notification endpoint that is down
fails the automation's action (``prefect.automation.action.failed`` in the event feed), never the recovery.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field

from tasks.approval import REQUESTED_EVENT
from tasks.report import OUTCOME_EVENT
from tasks.settings import Settings

#: every deployment of prefect.yaml carries this tag (its flow runs inherit it)
CRASH_TAG = "ferrumdeck"
CRASHED_EVENT = "prefect.flow-run.Crashed"
APPROVAL_EVENT = f"ferrumdeck.recovery.{REQUESTED_EVENT}"

OUTCOME_SUBJECT = (
    "FerrumDeck recovery {{ event.resource['ferrumdeck.outcome'] }}: {{ event.resource['ferrumdeck.flow'] }}"
    " on {{ event.resource['ferrumdeck.target'] }}"
)
OUTCOME_BODY = """\
Recovery: {{ event.resource['ferrumdeck.flow'] }} ({{ event.resource['prefect.resource.name'] }})
Target: {{ event.resource['ferrumdeck.target'] }}
Outcome: {{ event.resource['ferrumdeck.outcome'] }}
Cause: {{ event.payload.cause }}
Run: {ui_url}/runs/flow-run/{{ event.payload.flow_run_id }}"""

CRASHED_SUBJECT = "FerrumDeck recovery crashed: {{ flow.name }} ({{ flow_run.name }})"
CRASHED_BODY = """\
Recovery: {{ flow.name }}{% if deployment %} (deployment {{ deployment.name }}){% endif %}
Target: {% for name, value in flow_run.parameters.items() if name != 'dry_run' and value is not none %}\
{{ name }}={{ value }} {% else %}-{% endfor %}
Outcome: crashed
Cause: {{ flow_run.state.message or 'the flow run crashed before its report' }}
Run: {ui_url}/runs/flow-run/{{ flow_run.id }}"""

APPROVAL_SUBJECT = "FerrumDeck recovery waits for your approval: {{ event.payload.flow }} — {{ event.payload.plan }}"
APPROVAL_BODY = """\
Recovery: {{ event.payload.flow }} waits for a person's approval before it acts
Plan: {{ event.payload.plan }}
Why a person is asked: {{ event.payload.rule }}
No answer within {{ event.payload.timeout_s | round | int }} s: rejected, nothing changes
Approve or reject (the run's Resume button): {ui_url}/runs/flow-run/{{ event.payload.flow_run_id }}"""


class NotificationsApplied(BaseModel):
    """What ``apply_notifications`` left in Prefect: the blocks used and each automation's fate."""

    blocks: dict[str, UUID] = Field(default_factory=dict)
    automations: dict[str, str] = Field(default_factory=dict, description="name -> created / updated / removed")


def block_names(settings: Settings) -> dict[str, str]:
    """The names of the two notification blocks (``<prefix>-slack``, ``<prefix>-webhook``)."""
    return {"slack": f"{settings.notify_name_prefix}-slack", "webhook": f"{settings.notify_name_prefix}-webhook"}


def automation_names(settings: Settings) -> dict[str, str]:
    """The names of the automations, saying what they notify about."""
    prefix = settings.notify_name_prefix
    return {"outcome": f"{prefix}: notify on recovery outcome", "crashed": f"{prefix}: notify on crashed recovery run",
            "approval": f"{prefix}: notify when a recovery waits for approval"}


def notification_blocks(settings: Settings) -> dict[str, Any]:
    """The blocks the settings ask for, by block name (none when no URL is set)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook

    names = block_names(settings)
    blocks: dict[str, Any] = {}
    if settings.notify_slack_webhook_url is not None:
        blocks[names["slack"]] = SlackWebhook(url=settings.notify_slack_webhook_url)
    if settings.notify_webhook_url is not None:
        secrets = {"url": settings.notify_webhook_url.get_secret_value()}
        headers = {"Content-Type": "application/json"}
        if settings.notify_webhook_token is not None:
            secrets["token"] = settings.notify_webhook_token.get_secret_value()
            headers["Authorization"] = "Bearer {{token}}"
        blocks[names["webhook"]] = CustomWebhookNotificationBlock(
            name=names["webhook"], url="{{url}}", method="POST", headers=headers, secrets=secrets,
            json_data={"subject": "{{subject}}", "text": "{{body}}", "source": "ferrumdeck-recovery"},
        )
    return blocks


def ui_url(settings: Settings) -> str:
    """The Prefect UI base URL the messages link to: FD_NOTIFY_UI_URL, else Prefect's own (PREFECT_UI_URL, or
    derived from PREFECT_API_URL). Set once into the templates: the server's own UI URL is often unset."""
    from prefect.settings import get_current_settings

    url = settings.notify_ui_url or get_current_settings().ui_url
    if not url:
        raise ValueError("no Prefect UI URL for the notifications' links: set FD_NOTIFY_UI_URL or PREFECT_API_URL")
    return url.rstrip("/")


def notification_automations(settings: Settings, block_ids: list[UUID], *, base_url: str) -> dict[str, Any]:
    """Pure: the automations (by name) sending through ``block_ids`` — one action per block — with links
    to runs under ``base_url`` (the Prefect UI)."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    names = automation_names(settings)
    outcomes = ", ".join(settings.notify_outcomes)
    blocks = f"{len(block_ids)} notification block(s)"

    def notify(key: str, *, what: str, event: str, subject: str, body: str, **match: Any) -> AutomationCore:
        """One automation: on ``event`` (reactive, each one), send ``subject``/``body`` through every block."""
        return AutomationCore(
            name=names[key], description=f"{what} to {blocks}. Managed by `fd-recovery notifications apply`.",
            trigger=EventTrigger(expect={event}, posture=Posture.Reactive, threshold=1, within=timedelta(0), **match),
            actions=[SendNotification(block_document_id=b, subject=subject, body=body.replace("{ui_url}", base_url))
                     for b in block_ids],
        )

    automations = [
        notify("outcome", event=OUTCOME_EVENT, subject=OUTCOME_SUBJECT, body=OUTCOME_BODY,
               what=f"A recovery ended {outcomes}: send its target, outcome, one-line cause and a link to its run "
               f"({', '.join(block_names(settings).values())} when configured)",
               match={"prefect.resource.id": "ferrumdeck.recovery.*",
                      "ferrumdeck.outcome": list(settings.notify_outcomes)}),
        notify("crashed", event=CRASHED_EVENT, subject=CRASHED_SUBJECT, body=CRASHED_BODY,
               what=f"A recovery's flow run (tag `{CRASH_TAG}`) crashed before its report: send its parameters, the "
               f"crash message and a link to the run",
               match={"prefect.resource.id": "prefect.flow-run.*"},
               match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{CRASH_TAG}"}),
        notify("approval", event=APPROVAL_EVENT, subject=APPROVAL_SUBJECT, body=APPROVAL_BODY,
               what="A recovery paused for a person's approval (large blast radius, FD_APPROVAL_*): send the plan, "
               "why a person is asked, the deadline and a link to the paused run (its Resume form)",
               match={"prefect.resource.id": "ferrumdeck.recovery.*"}),
    ]
    return {a.name: a for a in automations}


def _upsert_automation(client: Any, automation: Any) -> str:
    """Create the automation, or update the one with its name (extra copies are deleted); say which."""
    existing = client.read_automations_by_name(automation.name)
    if not existing:
        client.create_automation(automation)
        return "created"
    first, *extra = existing
    client.update_automation(first.id, automation)
    for duplicate in extra:
        client.delete_automation(duplicate.id)
    return "updated"


def apply_notifications(settings: Settings) -> NotificationsApplied:
    """Create or update the notification blocks and automations the settings ask for (idempotent by name).

    Without any notification URL the automations are removed (blocks are left alone: they may be in use).
    """
    from prefect.client.orchestration import get_client

    applied = NotificationsApplied()
    blocks = notification_blocks(settings)
    base_url = ui_url(settings) if blocks else ""
    for name, block in blocks.items():
        applied.blocks[name] = block.save(name=name, overwrite=True, _sync=True)
    with get_client(sync_client=True) as client:
        if not applied.blocks:
            for name in automation_names(settings).values():
                for automation in client.read_automations_by_name(name):
                    client.delete_automation(automation.id)
                    applied.automations[name] = "removed"
            return applied
        automations = notification_automations(settings, list(applied.blocks.values()), base_url=base_url)
        for name, automation in automations.items():
            applied.automations[name] = _upsert_automation(client, automation)
    return applied
