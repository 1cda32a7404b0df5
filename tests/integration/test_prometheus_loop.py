"""The detection loop, real: Debian's Prometheus scrapes the sandbox's /metrics and the real redis and blackbox
exporters, evaluates the project's rules (a fast profile of them), and sends alerts to the real Alertmanager,
which notifies the real alert bridge (its Prefect API stubbed: the events it would post are kept).

Everything runs on 127.0.0.1 with free ports; the redis exporter checks a stream of this module's own key prefix.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import redis as redis_lib
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from deployments.bridge import BackgroundBridge, BridgeSettings, PrefectTarget, create_app
from sandbox.http_server import serve_app
from sandbox.kube.store import Store
from sandbox.llm import LLMProviders, ProviderError
from sandbox.mcp import MCPServer
from sandbox.metrics import serve_sandbox_metrics
from sandbox.observability import (
    DEMO,
    RULES,
    Observability,
    missing_packages,
    rule_metric_names,
    with_profile,
)
from tasks.runs import create_schema, tables
from tasks.settings import Settings
from tests.conftest import REDIS_URL
from tests.polling import wait_for

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(bool(missing_packages()), reason=f"not installed: {' '.join(missing_packages())} "
                       "(Debian: apt-get install -y prometheus prometheus-alertmanager prometheus-redis-exporter "
                       "prometheus-blackbox-exporter)"),
]

#: the demo profile, faster still: every for: 1 s, a hang after 1 s idle, a backlog at 1 s behind
FAST = with_profile(DEMO, name="test", scrape_interval_s=0.5, evaluation_interval_s=0.5, rule_for_s=1,
                    hang_idle_s=1, backlog_wait_s=1, llm_window="5s", stuck_after_s=60, group_interval_s=1,
                    resend_delay_s=0.5)
TOKEN = "prometheus-loop-bridge-token-0123"
ALERT_S = 20  # deadline for an alert to fire (it takes ~2-4 s)


@pytest.fixture(scope="module")
def loop(sandbox_cluster, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """Sandbox metrics + MCP stub + bridge + Prometheus/Alertmanager/exporters, for the whole module."""
    tmp = tmp_path_factory.mktemp("prometheus-loop")
    prefix = f"fdtest:{uuid.uuid4().hex[:10]}"
    settings = Settings(database_url=SecretStr(f"sqlite:///{tmp / 'runs.db'}"), namespace="ferrumdeck",
                        stream=f"{prefix}:steps", group="workers")
    create_schema(settings=settings)
    llm, mcp = LLMProviders(), MCPServer()
    mcp_served = serve_app(mcp.app(), name="mcp")
    events: list[dict] = []

    def prefect(request: httpx.Request) -> httpx.Response:
        import json

        events.extend(json.loads(request.content))
        return httpx.Response(200)

    bridge_app = create_app(BridgeSettings(token=TOKEN), http_client=httpx.AsyncClient(transport=httpx.MockTransport(prefect)),
                            target=PrefectTarget(events_url="http://prefect.test/api/events"))
    bridge = BackgroundBridge(bridge_app).start()
    metrics = serve_sandbox_metrics(sandbox_cluster, settings, llm=llm, mcp=mcp, stuck_after_s=FAST.stuck_after_s)
    t0 = time.monotonic()
    obs = None
    try:
        obs = Observability.start(
            profile=FAST, sandbox_metrics=metrics.address, redis_url=REDIS_URL, streams=[settings.stream],
            probe_urls=[f"{mcp_served.url}/health"], bridge_url=bridge.url, bridge_token=TOKEN,
            stream=settings.stream, group=settings.group, state_dir=tmp / "observability",
        )
        obs.wait_until_scraped(timeout_s=30)
        started_s = time.monotonic() - t0
        yield SimpleNamespace(obs=obs, settings=settings, llm=llm, mcp=mcp, mcp_url=mcp_served.url, events=events,
                              bridge=bridge, metrics=metrics, started_s=started_s, state=tmp / "observability")
    finally:
        if obs is not None:
            obs.stop()
        metrics.stop()
        bridge.stop()
        mcp_served.stop()
        client = redis_lib.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def r(loop) -> Iterator[redis_lib.Redis]:
    """Redis with this module's stream removed before and after the test."""
    client = redis_lib.Redis.from_url(REDIS_URL, decode_responses=True)
    client.delete(loop.settings.stream)
    yield client
    client.delete(loop.settings.stream)
    client.close()


def ready_workers(cluster) -> list[str]:
    pods = cluster.pods(selector="app=worker")
    return sorted(p["metadata"]["name"] for p in pods
                  if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])))


def firing(obs: Observability, alertname: str, **labels: str) -> list[dict]:
    return [a for a in obs.alerts() if a["labels"]["alertname"] == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def in_alertmanager(obs: Observability, alertname: str, **labels: str) -> list[dict]:
    return [a for a in obs.alertmanager_alerts() if a["labels"]["alertname"] == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def test_loop_started_with_the_profile_rules_and_every_target_up(loop):
    targets = {t["labels"]["job"]: t for t in loop.obs.targets()}
    assert set(targets) == {"kube-state-metrics", "ferrumdeck", "redis", "blackbox-mcp"}
    assert all(t["health"] == "up" for t in targets.values())
    assert loop.obs.problems() == []
    rules = loop.obs.rules_path.read_text()
    assert f'stream="{loop.settings.stream}"' in rules and "for: 1s" in rules and "for: 1m" not in rules
    assert "for: 1m" in RULES.read_text()  # the production values stay in the rules file
    print(f"loop started and every target scraped in {loop.started_s:.2f} s")
    assert loop.started_s < 30, f"the loop took {loop.started_s:.1f} s to start"


def test_crash_looping_pod_fires_through_prometheus_alertmanager_and_the_bridge(loop, cluster):
    obs = loop.obs
    pod = ready_workers(cluster)[0]
    wait_for(lambda: obs.query(f'kube_pod_status_ready{{pod="{pod}", condition="true"}} == 1'), timeout=10,
             what=f"Prometheus to scrape {pod} Ready")
    assert not firing(obs, "WorkerCrashLooping", pod=pod)

    t0 = time.monotonic()
    cluster.crash_loop(pod, exit_code=1, reason="Error")
    [alert] = wait_for(lambda: firing(obs, "WorkerCrashLooping", pod=pod), timeout=ALERT_S, what="WorkerCrashLooping")
    fired_s = time.monotonic() - t0
    assert alert["labels"] | {"namespace": "ferrumdeck", "severity": "critical", "team": "ferrumdeck"} == alert["labels"]
    current = set(ready_workers(cluster)) | {pod}
    assert {a["labels"]["pod"] for a in firing(obs, "WorkerCrashLooping")} & current == {pod}  # only the crashed pod

    [held] = wait_for(lambda: in_alertmanager(obs, "WorkerCrashLooping", pod=pod), timeout=ALERT_S,
                      what="the alert in Alertmanager")
    assert held["receivers"] == [{"name": "ferrumdeck-bridge"}]
    [event] = wait_for(lambda: [e for e in loop.events if e["resource"].get("ferrumdeck.label.pod") == pod],
                       timeout=ALERT_S, what="the bridge's event for the pod")
    at_bridge_s = time.monotonic() - t0
    assert event["event"] == "ferrumdeck.alert.firing"
    assert event["resource"]["prefect.resource.id"] == "ferrumdeck.alert.WorkerCrashLooping"
    assert event["payload"]["labels"]["pod"] == pod
    # the always-firing heartbeat went the same way and the bridge recorded it
    beat = httpx.get(f"{loop.bridge.url}/heartbeat", timeout=5).json()
    assert beat["alertname"] == "FerrumDeckHeartbeat"
    print(f"crash -> Prometheus firing {fired_s:.2f} s, -> bridge event {at_bridge_s:.2f} s")
    assert at_bridge_s < ALERT_S


def test_redis_exporter_series_make_worker_hung_and_queue_backlog_fire(loop, cluster, r):
    obs, stream, group = loop.obs, loop.settings.stream, loop.settings.group
    a, b, c = ready_workers(cluster)
    r.xgroup_create(stream, group, id="0", mkstream=True)
    ids = [r.xadd(stream, {"n": str(i)}) for i in range(6)]
    assert len(r.xreadgroup(group, a, {stream: ">"}, count=3)[0][1]) == 3  # a holds 3 and goes silent (hung)
    assert len(r.xreadgroup(group, c, {stream: ">"}, count=3)[0][1]) == 3  # c holds 3 ...
    r.xgroup_createconsumer(stream, group, b)  # b holds nothing (an idle worker on an empty queue)
    # 4 steps nobody picks up; ids a few ms later than those delivered (the exporter reports ids in ms)
    last_ms = int(ids[-1].split("-")[0])
    for i in range(4):
        r.xadd(stream, {"n": str(6 + i)}, id=f"{last_ms + 3}-*")
    cluster.crash_loop(c)  # ... but c's pod is not Ready: that is a crash, not a hang

    t0 = time.monotonic()
    [hung] = wait_for(lambda: firing(obs, "WorkerHung", pod=a), timeout=ALERT_S, what="WorkerHung for a")
    assert hung["labels"]["consumer"] == a and hung["labels"]["team"] == "ferrumdeck"
    assert {x["labels"]["pod"] for x in firing(obs, "WorkerHung")} & {a, b, c} == {a}
    [backlog] = wait_for(lambda: firing(obs, "QueueBacklog", stream=stream, group=group), timeout=ALERT_S,
                         what="QueueBacklog")
    assert float(backlog["value"]) > FAST.backlog_wait_s
    print(f"WorkerHung and QueueBacklog firing {time.monotonic() - t0:.2f} s after the scene was set")
    wait_for(lambda: in_alertmanager(obs, "WorkerHung", pod=a) and in_alertmanager(obs, "QueueBacklog", stream=stream),
             timeout=ALERT_S, what="both alerts in Alertmanager")

    # the workers catch up: every step delivered -> the backlog resolves (the rule needs undelivered steps)
    r.xreadgroup(group, b, {stream: ">"}, count=100)
    wait_for(lambda: not firing(obs, "QueueBacklog", stream=stream), timeout=ALERT_S, what="QueueBacklog resolved")


def test_other_rules_fire_from_the_sandbox_state(loop, cluster):
    """LLMProviderErrors, MCPServerDown and RunsStuck, from the LLM stub, the MCP stub (blackbox) and the runs DB."""
    obs, s = loop.obs, loop.settings
    model = f"openai/gpt-test-{uuid.uuid4().hex[:6]}"
    run_id = f"run-stuck-{uuid.uuid4().hex[:8]}"
    runs = tables(s).runs
    engine = sa.create_engine(s.database_url.get_secret_value())
    try:
        for _ in range(5):
            loop.llm.complete(model=model)
        loop.llm.outage("openai")
        loop.mcp.outage(current_pods=[])
        with engine.begin() as conn:
            conn.execute(runs.insert().values(id=run_id, status="running",
                                              started_at=datetime.now(UTC) - timedelta(hours=2)))

        def llm_errors() -> list[dict]:
            for _ in range(3):  # the workers keep calling the failing model
                with pytest.raises(ProviderError):
                    loop.llm.complete(model=model)
            return firing(obs, "LLMProviderErrors", provider="openai", model=model)

        [llm_alert] = wait_for(llm_errors, timeout=ALERT_S, what="LLMProviderErrors")
        assert llm_alert["labels"]["namespace"] == "ferrumdeck"
        [mcp_alert] = wait_for(lambda: firing(obs, "MCPServerDown"), timeout=ALERT_S, what="MCPServerDown")
        assert mcp_alert["labels"]["deployment"] == "mcp-server"
        [stuck] = wait_for(lambda: firing(obs, "RunsStuck", namespace="ferrumdeck"), timeout=ALERT_S, what="RunsStuck")
        assert float(stuck["value"]) == 1
    finally:
        loop.llm.restore()
        loop.mcp.restore()
        with engine.begin() as conn:
            conn.execute(runs.delete().where(runs.c.id == run_id))
        engine.dispose()
    wait_for(lambda: not firing(obs, "MCPServerDown") and not firing(obs, "RunsStuck"), timeout=ALERT_S,
             what="MCPServerDown and RunsStuck resolved")


def metric_names(text: str) -> set[str]:
    """The sample names of an exposition (counters as ``*_total``, as Prometheus stores them)."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_the_rules_use_is_served_by_the_sandbox_or_a_debian_exporter(loop, cluster, r):
    obs, s = loop.obs, loop.settings
    # something to show for every series: a crash-looping worker, an LLM call, a consumer holding a step
    cluster.crash_loop(ready_workers(cluster)[0])
    loop.llm.complete(model="openai/gpt-4o")
    r.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    r.xadd(s.stream, {"n": "1"})
    r.xreadgroup(s.group, "worker-x", {s.stream: ">"}, count=1)

    sandbox = metric_names(httpx.get(loop.metrics.url, timeout=10).text)
    redis_exporter = metric_names(httpx.get(obs.url("redis_exporter") + "/metrics", timeout=10).text)
    blackbox = metric_names(httpx.get(obs.url("blackbox_exporter") + "/probe", timeout=10,
                                      params={"target": f"{loop.mcp_url}/health", "module": "http_2xx"}).text)
    prometheus_own = {"up"}  # Prometheus writes `up` for every target it scrapes
    used = rule_metric_names(RULES.read_text())
    sources = {"sandbox": sandbox, "redis_exporter": redis_exporter, "blackbox_exporter": blackbox,
               "prometheus": prometheus_own}
    unserved = {name for name in used if not any(name in names for names in sources.values())}
    assert unserved == set(), f"the rules use metrics nothing serves: {sorted(unserved)}"
    assert {"redis_stream_group_lag"} - redis_exporter  # why QueueBacklog measures time: 1.45 has no lag series

    # and Prometheus really holds every one of them (scraped, not only served)
    names = "|".join(sorted(used))

    def stored() -> set[str]:
        return {x["metric"]["__name__"] for x in obs.query(f'count by (__name__) ({{__name__=~"{names}"}})')}

    wait_for(lambda: stored() == used, timeout=ALERT_S, what="every rule metric in Prometheus")


def test_metrics_of_a_cluster_with_no_pods_and_a_database_that_is_gone(tmp_path):
    """Nothing to show is not an error; a runs database that does not answer costs only its own series."""
    empty = SimpleNamespace(store=Store())
    settings = Settings(database_url=SecretStr(f"sqlite:///{tmp_path / 'missing' / 'runs.db'}"))
    endpoint = serve_sandbox_metrics(empty, settings)
    try:
        response = httpx.get(endpoint.url, timeout=10)
    finally:
        endpoint.stop()
    assert response.status_code == 200
    names = metric_names(response.text)
    assert not {n for n in names if n.startswith("kube_")}
    assert "ferrumdeck_runs_stuck" not in names
    assert 'ferrumdeck_sandbox_source_up{source="runs_db"} 0.0' in response.text
    assert 'ferrumdeck_sandbox_source_up{source="kube_state"} 1.0' in response.text


def test_observability_stop_ends_every_process(loop, tmp_path: Path):
    """A second loop, stopped: every process it started has exited (and stop() is idempotent)."""
    obs = Observability.start(profile=FAST, state_dir=tmp_path)
    procs = [c.popen for c in obs.components.values()]
    assert set(obs.components) == {"alertmanager", "prometheus"}  # nothing to watch: no exporter started
    obs.stop()
    obs.stop()
    assert all(p.poll() is not None for p in procs)


def test_an_exporter_that_is_down_and_an_alertmanager_out_of_reach_are_named_and_nothing_crashes(tmp_path: Path):
    """A second loop whose redis exporter watches a Redis that is not there, is then killed, and whose
    Alertmanager is killed: Prometheus goes on, ``problems()`` names each in words, and the recovery system's
    RecoveryDetectionBlind expression (real Prometheus, real exporter output) names the blind source."""
    from sandbox.observability import PROMETHEUS_DIR
    from sandbox.scratch import free_port

    rules = yaml.safe_load((PROMETHEUS_DIR / "recovery-system-alerts.yaml").read_text())
    [blind] = [r["expr"] for g in rules["groups"] for r in g["rules"] if r["alert"] == "RecoveryDetectionBlind"]
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    obs = Observability.start(profile=FAST, redis_url=nowhere, streams=["fdtest:nowhere:steps"], state_dir=tmp_path)
    try:
        def problems_with(text: str) -> list[str]:
            return [p for p in obs.problems() if text in p]

        [unreachable] = wait_for(lambda: problems_with("cannot reach Redis"), timeout=ALERT_S, what="redis_up 0")
        assert obs.components["redis_exporter"].address in unreachable
        sources = {x["metric"]["source"] for x in obs.query(blind)}
        assert "redis_exporter (Redis unreachable)" in sources and "redis_exporter (the step stream)" in sources

        obs.components["redis_exporter"].popen.kill()
        [down] = wait_for(lambda: problems_with("redis target"), timeout=ALERT_S, what="the exporter's target down")
        assert "is down" in down and "connection refused" in down

        obs.components["alertmanager"].popen.kill()
        [cut] = wait_for(lambda: problems_with("cannot reach Alertmanager"), timeout=ALERT_S, what="Alertmanager gone")
        assert obs.components["alertmanager"].url in cut
        # FerrumDeckHeartbeat always fires: Prometheus keeps trying to send it, and counts its failures
        wait_for(lambda: problems_with("failed"), timeout=ALERT_S, what="Prometheus' failed notifications")
        assert obs.query("vector(1)")[0]["value"][1] == "1"  # Prometheus itself goes on
    finally:
        obs.stop()
    assert all(not c.alive() for c in obs.components.values())
