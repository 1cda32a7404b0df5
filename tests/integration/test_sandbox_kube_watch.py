"""The sandbox's watch protocol and lifecycle edges: raw chunked streams, bookmarks, filtered watches, reset,
faults that hold requests, unschedulable pods, listeners, server-side dry run, and ``python -m sandbox.kube``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

NS = "ferrumdeck"
PODS = f"/api/v1/namespaces/{NS}/pods"


@pytest.fixture
def http(cluster):
    with httpx.Client(base_url=cluster.url, timeout=10) as c:
        yield c


@pytest.fixture
def core(cluster):
    api_client = k8s_config.new_client_from_config(config_file=cluster.kubeconfig)
    yield k8s.CoreV1Api(api_client)
    api_client.close()


def is_ready(pod: dict) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or []
    )


def worker_names(cluster) -> list[str]:
    return sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=worker"))


def watch_lines(http: httpx.Client, path: str, **params: str) -> tuple[list[dict], bytes]:
    """Read a whole watch stream (the server closes it at timeoutSeconds); the events and the raw bytes."""
    with http.stream("GET", path, params={"watch": "true", **params}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        raw = response.read()
    return [json.loads(line) for line in raw.splitlines() if line.strip()], raw


def when_watching(cluster, fn) -> threading.Thread:
    """Run ``fn`` on a thread as soon as the server has received one more watch request (the test's own)."""
    watches = sum(1 for r in cluster.requests if r.verb == "watch")

    def run() -> None:
        cluster.wait_until(lambda: sum(1 for r in cluster.requests if r.verb == "watch") > watches, timeout=5)
        fn()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_watch_from_zero_lists_then_closes_at_timeout_with_bookmark_and_newlines(cluster, http):
    cluster.set_timing(bookmark_interval=0.3)
    started = time.monotonic()
    events, raw = watch_lines(http, PODS, labelSelector="app=worker", timeoutSeconds="1", allowWatchBookmarks="true")
    assert 0.9 <= time.monotonic() - started < 3
    assert raw.endswith(b"\n") and raw.count(b"\n") == len(events)
    added = [e for e in events if e["type"] == "ADDED"]
    assert sorted(e["object"]["metadata"]["name"] for e in added) == worker_names(cluster)
    assert all(e["object"]["kind"] == "Pod" and e["object"]["apiVersion"] == "v1" for e in added)
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks and bookmarks[-1]["object"]["metadata"]["resourceVersion"] == cluster.resource_version


def test_filtered_watch_sees_deleted_when_a_pod_leaves_the_selector(cluster, http):
    rv = http.get(PODS).json()["metadata"]["resourceVersion"]
    victim = worker_names(cluster)[0]
    relabel = when_watching(cluster, lambda: http.patch(
        f"{PODS}/{victim}", content=json.dumps({"metadata": {"labels": {"app": "quarantine"}}}),
        headers={"Content-Type": "application/strategic-merge-patch+json"}).raise_for_status())
    events, _ = watch_lines(http, PODS, labelSelector="app=worker", resourceVersion=rv, timeoutSeconds="1")
    relabel.join()
    mine = [(e["type"], e["object"]["metadata"]["name"]) for e in events if e["object"]["metadata"]["name"] == victim]
    assert mine == [("DELETED", victim)]
    # the ReplicaSet released the pod and made a replacement that joins the watch's selector
    cluster.wait_until(lambda: len([p for p in cluster.pods(selector="app=worker") if is_ready(p)]) == 3)
    (orphan,) = cluster.pods(selector="app=quarantine")
    assert not orphan["metadata"].get("ownerReferences")


def test_watch_by_name_follows_one_deployment_like_rollout_status(cluster, core):
    apps = k8s.AppsV1Api(core.api_client)
    listing = apps.list_namespaced_deployment(NS, field_selector="metadata.name=worker")
    rv = listing.metadata.resource_version
    when_watching(cluster, lambda: apps.patch_namespaced_deployment(
        "worker", NS, {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "now"}}}}}))
    done = None
    for event in k8s_watch.Watch().stream(apps.list_namespaced_deployment, NS, field_selector="metadata.name=worker",
                                          resource_version=rv, timeout_seconds=10):
        d = event["object"]
        assert d.metadata.name == "worker"
        s = d.status
        if (d.metadata.generation == 2 and s.observed_generation == 2 and s.updated_replicas == 3
                and (s.replicas or 0) == 3 and s.available_replicas == 3):
            done = d
            break
    assert done is not None
    assert {c.type: c.reason for c in done.status.conditions}["Progressing"] == "NewReplicaSetAvailable"


def test_reset_ends_open_watches_and_expires_old_versions(cluster, core):
    old_rv = core.list_namespaced_pod(NS).metadata.resource_version
    outcome: list[object] = []

    def follow() -> None:
        try:
            # without timeout_seconds the client reconnects when the server closes the stream
            for event in k8s_watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=old_rv):
                outcome.append(event["type"])
        except ApiException as e:
            outcome.append(e.status)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    cluster.wait_until(lambda: any(r.verb == "watch" for r in cluster.requests))
    cluster.reset()
    watcher.join(timeout=5)
    # the server closed the stream; the client resumed from its last version, which reset had expired
    assert not watcher.is_alive() and outcome[-1] == 410
    assert "ADDED" not in outcome
    with pytest.raises(ApiException) as err:
        list(k8s_watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=old_rv, timeout_seconds=1))
    assert err.value.status == 410 and "too old resource version" in str(err.value)


def test_timeout_fault_holds_the_request_then_504(cluster, core):
    cluster.set_timing(api_timeout=0.3)
    cluster.fail_api("timeout", count=1, path_contains="/pods")
    started = time.monotonic()
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod(NS)
    assert err.value.status == 504 and time.monotonic() - started >= 0.3
    cluster.fail_api("timeout", count=4)  # urllib3 under the client retries a read timeout 3 times
    with pytest.raises(urllib3.exceptions.MaxRetryError, match="Read timed out"):
        core.list_namespaced_pod(NS, _request_timeout=0.1)
    assert len(core.list_namespaced_pod(NS).items) == 4


def test_unschedulable_pod_is_pending_with_failed_scheduling_event(cluster, core):
    victim = worker_names(cluster)[0]
    cluster.unschedulable(victim)
    pod = core.read_namespaced_pod(victim, NS)
    assert pod.status.phase == "Pending" and pod.spec.node_name is None
    (cond,) = pod.status.conditions
    assert (cond.type, cond.status, cond.reason) == ("PodScheduled", "False", "Unschedulable")
    events = core.list_namespaced_event(NS, field_selector=f"involvedObject.uid={pod.metadata.uid},reason=FailedScheduling")
    assert [e.source.component for e in events.items] == ["default-scheduler"]
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log(victim, NS)
    assert err.value.status == 400
    cluster.wait_until(lambda: cluster.deployment("worker")["status"].get("readyReplicas") == 2)
    assert cluster.deployment("worker")["status"]["unavailableReplicas"] == 1


def test_listeners_hear_every_pod_change_in_order(cluster, core):
    heard: list[tuple[str, str, str]] = []
    cluster.add_listener(lambda kind, pod: heard.append((kind, pod["metadata"]["name"], pod["status"].get("phase", ""))))
    k8s.AppsV1Api(core.api_client).patch_namespaced_deployment_scale("worker", NS, {"spec": {"replicas": 4}})
    cluster.wait_until(lambda: len([p for p in cluster.pods(selector="app=worker") if is_ready(p)]) == 4)
    cluster.wait_until(lambda: any(kind == "MODIFIED" and phase == "Running" for kind, _, phase in heard))
    new = [name for kind, name, _ in heard if kind == "ADDED"]
    assert len(new) == 1
    phases = [phase for kind, name, phase in heard if name == new[0]]
    assert phases[0] == "Pending" and phases[-1] == "Running"


def test_server_side_dry_run_changes_nothing(cluster, http):
    victim = worker_names(cluster)[0]
    before = cluster.resource_version
    assert http.delete(f"{PODS}/{victim}", params={"dryRun": "All"}).status_code == 200
    patch = http.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/worker/scale", params={"dryRun": "All"},
                       content=json.dumps({"spec": {"replicas": 9}}),
                       headers={"Content-Type": "application/merge-patch+json"})
    assert patch.json()["spec"]["replicas"] == 9
    assert cluster.resource_version == before
    assert victim in worker_names(cluster) and cluster.deployment("worker")["spec"]["replicas"] == 3


def test_update_with_stale_resource_version_conflicts(cluster, core):
    victim = worker_names(cluster)[0]
    pod = core.read_namespaced_pod(victim, NS)
    core.patch_namespaced_pod(victim, NS, {"metadata": {"annotations": {"note": "first"}}})
    pod.metadata.annotations = {"note": "second"}
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_pod(victim, NS, pod)
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"
    assert cluster.pod(victim)["metadata"]["annotations"] == {"note": "first"}


def test_module_entry_point_serves_until_interrupted(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.kube", "--port", "0", "--kubeconfig", str(kubeconfig), "--timing", "fast"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    try:
        line = proc.stdout.readline()
        assert "serving at http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        api_client = k8s_config.new_client_from_config(config_file=str(kubeconfig))
        pods = k8s.CoreV1Api(api_client).list_namespaced_pod(NS, label_selector="app=worker").items
        assert len(pods) == 3 and all(p.status.phase == "Running" for p in pods)
        api_client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_expired_events_are_pruned(cluster, core):
    assert core.list_namespaced_event(NS, field_selector="reason=Scheduled").items
    cluster.set_timing(event_ttl=-60.0, event_prune_interval=0.0)  # everything is older than the cutoff
    core.patch_namespaced_pod(worker_names(cluster)[0], NS, {"metadata": {"labels": {"poke": "1"}}})  # wakes controllers
    cluster.wait_until(lambda: not core.list_namespaced_event(NS, field_selector="reason=Scheduled").items)


def test_client_quirks_python_booleans_protobuf_accept_and_pagination(cluster, http):
    victim = worker_names(cluster)[0]
    cluster.crash_loop(victim, logs=["boom"])
    # client v35 sends Python-style booleans
    assert http.get(f"{PODS}/{victim}/log", params={"previous": "True"}).text == "boom\n"
    events, _ = watch_lines(http, PODS, watch="True", timeoutSeconds="1", labelSelector="app=mcp-server")
    assert [e["type"] for e in events] == ["ADDED"]
    # protobuf asked first: JSON answered, never 406
    pb = http.get(PODS, headers={"Accept": "application/vnd.kubernetes.protobuf, application/json"})
    assert pb.status_code == 200 and pb.headers["content-type"] == "application/json" and pb.json()["kind"] == "PodList"
    # limit/continue
    first = http.get(PODS, params={"limit": "3"}).json()
    assert len(first["items"]) == 3 and first["metadata"]["remainingItemCount"] == 1
    rest = http.get(PODS, params={"limit": "3", "continue": first["metadata"]["continue"]}).json()
    names = [p["metadata"]["name"] for p in first["items"] + rest["items"]]
    assert sorted(names) == sorted(p["metadata"]["name"] for p in cluster.pods()) and "continue" not in rest["metadata"]
