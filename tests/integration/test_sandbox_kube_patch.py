"""The sandbox server's pure parts: patch flavours, selectors, filtered-watch translation, AGE (no server)."""

from __future__ import annotations

import pytest

from sandbox.kube.patch import PatchError, apply_patch, json_patch, merge_patch, strategic_merge
from sandbox.kube.resources import DEPLOYMENTS, PODS
from sandbox.kube.selectors import SelectorError, labels_match, parse_field_selector, parse_label_selector
from sandbox.kube.store import WatchEvent
from sandbox.kube.tables import human_duration, pod_status_text
from sandbox.kube.watch import translate

DEPLOY = {
    "metadata": {"name": "worker", "labels": {"app": "worker"}},
    "spec": {"replicas": 3, "template": {"spec": {"containers": [
        {"name": "worker", "image": "w:1", "env": [{"name": "A", "value": "1"}, {"name": "LITELLM_MODEL", "value": "x"}]},
        {"name": "sidecar", "image": "s:1"},
    ]}}},
}


def containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"]


def test_kubectl_set_env_body_merges_by_name_and_keeps_order():
    patch = {"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "worker"}, {"name": "sidecar"}],
        "containers": [{"$setElementOrder/env": [{"name": "A"}, {"name": "LITELLM_MODEL"}, {"name": "K"}],
                        "env": [{"name": "K", "value": "V"}, {"name": "LITELLM_MODEL", "value": "y"}],
                        "name": "worker"}]}}}}
    out = strategic_merge(DEPLOY, patch)
    assert containers(out)[0]["env"] == [{"name": "A", "value": "1"}, {"name": "LITELLM_MODEL", "value": "y"},
                                         {"name": "K", "value": "V"}]
    assert containers(out)[1] == {"name": "sidecar", "image": "s:1"}
    assert containers(DEPLOY)[0]["env"][1]["value"] == "x"  # the original is untouched


def test_strategic_delete_directive_null_and_replace():
    out = strategic_merge(DEPLOY, {"metadata": {"labels": None}, "spec": {"template": {"spec": {"containers": [
        {"name": "worker", "env": [{"$patch": "delete", "name": "A"}]},
        {"$patch": "delete", "name": "sidecar"}]}}}})
    assert "labels" not in out["metadata"]
    assert containers(out) == [{"name": "worker", "image": "w:1", "env": [{"name": "LITELLM_MODEL", "value": "x"}]}]
    replaced = strategic_merge(DEPLOY, {"spec": {"template": {"spec": {"$patch": "replace", "containers": [{"name": "only"}]}}}})
    assert replaced["spec"]["template"]["spec"] == {"containers": [{"name": "only"}]}
    with pytest.raises(PatchError, match="merge key"):
        strategic_merge(DEPLOY, {"spec": {"template": {"spec": {"containers": [{"image": "no-name"}]}}}})


def test_restart_annotation_patch_adds_to_template_metadata():
    out = apply_patch(DEPLOY, {"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2026-11-27T21:00:00Z"}}}}}, "application/strategic-merge-patch+json")
    assert out["spec"]["template"]["metadata"]["annotations"] == {"kubectl.kubernetes.io/restartedAt": "2026-11-27T21:00:00Z"}
    assert containers(out) == containers(DEPLOY)


def test_merge_patch_replaces_lists_and_deletes_nulls():
    out = merge_patch(DEPLOY, {"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "x"}]}}},
                               "metadata": {"labels": {"app": None, "tier": "t"}}})
    assert out["spec"]["replicas"] == 5 and containers(out) == [{"name": "x"}]
    assert out["metadata"]["labels"] == {"tier": "t"}


def test_json_patch_operations_and_failures():
    out = json_patch(DEPLOY, [
        {"op": "replace", "path": "/spec/replicas", "value": 1},
        {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "B", "value": "2"}},
        {"op": "copy", "from": "/metadata/labels/app", "path": "/metadata/labels/copy"},
        {"op": "move", "from": "/metadata/labels/copy", "path": "/metadata/labels/moved"},
        {"op": "remove", "path": "/spec/template/spec/containers/1"},
        {"op": "test", "path": "/metadata/name", "value": "worker"},
    ])
    assert out["spec"]["replicas"] == 1 and containers(out)[0]["env"][-1] == {"name": "B", "value": "2"}
    assert out["metadata"]["labels"] == {"app": "worker", "moved": "worker"} and len(containers(out)) == 1
    with pytest.raises(PatchError):
        json_patch(DEPLOY, [{"op": "remove", "path": "/spec/nothing"}])
    with pytest.raises(PatchError):
        json_patch(DEPLOY, [{"op": "test", "path": "/spec/replicas", "value": 9}])
    with pytest.raises(PatchError, match="unsupported patch type"):
        apply_patch(DEPLOY, {}, "application/yaml")


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("app=worker", {"app": "worker"}, True),
        ("app==worker,tier", {"app": "worker"}, False),
        ("app!=worker", {}, True),
        ("app in (worker, mcp-server)", {"app": "mcp-server"}, True),
        ("app notin (worker),!legacy", {"app": "mcp-server", "legacy": "1"}, False),
        ("", {"anything": "x"}, True),
    ],
)
def test_label_selectors(selector, labels, expected):
    assert labels_match(parse_label_selector(selector), labels) is expected


def test_unsupported_field_selector_is_rejected():
    with pytest.raises(SelectorError, match="field label not supported: spec.bogus"):
        parse_field_selector("spec.bogus=1", allowed={"metadata.name"})
    reqs = parse_field_selector("metadata.name!=a", allowed={"metadata.name"})
    assert (reqs[0].op, reqs[0].value) == ("!=", "a")


def test_age_and_pod_status_like_kubectl():
    assert [human_duration(s) for s in (5, 119, 150, 600, 3 * 3600 + 60, 50 * 3600, 400 * 86400)] == [
        "5s", "119s", "2m30s", "10m", "3h1m", "2d2h", "400d"]
    pod = {"metadata": {"deletionTimestamp": "2026-11-27T21:00:00Z"},
           "status": {"phase": "Running", "containerStatuses": [{"restartCount": 2, "ready": True, "state": {"running": {}}}]}}
    assert pod_status_text(pod)[:3] == ("Terminating", 1, 2)


def _pod(app: str, ns: str = "ferrumdeck") -> dict:
    return {"metadata": {"name": "p", "namespace": ns, "labels": {"app": app}}}


@pytest.mark.parametrize(
    ("kind", "old", "new", "expected"),
    [
        ("MODIFIED", "worker", "worker", "MODIFIED"),
        ("MODIFIED", "worker", "quarantine", "DELETED"),  # left the selector
        ("MODIFIED", "quarantine", "worker", "ADDED"),  # entered it
        ("MODIFIED", "mcp", "other", None),
        ("ADDED", None, "worker", "ADDED"),
        ("DELETED", "worker", "worker", "DELETED"),
        ("DELETED", "mcp", "mcp", None),
    ],
)
def test_filtered_watch_translation(kind, old, new, expected):
    predicate = lambda obj: obj["metadata"]["labels"]["app"] == "worker"  # noqa: E731
    ev = WatchEvent(rv=7, resource=PODS.key, type=kind, old=_pod(old) if old else None, new=_pod(new))
    got = translate(ev, PODS, "ferrumdeck", predicate)
    assert (got[0] if got else None) == expected
    assert translate(ev, DEPLOYMENTS, "ferrumdeck", predicate) is None  # another resource
    assert translate(ev, PODS, "elsewhere", predicate) is None  # another namespace
