"""Every Kubernetes task against the sandbox API server, through the official client (no mocks).

Assertions are on the cluster's state (pods, deployments) and on the requests the server recorded: one list
call instead of N gets, no writes in a dry run, retries only where they belong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import kube
from tasks.errors import RETRY_DELAYS_S
from tasks.kube import (
    Classification,
    KubeNotFound,
    KubeServerError,
    KubeUnavailable,
)

pytestmark = pytest.mark.usefixtures("record_kube_requests")

MODEL = "LITELLM_MODEL"


@pytest.fixture
def ks(kube_settings):
    """Settings pointing at the sandbox cluster (explicit kubeconfig path), Redis keys private to the test.

    These tests are about the Kubernetes calls themselves (idempotence, retries, requests): the guard around
    the mutators is open wide (no cooldown, roomy budgets); tests/integration/test_guard.py tests the guard.
    """
    return kube_settings.model_copy(update={"kube_timeout_s": 5.0, "target_cooldown_s": 0,
                                            "pod_deletions_per_hour": 100, "failovers_per_15_min": 100})


def api_requests(cluster, *, verb=None, resource=None, subresource=None, start=0):
    """Recorded resource requests from index ``start`` on, optionally filtered (discovery calls left out)."""
    return [
        r
        for r in list(cluster.requests)[start:]
        if r.resource
        and (verb is None or r.verb == verb)
        and (resource is None or r.resource == resource)
        and (subresource is None or r.subresource == subresource)
    ]


def writes(cluster):
    return [r for r in cluster.requests if r.method not in ("GET", "HEAD")]


def worker_names(cluster):
    return sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=worker"))


def ready(pod: dict) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return (
        bool(statuses)
        and all(s.get("ready") for s in statuses)
        and not pod["metadata"].get("deletionTimestamp")
    )


def template_env(cluster, deployment="worker", container="worker") -> dict[str, str | None]:
    containers = cluster.deployment(deployment)["spec"]["template"]["spec"]["containers"]
    c = next(c for c in containers if c["name"] == container)
    return {e["name"]: e.get("value") for e in c.get("env") or []}


# ---------------------------------------------------------------- observations


def test_list_worker_pods_is_one_list_call(ks, cluster):
    pods = kube.list_worker_pods.fn(settings=ks)
    assert [p.name for p in pods] == worker_names(cluster)
    assert len(pods) == 3 and all(p.ready and p.phase == "Running" and p.restart_count == 0 for p in pods)
    calls = api_requests(cluster)
    assert [(r.verb, r.resource) for r in calls] == [("list", "pods")]
    assert calls[0].query.get("labelSelector") == "app=worker"


def test_ready_worker_count_excludes_crash_looping_pods(ks, cluster):
    assert kube.ready_worker_count.fn(settings=ks) == 3
    victim = worker_names(cluster)[0]
    cluster.crash_loop(victim)
    cluster.wait_until(lambda: not ready(next(p for p in cluster.pods() if p["metadata"]["name"] == victim)))
    assert kube.ready_worker_count.fn(settings=ks) == 2


def test_pod_cpu_millicores_reads_metrics(ks, cluster):
    names = worker_names(cluster)
    cluster.set_cpu(names[0], 12)
    cpu = kube.pod_cpu_millicores.fn(settings=ks)
    assert set(cpu) == set(names)
    assert cpu[names[0]] == pytest.approx(12, abs=0.01)
    assert all(cpu[n] > 50 for n in names[1:])
    assert [(r.verb, r.api_group, r.resource) for r in api_requests(cluster)] == [
        ("list", "metrics.k8s.io", "pods")
    ]


def test_diagnose_crash_loop_and_hang_with_events_and_logs_only_for_them(ks, cluster):
    crashing, hung, healthy = worker_names(cluster)
    cluster.crash_loop(
        crashing,
        exit_code=3,
        reason="Error",
        logs=["processing step s-1", "Traceback (most recent call last):", "RuntimeError: boom"],
    )
    cluster.hang(hung)
    cluster.wait_until(
        lambda: not ready(next(p for p in cluster.pods() if p["metadata"]["name"] == crashing))
    )
    mark = len(cluster.requests)

    diagnoses = {d.name: d for d in kube.diagnose_pods.fn(settings=ks)}

    assert set(diagnoses) == {crashing, hung, healthy}
    c = diagnoses[crashing]
    assert c.classification is Classification.CRASH_LOOPING and not c.ready and c.restart_count >= 1
    assert c.last_termination.exit_code == 3 and c.last_termination.reason == "Error"
    assert c.last_termination.finished_at is not None
    assert c.log_source == "previous" and c.log_tail[-1] == "RuntimeError: boom"
    assert "BackOff" in {e.reason for e in c.events} and c.waiting_reason == "CrashLoopBackOff"
    assert c.summary.startswith(f"{crashing}: crash-looping") and "exit 3 (Error)" in c.summary
    h = diagnoses[hung]
    assert h.classification is Classification.HUNG_SUSPECT and h.ready and h.cpu_millicores < 5
    assert diagnoses[healthy].classification is Classification.HEALTHY and diagnoses[healthy].log_tail == []

    calls = api_requests(cluster, start=mark)
    core_pods = [(r.verb, r.api_group) for r in calls if r.resource == "pods" and not r.subresource]
    assert sorted(core_pods) == [("list", ""), ("list", "metrics.k8s.io")]  # one pod list + one metrics list
    logs = [r for r in calls if r.subresource == "log"]
    assert sorted(r.name for r in logs) == sorted([crashing, hung])
    evented = [r.query["fieldSelector"] for r in calls if r.resource == "events"]
    assert len(evented) == 2 and all("involvedObject.uid=" in s for s in evented)
    previous = next(r for r in logs if r.name == crashing)
    assert previous.query.get("previous", "").lower() == "true" and previous.query.get("tailLines") == "50"


def test_diagnose_oom_killed(ks, cluster):
    victim = worker_names(cluster)[1]
    cluster.crash_loop(victim, exit_code=137, reason="OOMKilled", logs=["allocating 4 GiB"])
    cluster.wait_until(lambda: not ready(next(p for p in cluster.pods() if p["metadata"]["name"] == victim)))
    (d,) = kube.diagnose_pods.fn(settings=ks, pods=[victim], log_lines=10)
    assert d.classification is Classification.OOM_KILLED
    assert (d.last_termination.exit_code, d.last_termination.reason) == (137, "OOMKilled")
    assert d.log_tail == ["allocating 4 GiB"]


def test_diagnose_unschedulable_reads_events_but_no_logs(ks, cluster):
    victim = worker_names(cluster)[2]
    cluster.unschedulable(victim)
    cluster.wait_until(
        lambda: any(
            p["status"].get("phase") == "Pending" for p in cluster.pods() if p["metadata"]["name"] == victim
        )
    )
    mark = len(cluster.requests)
    (d,) = kube.diagnose_pods.fn(settings=ks, pods=[victim])
    assert d.classification is Classification.UNSCHEDULABLE and d.unschedulable_message
    assert "FailedScheduling" in {e.reason for e in d.events}
    assert api_requests(cluster, subresource="log", start=mark) == []


def test_diagnose_named_pods_reports_missing_ones(ks, cluster):
    name = worker_names(cluster)[0]
    result = kube.diagnose_pods.fn(settings=ks, pods=[name, "worker-doesnotexist"])
    assert [(d.name, d.classification) for d in result] == [
        (name, Classification.HEALTHY),
        ("worker-doesnotexist", Classification.GONE),
    ]


# ---------------------------------------------------------------- pods: delete, evict, replacement


def test_delete_dry_run_changes_nothing(ks, cluster):
    before = worker_names(cluster)
    result = kube.delete_pod.fn(settings=ks, pod=before[0], dry_run=True)
    assert (result.changed, result.existed, result.dry_run) == (False, True, True)
    assert worker_names(cluster) == before and all(ready(p) for p in cluster.pods(selector="app=worker"))
    assert writes(cluster) == []


def test_delete_then_replacement_ready(ks, cluster):
    before = worker_names(cluster)
    victim = before[0]
    result = kube.delete_pod.fn(settings=ks, pod=victim, dry_run=False)
    assert (result.changed, result.existed, result.action) == (True, True, "delete")
    rep = kube.wait_for_replacement_ready.fn(settings=ks, old_pod=victim, previous_pods=before, timeout_s=15)
    assert rep.ready and rep.old_pod_gone and rep.new_pod not in before and rep.seconds < 15
    pods = {p["metadata"]["name"]: p for p in cluster.pods(selector="app=worker")}
    assert victim not in pods and ready(pods[rep.new_pod])
    assert [(r.verb, r.name) for r in writes(cluster)] == [("delete", victim)]
    assert api_requests(cluster, verb="watch", resource="pods")  # waited by watching, not by polling gets


def test_wait_for_replacement_without_previous_names(ks, cluster):
    cluster.set_timing(
        grace=1.0
    )  # the old pod is still Terminating when the wait starts, as in real clusters
    before = worker_names(cluster)
    kube.delete_pod.fn(settings=ks, pod=before[1], dry_run=False)
    rep = kube.wait_for_replacement_ready.fn(settings=ks, old_pod=before[1], previous_pods=None, timeout_s=15)
    assert rep.ready and rep.new_pod not in before


def test_evict_uses_the_eviction_api(ks, cluster):
    before = worker_names(cluster)
    result = kube.delete_pod.fn(settings=ks, pod=before[2], evict=True, dry_run=False)
    assert (result.changed, result.action) == (True, "evict")
    assert [(r.verb, r.resource, r.subresource) for r in writes(cluster)] == [("create", "pods", "eviction")]
    rep = kube.wait_for_replacement_ready.fn(
        settings=ks, old_pod=before[2], previous_pods=before, timeout_s=15
    )
    assert rep.ready and before[2] not in worker_names(cluster)


def test_deleting_a_pod_that_is_gone_counts_as_deleted(ks, cluster):
    before = worker_names(cluster)
    for evict in (False, True):
        result = kube.delete_pod.fn(settings=ks, pod="worker-gone-12345", evict=evict, dry_run=False)
        assert (result.changed, result.existed, result.detail) == (False, False, "already gone")
    dry = kube.delete_pod.fn(settings=ks, pod="worker-gone-12345", dry_run=True)
    assert (dry.changed, dry.existed) == (False, False)
    assert worker_names(cluster) == before


def test_wait_for_replacement_gives_up_at_the_deadline(ks, cluster):
    name = worker_names(cluster)[0]  # never deleted: no replacement can appear
    rep = kube.wait_for_replacement_ready.fn(
        settings=ks, old_pod=name, previous_pods=worker_names(cluster), timeout_s=1.0
    )
    assert (rep.ready, rep.new_pod, rep.old_pod_gone) == (False, None, False)
    assert 0.9 <= rep.seconds < 5


# ---------------------------------------------------------------- deployments


def test_scale_dry_run_then_up_then_idempotent(ks, cluster):
    dry = kube.scale_deployment.fn(
        settings=ks, deployment="worker", replicas=5, max_replicas=10, dry_run=True
    )
    assert (dry.previous, dry.requested, dry.changed) == (3, 5, False)
    assert cluster.deployment("worker")["spec"]["replicas"] == 3 and writes(cluster) == []

    up = kube.scale_deployment.fn(
        settings=ks, deployment="worker", replicas=5, max_replicas=10, dry_run=False
    )
    assert (up.previous, up.requested, up.changed) == (3, 5, True)
    assert cluster.deployment("worker")["spec"]["replicas"] == 5
    cluster.wait_until(lambda: sum(ready(p) for p in cluster.pods(selector="app=worker")) == 5)
    (patch,) = writes(cluster)
    assert (patch.verb, patch.subresource, patch.body) == ("patch", "scale", {"spec": {"replicas": 5}})

    again = kube.scale_deployment.fn(
        settings=ks, deployment="worker", replicas=5, max_replicas=10, dry_run=False
    )
    assert (again.previous, again.changed) == (5, False) and len(writes(cluster)) == 1


def test_scale_above_the_maximum_is_refused_before_any_request(ks, cluster):
    with pytest.raises(ValueError, match="refusing to scale worker to 11"):
        kube.scale_deployment.fn(
            settings=ks, deployment="worker", replicas=11, max_replicas=10, dry_run=False
        )
    assert cluster.requests == [] and cluster.deployment("worker")["spec"]["replicas"] == 3


def test_set_env_like_kubectl_set_env(ks, cluster):
    assert kube.get_deployment_env.fn(settings=ks, deployment="worker", container="worker", name=MODEL) == (
        "openai/gpt-4o"
    )
    new = "anthropic/claude-sonnet-4-20250514"
    dry = kube.set_deployment_env.fn(
        settings=ks, deployment="worker", container="worker", name=MODEL, value=new, dry_run=True
    )
    assert (dry.previous, dry.changed) == ("openai/gpt-4o", False)
    assert template_env(cluster)[MODEL] == "openai/gpt-4o" and writes(cluster) == []

    done = kube.set_deployment_env.fn(
        settings=ks, deployment="worker", container="worker", name=MODEL, value=new, dry_run=False
    )
    assert (done.previous, done.value, done.changed) == ("openai/gpt-4o", new, True)
    assert template_env(cluster)[MODEL] == new
    (patch,) = writes(cluster)
    assert patch.content_type.startswith("application/strategic-merge-patch+json")

    status = kube.wait_for_rollout.fn(settings=ks, deployment="worker", timeout_s=20)
    assert status.complete and status.updated_replicas == 3 and status.available_replicas == 3
    for pod in filter(ready, cluster.pods(selector="app=worker")):  # old pods may still be Terminating
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
        assert env[MODEL] == new

    same = kube.set_deployment_env.fn(
        settings=ks, deployment="worker", container="worker", name=MODEL, value=new, dry_run=False
    )
    assert (same.previous, same.changed) == (new, False) and len(writes(cluster)) == 1


def test_set_env_none_removes_the_variable(ks, cluster):
    removed = kube.set_deployment_env.fn(
        settings=ks, deployment="worker", container="worker", name=MODEL, value=None, dry_run=False
    )
    assert (removed.previous, removed.changed) == ("openai/gpt-4o", True)
    assert MODEL not in template_env(cluster)
    assert (
        kube.get_deployment_env.fn(settings=ks, deployment="worker", container="worker", name=MODEL) is None
    )
    again = kube.set_deployment_env.fn(
        settings=ks, deployment="worker", container="worker", name=MODEL, value=None, dry_run=False
    )
    assert again.changed is False


def test_env_of_a_missing_container_or_deployment_is_not_found(ks, cluster):
    with pytest.raises(KubeNotFound, match="no container 'sidecar'"):
        kube.get_deployment_env.fn(settings=ks, deployment="worker", container="sidecar", name=MODEL)
    with pytest.raises(KubeNotFound, match="get deployment nope: HTTP 404"):
        kube.set_deployment_env.fn(
            settings=ks, deployment="nope", container="worker", name=MODEL, value="x", dry_run=False
        )


def test_rollout_restart_and_wait(ks, cluster):
    before = sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server"))
    dry = kube.rollout_restart.fn(settings=ks, deployment="mcp-server", dry_run=True)
    assert dry.changed is False and writes(cluster) == []
    annotations = (
        cluster.deployment("mcp-server")["spec"]["template"].get("metadata", {}).get("annotations") or {}
    )
    assert "kubectl.kubernetes.io/restartedAt" not in annotations

    done = kube.rollout_restart.fn(settings=ks, deployment="mcp-server", dry_run=False)
    assert done.changed and done.restarted_at
    template = cluster.deployment("mcp-server")["spec"]["template"]
    assert template["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] == done.restarted_at
    status = kube.wait_for_rollout.fn(settings=ks, deployment="mcp-server", timeout_s=20)
    assert status.complete, status.message
    after = sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server") if ready(p))
    assert len(after) == 1 and not set(after) & set(before)
    assert api_requests(cluster, verb="watch", resource="deployments")


def test_wait_for_rollout_of_a_missing_deployment(ks, cluster):
    with pytest.raises(KubeNotFound, match="deployment nope not found"):
        kube.wait_for_rollout.fn(settings=ks, deployment="nope", timeout_s=2)


# ---------------------------------------------------------------- faults and retries (Prefect task runs)


def test_429_then_success_is_retried(ks, cluster):
    cluster.fail_api(status=429, count=1, path_contains="/pods")
    pods = kube.list_worker_pods(settings=ks)
    assert len(pods) == 3
    assert [r.status for r in api_requests(cluster, resource="pods")] == [429, 200]


def test_500_beyond_the_retries_is_a_clear_error(ks, cluster):
    cluster.fail_api(status=500, count=10, path_contains="/pods")
    with pytest.raises(
        KubeServerError, match=r"list pods app=worker in ferrumdeck: HTTP 500 .*injected fault"
    ) as info:
        kube.list_worker_pods(settings=ks)
    assert len(api_requests(cluster, resource="pods")) == 1 + len(RETRY_DELAYS_S)
    token = "sandbox-token"  # the kubeconfig's bearer token: sent, never shown
    assert token in Path(cluster.kubeconfig).read_text()
    assert token not in str(info.value) and token not in repr(info.value.__cause__)


def test_a_timeout_is_retried(ks, cluster):
    quick = ks.model_copy(update={"kube_timeout_s": 0.5})
    cluster.fail_api(status="timeout", count=1, path_contains="/deployments/worker")
    assert kube.get_deployment_env(settings=quick, deployment="worker", container="worker", name=MODEL) == (
        "openai/gpt-4o"
    )
    assert len(api_requests(cluster, resource="deployments")) == 2


def test_not_found_is_not_retried(ks, cluster):
    with pytest.raises(KubeNotFound):
        kube.get_deployment_env(settings=ks, deployment="nope", container="worker", name=MODEL)
    assert len(api_requests(cluster, resource="deployments")) == 1


def test_mutation_retried_after_a_server_error_lands_once(ks, cluster):
    cluster.fail_api(status=500, count=1, path_contains="/deployments/worker/scale")
    result = kube.scale_deployment(
        settings=ks, deployment="worker", replicas=4, max_replicas=10, dry_run=False
    )
    assert result.changed and cluster.deployment("worker")["spec"]["replicas"] == 4


def test_unreachable_api_fails_clearly(ks, cluster, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = Path(cluster.kubeconfig).read_text().replace(cluster.url, f"http://127.0.0.1:{port}")
    (tmp_path / "kc").write_text(text)
    dead = ks.model_copy(update={"kubeconfig": str(tmp_path / "kc")})
    with pytest.raises(KubeUnavailable, match="unreachable"):
        kube.ready_worker_count(settings=dead)


def test_wait_for_rollout_reports_an_incomplete_rollout_at_the_deadline(ks, cluster):
    cluster.set_timing(start_delay=30.0)  # new pods stay Pending: the rollout cannot finish in time
    kube.set_deployment_env.fn(
        settings=ks, deployment="worker", container="worker", name=MODEL, value="x/y", dry_run=False
    )
    status = kube.wait_for_rollout.fn(settings=ks, deployment="worker", timeout_s=1.0)
    assert not status.complete and 1.0 <= status.seconds < 5
    assert "updated" in status.message or "available" in status.message


def test_replacement_wait_survives_an_expired_watch(ks, cluster, mocker):
    """A 410 Expired on the watch (our resourceVersion compacted away) -> relist and keep waiting."""
    from kubernetes.client.exceptions import ApiException

    real = kube._watch_pods
    calls = {"n": 0}

    def expire_first(settings, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ApiException(status=410, reason="Expired: too old resource version")
        yield from real(settings, **kwargs)

    mocker.patch.object(kube, "_watch_pods", side_effect=expire_first)
    cluster.set_timing(start_delay=0.5)  # the replacement is not Ready before the first watch starts
    before = worker_names(cluster)
    kube.delete_pod.fn(settings=ks, pod=before[0], dry_run=False)
    rep = kube.wait_for_replacement_ready.fn(
        settings=ks, old_pod=before[0], previous_pods=before, timeout_s=15
    )
    assert rep.ready and rep.new_pod not in before and calls["n"] >= 2
    assert len(api_requests(cluster, verb="list", resource="pods")) == 2  # the first list + the relist


def test_eviction_refused_by_a_disruption_budget(ks, cluster):
    """Evict respects PodDisruptionBudgets: refused (429, retried, then a clear error) and the pod stays."""
    from kubernetes import client as k8s

    from tasks.kube import KubeEvictionRefused, kube_api_client

    k8s.PolicyV1Api(kube_api_client(ks)).create_namespaced_pod_disruption_budget(  # setup, not our code:
        "ferrumdeck",
        k8s.V1PodDisruptionBudget(
            metadata=k8s.V1ObjectMeta(name="worker-pdb"),
            spec=k8s.V1PodDisruptionBudgetSpec(
                min_available=3, selector=k8s.V1LabelSelector(match_labels={"app": "worker"})
            ),
        ),
    )
    cluster.clear_requests()  # ... so it stays out of the RBAC replay
    before = worker_names(cluster)
    with pytest.raises(KubeEvictionRefused, match="disruption budget"):
        kube.delete_pod(settings=ks, pod=before[0], evict=True, dry_run=False)
    evictions = api_requests(cluster, subresource="eviction")
    assert len(evictions) == 1 + len(RETRY_DELAYS_S) and {r.status for r in evictions} == {429}
    assert worker_names(cluster) == before and all(ready(p) for p in cluster.pods(selector="app=worker"))


def test_diagnose_without_a_working_metrics_api(ks, cluster):
    """metrics-server down (503): diagnosis still classifies from pod state, CPU unknown, no retry storm."""
    victim = worker_names(cluster)[0]
    cluster.crash_loop(victim)
    cluster.fail_api(status=503, count=10, path_contains="/apis/metrics.k8s.io/")
    result = {d.name: d for d in kube.diagnose_pods(settings=ks)}
    assert result[victim].classification is Classification.CRASH_LOOPING
    assert all(d.cpu_millicores is None for d in result.values())
    assert len([r for r in cluster.requests if r.api_group == "metrics.k8s.io"]) == 1
