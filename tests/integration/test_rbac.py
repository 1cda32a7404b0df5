"""deployments/kubernetes/rbac.yaml grants exactly what our Kubernetes code uses.

The sandbox API server records every request; the kube tests (test_kube_*.py, through the
``record_kube_requests`` fixture) add theirs to the session's ``kube_request_log``. Here every recorded
request is checked against the Role's rules the way the RBAC authorizer would, and every granted
(group, resource, verb) must have been used at least once. kubectl's requests are not recorded (not ours);
discovery calls are non-resource URLs, which a Role cannot grant (the default system:discovery does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

RBAC = Path(__file__).resolve().parents[2] / "deployments" / "kubernetes" / "rbac.yaml"
NAMESPACE = "ferrumdeck"
ACCOUNT = "ferrumdeck-recovery"


@dataclass(frozen=True)
class Access:
    """What the RBAC authorizer checks for a resource request."""

    verb: str
    api_group: str
    resource: str  # "pods" or "pods/log"
    namespace: str | None


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RBAC.read_text()) if doc}


def role_rules() -> list[dict]:
    return documents()["Role"]["rules"]


def access_of(request) -> Access | None:
    """The RBAC attributes of a recorded request; None for non-resource URLs (discovery)."""
    if not request.resource:
        return None
    resource = request.resource + (f"/{request.subresource}" if request.subresource else "")
    return Access(request.verb, request.api_group or "", resource, request.namespace)


def allows(rules: list[dict], access: Access, *, namespace: str = NAMESPACE) -> bool:
    """Whether a namespaced Role with ``rules`` in ``namespace`` permits ``access`` (no wildcards granted)."""
    if access.namespace != namespace:
        return False
    return any(
        access.api_group in rule.get("apiGroups", [])
        and access.resource in rule.get("resources", [])
        and access.verb in rule.get("verbs", [])
        and not rule.get("resourceNames")
        for rule in rules
    )


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_manifest_binds_the_role_to_the_service_account():
    docs = documents()
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding"}
    for doc in docs.values():
        assert doc["metadata"]["name"] == ACCOUNT and doc["metadata"]["namespace"] == NAMESPACE
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}]
    flat = grants(role_rules())
    assert not any("*" in item for item in flat), "no wildcards"


def test_manifest_is_valid_kubernetes():
    import kubernetes_validate

    for doc in yaml.safe_load_all(RBAC.read_text()):
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_authorizer_model():
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    assert allows(rules, Access("list", "", "pods", NAMESPACE))
    assert not allows(rules, Access("delete", "", "pods", NAMESPACE))  # verb not granted
    assert not allows(rules, Access("get", "", "pods/log", NAMESPACE))  # a subresource needs its own grant
    assert not allows(rules, Access("list", "apps", "pods", NAMESPACE))  # another API group
    assert not allows(rules, Access("list", "", "pods", "kube-system"))  # a Role is namespaced
    assert not allows(rules, Access("list", "", "pods", None))  # ... and grants nothing cluster-wide


def exercise_every_task(settings, cluster) -> list:
    """Call every Kubernetes task once against the sandbox (a crash-looping pod, so logs and events are read);
    the requests they made. Makes this test self-sufficient when run alone."""
    from tasks import kube

    pods = [p.name for p in kube.list_worker_pods.fn(settings=settings)]
    cluster.crash_loop(pods[0])
    kube.diagnose_pods.fn(settings=settings)
    kube.ready_worker_count.fn(settings=settings)
    kube.pod_cpu_millicores.fn(settings=settings)
    kube.delete_pod.fn(settings=settings, pod=pods[2], dry_run=True)  # a dry run reads the pod
    kube.delete_pod.fn(settings=settings, pod=pods[0], dry_run=False)
    kube.wait_for_replacement_ready.fn(settings=settings, old_pod=pods[0], previous_pods=pods, timeout_s=30)
    kube.delete_pod.fn(settings=settings, pod=pods[1], evict=True, dry_run=False)
    kube.scale_deployment.fn(settings=settings, deployment="worker", replicas=4, max_replicas=10, dry_run=False)
    kube.get_deployment_env.fn(settings=settings, deployment="worker", container="worker", name="LITELLM_MODEL")
    kube.set_deployment_env.fn(
        settings=settings, deployment="worker", container="worker", name="LITELLM_MODEL", value="b/m", dry_run=False
    )
    kube.rollout_restart.fn(settings=settings, deployment="mcp-server", dry_run=False)
    kube.wait_for_rollout.fn(settings=settings, deployment="mcp-server", timeout_s=60)
    return [r for r in cluster.requests if not (r.user_agent or "").startswith("kubectl")]


def recorded_accesses(log) -> set[Access]:
    return {a for a in map(access_of, log) if a is not None}


def forbidden(rules: list[dict], accesses: set[Access]) -> list[str]:
    return sorted(
        f"{a.verb} {a.api_group or 'core'}/{a.resource} in {a.namespace}"
        for a in accesses
        if not allows(rules, a)
    )


def unused(rules: list[dict], accesses: set[Access]) -> list[tuple[str, str, str]]:
    return sorted(grants(rules) - {(a.api_group, a.resource, a.verb) for a in accesses})


def test_every_recorded_request_is_allowed_and_every_grant_is_used(kube_request_log, kube_settings, cluster):
    """The requests of every Kubernetes task (exercised here) plus those the kube tests recorded this session."""
    accesses = recorded_accesses([*exercise_every_task(kube_settings, cluster), *kube_request_log])
    rules = role_rules()
    assert forbidden(rules, accesses) == [], "rbac.yaml forbids requests our code makes"
    assert unused(rules, accesses) == [], "rbac.yaml grants verbs nothing used"


def test_the_replay_notices_a_missing_or_an_extra_grant(kube_request_log, kube_settings, cluster):
    accesses = recorded_accesses([*exercise_every_task(kube_settings, cluster), *kube_request_log])
    rules = role_rules()
    for i, rule in enumerate(rules):  # every rule is needed: without it some recorded request is forbidden
        for verb in rule["verbs"]:
            fewer = [
                dict(r, verbs=[v for v in r["verbs"] if v != verb]) if j == i else r
                for j, r in enumerate(rules)
            ]
            assert forbidden(fewer, accesses), f"{rule['resources']} {verb} is granted but never needed"
    extra = [*rules, {"apiGroups": [""], "resources": ["pods"], "verbs": ["deletecollection"]}]
    assert unused(extra, accesses) == [("", "pods", "deletecollection")]
