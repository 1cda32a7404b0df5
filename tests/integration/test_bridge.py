"""The bridge as a real HTTP server (uvicorn) in front of the session's real Prefect test server.

Events are read back from Prefect itself: live from its event stream (websocket ``/api/events/out``, what the
automations' triggers consume) and, once, from storage (``POST /api/events/filter``, flushed every ~5 s).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from deployments.bridge import BackgroundBridge, BridgeSettings, create_app
from tests.unit.test_alerts import am_alert, am_body

TOKEN = "integration-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def unique_alert(alertname: str = "WorkerCrashLooping", status: str = "firing", **labels: str) -> dict:
    alert = am_alert(alertname, status, **labels)
    alert["fingerprint"] = uuid.uuid4().hex[:16]
    return alert


def prefect_events(fingerprint: str) -> list[dict]:
    """Events Prefect has stored for one alert fingerprint (oldest first)."""
    api = PREFECT_API_URL.value()
    body = {"filter": {"resource": {"labels": {"ferrumdeck.fingerprint": fingerprint}}, "order": "ASC"}, "limit": 50}
    r = httpx.post(f"{api}/events/filter", json=body, timeout=10)
    r.raise_for_status()
    return r.json()["events"]


def wait_for_events(fingerprint: str, count: int = 1, timeout_s: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        events = prefect_events(fingerprint)
        if len(events) >= count:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(events)} events for {fingerprint} after {timeout_s}s, wanted {count}")
        time.sleep(0.2)  # poll


class EventStream:
    """Prefect's live stream of ``ferrumdeck.alert.*`` events, collected by a background thread."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.events: list[dict] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="prefect-event-stream", daemon=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._consume())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # surfaced by wait_for
            self._error = e
        finally:
            self._ready.set()
            self._loop.close()

    async def _consume(self) -> None:
        from prefect.events.clients import PrefectEventSubscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        wanted = EventFilter(event=EventNameFilter(prefix=["ferrumdeck.alert."]))
        async with PrefectEventSubscriber(api_url=self.api_url, filter=wanted, reconnection_attempts=3) as sub:
            self._ready.set()
            async for event in sub:
                self.events.append(event.model_dump(mode="json"))

    def start(self, timeout_s: float = 20) -> EventStream:
        """Start, then prove the subscription is live with a probe event posted straight to Prefect."""
        self._thread.start()
        assert self._ready.wait(timeout_s), "event stream did not connect"
        probe = uuid.uuid4().hex[:16]
        deadline = time.monotonic() + timeout_s
        while not self.matching(probe):
            event = {
                "id": str(uuid.uuid4()),
                "occurred": datetime.now(UTC).isoformat(),
                "event": "ferrumdeck.alert.probe",
                "resource": {"prefect.resource.id": "ferrumdeck.alert.probe", "ferrumdeck.fingerprint": probe},
            }
            httpx.post(f"{self.api_url}/events", json=[event], timeout=10).raise_for_status()
            assert time.monotonic() < deadline and self._error is None, f"no live events: {self._error!r}"
            time.sleep(0.2)  # poll
        return self

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=10)

    def matching(self, fingerprint: str) -> list[dict]:
        return [e for e in list(self.events) if e["resource"].get("ferrumdeck.fingerprint") == fingerprint]

    def wait_for(self, fingerprint: str, count: int = 1, timeout_s: float = 15) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(found := self.matching(fingerprint)) < count:
            assert self._error is None, f"event stream failed: {self._error!r}"
            assert time.monotonic() < deadline, f"{len(found)} events for {fingerprint}, wanted {count}"
            time.sleep(0.05)  # poll
        return found


@pytest.fixture(scope="module")
def stream() -> Iterator[EventStream]:
    s = EventStream(PREFECT_API_URL.value()).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def bridge() -> Iterator[BackgroundBridge]:
    """One bridge for the module, talking to the session's Prefect server."""
    with BackgroundBridge(create_app(BridgeSettings(token=TOKEN))) as b:
        yield b


def post(bridge: BackgroundBridge, body: dict, path: str = "/alertmanager", **kw) -> httpx.Response:
    return httpx.post(f"{bridge.url}{path}", json=body, headers=kw.pop("headers", AUTH), timeout=15, **kw)


def test_alertmanager_alert_arrives_in_prefect_as_an_event(bridge, stream):
    alert = unique_alert(pod="worker-abc-1")
    r = post(bridge, am_body(alert))
    assert r.status_code == 200, r.text
    assert r.json()["events"] == 1
    [live] = stream.wait_for(alert["fingerprint"])
    [event] = wait_for_events(alert["fingerprint"])  # and it is stored
    assert live["id"] == event["id"]
    assert event["event"] == "ferrumdeck.alert.firing"
    assert event["resource"]["prefect.resource.id"] == "ferrumdeck.alert.WorkerCrashLooping"
    assert event["resource"]["ferrumdeck.label.pod"] == "worker-abc-1"
    assert event["payload"]["labels"] == alert["labels"]
    assert event["payload"]["annotations"] == alert["annotations"]
    assert event["payload"]["groupKey"] == am_body()["groupKey"]


def test_duplicates_are_dropped_and_resolved_follows(bridge, stream):
    alert = unique_alert("WorkerHung", pod="worker-abc-2")
    assert post(bridge, am_body(alert)).json()["events"] == 1
    assert post(bridge, am_body(alert)).json() == {
        "events": 0, "duplicates": 1, "heartbeats": 0, "truncatedAlerts": 0
    }
    resolved = dict(alert, status="resolved", endsAt="2026-11-27T21:00:00Z")
    assert post(bridge, am_body(resolved)).json()["events"] == 1
    events = stream.wait_for(alert["fingerprint"], count=2)
    assert [e["event"] for e in events] == ["ferrumdeck.alert.firing", "ferrumdeck.alert.resolved"]
    marker = unique_alert(pod="marker")  # sent last: once it is seen, a duplicate would have been too
    assert post(bridge, am_body(marker)).status_code == 200
    stream.wait_for(marker["fingerprint"])
    assert len(stream.matching(alert["fingerprint"])) == 2


def test_grafana_alert_arrives_in_prefect(bridge, stream):
    alert = unique_alert("MCPServerDown")
    body = {"receiver": "fd", "status": "firing", "orgId": 1, "version": "1", "alerts": [alert], "state": "alerting"}
    assert post(bridge, body, path="/grafana").status_code == 200
    [event] = stream.wait_for(alert["fingerprint"])
    assert event["payload"]["source"] == "grafana"


def test_rejected_requests_emit_nothing(bridge, stream):
    alert = unique_alert(pod="worker-abc-3")
    assert post(bridge, am_body(alert), headers={}).status_code == 401
    broken = am_body(alert)
    broken["alerts"][0]["labels"]["pod"] = 3
    assert post(bridge, broken).status_code == 422
    # a valid marker sent afterwards arrives; the rejected alert never does
    marker = unique_alert(pod="marker")
    assert post(bridge, am_body(marker)).status_code == 200
    stream.wait_for(marker["fingerprint"])
    assert stream.matching(alert["fingerprint"]) == []


def test_prefect_refusing_events_gives_503_and_the_retry_is_delivered(stream):
    alert = unique_alert(pod="worker-abc-4")
    real_api = PREFECT_API_URL.value()
    broken = BridgeSettings(token=TOKEN, prefect_api_url=real_api + "/no-such-prefix")  # real server: 404
    with BackgroundBridge(create_app(broken)) as b:
        r = post(b, am_body(alert))
    assert r.status_code == 503 and r.headers["retry-after"]
    closed = BridgeSettings(token=TOKEN, prefect_api_url="http://127.0.0.1:9/api", prefect_timeout_s=2)
    with BackgroundBridge(create_app(closed)) as b:
        assert post(b, am_body(alert)).status_code == 503
    # Alertmanager's retry, once Prefect takes events again, is delivered (not deduped away)
    app = create_app(BridgeSettings(token=TOKEN))
    deduper = app.state.deduper
    with BackgroundBridge(app) as b:
        assert post(b, am_body(alert)).json()["events"] == 1
        assert len(deduper) == 1
    stream.wait_for(alert["fingerprint"])


class AuthPrefect:
    """A stand-in Prefect API that, like a server with PREFECT_SERVER_API_AUTH_STRING, demands Basic auth
    and validates the events with Prefect's own model before accepting them (204)."""

    def __init__(self, auth_string: str) -> None:
        self.expected = "Basic " + base64.b64encode(auth_string.encode()).decode()
        self.events: list[dict] = []
        self.refused = 0

    async def events_endpoint(self, request: Request) -> Response:
        from prefect.events.schemas.events import Event

        if request.headers.get("authorization") != self.expected:
            self.refused += 1
            return Response(status_code=401)
        body = await request.json()
        for item in body:
            Event.model_validate(item)
        self.events.extend(body)
        return Response(status_code=204)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/api/events", self.events_endpoint, methods=["POST"])])


def test_works_against_a_prefect_api_requiring_an_auth_string():
    server = AuthPrefect("admin:s3cr3t:with-colon")
    with BackgroundBridge(server.app()) as fake_prefect:
        api = f"{fake_prefect.url}/api"
        with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: "admin:s3cr3t:with-colon"}):
            good = create_app(BridgeSettings(token=TOKEN))
        with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: "admin:wrong"}):
            bad = create_app(BridgeSettings(token=TOKEN))
        alert = unique_alert(pod="worker-auth")
        with BackgroundBridge(bad) as b:
            assert post(b, am_body(alert)).status_code == 503
        assert server.refused == 1 and server.events == []
        with BackgroundBridge(good) as b:
            assert post(b, am_body(alert)).status_code == 200
        assert [e["resource"]["ferrumdeck.fingerprint"] for e in server.events] == [alert["fingerprint"]]


class CountingPrefect:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.events.extend(json.loads(request.content))
        return httpx.Response(204)


def test_redis_dedupe_and_heartbeat_are_shared_by_replicas(key_prefix):
    from deployments.bridge import PrefectTarget
    from tests.conftest import REDIS_URL

    sink = CountingPrefect()
    settings = BridgeSettings(token=TOKEN, redis_url=REDIS_URL, redis_prefix=f"{key_prefix}:bridge")

    def replica():
        return create_app(
            settings,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(sink)),
            target=PrefectTarget(events_url="http://prefect.test/api/events"),
        )

    alert = unique_alert(pod="worker-r1")
    try:
        with BackgroundBridge(replica()) as a, BackgroundBridge(replica()) as b:
            assert post(a, am_body(alert)).json()["events"] == 1
            assert post(b, am_body(alert)).json() == {
                "events": 0, "duplicates": 1, "heartbeats": 0, "truncatedAlerts": 0
            }
            assert post(a, am_body(unique_alert("Watchdog"))).json()["heartbeats"] == 1
            seen_by_b = httpx.get(f"{b.url}/heartbeat", timeout=5).json()
            assert seen_by_b["alertname"] == "Watchdog" and seen_by_b["age_s"] < 60
        assert len(sink.events) == 1
    finally:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{key_prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_fd_recovery_bridge_command_serves_healthz(stream):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {
        "FD_BRIDGE_TOKEN": TOKEN,
        "FD_BRIDGE_PORT": str(port),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    script = os.path.join(os.path.dirname(sys.executable), "fd-recovery")
    proc = subprocess.Popen([script, "bridge"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "fd-recovery bridge did not come up"
                time.sleep(0.1)  # poll
        assert r.json() == {"status": "ok"}
        alert = unique_alert(pod="worker-cli")
        r = httpx.post(f"http://127.0.0.1:{port}/alertmanager", json=am_body(alert), headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        stream.wait_for(alert["fingerprint"])
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode()
    assert TOKEN not in output
    assert "WorkerCrashLooping" in output


def test_an_alert_event_links_its_pod_deployment_and_the_flow_run_its_trigger_started(bridge, stream):
    """What the Prefect UI shows: the stored alert event relates the pod and the Deployment; the automation's
    ``action.triggered`` event relates that alert event (triggering-event) and the flow run it created, which is
    how ``tasks.metrics`` finds the alert-to-start time."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events import DeploymentEventTrigger
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    from tasks.metrics import triggering_event_time

    suffix = uuid.uuid4().hex[:8]
    alertname = f"LinkTest{suffix}"

    @flow(name="fd-bridge-link-test")
    def linked(pod: str = "") -> str:
        return pod

    trigger = DeploymentEventTrigger(
        name=f"{alertname} firing -> link-test", description=f"Alert {alertname} starts the link test.",
        match={"prefect.resource.id": f"ferrumdeck.alert.{alertname}"}, expect={"ferrumdeck.alert.firing"},
        parameters={"pod": "{{ event.payload.labels.pod }}"},
    )
    deployment_id = linked.to_deployment(name=f"link-{suffix}", triggers=[trigger]).apply()
    pod = f"worker-7d9f8b6c5d-{suffix[:5]}"
    sent: dict[str, dict] = {}

    def fire_until_a_run_exists() -> list:  # the server loads a new automation asynchronously
        alert = unique_alert(alertname, pod=pod)
        assert post(bridge, am_body(alert)).status_code == 200
        sent[alert["fingerprint"]] = alert
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

    deadline = time.monotonic() + 60
    while not (runs := fire_until_a_run_exists()):
        assert time.monotonic() < deadline, "the trigger never started a run"
        time.sleep(0.5)  # poll
    run = runs[0]
    assert run.parameters == {"pod": pod}
    assert run.created_by is not None and run.created_by.type == "AUTOMATION"
    assert run.created_by.display_value == f"{alertname} firing -> link-test"  # the automation's name

    def action_event() -> list:
        with get_client(sync_client=True) as client:
            return client.read_events(filter=EventFilter(
                event=EventNameFilter(name=["prefect.automation.action.triggered"]),
                related=EventRelatedFilter(resources_in_roles=[(f"prefect.flow-run.{run.id}", "flow-run")]),
            ), limit=10).events

    deadline = time.monotonic() + 30
    while not (found := action_event()):
        assert time.monotonic() < deadline, "no action.triggered event relates the flow run"
        time.sleep(0.5)  # poll
    roles = {r.role: r.id for r in found[0].related}
    alert_event_id = roles["triggering-event"].removeprefix("prefect.event.")
    stored = [e for fingerprint in sent for e in wait_for_events(fingerprint)]
    [alert_event] = [e for e in stored if e["id"] == alert_event_id]
    related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in alert_event["related"]}
    assert related == {"pod": f"ferrumdeck.pod.{pod}", "kubernetes-deployment": "ferrumdeck.deployment.ferrumdeck.worker"}
    occurred = triggering_event_time(str(run.id))
    assert occurred is not None and occurred.isoformat().startswith(alert_event["occurred"][:19])
