"""The real ``kubectl`` (1.32) against the sandbox cluster: the runbook's commands work unchanged.

Each test uses its own discovery cache (``KUBECACHEDIR``) so no cached discovery of an earlier port leaks in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

NS = "ferrumdeck"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture
def kubectl(cluster, tmp_path):
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig, "KUBECACHEDIR": str(tmp_path / "kube-cache"),
           "HOME": str(tmp_path)}

    def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run(["kubectl", *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    return run


def is_ready(pod: dict) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or []
    )


def worker_names(cluster) -> list[str]:
    return sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=worker"))


def ready_workers(cluster) -> list[dict]:
    return [p for p in cluster.pods(selector="app=worker") if is_ready(p)]


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.strip().splitlines()]


def test_get_pods_shows_ready_status_restarts(cluster, kubectl):
    victim = worker_names(cluster)[0]
    cluster.crash_loop(victim)
    out = kubectl("get", "pods", "-l", "app=worker", "-n", NS).stdout
    table = rows(out)
    assert table[0] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    by_name = {r[0]: r for r in table[1:]}
    assert sorted(by_name) == worker_names(cluster)
    assert by_name[victim][1:4] == ["0/1", "CrashLoopBackOff", "1"]
    for name in worker_names(cluster)[1:]:
        assert by_name[name][1:4] == ["1/1", "Running", "0"]
    wide = rows(kubectl("get", "pods", "-o", "wide", "-n", NS).stdout)
    assert wide[0][:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]


def test_get_deployments_and_replicasets(cluster, kubectl):
    deploys = {r[0]: r for r in rows(kubectl("get", "deployments").stdout)[1:]}
    assert deploys["worker"][1:4] == ["3/3", "3", "3"] and deploys["mcp-server"][1] == "1/1"
    rs = rows(kubectl("get", "rs", "-l", "app=worker").stdout)
    assert rs[0][:4] == ["NAME", "DESIRED", "CURRENT", "READY"] and rs[1][1:4] == ["3", "3", "3"]
    as_json = json.loads(kubectl("get", "deployment", "worker", "-o", "json").stdout)
    assert as_json["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == "openai/gpt-4o"


def test_describe_pod_shows_events_and_logs_previous(cluster, kubectl):
    victim = worker_names(cluster)[0]
    cluster.crash_loop(victim, reason="OOMKilled", logs=["loading model cache", "Killed"])
    described = kubectl("describe", "pod", victim).stdout
    assert "CrashLoopBackOff" in described and "OOMKilled" in described and "Exit Code:    137" in described
    events = described.split("Events:", 1)[1]
    assert "BackOff" in events and "Back-off restarting failed container worker" in events
    assert kubectl("logs", victim, "--previous", "--tail=50").stdout == "loading model cache\nKilled\n"
    healthy = worker_names(cluster)[1]
    failed = kubectl("logs", healthy, "--previous", check=False)
    assert failed.returncode != 0 and "previous terminated container" in failed.stderr


def test_delete_pod_returns_and_a_replacement_comes_up(cluster, kubectl):
    victim = worker_names(cluster)[0]
    out = kubectl("delete", "pod", victim).stdout
    assert out.strip() == f'pod "{victim}" deleted'
    assert victim not in worker_names(cluster)  # kubectl waited until it was gone
    cluster.wait_until(lambda: len(ready_workers(cluster)) == 3)
    assert len(worker_names(cluster)) == 3


def test_scale_deployment_to_ten_yields_ten_pods(cluster, kubectl):
    assert kubectl("scale", "deployment", "worker", "--replicas=10").stdout.strip() == "deployment.apps/worker scaled"
    cluster.wait_until(lambda: len(ready_workers(cluster)) == 10)
    assert cluster.deployment("worker")["spec"]["replicas"] == 10


def test_set_env_rolls_out_pods_with_the_new_value(cluster, kubectl):
    old = set(worker_names(cluster))
    out = kubectl("set", "env", "deployment/worker", "LITELLM_MODEL=anthropic/claude-sonnet-4-20250514").stdout
    assert out.strip() == "deployment.apps/worker env updated"
    status = kubectl("rollout", "status", "deployment/worker", "--timeout=30s").stdout
    assert 'deployment "worker" successfully rolled out' in status
    cluster.wait_until(lambda: not old & set(worker_names(cluster)))
    pods = ready_workers(cluster)
    assert len(pods) == 3
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["LITELLM_MODEL"] == "anthropic/claude-sonnet-4-20250514"
    kubectl("set", "env", "deployment/worker", "LITELLM_MODEL-")
    assert "env" not in cluster.deployment("worker")["spec"]["template"]["spec"]["containers"][0]


def test_rollout_restart_and_status_complete(cluster, kubectl):
    old = {p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server")}
    assert kubectl("rollout", "restart", "deployment", "mcp-server").stdout.strip() == "deployment.apps/mcp-server restarted"
    status = kubectl("rollout", "status", "deployment", "mcp-server", "--timeout=30s").stdout
    assert 'deployment "mcp-server" successfully rolled out' in status
    cluster.wait_until(lambda: not old & {p["metadata"]["name"] for p in cluster.pods(selector="app=mcp-server")})
    (pod,) = cluster.pods(selector="app=mcp-server")
    assert "kubectl.kubernetes.io/restartedAt" in pod["metadata"]["annotations"] and is_ready(pod)


def test_top_pod_prints_cpu(cluster, kubectl):
    names = worker_names(cluster)
    cluster.hang(names[0])
    cluster.set_cpu(names[1], 730)
    table = {r[0]: r for r in rows(kubectl("top", "pod", "-l", "app=worker").stdout)[1:]}
    assert table[names[0]][1] == "0m" and table[names[1]][1] == "730m" and table[names[2]][1] == "250m"
    assert table[names[2]][2] == "64Mi"


def test_drain_evicts_and_replacements_wait_for_uncordon(cluster, kubectl):
    before = set(worker_names(cluster))
    out = kubectl("drain", "sandbox-node-1", "--ignore-daemonsets", "--timeout=30s").stdout
    assert "node/sandbox-node-1 drained" in out
    assert not before & set(worker_names(cluster))
    pending = cluster.pods(selector="app=worker")
    assert len(pending) == 3 and {p["status"]["phase"] for p in pending} == {"Pending"}
    assert {p["status"]["conditions"][0]["reason"] for p in pending} == {"Unschedulable"}
    kubectl("uncordon", "sandbox-node-1")
    cluster.wait_until(lambda: len(ready_workers(cluster)) == 3)
    assert {p["metadata"]["name"] for p in pending} == set(worker_names(cluster))
