"""The sandbox Kubernetes API server through the official client: lists, watches, patches, scale, faults.

Every test starts from the seeded namespace (`cluster` fixture resets it); waits poll with deadlines.
"""

from __future__ import annotations

import json

import httpx
import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

NS = "ferrumdeck"


@pytest.fixture
def api(cluster):
    api_client = k8s_config.new_client_from_config(config_file=cluster.kubeconfig)
    yield api_client
    api_client.close()


@pytest.fixture
def core(api):
    return k8s.CoreV1Api(api)


@pytest.fixture
def apps(api):
    return k8s.AppsV1Api(api)


def is_ready(pod: dict) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or []
    )


def ready_workers(cluster) -> list[str]:
    return sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=worker") if is_ready(p))


def worker_names(cluster) -> list[str]:
    return sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=worker"))


# --- discovery and seed ---


def test_discovery_lists_groups_resources_and_subresources(cluster):
    with httpx.Client(base_url=cluster.url, timeout=5) as http:
        assert http.get("/version").json()["minor"] == "32"
        assert http.get("/api").json()["versions"] == ["v1"]
        groups = {g["name"] for g in http.get("/apis").json()["groups"]}
        assert {"apps", "policy", "metrics.k8s.io"} <= groups
        core_names = {r["name"] for r in http.get("/api/v1").json()["resources"]}
        assert {"pods", "pods/log", "pods/eviction", "events", "namespaces"} <= core_names
        apps_resources = {r["name"]: r for r in http.get("/apis/apps/v1").json()["resources"]}
        assert apps_resources["deployments/scale"]["group"] == "autoscaling"
        assert apps_resources["deployments"]["shortNames"] == ["deploy"]
        missing = http.get("/api/v1/namespaces/ferrumdeck/pods/nope")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/json"
        assert missing.json()["kind"] == "Status" and missing.json()["reason"] == "NotFound"


def test_seeded_namespace_has_ready_workers_and_mcp_server(cluster, apps):
    deploy = apps.read_namespaced_deployment("worker", NS)
    assert deploy.spec.replicas == 3 and deploy.status.ready_replicas == 3
    env = {e.name: e.value for e in deploy.spec.template.spec.containers[0].env}
    assert env == {"LITELLM_MODEL": "openai/gpt-4o"}
    assert len(ready_workers(cluster)) == 3
    mcp = cluster.pods(selector="app=mcp-server")
    assert len(mcp) == 1 and is_ready(mcp[0])
    rs_name = mcp[0]["metadata"]["ownerReferences"][0]["name"]
    assert rs_name.startswith("mcp-server-") and mcp[0]["metadata"]["name"].startswith(rs_name + "-")


# --- lists and selectors ---


def test_list_with_label_and_field_selectors(cluster, core):
    names = worker_names(cluster)
    assert sorted(p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app=worker").items) == names
    assert [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app in (mcp-server)").items] == [
        p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server")
    ]
    assert core.list_namespaced_pod(NS, label_selector="app!=worker,app").items[0].metadata.labels["app"] == "mcp-server"
    only = core.list_namespaced_pod(NS, field_selector=f"metadata.name={names[1]}").items
    assert [p.metadata.name for p in only] == [names[1]]
    cluster.unschedulable(names[0])
    running = core.list_namespaced_pod(NS, label_selector="app=worker", field_selector="status.phase=Running").items
    assert sorted(p.metadata.name for p in running) == names[1:]
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod(NS, field_selector="spec.bogus=1")
    assert err.value.status == 400 and "field label not supported" in json.loads(err.value.body)["message"]


# --- delete, replacement, watch ---


def test_delete_pod_terminates_then_replacement_becomes_ready(cluster, core):
    cluster.set_timing(grace=30.0)  # keep the old pod Terminating while we look
    victim = worker_names(cluster)[0]
    seen: list[tuple[str, str, bool]] = []
    cluster.add_listener(lambda kind, pod: seen.append((kind, pod["metadata"]["name"], is_ready(pod))))
    deleted = core.delete_namespaced_pod(victim, NS)
    assert deleted.metadata.deletion_timestamp is not None and deleted.metadata.deletion_grace_period_seconds == 30
    cluster.wait_until(lambda: len(ready_workers(cluster)) == 3)  # the replacement is up while the old one terminates
    with httpx.Client(base_url=cluster.url, timeout=5) as http:
        row = http.get(f"/api/v1/namespaces/{NS}/pods/{victim}",
                       headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}).json()["rows"][0]
    assert row["cells"][2] == "Terminating"
    assert len(worker_names(cluster)) == 4 and victim not in ready_workers(cluster)
    core.delete_namespaced_pod(victim, NS, grace_period_seconds=0)  # --force: gone at once
    assert victim not in worker_names(cluster)
    cluster.wait_until(lambda: ("DELETED", victim, False) in seen)
    added = [name for kind, name, _ in seen if kind == "ADDED"]
    assert len(added) == 1 and added[0] in ready_workers(cluster)
    assert deleted.metadata.uid != core.read_namespaced_pod(added[0], NS).metadata.uid


def test_watch_resume_from_resource_version_has_no_duplicates(cluster, core):
    listing = core.list_namespaced_pod(NS, label_selector="app=worker")
    start_rv = listing.metadata.resource_version
    victim = listing.items[0].metadata.name
    core.delete_namespaced_pod(victim, NS)
    cluster.wait_until(lambda: victim not in worker_names(cluster) and len(ready_workers(cluster)) == 3)

    first = list(k8s_watch.Watch().stream(core.list_namespaced_pod, NS, label_selector="app=worker",
                                          resource_version=start_rv, timeout_seconds=1))
    versions = [e["object"].metadata.resource_version for e in first]
    assert len(versions) == len(set(versions)) and versions == sorted(versions, key=int)
    assert ("DELETED", victim) in [(e["type"], e["object"].metadata.name) for e in first]
    assert all(int(v) > int(start_rv) for v in versions)

    again = list(k8s_watch.Watch().stream(core.list_namespaced_pod, NS, label_selector="app=worker",
                                          resource_version=versions[-1], timeout_seconds=1))
    assert again == []


def test_watch_from_compacted_version_gets_410(cluster, core):
    old_rv = core.list_namespaced_pod(NS).metadata.resource_version
    core.delete_namespaced_pod(worker_names(cluster)[0], NS)
    cluster.compact()
    with pytest.raises(ApiException) as err:
        list(k8s_watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=old_rv, timeout_seconds=1))
    assert err.value.status == 410


# --- deployments: scale and patches ---


def test_scale_subresource_patch_and_replace(cluster, apps):
    assert apps.read_namespaced_deployment_scale("worker", NS).spec.replicas == 3
    apps.patch_namespaced_deployment_scale("worker", NS, {"spec": {"replicas": 5}})
    cluster.wait_until(lambda: len(ready_workers(cluster)) == 5)
    scale = apps.read_namespaced_deployment_scale("worker", NS)
    scale.spec.replicas = 2
    apps.replace_namespaced_deployment_scale("worker", NS, scale)
    cluster.wait_until(lambda: len(worker_names(cluster)) == 2 and len(ready_workers(cluster)) == 2)
    assert apps.read_namespaced_deployment_scale("worker", NS).status.selector == "app=worker"
    assert cluster.deployment("worker")["status"]["replicas"] == 2


def test_strategic_merge_set_env_rolls_out_new_replicaset(cluster, apps):
    old_pods = set(worker_names(cluster))
    patch = {"spec": {"template": {"spec": {"containers": [
        {"name": "worker", "env": [{"name": "LITELLM_MODEL", "value": "anthropic/claude-sonnet-4-20250514"}]}]}}}}
    apps.patch_namespaced_deployment("worker", NS, patch)

    def rolled_out():
        d = cluster.deployment("worker")
        s = d["status"]
        return (s.get("observedGeneration") == d["metadata"]["generation"] and s.get("updatedReplicas") == 3
                and s.get("availableReplicas") == 3 and s.get("replicas") == 3)

    cluster.wait_until(rolled_out)
    cluster.wait_until(lambda: not old_pods & set(worker_names(cluster)))  # terminating old pods are gone
    pods = cluster.pods(selector="app=worker")
    assert len(pods) == 3
    assert all(p["spec"]["containers"][0]["env"][0]["value"] == "anthropic/claude-sonnet-4-20250514" for p in pods)
    replicasets = {rs["metadata"]["name"]: rs for rs in cluster.replicasets() if rs["metadata"]["name"].startswith("worker-")}
    assert sorted(rs["spec"]["replicas"] for rs in replicasets.values()) == [0, 3]
    assert cluster.deployment("worker")["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"


def test_patch_flavours_merge_json_and_delete_directive(cluster, apps):
    apps.patch_namespaced_deployment("worker", NS, {"spec": {"template": {"spec": {"containers": [
        {"name": "worker", "env": [{"name": "EXTRA", "value": "1"}]}]}}}})
    env = cluster.deployment("worker")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env] == ["LITELLM_MODEL", "EXTRA"]
    apps.patch_namespaced_deployment("worker", NS, {"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "worker"}],
        "containers": [{"name": "worker", "env": [{"$patch": "delete", "name": "EXTRA"}]}]}}}})
    env = cluster.deployment("worker")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "LITELLM_MODEL", "value": "openai/gpt-4o"}]

    apps.api_client.set_default_header("Content-Type", "application/merge-patch+json")
    with httpx.Client(base_url=cluster.url, timeout=5) as http:
        merged = http.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/mcp-server",
                            content=json.dumps({"metadata": {"labels": {"tier": "tools"}}}),
                            headers={"Content-Type": "application/merge-patch+json"})
        assert merged.status_code == 200, merged.text
        jp = http.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/mcp-server",
                        content=json.dumps([{"op": "replace", "path": "/spec/replicas", "value": 2},
                                            {"op": "remove", "path": "/metadata/labels/tier"}]),
                        headers={"Content-Type": "application/json-patch+json"})
        assert jp.status_code == 200, jp.text
        bad = http.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/mcp-server",
                         content=json.dumps([{"op": "test", "path": "/spec/replicas", "value": 7}]),
                         headers={"Content-Type": "application/json-patch+json"})
        assert bad.status_code == 422 and bad.json()["kind"] == "Status"
    d = cluster.deployment("mcp-server")
    assert d["spec"]["replicas"] == 2 and "tier" not in d["metadata"]["labels"]
    cluster.wait_until(lambda: len([p for p in cluster.pods(selector="app=mcp-server") if is_ready(p)]) == 2)


# --- logs, events, metrics ---


def test_logs_previous_tail_and_400_without_previous(cluster, core):
    victim = worker_names(cluster)[0]
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log(victim, NS, container="worker", previous=True)
    assert err.value.status == 400 and "previous terminated container" in err.value.body
    cluster.append_log(victim, "processing step s-1")
    assert core.read_namespaced_pod_log(victim, NS, tail_lines=1) == "processing step s-1\n"
    cluster.crash_loop(victim, logs=["boot", "Traceback (most recent call last):", "KeyError: 'LITELLM_MODEL'"])
    assert core.read_namespaced_pod_log(victim, NS, container="worker", previous=True, tail_lines=2) == (
        "Traceback (most recent call last):\nKeyError: 'LITELLM_MODEL'\n"
    )


def test_crash_loop_restarts_grow_with_backoff_events(cluster, core):
    victim = worker_names(cluster)[0]
    cluster.crash_loop(victim, reason="OOMKilled")
    pod = core.read_namespaced_pod(victim, NS)
    cs = pod.status.container_statuses[0]
    assert cs.state.waiting.reason == "CrashLoopBackOff" and not cs.ready
    assert cs.last_state.terminated.exit_code == 137 and cs.last_state.terminated.reason == "OOMKilled"
    cluster.wait_until(lambda: core.read_namespaced_pod(victim, NS).status.container_statuses[0].restart_count >= 3)
    uid = pod.metadata.uid
    events = core.list_namespaced_event(
        NS, field_selector=f"involvedObject.name={victim},involvedObject.namespace={NS},involvedObject.uid={uid}").items
    backoff = [e for e in events if e.reason == "BackOff"]
    assert len(backoff) == 1 and backoff[0].count >= 2 and backoff[0].type == "Warning"
    assert {e.involved_object.uid for e in events} == {uid}
    assert len(ready_workers(cluster)) == 2


def test_metrics_report_cpu_and_hang_drops_it(cluster, api):
    names = worker_names(cluster)
    cluster.hang(names[0])
    cluster.set_cpu(names[1], 900)
    metrics = k8s.CustomObjectsApi(api).list_namespaced_custom_object("metrics.k8s.io", "v1beta1", NS, "pods")
    cpu = {m["metadata"]["name"]: m["containers"][0]["usage"]["cpu"] for m in metrics["items"]}
    assert cpu[names[0]] == "0n" and cpu[names[1]] == "900000000n" and cpu[names[2]] == "250000000n"
    assert names[0] in ready_workers(cluster)
    assert cluster.pod_fault(names[0]) == "hang"


# --- eviction and faults ---


def test_eviction_deletes_and_respects_disruption_budget(cluster, core, api):
    victim = worker_names(cluster)[0]
    body = k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=victim, namespace=NS))
    core.create_namespaced_pod_eviction(victim, NS, body)
    cluster.wait_until(lambda: victim not in worker_names(cluster) and len(ready_workers(cluster)) == 3)
    policy = k8s.PolicyV1Api(api)
    policy.create_namespaced_pod_disruption_budget(NS, k8s.V1PodDisruptionBudget(
        metadata=k8s.V1ObjectMeta(name="workers"),
        spec=k8s.V1PodDisruptionBudgetSpec(min_available=3, selector=k8s.V1LabelSelector(match_labels={"app": "worker"})),
    ))
    second = worker_names(cluster)[0]
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod_eviction(second, NS, k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=second, namespace=NS)))
    assert err.value.status == 429 and "disruption budget" in err.value.body
    assert second in ready_workers(cluster)


def test_fail_api_429_then_success_and_500(cluster, core):
    cluster.fail_api(429, count=2, path_contains="/pods")
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            core.list_namespaced_pod(NS)
        assert err.value.status == 429
    assert len(core.list_namespaced_pod(NS).items) == 4
    cluster.fail_api(500, count=1)
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod(worker_names(cluster)[0], NS)
    assert err.value.status == 500 and json.loads(err.value.body)["reason"] == "InternalError"
    verbs = [(r.verb, r.resource, r.status) for r in cluster.requests]
    assert verbs == [("list", "pods", 429), ("list", "pods", 429), ("list", "pods", 200), ("get", "pods", 500)]


def test_requests_are_recorded_with_verb_group_and_subresource(cluster, core, apps):
    victim = worker_names(cluster)[0]
    cluster.clear_requests()
    core.read_namespaced_pod_log(victim, NS)
    apps.patch_namespaced_deployment_scale("worker", NS, {"spec": {"replicas": 3}})
    core.delete_namespaced_pod(victim, NS)
    got = [(r.verb, r.api_group, r.resource, r.subresource, r.namespace, r.name) for r in cluster.requests]
    assert got == [
        ("get", "", "pods", "log", NS, victim),
        ("patch", "apps", "deployments", "scale", NS, "worker"),
        ("delete", "", "pods", None, NS, victim),
    ]


# --- objects created through the API, scheduling, follow ---


def test_created_deployment_gets_pods_and_its_deletion_cascades(cluster, apps):
    body = k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name="extra", labels={"app": "extra"}),
        spec=k8s.V1DeploymentSpec(
            replicas=2,
            selector=k8s.V1LabelSelector(match_labels={"app": "extra"}),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels={"app": "extra"}),
                spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="extra", image="busybox:1.36")]),
            ),
        ),
    )
    created = apps.create_namespaced_deployment(NS, body)
    assert created.metadata.generation == 1 and created.spec.strategy.type == "RollingUpdate"
    with pytest.raises(ApiException) as err:
        apps.create_namespaced_deployment(NS, body)
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    cluster.wait_until(lambda: len([p for p in cluster.pods(selector="app=extra") if is_ready(p)]) == 2)
    (rs,) = [r for r in cluster.replicasets() if r["metadata"]["labels"].get("app") == "extra"]
    pod = cluster.pods(selector="app=extra")[0]
    assert pod["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]
    assert rs["metadata"]["ownerReferences"][0]["uid"] == created.metadata.uid
    apps.delete_namespaced_deployment("extra", NS)
    cluster.wait_until(lambda: not cluster.pods(selector="app=extra"))
    assert not [r for r in cluster.replicasets() if r["metadata"]["labels"].get("app") == "extra"]
    assert len(ready_workers(cluster)) == 3


def test_blocked_scheduling_keeps_the_replacement_pending_until_lifted(cluster, core):
    cluster.set_schedulable(False, selector="app=worker")
    victim = worker_names(cluster)[0]
    core.delete_namespaced_pod(victim, NS)
    cluster.wait_until(lambda: victim not in worker_names(cluster) and len(worker_names(cluster)) == 3)
    (pending,) = [p for p in cluster.pods(selector="app=worker") if p["status"]["phase"] == "Pending"]
    assert pending["status"]["conditions"][0]["reason"] == "Unschedulable"
    reasons = {e["reason"] for e in cluster.events(involved=pending["metadata"]["name"])}
    assert "FailedScheduling" in reasons and "Scheduled" not in reasons
    cluster.set_schedulable(True)
    cluster.wait_until(lambda: len(ready_workers(cluster)) == 3)
    assert pending["metadata"]["name"] in ready_workers(cluster)


def test_logs_follow_streams_appended_lines(cluster):
    victim = worker_names(cluster)[0]
    with httpx.Client(base_url=cluster.url, timeout=10) as http, http.stream(
        "GET", f"/api/v1/namespaces/{NS}/pods/{victim}/log", params={"follow": "true"}
    ) as response:
        assert response.headers["content-type"].startswith("text/plain")
        lines = response.iter_lines()
        assert next(lines).startswith("worker started")
        cluster.append_log(victim, "claimed 50 steps")
        assert next(lines) == "claimed 50 steps"
