"""End to end: a real Alertmanager, configured with deployments/prometheus/alertmanager.yaml, notifies the
bridge (Bearer token from a file), and the alert arrives as an event in the session's real Prefect server."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.settings import PREFECT_API_URL

from deployments.bridge import BackgroundBridge, BridgeSettings, PrefectTarget, create_app
from sandbox.scratch import free_port
from tests.integration.test_bridge import EventStream
from tests.polling import wait_for

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AM_CONFIG = Path(__file__).resolve().parents[2] / "deployments" / "prometheus" / "alertmanager.yaml"
TOKEN = "e2e-bridge-token-0123456789abcdef"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        ALERTMANAGER is None,
        reason="Alertmanager not installed (Debian: apt-get install prometheus-alertmanager; .ci/run installs it)",
    ),
]


class Alertmanager:
    """A real Alertmanager process with our routes, pointed at ``bridge_url``, fast timings for tests."""

    def __init__(self, *, workdir: Path, bridge_url: str, token: str) -> None:
        token_file = workdir / "bridge-token"
        token_file.write_text(token)
        config = yaml.safe_load(AM_CONFIG.read_text())
        for route in config["route"]["routes"]:
            route.update(group_wait="0s", group_interval="1s", repeat_interval="1h")
        [bridge] = [r for r in config["receivers"] if r["name"] == "ferrumdeck-bridge"]
        [webhook] = bridge["webhook_configs"]
        webhook["url"] = f"{bridge_url}/alertmanager"
        webhook["http_config"]["authorization"]["credentials_file"] = str(token_file)
        (workdir / "alertmanager.yaml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "alertmanager.log").open("w+")
        self.proc = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={workdir / 'alertmanager.yaml'}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise AssertionError(f"alertmanager did not start:\n{self.log.read()}")
            time.sleep(0.1)  # poll

    def post_alert(self, labels: dict[str, str], *, resolved: bool = False) -> None:
        now = datetime.now(UTC)
        alert = {
            "labels": {"team": "ferrumdeck", "severity": "critical", **labels},
            "annotations": {"summary": f"e2e {labels['alertname']}"},
            "startsAt": (now - timedelta(minutes=1)).isoformat(),
            "generatorURL": "http://prometheus.test/graph",
        }
        if resolved:
            alert["endsAt"] = now.isoformat()
        r = httpx.post(f"{self.url}/api/v2/alerts", json=[alert], timeout=10)
        assert r.status_code == 200, r.text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def stream() -> Iterator[EventStream]:
    s = EventStream(PREFECT_API_URL.value()).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def bridge() -> Iterator[BackgroundBridge]:
    with BackgroundBridge(create_app(BridgeSettings(token=TOKEN))) as b:
        yield b


@pytest.fixture(scope="module")
def alertmanager(bridge, tmp_path_factory) -> Iterator[Alertmanager]:
    am = Alertmanager(workdir=tmp_path_factory.mktemp("alertmanager"), bridge_url=bridge.url, token=TOKEN)
    try:
        am.wait_ready()
        yield am
    finally:
        am.stop()


def events_for_pod(stream: EventStream, pod: str) -> list[dict]:
    return [e for e in list(stream.events) if e["resource"].get("ferrumdeck.label.pod") == pod]



def test_alert_posted_to_alertmanager_arrives_in_prefect(alertmanager, stream):
    pod = f"worker-e2e-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    alertmanager.post_alert({"alertname": "WorkerCrashLooping", "pod": pod})
    [event] = wait_for(lambda: events_for_pod(stream, pod), what=f"event for {pod}")
    elapsed = time.monotonic() - started
    assert event["event"] == "ferrumdeck.alert.firing"
    assert event["resource"]["prefect.resource.id"] == "ferrumdeck.alert.WorkerCrashLooping"
    assert event["resource"]["ferrumdeck.team"] == "ferrumdeck"
    assert event["resource"]["ferrumdeck.routed"] == "true"
    assert len(event["resource"]["ferrumdeck.fingerprint"]) == 16  # Alertmanager's fingerprint
    payload = event["payload"]
    assert payload["labels"]["pod"] == pod and payload["receiver"] == "ferrumdeck-bridge"
    assert payload["groupKey"] and payload["generatorURL"] == "http://prometheus.test/graph"
    assert elapsed < 10, f"alert took {elapsed:.1f}s to reach Prefect"


def test_resolved_alert_arrives_as_resolved_event(alertmanager, stream):
    pod = f"worker-e2e-{uuid.uuid4().hex[:6]}"
    alertmanager.post_alert({"alertname": "WorkerHung", "pod": pod})
    wait_for(lambda: events_for_pod(stream, pod), what="firing event")
    alertmanager.post_alert({"alertname": "WorkerHung", "pod": pod}, resolved=True)
    events = wait_for(lambda: len(e := events_for_pod(stream, pod)) >= 2 and e, what="resolved event")
    assert [e["event"] for e in events] == ["ferrumdeck.alert.firing", "ferrumdeck.alert.resolved"]
    assert events[0]["resource"]["ferrumdeck.fingerprint"] == events[1]["resource"]["ferrumdeck.fingerprint"]


def test_heartbeat_reaches_the_bridge_and_is_not_an_event(alertmanager, bridge, stream):
    alertmanager.post_alert({"alertname": "FerrumDeckHeartbeat", "severity": "none"})
    beat = wait_for(
        lambda: (h := httpx.get(f"{bridge.url}/heartbeat", timeout=5).json())["alertname"] and h,
        what="heartbeat",
    )
    assert beat["alertname"] == "FerrumDeckHeartbeat" and beat["age_s"] < 30
    assert not [e for e in stream.events if e["resource"]["prefect.resource.id"].endswith("FerrumDeckHeartbeat")]


class FlakyPrefect:
    """Refuses the first ``failures`` deliveries (500), then forwards to the real Prefect API."""

    def __init__(self, *, real_events_url: str, failures: int) -> None:
        self.real = real_events_url
        self.failures = failures
        self.calls = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls <= self.failures:
            return httpx.Response(500)
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(self.real, content=request.content, headers={"content-type": "application/json"})
        return httpx.Response(r.status_code)


def test_alertmanager_retries_after_503_and_the_alert_arrives_once(stream, tmp_path):
    flaky = FlakyPrefect(real_events_url=PREFECT_API_URL.value() + "/events", failures=2)
    app = create_app(
        BridgeSettings(token=TOKEN),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(flaky)),
        target=PrefectTarget(events_url="http://flaky.test/api/events"),
    )
    pod = f"worker-e2e-{uuid.uuid4().hex[:6]}"
    with BackgroundBridge(app) as b:
        am = Alertmanager(workdir=tmp_path, bridge_url=b.url, token=TOKEN)
        try:
            am.wait_ready()
            am.post_alert({"alertname": "QueueBacklog", "pod": pod})
            wait_for(lambda: events_for_pod(stream, pod), what="event after retries")
        finally:
            am.stop()
    assert flaky.calls >= 3  # two refusals answered 503, Alertmanager retried
    assert len(events_for_pod(stream, pod)) == 1


def test_wrong_token_is_refused_and_nothing_arrives(bridge, stream, tmp_path):
    am = Alertmanager(workdir=tmp_path, bridge_url=bridge.url, token="not-the-token-0123456789")
    pod = f"worker-e2e-{uuid.uuid4().hex[:6]}"
    marker = f"worker-e2e-{uuid.uuid4().hex[:6]}"
    try:
        am.wait_ready()
        am.post_alert({"alertname": "WorkerCrashLooping", "pod": pod})
        # Alertmanager logs the 401 (it does not retry 4xx)
        wait_for(lambda: "401" in (am.log.seek(0) or am.log.read()), what="401 in Alertmanager's log")
    finally:
        am.stop()
    (tmp_path / "good").mkdir()
    good = Alertmanager(workdir=tmp_path / "good", bridge_url=bridge.url, token=TOKEN)
    try:
        good.wait_ready()
        good.post_alert({"alertname": "WorkerCrashLooping", "pod": marker})
        wait_for(lambda: events_for_pod(stream, marker), what="marker event")
    finally:
        good.stop()
    assert events_for_pod(stream, pod) == []
