"""The bridge app over HTTP (Starlette TestClient) against a stub Prefect API that records every POST."""

from __future__ import annotations

import base64
import json
import logging
import time
import warnings
from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr, ValidationError

with warnings.catch_warnings():  # starlette 1.x warns that its TestClient will move to httpx2
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from deployments.bridge import BridgeSettings, PrefectTarget, authorized, create_app, prefect_target
from tests.unit.test_alerts import am_alert, am_body

TOKEN = "t0ken-for-unit-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENTS_URL = "http://prefect.test/api/events"


class StubPrefect:
    """Answers POST /api/events like Prefect (204) or with a chosen failure; keeps what it got."""

    def __init__(self) -> None:
        self.status = 204
        self.fail: Exception | None = None
        self.posts: list[list[dict]] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and str(request.url) == EVENTS_URL
        if self.fail is not None:
            raise self.fail
        self.headers.append(request.headers)
        if 200 <= self.status < 300:
            self.posts.append(json.loads(request.content))
        return httpx.Response(self.status)

    @property
    def events(self) -> list[dict]:
        return [e for post in self.posts for e in post]


def make_settings(**kw) -> BridgeSettings:
    return BridgeSettings(token=TOKEN, **kw)


@pytest.fixture
def stub() -> StubPrefect:
    return StubPrefect()


@pytest.fixture
def client(stub: StubPrefect) -> Iterator[TestClient]:
    app = create_app(
        make_settings(),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(stub)),
        target=PrefectTarget(events_url=EVENTS_URL),
    )
    with TestClient(app) as c:
        yield c


def test_valid_webhook_delivers_one_event_per_alert_in_one_post(client, stub):
    body = am_body(am_alert(pod="p1"), am_alert(pod="p2"))
    r = client.post("/alertmanager", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"events": 2, "duplicates": 0, "heartbeats": 0, "truncatedAlerts": 0}
    assert len(stub.posts) == 1
    assert [e["payload"]["labels"]["pod"] for e in stub.events] == ["p1", "p2"]
    assert {e["event"] for e in stub.events} == {"ferrumdeck.alert.firing"}


def test_duplicate_notification_is_dropped_but_resolved_passes(client, stub):
    body = am_body(am_alert(pod="p1"))
    assert client.post("/alertmanager", json=body, headers=AUTH).json()["events"] == 1
    again = client.post("/alertmanager", json=body, headers=AUTH)
    assert again.status_code == 200 and again.json() == {
        "events": 0, "duplicates": 1, "heartbeats": 0, "truncatedAlerts": 0
    }
    resolved = client.post("/alertmanager", json=am_body(am_alert(status="resolved", pod="p1")), headers=AUTH)
    assert resolved.json()["events"] == 1
    assert [e["event"] for e in stub.events] == ["ferrumdeck.alert.firing", "ferrumdeck.alert.resolved"]
    assert len(stub.posts) == 2  # the duplicate made no POST at all


@pytest.mark.parametrize("status", [400, 422, 500, 503])
def test_prefect_refusal_answers_503_and_the_retry_is_not_deduped(client, stub, status):
    body = am_body(am_alert(pod="p1"))
    stub.status = status
    r = client.post("/alertmanager", json=body, headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert stub.events == []
    stub.status = 204
    retry = client.post("/alertmanager", json=body, headers=AUTH)
    assert retry.status_code == 200 and retry.json()["events"] == 1
    assert len(stub.events) == 1


def test_prefect_unreachable_answers_503(client, stub):
    stub.fail = httpx.ConnectError("refused")
    r = client.post("/alertmanager", json=am_body(am_alert(pod="p1")), headers=AUTH)
    assert r.status_code == 503
    stub.fail = None
    assert client.post("/alertmanager", json=am_body(am_alert(pod="p1")), headers=AUTH).json()["events"] == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Basic " + base64.b64encode(f"user:{TOKEN}".encode()).decode()},
        {"Authorization": "Digest abc"},
    ],
)
def test_without_valid_credentials_401_and_nothing_sent(client, stub, headers):
    r = client.post("/alertmanager", json=am_body(am_alert(pod="p1")), headers=headers)
    assert r.status_code == 401
    assert "www-authenticate" in r.headers
    assert stub.posts == []


def test_basic_credentials_work_and_are_checked():
    s = BridgeSettings(basic_user="alertmanager", basic_password="s3cret-pass")

    def basic(user: str, pw: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    assert authorized(basic("alertmanager", "s3cret-pass"), settings=s)
    assert not authorized(basic("alertmanager", "s3cret-pas"), settings=s)
    assert not authorized(basic("alertmanage", "s3cret-pass"), settings=s)
    assert not authorized("Basic " + base64.b64encode(b"alertmanagers3cret-pass").decode(), settings=s)
    assert not authorized(f"Bearer {TOKEN}", settings=s)  # no token configured


def test_body_over_limit_gets_413_before_anything_is_sent(client, stub):
    big = am_body(am_alert(pod="p1"))
    big["alerts"][0]["annotations"]["description"] = "x" * (1024 * 1024)
    r = client.post("/alertmanager", json=big, headers=AUTH)
    assert r.status_code == 413
    assert stub.posts == []


def test_streamed_body_over_limit_gets_413_without_content_length(stub):
    app = create_app(
        make_settings(max_body_bytes=2048),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(stub)),
        target=PrefectTarget(events_url=EVENTS_URL),
    )

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    with TestClient(app) as c:
        r = c.post("/alertmanager", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    assert stub.posts == []


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"", 400),
        (b"{not json", 400),
        (b"\xff\xfe\x00garbage", 400),
        (b"[" * 100_000, 400),
        (b"[]", 422),
        (b"null", 422),
        (json.dumps({"version": "4", "alerts": [{"status": "firing"}]}).encode(), 422),
        (json.dumps(am_body(am_alert(pod="p1")) | {"truncatedAlerts": "many"}).encode(), 422),
    ],
)
def test_malformed_bodies_get_a_clear_4xx(client, stub, content, status):
    r = client.post("/alertmanager", content=content, headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert stub.posts == []


def test_422_names_the_field_and_does_not_echo_the_input(client):
    body = am_body(am_alert(pod="p1"))
    body["alerts"][0]["labels"]["secret_looking"] = 12345
    r = client.post("/alertmanager", json=body, headers=AUTH)
    assert r.status_code == 422
    details = r.json()["details"]
    assert any("secret_looking" in map(str, d["loc"]) for d in details)
    assert "12345" not in r.text


def test_extra_fields_and_truncated_alerts_are_accepted(client, stub, caplog):
    body = am_body(am_alert(pod="p1") | {"someNewField": {"x": [1, 2]}}, truncatedAlerts=7, version5Thing=True)
    with caplog.at_level(logging.WARNING, logger="ferrumdeck.bridge"):
        r = client.post("/alertmanager", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["truncatedAlerts"] == 7
    assert stub.events[0]["payload"]["truncatedAlerts"] == 7
    assert "left out 7 alerts" in caplog.text


def test_grafana_endpoint_delivers_the_same_event_shape(client, stub):
    body = {
        "receiver": "fd", "status": "firing", "orgId": 1, "version": "1", "groupKey": "g",
        "alerts": [am_alert("MCPServerDown") | {"silenceURL": "http://g/s", "values": {"A": 0}}],
        "title": "[FIRING:1]", "state": "alerting", "message": "m",
    }
    r = client.post("/grafana", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert stub.events[0]["resource"]["prefect.resource.id"] == "ferrumdeck.alert.MCPServerDown"
    assert stub.events[0]["payload"]["source"] == "grafana"


def test_heartbeat_endpoint_reports_the_last_watchdog(client, stub):
    before = client.get("/heartbeat").json()
    assert before["last_seen"] is None and before["count"] == 0
    r = client.post("/alertmanager", json=am_body(am_alert("Watchdog")), headers=AUTH)
    assert r.json() == {"events": 0, "duplicates": 0, "heartbeats": 1, "truncatedAlerts": 0}
    after = client.get("/heartbeat").json()
    assert after["alertname"] == "Watchdog" and after["count"] == 1
    assert 0 <= after["age_s"] < 60
    assert stub.posts == []  # heartbeats are not Prefect events


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_prefect_auth_string_becomes_basic_auth_header(stub):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://prefect.test/api", PREFECT_API_AUTH_STRING: "admin:pw:x"}):
        target = prefect_target(make_settings())
    assert target.events_url == EVENTS_URL
    app = create_app(make_settings(), http_client=httpx.AsyncClient(transport=httpx.MockTransport(stub)), target=target)
    with TestClient(app) as c:
        assert c.post("/alertmanager", json=am_body(am_alert(pod="p1")), headers=AUTH).status_code == 200
    assert stub.headers[0]["authorization"] == "Basic " + base64.b64encode(b"admin:pw:x").decode()


def test_token_never_logged_or_echoed(client, stub, caplog):
    with caplog.at_level(logging.DEBUG):
        client.post("/alertmanager", json=am_body(am_alert(pod="p1")), headers=AUTH)
        client.post("/alertmanager", json=am_body(am_alert(pod="p1")), headers={"Authorization": "Bearer nope"})
        stub.status = 500
        r = client.post("/alertmanager", json=am_body(am_alert(pod="p2")), headers=AUTH)
    assert TOKEN not in caplog.text and TOKEN not in r.text
    assert "WorkerCrashLooping" in caplog.text  # alert names and fingerprints are logged


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"token": "short"},
        {"basic_user": "u"},
        {"basic_user": "u", "basic_password": ""},
    ],
)
def test_settings_refuse_missing_or_weak_credentials(kw, monkeypatch):
    for var in ("FD_BRIDGE_TOKEN", "FD_BRIDGE_BASIC_USER", "FD_BRIDGE_BASIC_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValidationError):
        BridgeSettings(**kw)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FD_BRIDGE_TOKEN", TOKEN)
    monkeypatch.setenv("FD_BRIDGE_PORT", "9999")
    monkeypatch.setenv("FD_BRIDGE_DEDUPE_WINDOW_S", "30")
    s = BridgeSettings()
    assert s.port == 9999 and s.dedupe_window_s == 30 and s.max_body_bytes == 1024 * 1024
    assert isinstance(s.token, SecretStr) and TOKEN not in repr(s)


def test_cli_refuses_bad_settings_without_echoing_the_token(monkeypatch, capsys):
    from deployments.cli import main

    monkeypatch.setenv("FD_BRIDGE_TOKEN", "tooShortSecret")
    assert main(["bridge"]) == 2
    err = capsys.readouterr().err
    assert "at least 16 characters" in err and "tooShortSecret" not in err


def test_cli_refuses_to_start_without_a_prefect_api(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.cli import main

    monkeypatch.setenv("FD_BRIDGE_TOKEN", TOKEN)
    monkeypatch.delenv("FD_BRIDGE_PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["bridge", "--port", "1"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err


@pytest.mark.parametrize("command,module", [("demo", "deployments.demo"), ("sandbox", "sandbox.__main__")])
def test_cli_passes_every_option_after_demo_or_sandbox_on_verbatim(monkeypatch, command, module):
    """`fd-recovery demo|sandbox ...`: that command's own parser gets the options, in order, untouched."""
    import importlib

    got: list[list[str]] = []
    monkeypatch.setattr(importlib.import_module(module), "main", lambda argv, **kw: got.append(argv) or 0)
    from deployments.cli import main

    argv = ["--short", "--scenarios", "crash", "mcp_outage", "--state-dir", "x"]
    assert main([command, *argv]) == 0 and main([command]) == 0
    assert got == [argv, []]


def test_unreachable_dedupe_store_answers_503_and_sends_nothing(stub):
    import redis.asyncio as redis_asyncio

    from deployments.alerts import RedisDeduper

    dead = redis_asyncio.Redis(host="127.0.0.1", port=9, socket_connect_timeout=1)  # nothing listens on 9
    app = create_app(
        make_settings(),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(stub)),
        deduper=RedisDeduper(client=dead, prefix="fdtest:dead", window_s=60),
        target=PrefectTarget(events_url=EVENTS_URL),
    )
    with TestClient(app) as c:
        r = c.post("/alertmanager", json=am_body(am_alert(pod="p1")), headers=AUTH)
    assert r.status_code == 503 and "dedupe" in r.json()["error"]
    assert stub.posts == []


# --- related resources: the UI links an alert to the pod and the Deployment its recovery acts on ---------------

def related_by_role(event: dict) -> dict[str, dict]:
    return {r["prefect.resource.role"]: r for r in event["related"]}


def test_alert_events_relate_the_pod_and_its_deployment(client, stub):
    r = client.post("/alertmanager", json=am_body(am_alert(pod="worker-7d9f8b6c5d-abc12", namespace="prod")),
                    headers=AUTH)
    assert r.status_code == 200, r.text
    [event] = stub.events
    related = related_by_role(event)
    assert related["pod"] == {"prefect.resource.id": "ferrumdeck.pod.worker-7d9f8b6c5d-abc12",
                              "prefect.resource.role": "pod", "prefect.resource.name": "worker-7d9f8b6c5d-abc12",
                              "kubernetes.namespace": "prod"}
    assert related["kubernetes-deployment"]["prefect.resource.id"] == "ferrumdeck.deployment.prod.worker"
    assert related["kubernetes-deployment"]["prefect.resource.name"] == "worker"


@pytest.mark.parametrize(("alert", "pod", "deployment"), [
    (am_alert("MCPServerDown", deployment="mcp-server"), None, "ferrumdeck.deployment.ferrumdeck.mcp-server"),
    (am_alert("QueueBacklog", stream="fd:queue:steps"), None, "ferrumdeck.deployment.ferrumdeck.worker"),
    (am_alert("LLMProviderErrors", provider="openai", model="gpt-4o"), None, "ferrumdeck.deployment.ferrumdeck.worker"),
    (am_alert("WorkerHung", pod="worker-h", consumer="worker-h"), "ferrumdeck.pod.worker-h",
     "ferrumdeck.deployment.ferrumdeck.worker"),  # no ReplicaSet-style name: the alert's Deployment
    (am_alert("RunsStuck"), None, None),
])
def test_the_deployment_comes_from_the_label_the_pod_name_or_the_alert(client, stub, alert, pod, deployment):
    assert client.post("/alertmanager", json=am_body(alert), headers=AUTH).status_code == 200
    related = related_by_role(stub.events[0])
    assert related.get("pod", {}).get("prefect.resource.id") == pod
    assert related.get("kubernetes-deployment", {}).get("prefect.resource.id") == deployment


def test_alert_deployments_and_namespace_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FD_BRIDGE_TOKEN", TOKEN)
    monkeypatch.setenv("FD_BRIDGE_NAMESPACE", "fd-prod")
    monkeypatch.setenv("FD_BRIDGE_ALERT_DEPLOYMENTS", '{"RunsStuck": "gateway"}')
    from deployments.bridge import related_resources

    [deployment] = related_resources({"alertname": "RunsStuck"}, settings=BridgeSettings())
    assert deployment["prefect.resource.id"] == "ferrumdeck.deployment.fd-prod.gateway"


# --- /metrics -------------------------------------------------------------------------------------------------

def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_forwarded_and_rejected_events_and_requests_by_status(client, stub):
    body = am_body(am_alert(pod="p1"), am_alert(pod="p2"), am_alert("WorkerCrashLooping", "resolved", pod="p3"))
    assert client.post("/alertmanager", json=body, headers=AUTH).status_code == 200
    assert client.post("/alertmanager", json=body, headers=AUTH).status_code == 200  # all duplicates
    assert client.post("/alertmanager", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/grafana", content=b"{", headers=AUTH).status_code == 400
    stub.status = 500
    assert client.post("/alertmanager", json=am_body(am_alert(pod="p4")), headers=AUTH).status_code == 503
    m = scrape(client)
    assert m[("ferrumdeck_bridge_events_forwarded_total", (("event", "ferrumdeck.alert.firing"), ("source", "alertmanager")))] == 2
    assert m[("ferrumdeck_bridge_events_forwarded_total", (("event", "ferrumdeck.alert.resolved"), ("source", "alertmanager")))] == 1
    assert m[("ferrumdeck_bridge_events_rejected_total", (("reason", "duplicate"), ("source", "alertmanager")))] == 3
    assert m[("ferrumdeck_bridge_events_rejected_total", (("reason", "prefect_unavailable"), ("source", "alertmanager")))] == 1
    requests = {labels: v for (name, labels), v in m.items() if name == "ferrumdeck_bridge_requests_total"}
    assert requests[(("endpoint", "/alertmanager"), ("status", "200"))] == 2
    assert requests[(("endpoint", "/alertmanager"), ("status", "401"))] == 1
    assert requests[(("endpoint", "/alertmanager"), ("status", "503"))] == 1
    assert requests[(("endpoint", "/grafana"), ("status", "400"))] == 1
    client.get("/no/such/path")
    assert scrape(client)[("ferrumdeck_bridge_requests_total", (("endpoint", "other"), ("status", "404")))] == 1


def test_metrics_record_heartbeats(client, stub):
    assert scrape(client)[("ferrumdeck_bridge_heartbeat_last_seen_timestamp_seconds", ())] == 0
    client.post("/alertmanager", json=am_body(am_alert("Watchdog")), headers=AUTH)
    m = scrape(client)
    assert m[("ferrumdeck_bridge_heartbeats_total", ())] == 1
    assert abs(m[("ferrumdeck_bridge_heartbeat_last_seen_timestamp_seconds", ())] - time.time()) < 60


def test_unreachable_dedupe_store_counts_rejected_events(stub):
    from deployments.alerts import DedupeError

    class Broken:
        async def claim(self, keys):
            raise DedupeError("dedupe store unavailable: ConnectionError")

        async def release(self, keys):
            pass

    app = create_app(make_settings(), http_client=httpx.AsyncClient(transport=httpx.MockTransport(stub)),
                     deduper=Broken(), target=PrefectTarget(events_url=EVENTS_URL))
    with TestClient(app) as c:
        assert c.post("/alertmanager", json=am_body(am_alert(pod="a"), am_alert(pod="b")), headers=AUTH).status_code == 503
        m = scrape(c)
    assert m[("ferrumdeck_bridge_events_rejected_total", (("reason", "dedupe_unavailable"), ("source", "alertmanager")))] == 2


# --- the automations prefect.yaml declares are named after the alert they handle ----------------------------

def test_every_trigger_is_named_and_described_after_the_alert_or_watcher_events_it_handles():
    from deployments.alerts import ROUTED_ALERTS
    from deployments.serve import deployment_triggers, read_deployment_specs

    routed: set[str] = set()
    for spec in read_deployment_specs():
        for trigger, raw in zip(deployment_triggers(spec["name"], spec.get("triggers")), spec.get("triggers") or [],
                                strict=True):
            assert trigger.name.endswith(f"-> {spec['name']}"), trigger.name  # what it starts
            assert "__automation_" not in trigger.name and len(trigger.description) > 40
            resource = raw["match"]["prefect.resource.id"]
            if resource.startswith("ferrumdeck.alert.") and not resource.endswith("*"):
                alertname = resource.removeprefix("ferrumdeck.alert.")
                assert trigger.name.startswith(f"{alertname} firing"), trigger.name
                assert alertname in trigger.description
                routed.add(alertname)
            else:
                assert trigger.name.startswith(("watcher:", "any other FerrumDeck alert")), trigger.name
    assert routed == ROUTED_ALERTS
