"""Notifications through Prefect's own automations: a real Prefect server (the session's test harness) sends
through a real ``Custom Webhook`` block to a local HTTP receiver; we assert what the receiver got."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.states import Crashed, Running
from pydantic import SecretStr

from deployments.notifications import apply_notifications, automation_names, block_names
from sandbox.scratch import free_port
from tasks.outcome import ActionStatus, Outcome, RecoveryResult
from tasks.report import OUTCOME_EVENT, conclude, recording
from tasks.settings import Settings
from tests.polling import wait_for

TEST_FLOW = "fd-notification-test"


class Receiver:
    """A local webhook endpoint that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        received, headers = self.bodies, self.headers

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                received.append(json.loads(self.rfile.read(length) or b"{}"))
                headers.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def about(self, text: str) -> list[dict]:
        return [b for b in list(self.bodies) if text in b.get("text", "") or text in b.get("subject", "")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def remove_automations(settings: Settings) -> None:
    with get_client(sync_client=True) as client:
        for name in automation_names(settings).values():
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)


@pytest.fixture
def notify_settings(receiver: Receiver, active_settings: Settings) -> Iterator[Settings]:
    """Notifications to the local receiver (with a Bearer token) under names private to this test; the runs'
    own settings (Redis keys: the events' outbox) are private to it too."""
    s = active_settings.model_copy(update={
        "notify_webhook_url": SecretStr(receiver.url), "notify_webhook_token": SecretStr("hook-token-123456"),
        "notify_name_prefix": f"fdtest-{uuid.uuid4().hex[:8]}"})
    yield s
    remove_automations(s)


def emit_probe(target: str) -> None:
    emit_event(event=OUTCOME_EVENT, payload={"cause": "probe"},
               resource={"prefect.resource.id": f"ferrumdeck.recovery.{TEST_FLOW}", "ferrumdeck.flow": TEST_FLOW,
                         "ferrumdeck.outcome": "failed", "ferrumdeck.target": target})


def wait_until_live(receiver: Receiver) -> None:
    """The server loads a new automation asynchronously: send probe events until one is delivered."""
    probe = f"probe-{uuid.uuid4().hex[:8]}"

    def delivered() -> bool:
        emit_probe(probe)
        return bool(receiver.about(probe))

    wait_for(delivered, timeout=60, interval=1.0, what="the notification automation to be live")


@flow(name=TEST_FLOW, flow_run_name="notify {target}")
def unverified_recovery(target: str, *, refuse: bool = False) -> RecoveryResult:
    """Deletes a pod (recorded, not done) whose replacement never becomes Ready: ends not_verified (or refused)."""
    with recording(RecoveryResult(flow=TEST_FLOW, title="Notification test recovery")) as result:
        if refuse:
            result.act("delete-pod", target, ActionStatus.REFUSED, detail="kill switch `paused` is on")
        else:
            result.act("delete-pod", target, ActionStatus.DONE)
            result.check("replacement Ready", False, "no Ready replacement after 180 s", target=target)
    return conclude(result)


def test_apply_is_idempotent_and_names_say_what_they_notify(notify_settings):
    first = apply_notifications(notify_settings)
    second = apply_notifications(notify_settings)
    names = automation_names(notify_settings)
    assert set(first.automations.values()) == {"created"} and set(second.automations.values()) == {"updated"}
    assert list(second.blocks) == [block_names(notify_settings)["webhook"]]
    assert second.blocks == first.blocks  # the block is overwritten in place, not duplicated
    with get_client(sync_client=True) as client:
        for name in names.values():
            [automation] = client.read_automations_by_name(name)
            assert "notifications apply" in automation.description
            assert [a.block_document_id for a in automation.actions] == list(first.blocks.values())
        [outcome] = client.read_automations_by_name(names["outcome"])
        assert outcome.trigger.expect == {OUTCOME_EVENT}
        assert sorted(outcome.trigger.match.root["ferrumdeck.outcome"]) == sorted(
            ["not_verified", "partial", "failed", "refused"])
    removed = apply_notifications(notify_settings.model_copy(update={"notify_webhook_url": None}))
    assert set(removed.automations.values()) == {"removed"}
    with get_client(sync_client=True) as client:
        assert all(client.read_automations_by_name(n) == [] for n in names.values())


def test_a_not_verified_recovery_notifies_with_target_outcome_cause_and_link(notify_settings, receiver):
    apply_notifications(notify_settings)
    wait_until_live(receiver)
    target = f"worker-{uuid.uuid4().hex[:6]}"
    state = unverified_recovery(target=target, return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_failed() and result.outcome is Outcome.NOT_VERIFIED
    [body] = wait_for(lambda: receiver.about(target), timeout=30, what="the notification")
    text = body["text"]
    assert f"Target: {target}" in text
    assert "Outcome: not_verified" in text
    assert "Cause: not verified: replacement Ready (no Ready replacement after 180 s)" in text
    assert f"/runs/flow-run/{state.state_details.flow_run_id}" in text
    assert body["subject"] == f"FerrumDeck recovery not_verified: {TEST_FLOW} on {target}"
    assert body["source"] == "ferrumdeck-recovery"
    [headers] = [h for b, h in zip(receiver.bodies, receiver.headers, strict=True) if b is body]
    assert {k.lower(): v for k, v in headers.items()}["authorization"] == "Bearer hook-token-123456"


def test_a_refused_recovery_notifies_and_a_green_one_does_not(notify_settings, receiver):
    apply_notifications(notify_settings)
    wait_until_live(receiver)
    refused, fine = f"worker-{uuid.uuid4().hex[:6]}", f"worker-{uuid.uuid4().hex[:6]}"
    state = unverified_recovery(target=refused, refuse=True, return_state=True)
    assert state.is_completed() and state.result().outcome is Outcome.REFUSED

    @flow(name=TEST_FLOW)
    def green(target: str) -> RecoveryResult:
        with recording(RecoveryResult(flow=TEST_FLOW, title="green")) as result:
            result.act("delete-pod", target, ActionStatus.DONE)
            result.check("replacement Ready", True, target=target)
        return conclude(result)

    assert green(target=fine).outcome is Outcome.RECOVERED
    [body] = wait_for(lambda: receiver.about(refused), timeout=30, what="the refused notification")
    assert "Outcome: refused" in body["text"] and "Cause: refused: kill switch `paused` is on" in body["text"]
    emit_probe(marker := f"after-{uuid.uuid4().hex[:6]}")  # delivered after the green run's event was evaluated
    wait_for(lambda: receiver.about(marker), timeout=30, what="a marker notification")
    assert receiver.about(fine) == []


def test_a_crashed_recovery_run_notifies(notify_settings, receiver):
    apply_notifications(notify_settings)
    wait_until_live(receiver)
    pod = f"worker-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(unverified_recovery, parameters={"target": pod}, tags=["ferrumdeck"])
        client.set_flow_run_state(run.id, Running(), force=True)
        client.set_flow_run_state(run.id, Crashed(message="Flow run process exited with code -9 (OOM killed)"),
                                  force=True)
    [body] = wait_for(lambda: receiver.about(pod), timeout=30, what="the crash notification")
    text = body["text"]
    assert f"Target: target={pod}" in text and "Outcome: crashed" in text
    assert "Cause: Flow run process exited with code -9 (OOM killed)" in text
    assert f"/runs/flow-run/{run.id}" in text
    assert body["subject"] == f"FerrumDeck recovery crashed: {TEST_FLOW} ({run.name})"


def test_a_notification_endpoint_that_is_down_does_not_fail_the_recovery(notify_settings, receiver):
    """The server sends notifications: a dead endpoint neither fails the run nor stops the other endpoints."""
    down = Settings(notify_webhook_url=SecretStr(f"http://127.0.0.1:{free_port()}/down"),
                    notify_name_prefix=f"fdtest-{uuid.uuid4().hex[:8]}")
    try:
        apply_notifications(down)
        apply_notifications(notify_settings)
        wait_until_live(receiver)
        target = f"worker-{uuid.uuid4().hex[:6]}"
        state = unverified_recovery(target=target, return_state=True)
        assert state.is_failed() and state.result(raise_on_failure=False).outcome is Outcome.NOT_VERIFIED
        assert "not_verified" in state.message  # failed by its outcome, as without notifications
        wait_for(lambda: receiver.about(target), timeout=30, what="the notification through the working endpoint")
    finally:
        remove_automations(down)


@flow(name=TEST_FLOW, flow_run_name="approval {target}")
def gated_recovery(target: str, settings: Settings) -> RecoveryResult:
    """Would delete one pod, which these settings put above the approval threshold: it pauses for a person."""
    from tasks.approval import approve, pod_deletions

    with recording(RecoveryResult(flow=TEST_FLOW, title="Approval notification test")) as result:
        if approve(result, pod_deletions(settings, [target]), settings=settings, dry_run=False):
            result.act("delete-pod", target, ActionStatus.DONE)
    return conclude(result)


def test_a_recovery_waiting_for_approval_notifies_with_its_plan_and_the_run_to_resume(notify_settings, receiver):
    """Nobody answers (1 s): the person was told what waits, why and where; the refusal notifies too."""
    apply_notifications(notify_settings)
    wait_until_live(receiver)
    pod = f"worker-{uuid.uuid4().hex[:6]}"
    gate = notify_settings.model_copy(update={"approval_pod_deletions": 0, "approval_timeout_s": 1.0,
                                              "approval_poll_s": 0.2})
    state = gated_recovery(target=pod, settings=gate, return_state=True)
    assert state.is_completed() and state.result().outcome is Outcome.REFUSED  # nothing changed
    run_id = state.state_details.flow_run_id
    asked = wait_for(lambda: [b for b in receiver.about(pod) if "waits for your approval" in b["subject"]],
                     timeout=30, what="the approval notification")
    [body] = asked
    assert body["subject"] == f"FerrumDeck recovery waits for your approval: {TEST_FLOW} — delete 1 worker pod: {pod}"
    assert "Why a person is asked: 1 pod > FD_APPROVAL_POD_DELETIONS = 0" in body["text"]
    assert "No answer within 1 s: rejected, nothing changes" in body["text"]
    assert f"/runs/flow-run/{run_id}" in body["text"]
    [refused] = wait_for(lambda: [b for b in receiver.about(pod) if "refused" in b["subject"]], timeout=30,
                         what="the refused notification")
    assert "Outcome: refused" in refused["text"] and f"/runs/flow-run/{run_id}" in refused["text"]


def test_cli_applies_from_the_environment(monkeypatch, receiver, capsys):
    from deployments.cli import main

    prefix = f"fdtest-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("FD_NOTIFY_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("FD_NOTIFY_NAME_PREFIX", prefix)
    try:
        assert main(["notifications", "apply"]) == 0
        assert main(["notifications", "apply"]) == 0
        out = capsys.readouterr().out
        assert f"block {prefix}-webhook: saved" in out
        assert f"automation '{prefix}: notify on recovery outcome': created" in out
        assert f"automation '{prefix}: notify on crashed recovery run': updated" in out
        assert f"automation '{prefix}: notify when a recovery waits for approval': updated" in out
        assert receiver.url not in out
    finally:
        remove_automations(Settings(notify_name_prefix=prefix))
