"""Kubernetes task plumbing without a server: client factory, error classes, retry policy, refusals."""

import json
import socket

import pytest
from kubernetes.client.exceptions import ApiException
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from tasks import kube
from tasks.errors import RETRY_DELAYS_S, is_temporary, retry_if_temporary
from tasks.kube import (
    KubeConfigError,
    KubeConflict,
    KubeError,
    KubeForbidden,
    KubeNotFound,
    KubeServerError,
    KubeTooManyRequests,
    KubeUnavailable,
    kube_api_client,
)
from tasks.settings import Settings

TOKEN = "sekret-bearer-token-123"


def write_kubeconfig(path, *, server, token=TOKEN, contexts=("sandbox",)):
    ctx = "\n".join(
        f"- name: {c}\n  context: {{cluster: {c}, user: {c}, namespace: ferrumdeck}}" for c in contexts
    )
    clusters = "\n".join(f"- name: {c}\n  cluster: {{server: '{server}/{c}'}}" for c in contexts)
    users = "\n".join(f"- name: {c}\n  user: {{token: {token}}}" for c in contexts)
    path.write_text(
        f"apiVersion: v1\nkind: Config\ncurrent-context: {contexts[0]}\n"
        f"clusters:\n{clusters}\ncontexts:\n{ctx}\nusers:\n{users}\n"
    )
    return str(path)


@pytest.fixture
def dead_port():
    """A local port nothing listens on (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable(tmp_path, dead_port):
    kube.reset_kube_clients()
    yield Settings(kubeconfig=write_kubeconfig(tmp_path / "kc", server=f"http://127.0.0.1:{dead_port}"))
    kube.reset_kube_clients()


def test_client_from_explicit_kubeconfig_and_context(tmp_path):
    path = write_kubeconfig(tmp_path / "kc", server="http://127.0.0.1:1", contexts=("a", "b"))
    api = kube_api_client(Settings(kubeconfig=path, kube_context="b"))
    assert api.configuration.host == "http://127.0.0.1:1/b"
    assert api.configuration.retries == 0  # Prefect's retries are the only retry policy
    assert kube_api_client(Settings(kubeconfig=path, kube_context="b")) is api
    assert kube_api_client(Settings(kubeconfig=path)).configuration.host == "http://127.0.0.1:1/a"


def test_a_rewritten_kubeconfig_gives_a_new_client(tmp_path):
    import os

    path = write_kubeconfig(tmp_path / "kc", server="http://127.0.0.1:1")
    first = kube_api_client(Settings(kubeconfig=path))
    write_kubeconfig(tmp_path / "kc", server="http://127.0.0.1:3")
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 1_000_000))
    second = kube_api_client(Settings(kubeconfig=path))
    assert second is not first and second.configuration.host == "http://127.0.0.1:3/sandbox"


def test_client_from_KUBECONFIG(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", write_kubeconfig(tmp_path / "kc", server="http://127.0.0.1:2"))
    assert kube_api_client(Settings()).configuration.host == "http://127.0.0.1:2/sandbox"


def test_no_configuration_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubeConfigError, match="no kubeconfig"):
        kube_api_client(Settings())
    with pytest.raises(KubeConfigError, match="context"):
        kube_api_client(
            Settings(kubeconfig=write_kubeconfig(tmp_path / "kc", server="http://x"), kube_context="nope")
        )


@pytest.mark.parametrize(
    ("status", "cls", "temporary"),
    [
        (404, KubeNotFound, False),
        (409, KubeConflict, False),
        (403, KubeForbidden, False),
        (429, KubeTooManyRequests, True),
        (500, KubeServerError, True),
        (503, KubeServerError, True),
        (400, KubeError, False),
    ],
)
def test_api_errors_map_to_our_classes(status, cls, temporary):
    body = json.dumps({"kind": "Status", "message": 'pods "w-1" boom', "reason": "X", "code": status})

    def call():
        raise ApiException(status=status, reason="Reason", body=body)

    with pytest.raises(cls) as info:
        kube._api("get pod w-1", call)
    assert type(info.value) is cls and info.value.status == status
    assert info.value.temporary is temporary and is_temporary(info.value) is temporary
    assert str(info.value) == f'get pod w-1: HTTP {status} pods "w-1" boom'
    assert isinstance(info.value.__cause__, ApiException)


def test_error_messages_never_carry_a_bearer_token():
    def call():
        raise ApiException(status=401, reason="Unauthorized", body=f'{{"message": "bad Bearer {TOKEN}"}}')

    with pytest.raises(KubeForbidden) as info:
        kube._api("list pods", call)
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (KubeTooManyRequests("x"), True),
        (kube.KubeEvictionRefused("x"), True),
        (KubeServerError("x"), True),
        (KubeUnavailable("x"), True),
        (KubeNotFound("x"), False),
        (KubeConflict("x"), False),
        (ValueError("x"), False),
    ],
)
def test_retry_condition_only_for_temporary_errors(exc, retry):
    assert retry_if_temporary(None, None, Failed(data=exc)) is retry


def test_retry_condition_false_for_a_completed_state():
    assert retry_if_temporary(None, None, Completed(data=1)) is False


def test_tasks_declare_retries_with_configured_backoff_and_no_cache():
    # tests/conftest.py sets FD_RETRY_DELAYS_S to milliseconds before tasks.errors is imported
    assert RETRY_DELAYS_S == [0.05, 0.1, 0.2]
    for t in (
        kube.list_worker_pods,
        kube.diagnose_pods,
        kube.delete_pod,
        kube.wait_for_replacement_ready,
        kube.scale_deployment,
        kube.get_deployment_env,
        kube.set_deployment_env,
        kube.rollout_restart,
        kube.wait_for_rollout,
        kube.pod_cpu_millicores,
        kube.ready_worker_count,
    ):
        assert t.retries == 3 and t.retry_delay_seconds == [0.05, 0.1, 0.2], t.name
        assert t.retry_condition_fn is retry_if_temporary and t.cache_policy is NO_CACHE, t.name


def test_unreachable_api_is_a_temporary_error_without_secrets(unreachable):
    with pytest.raises(KubeUnavailable, match="unreachable") as info:
        kube.list_worker_pods.fn(settings=unreachable)
    assert info.value.temporary and TOKEN not in str(info.value)


@pytest.mark.parametrize("replicas", [21, -1])
def test_scale_refuses_out_of_bounds_before_any_call(unreachable, replicas):
    # the API is unreachable: reaching it would raise KubeUnavailable, so a ValueError proves no call was made
    with pytest.raises(ValueError, match=f"refusing to scale worker to {replicas}"):
        kube.scale_deployment.fn(
            settings=unreachable, deployment="worker", replicas=replicas, max_replicas=20, dry_run=False
        )
    with pytest.raises(ValueError, match="allowed 0..20"):
        kube.scale_deployment.fn(settings=unreachable, deployment="worker", replicas=replicas, dry_run=True)
