"""The pure half of the bridge: webhook models, alert -> Prefect event translation, dedupe."""

from __future__ import annotations

import copy
import itertools
import uuid
from datetime import UTC, datetime

import pytest
from prefect.events.schemas.events import Event
from pydantic import ValidationError

from deployments.alerts import (
    EVENT_FIRING,
    EVENT_RESOLVED,
    ROUTED_ALERTS,
    AlertmanagerWebhook,
    GrafanaWebhook,
    MemoryDeduper,
    WebhookAlert,
    translate,
)

NOW = datetime(2026, 11, 27, 21, 0, tzinfo=UTC)


def am_alert(alertname: str = "WorkerCrashLooping", status: str = "firing", **labels: str) -> dict:
    return {
        "status": status,
        "labels": {"alertname": alertname, "team": "ferrumdeck", "severity": "critical", **labels},
        "annotations": {"summary": f"{alertname} on {labels.get('pod', '?')}", "runbook_url": "https://rb/x"},
        "startsAt": "2026-11-27T20:58:00.000Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-27T21:00:00.000Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
        "fingerprint": uuid.uuid5(uuid.NAMESPACE_OID, alertname + repr(sorted(labels.items()))).hex[:16],
    }


def am_body(*alerts: dict, **extra) -> dict:
    return {
        "version": "4",
        "groupKey": '{}:{alertname="WorkerCrashLooping"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "ferrumdeck-bridge",
        "groupLabels": {"alertname": "WorkerCrashLooping"},
        "commonLabels": {"team": "ferrumdeck"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
        **extra,
    }


def ids():
    counter = itertools.count()
    return lambda: uuid.UUID(int=next(counter))


def test_firing_alert_becomes_one_prefect_event_with_labels_and_fingerprint():
    body = am_body(am_alert(pod="worker-7d9f-abc12"))
    group = AlertmanagerWebhook.model_validate(body)
    events, heartbeats = translate(group, source="alertmanager", occurred=NOW, new_id=ids())
    assert heartbeats == []
    assert len(events) == 1
    event = events[0].event
    alert = body["alerts"][0]
    assert event["event"] == EVENT_FIRING
    assert event["resource"]["prefect.resource.id"] == "ferrumdeck.alert.WorkerCrashLooping"
    assert event["resource"]["ferrumdeck.fingerprint"] == alert["fingerprint"]
    assert event["resource"]["ferrumdeck.alertname"] == "WorkerCrashLooping"
    assert event["resource"]["ferrumdeck.routed"] == "true"
    assert event["resource"]["ferrumdeck.label.pod"] == "worker-7d9f-abc12"
    assert event["resource"]["ferrumdeck.label.team"] == "ferrumdeck"
    assert event["resource"]["ferrumdeck.team"] == "ferrumdeck"
    payload = event["payload"]
    assert payload["labels"] == alert["labels"]
    assert payload["annotations"] == alert["annotations"]
    for field in ("startsAt", "endsAt", "fingerprint", "generatorURL", "status"):
        assert payload[field] == alert[field]
    assert payload["receiver"] == "ferrumdeck-bridge"
    assert payload["groupKey"] == body["groupKey"]
    # Prefect's own model accepts it (what POST /api/events validates)
    parsed = Event.model_validate(event)
    assert parsed.resource.id == "ferrumdeck.alert.WorkerCrashLooping"
    assert parsed.occurred == NOW


def test_resolved_alert_becomes_resolved_event():
    group = AlertmanagerWebhook.model_validate(am_body(am_alert("WorkerHung", "resolved", pod="p1")))
    events, _ = translate(group, source="alertmanager", occurred=NOW, new_id=ids())
    assert [e.event["event"] for e in events] == [EVENT_RESOLVED]
    assert events[0].event["payload"]["endsAt"] == "2026-11-27T21:00:00.000Z"


def test_each_alert_of_a_group_is_one_event_and_in_body_duplicates_collapse():
    a, b = am_alert(pod="p1"), am_alert(pod="p2")
    group = AlertmanagerWebhook.model_validate(am_body(a, b, copy.deepcopy(a)))
    events, _ = translate(group, source="alertmanager", occurred=NOW, new_id=ids())
    assert [e.fingerprint for e in events] == [a["fingerprint"], b["fingerprint"]]
    assert len({e.event["id"] for e in events}) == 2


def test_unrouted_alert_is_marked_for_triage():
    group = AlertmanagerWebhook.model_validate(am_body(am_alert("DiskFull")))
    events, _ = translate(group, source="alertmanager", occurred=NOW, new_id=ids())
    assert events[0].event["resource"]["ferrumdeck.routed"] == "false"
    assert "DiskFull" not in ROUTED_ALERTS
    # what prefect.yaml's triage trigger matches: any alert, team=ferrumdeck, not routed elsewhere
    from prefect.events.schemas.events import Resource, ResourceSpecification

    triage = ResourceSpecification(
        {"prefect.resource.id": "ferrumdeck.alert.*", "ferrumdeck.team": "ferrumdeck", "ferrumdeck.routed": "false"}
    )
    assert triage.matches(Resource(events[0].event["resource"]))
    routed, _ = translate(
        AlertmanagerWebhook.model_validate(am_body(am_alert(pod="p1"))), source="alertmanager", occurred=NOW, new_id=ids()
    )
    assert not triage.matches(Resource(routed[0].event["resource"]))


@pytest.mark.parametrize("name", ["Watchdog", "FerrumDeckHeartbeat"])
def test_heartbeat_alerts_are_recorded_not_forwarded(name):
    group = AlertmanagerWebhook.model_validate(am_body(am_alert(name), am_alert(pod="p1")))
    events, heartbeats = translate(group, source="alertmanager", occurred=NOW, new_id=ids())
    assert [h.alertname for h in heartbeats] == [name]
    assert [e.alertname for e in events] == ["WorkerCrashLooping"]


def test_unknown_extra_fields_are_accepted_everywhere():
    alert = am_alert(pod="p1") | {"silenceURL": "http://x", "values": {"B": 1.5}, "newThing": [1, {"a": None}]}
    group = AlertmanagerWebhook.model_validate(am_body(alert, futureField={"x": 1}))
    events, _ = translate(group, source="alertmanager", occurred=NOW, new_id=ids())
    assert len(events) == 1
    assert "newThing" not in events[0].event["payload"]


def test_truncated_alerts_count_travels_with_each_event():
    group = AlertmanagerWebhook.model_validate(am_body(am_alert(pod="p1"), truncatedAlerts=12))
    events, _ = translate(group, source="alertmanager", occurred=NOW, new_id=ids())
    assert group.truncatedAlerts == 12
    assert events[0].event["payload"]["truncatedAlerts"] == 12


def test_missing_fingerprint_gets_a_stable_hash_of_the_labels():
    a = am_alert(pod="p1")
    del a["fingerprint"]
    b = copy.deepcopy(a)
    b["labels"] = dict(reversed(list(a["labels"].items())))
    fa = WebhookAlert.model_validate(a).key_fingerprint
    assert fa == WebhookAlert.model_validate(b).key_fingerprint
    assert len(fa) == 16
    c = copy.deepcopy(a)
    c["labels"]["pod"] = "p2"
    assert WebhookAlert.model_validate(c).key_fingerprint != fa


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda b: b.pop("alerts"), "alerts"),
        (lambda b: b.pop("version"), "version"),
        (lambda b: b.update(alerts="nope"), "alerts"),
        (lambda b: b.update(truncatedAlerts="3"), "truncatedAlerts"),
        (lambda b: b.update(truncatedAlerts=-1), "truncatedAlerts"),
        (lambda b: b["alerts"][0].update(status="pending"), "status"),
        (lambda b: b["alerts"][0]["labels"].update(pod=7), "labels"),
        (lambda b: b["alerts"][0]["labels"].pop("alertname"), "labels"),
        (lambda b: b["alerts"][0]["labels"].update(alertname="  "), "labels"),
        (lambda b: b["alerts"][0].update(annotations=["a"]), "annotations"),
        (lambda b: b["alerts"][0].update(startsAt=1700000000), "startsAt"),
        (lambda b: b["alerts"][0].update(fingerprint=""), "fingerprint"),
        (lambda b: b["alerts"][0].update(fingerprint=None), None),  # allowed: hash of labels
    ],
)
def test_validation_names_the_bad_field(mutate, where):
    body = am_body(am_alert(pod="p1"))
    mutate(body)
    if where is None:
        AlertmanagerWebhook.model_validate(body)
        return
    with pytest.raises(ValidationError) as info:
        AlertmanagerWebhook.model_validate(body)
    assert any(where in map(str, err["loc"]) for err in info.value.errors())


def test_grafana_webhook_maps_to_the_same_events():
    body = {
        "receiver": "ferrumdeck",
        "status": "firing",
        "orgId": 1,
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "LLMProviderErrors", "provider": "openai", "team": "ferrumdeck"},
                "annotations": {"summary": "openai errors"},
                "startsAt": "2026-11-27T20:58:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://grafana/alerting/grafana/abc/view",
                "fingerprint": "a1b2c3d4e5f60718",
                "silenceURL": "http://grafana/alerting/silence/new",
                "dashboardURL": "",
                "panelURL": "",
                "values": {"B": 0.9},
                "valueString": "[ var='B' value=0.9 ]",
            }
        ],
        "groupLabels": {"alertname": "LLMProviderErrors"},
        "commonLabels": {"team": "ferrumdeck"},
        "commonAnnotations": {},
        "externalURL": "http://grafana/",
        "version": "1",
        "groupKey": "{}/{}:{alertname=\"LLMProviderErrors\"}",
        "truncatedAlerts": 0,
        "title": "[FIRING:1] LLMProviderErrors",
        "state": "alerting",
        "message": "...",
    }
    group = GrafanaWebhook.model_validate(body)
    events, _ = translate(group, source="grafana", occurred=NOW, new_id=ids())
    event = events[0].event
    assert event["event"] == EVENT_FIRING
    assert event["resource"]["prefect.resource.id"] == "ferrumdeck.alert.LLMProviderErrors"
    assert event["resource"]["ferrumdeck.fingerprint"] == "a1b2c3d4e5f60718"
    assert event["payload"]["labels"]["provider"] == "openai"
    assert event["payload"]["source"] == "grafana"
    Event.model_validate(event)


def test_odd_labels_stay_in_the_payload_but_not_on_the_resource():
    alert = am_alert(pod="p1")
    alert["labels"]["weird label"] = "x"
    alert["labels"]["long"] = "v" * 1000
    group = AlertmanagerWebhook.model_validate(am_body(alert))
    events, _ = translate(group, source="alertmanager", occurred=NOW, new_id=ids())
    resource, payload = events[0].event["resource"], events[0].event["payload"]
    assert "ferrumdeck.label.weird label" not in resource and "ferrumdeck.label.long" not in resource
    assert payload["labels"]["weird label"] == "x" and payload["labels"]["long"] == "v" * 1000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_dedupe_drops_repeats_within_the_window_and_forgets_after_it():
    clock = FakeClock()
    dedupe = MemoryDeduper(window_s=60, clock=clock)
    assert await dedupe.claim(["a", "b"]) == ["a", "b"]
    clock.now += 59
    assert await dedupe.claim(["a", "b", "c"]) == ["c"]
    clock.now += 2  # a and b expired, c has 58 s left
    assert await dedupe.claim(["a", "c"]) == ["a"]
    assert len(dedupe) == 2  # expired b pruned


@pytest.mark.anyio
async def test_release_lets_a_retry_through():
    dedupe = MemoryDeduper(window_s=60, clock=FakeClock())
    assert await dedupe.claim(["a"]) == ["a"]
    await dedupe.release(["a"])
    assert await dedupe.claim(["a"]) == ["a"]


@pytest.mark.anyio
async def test_dedupe_memory_is_bounded():
    dedupe = MemoryDeduper(window_s=3600, max_keys=100, clock=FakeClock())
    for i in range(1000):
        await dedupe.claim([f"k{i}"])
    assert len(dedupe) <= 101


def test_dedupe_key_separates_status_and_episode():
    firing = WebhookAlert.model_validate(am_alert(pod="p1"))
    resolved = WebhookAlert.model_validate(am_alert(status="resolved", pod="p1"))
    refired = WebhookAlert.model_validate(am_alert(pod="p1") | {"startsAt": "2026-11-27T21:05:00Z"})
    keys = {firing.dedupe_key(), resolved.dedupe_key(), refired.dedupe_key()}
    assert len(keys) == 3
    assert firing.dedupe_key() == WebhookAlert.model_validate(am_alert(pod="p1")).dedupe_key()
