"""The direct watcher against the sandbox Kubernetes API server and the real Redis: each event it emits, once
per fault; a watch resumed after 410 Gone; reconnection after API errors and timeouts; O(1) API calls per
event; its requests within its own RBAC Role; and its events, through the real Prefect API, starting the
deployment prefect.yaml routes them to."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from pydantic import SecretStr

from deployments.watch import Watcher, WatchSettings
from tests.integration.test_rbac import access_of, allows, grants
from tests.polling import wait_for

pytestmark = pytest.mark.timeout(90)

NS = "ferrumdeck"
MANIFEST = Path(__file__).resolve().parents[2] / "deployments" / "kubernetes" / "watcher.yaml"
FAST = {"poll_interval_s": 0.2, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}


class Recorder:
    """Where the watcher's events go in these tests (``emit``): kept, in order."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[dict]) -> None:
        with self.lock:
            self.events += events

    def of(self, event: str | None = None, pod: str | None = None) -> list[dict]:
        with self.lock:
            return [e for e in self.events if (event is None or e["event"] == event)
                    and (pod is None or e["payload"]["labels"].get("pod") == pod)]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def start(kube_settings, recorder, cluster) -> Iterator:
    """``start(settings=None, **watch_settings)`` -> a running Watcher whose first lists are done."""
    started: list[Watcher] = []

    def run(settings=None, **options) -> Watcher:
        w = Watcher(settings=settings or kube_settings, options=WatchSettings(**(FAST | options)), emit=recorder)
        started.append(w.start())
        wait_for(lambda: {"worker", "mcp"} <= w.state.synced and all(w.stats.watching.get(r) for r in ("worker", "mcp")),
                 what="first lists and watches")
        return w

    yield run
    for w in started:
        w.stop()


@pytest.fixture
def core(cluster) -> Iterator[k8s.CoreV1Api]:
    api = k8s_config.new_client_from_config(config_file=cluster.kubeconfig)
    yield k8s.CoreV1Api(api)
    api.close()


def workers(cluster) -> list[str]:
    return sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=worker"))


def restarts(cluster, pod: str) -> int:
    obj = cluster.pod(pod) or {}
    return sum(c.get("restartCount", 0) for c in (obj.get("status") or {}).get("containerStatuses") or [])


def hold_entries(redis, settings, consumer: str, n: int = 3) -> list[str]:
    """``consumer`` reads ``n`` steps and never acknowledges them."""
    redis.xgroup_create(settings.stream, settings.group, id="$", mkstream=True)
    ids = [redis.xadd(settings.stream, {"job_id": f"job-{i}", "run_id": f"run-{i}", "step_id": f"step-{i}"})
           for i in range(n)]
    got = redis.xreadgroup(settings.group, consumer, {settings.stream: ">"}, count=n)
    assert sum(len(batch) for _, batch in got) == n
    return ids


def watcher_lists(cluster) -> int:
    return sum(1 for r in cluster.requests if r.verb == "list")


# ----------------------------------------------------------------------------- one event per fault


def test_crash_loop_gives_exactly_one_crash_looping_event_with_no_list_call(start, cluster, recorder, core):
    cluster.set_timing(backoff_base=0.1, backoff_max=0.2)  # restarts every ~0.2 s: many pod updates
    w = start()
    lists = watcher_lists(cluster)
    a, b, _ = workers(cluster)
    polls = w.stats.polls
    cluster.crash_loop(a, logs=["RuntimeError: boom"])
    [event] = wait_for(lambda: recorder.of("ferrumdeck.pod.crash-looping", a), what="crash-looping event")
    wait_for(lambda: restarts(cluster, a) >= 5, what="5 restarts")
    wait_for(lambda: w.stats.polls >= polls + 3, what="a few polls")  # each poll re-judges every pod too
    assert recorder.of() == [event]  # one event for the fault, nothing about the healthy pods
    assert event["resource"]["prefect.resource.id"] == f"ferrumdeck.pod.{a}"
    assert event["payload"]["labels"] == {"pod": a, "namespace": NS, "role": "worker", "condition": "crash-looping",
                                          "consumer": a}
    assert event["payload"]["evidence"]["waiting_reason"] == "CrashLoopBackOff"
    assert watcher_lists(cluster) == lists and w.stats.expired == 0  # events cost no API call
    # the pod replaced (as the recovery does): the episode ends with it, the replacement is healthy
    core.delete_namespaced_pod(a, NS, grace_period_seconds=0)
    wait_for(lambda: a not in w.state.pods and len([p for p in w.state.pods.values() if p.info.serving
                                                    and p.role == "worker"]) == 3, what="replacement Ready")
    assert recorder.of() == [event]
    assert b in w.state.pods


def test_oom_killed_worker(start, cluster, recorder):
    start()
    a = workers(cluster)[0]
    cluster.crash_loop(a, reason="OOMKilled")
    [event] = wait_for(lambda: recorder.of("ferrumdeck.pod.oom-killed", a), what="oom-killed event")
    assert event["payload"]["evidence"]["last_exit_code"] == 137
    assert recorder.of("ferrumdeck.pod.crash-looping") == []


def test_unschedulable_worker(start, cluster, recorder):
    start()
    a = workers(cluster)[0]
    cluster.unschedulable(a)
    [event] = wait_for(lambda: recorder.of("ferrumdeck.pod.unschedulable", a), what="unschedulable event")
    assert "Insufficient cpu" in event["payload"]["evidence"]["unschedulable_message"]
    assert event["payload"]["evidence"]["phase"] == "Pending"


def test_mcp_pods_are_watched_with_the_mcp_deployments_own_selector(start, cluster, recorder):
    w = start()
    assert w.selectors == {"worker": "app=worker", "mcp": "app=mcp-server"}
    [mcp] = [p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server")]
    cluster.crash_loop(mcp)
    [event] = wait_for(lambda: recorder.of("ferrumdeck.mcp.crash-looping", mcp), what="mcp crash-looping event")
    assert event["resource"]["ferrumdeck.role"] == "mcp"
    assert recorder.of("ferrumdeck.pod.crash-looping") == []


def test_a_ready_workers_consumer_idle_holding_entries_is_hung_once(start, kube_settings, cluster, recorder, redis):
    s = kube_settings.model_copy(update={"hang_min_idle_ms": 300})
    a, b, _ = workers(cluster)
    hold_entries(redis, s, consumer=a, n=3)
    redis.xreadgroup(s.group, b, {s.stream: ">"}, count=1)  # b reads (nothing left): empty and busy, never hung
    w = start(settings=s)
    [event] = wait_for(lambda: recorder.of("ferrumdeck.consumer.hung", a), what="hung event")
    polls = w.stats.polls
    wait_for(lambda: w.stats.polls >= polls + 5, what="five more polls")
    assert recorder.of() == [event]
    assert event["resource"]["prefect.resource.id"] == f"ferrumdeck.pod.{a}"
    assert event["payload"]["labels"]["consumer"] == a and event["payload"]["evidence"]["pending"] == 3
    assert event["payload"]["evidence"]["idle_ms"] >= 300


def test_a_worker_deleted_while_its_consumer_holds_entries_is_reported_at_once(start, kube_settings, cluster,
                                                                                recorder, redis, core):
    a, b, _ = workers(cluster)
    hold_entries(redis, kube_settings, consumer=a, n=2)
    w = start(poll_interval_s=600)  # only the deletion itself can notice it within this test
    core.delete_namespaced_pod(a, NS, grace_period_seconds=0)
    [event] = wait_for(lambda: recorder.of("ferrumdeck.pod.deleted-holding-entries", a), what="deleted-holding event")
    assert w.stats.consumer_checks >= 1 and w.stats.polls == 1  # the first poll ran before the deletion
    assert event["payload"]["evidence"]["pending"] == 2
    # a pod deleted with nothing held is not an event
    core.delete_namespaced_pod(b, NS, grace_period_seconds=0)
    wait_for(lambda: w.stats.consumer_checks >= 2, what="second consumer check")
    assert recorder.of() == [event]


# ----------------------------------------------------------------------------- resilience


def test_a_410_on_the_watch_re_lists_and_the_watch_goes_on(start, cluster, recorder, core):
    cluster.set_timing(bookmark_interval=600)  # no bookmarks: the worker watch's resourceVersion stays behind
    w = start(watch_timeout_s=1)
    lists = w.stats.lists
    [mcp] = [p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server")]
    core.patch_namespaced_pod(mcp, NS, {"metadata": {"annotations": {"fd-test": uuid.uuid4().hex}}})  # not a worker
    cluster.compact()  # the worker watch's resourceVersion is now too old: its next watch gets 410 Gone
    wait_for(lambda: w.stats.expired >= 1 and w.stats.lists > lists and w.stats.watching.get("worker"),
             what="410, re-list, watching again")
    a = workers(cluster)[0]
    cluster.crash_loop(a)
    [event] = wait_for(lambda: recorder.of("ferrumdeck.pod.crash-looping", a), what="crash-looping after the 410")
    assert recorder.of() == [event]
    assert w.stats.api_errors == 0


@pytest.mark.parametrize("fault", [500, "timeout"])
def test_api_errors_and_timeouts_reconnect_with_back_off(start, cluster, recorder, fault):
    cluster.set_timing(api_timeout=0.3)
    w = start(watch_timeout_s=1)
    cluster.fail_api(fault, count=3, path_contains="/pods")  # the next watches (and a re-list, if any) fail
    wait_for(lambda: w.stats.api_errors >= 3, what="three failed requests")
    failed = [r for r in cluster.requests if r.status in (500, 504)]
    assert len(failed) == 3
    wait_for(lambda: all(w.stats.watching.get(r) for r in ("worker", "mcp")), what="watching again")
    a = workers(cluster)[0]
    cluster.crash_loop(a)
    [event] = wait_for(lambda: recorder.of("ferrumdeck.pod.crash-looping", a), what="crash-looping after the outage")
    assert recorder.of() == [event]


def test_redis_down_is_survived(start, kube_settings, cluster, recorder, redis):
    s = kube_settings.model_copy(update={"redis_url": SecretStr("redis://127.0.0.1:1/0"), "hang_min_idle_ms": 300})
    w = start(settings=s)
    wait_for(lambda: w.stats.redis_errors >= 2, what="failed polls")
    a = workers(cluster)[0]
    cluster.crash_loop(a)  # the pod watch does not depend on Redis
    wait_for(lambda: recorder.of("ferrumdeck.pod.crash-looping", a), what="crash-looping while Redis is down")


def test_healthz_is_ok_while_the_watcher_runs_and_503_once_it_stopped(start):
    """What the watcher Deployment's probes read: GET /healthz (its counts in the body), 404 elsewhere."""
    import httpx

    from deployments.watch import _health_server

    w = start()
    server = _health_server(w, None, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        ok = httpx.get(f"{url}/healthz", timeout=5)
        assert ok.status_code == 200 and ok.json()["status"] == "ok" and "loop_age_s" in ok.json()
        assert httpx.get(f"{url}/other", timeout=5).status_code == 404
        w.stop()
        gone = httpx.get(f"{url}/healthz/", timeout=5)
        assert gone.status_code == 503 and gone.json()["status"] == "unhealthy"
    finally:
        server.shutdown()


def test_every_request_is_allowed_by_the_watchers_role_and_every_grant_is_used(start, cluster, core):
    w = start(watch_timeout_s=1)
    cluster.compact()
    core.patch_namespaced_pod(workers(cluster)[0], NS, {"metadata": {"annotations": {"fd-test": "x"}}})
    wait_for(lambda: w.stats.watches >= 4, what="reconnections")
    w.stop()
    [role] = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "Role"]
    accesses = {a for a in map(access_of, cluster.requests) if a is not None}
    mine = {a for a in accesses if a.verb != "patch"}  # all but the test's own patch
    assert [a for a in mine if not allows(role["rules"], a)] == []
    assert grants(role["rules"]) == {(a.api_group, a.resource, a.verb) for a in mine}


# ----------------------------------------------------------------------------- through Prefect


def test_the_event_reaches_prefect_and_starts_worker_crash_recovery_for_that_pod(kube_settings, cluster):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from deployments.serve import build_runner_deployments
    from deployments.watch import watching

    [deployment] = build_runner_deployments(names=["worker-crash-recovery"])
    deployment.name = f"worker-crash-recovery-watch-{uuid.uuid4().hex[:6]}"  # its own, removed afterwards
    deployment.triggers = [t for t in deployment.triggers if t.match.root.get("ferrumdeck.source") == "watcher"]
    for t in deployment.triggers:
        t.name = f"{deployment.name}__{t.name}"
    deployment_id = deployment.apply()
    try:
        with watching(kube_settings, WatchSettings(**FAST)) as (w, sink):
            wait_for(lambda: "worker" in w.state.synced, what="first list")
            a = workers(cluster)[0]
            cluster.crash_loop(a)
            wait_for(lambda: sink.sent >= 1, what="the event delivered to Prefect")

            def runs():
                with get_client(sync_client=True) as client:
                    return client.read_flow_runs(deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[deployment_id])))

            [run] = wait_for(runs, timeout=30, what="a flow run started by the trigger")
            assert run.parameters == {"pod": a, "dry_run": False}
            assert sink.dropped == 0 and sink.buffered == 0
    finally:
        with get_client(sync_client=True) as client:
            for automation in client.read_automations_by_name(deployment.triggers[0].name):
                client.delete_automation(automation.id)
            for run in client.read_flow_runs(deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[deployment_id]))):
                client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)
