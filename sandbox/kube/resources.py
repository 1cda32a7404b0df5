"""The resource types the sandbox serves, as discovery lists them."""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
READ_VERBS = ["get", "list", "watch"]

COMMON_FIELDS = {"metadata.name", "metadata.namespace"}


@dataclass(frozen=True)
class Resource:
    """One REST resource: where it lives, what it is called, which field selectors it accepts."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = tuple(ALL_VERBS)
    fields: frozenset[str] = frozenset(COMMON_FIELDS)
    categories: tuple[str, ...] = ()
    subresources: dict[str, dict] = field(default_factory=dict, hash=False, compare=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def singular(self) -> str:
        return self.kind.lower()


POD_FIELDS = frozenset(
    COMMON_FIELDS
    | {
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    }
)
EVENT_FIELDS = frozenset(
    COMMON_FIELDS
    | {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "source.component",
        "type",
    }
)

PODS = Resource(
    "",
    "v1",
    "pods",
    "Pod",
    short_names=("po",),
    fields=POD_FIELDS,
    categories=("all",),
    subresources={
        "log": {"kind": "Pod", "verbs": ["get"]},
        "eviction": {"kind": "Eviction", "group": "policy", "version": "v1", "verbs": ["create"]},
        "status": {"kind": "Pod", "verbs": ["get", "patch", "update"]},
    },
)
EVENTS = Resource("", "v1", "events", "Event", short_names=("ev",), fields=EVENT_FIELDS)
NAMESPACES = Resource(
    "", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",),
    verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
    fields=frozenset(COMMON_FIELDS | {"status.phase"}),
)
NODES = Resource("", "v1", "nodes", "Node", namespaced=False, short_names=("no",),
                 fields=frozenset(COMMON_FIELDS | {"spec.unschedulable"}))
DEPLOYMENTS = Resource(
    "apps",
    "v1",
    "deployments",
    "Deployment",
    short_names=("deploy",),
    categories=("all",),
    subresources={
        "scale": {"kind": "Scale", "group": "autoscaling", "version": "v1", "verbs": ["get", "patch", "update"]},
        "status": {"kind": "Deployment", "verbs": ["get", "patch", "update"]},
    },
)
REPLICASETS = Resource(
    "apps",
    "v1",
    "replicasets",
    "ReplicaSet",
    short_names=("rs",),
    categories=("all",),
    subresources={
        "scale": {"kind": "Scale", "group": "autoscaling", "version": "v1", "verbs": ["get", "patch", "update"]},
        "status": {"kind": "ReplicaSet", "verbs": ["get", "patch", "update"]},
    },
)
PDBS = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short_names=("pdb",))
POD_METRICS = Resource("metrics.k8s.io", "v1beta1", "pods", "PodMetrics", verbs=("get", "list"))
NODE_METRICS = Resource("metrics.k8s.io", "v1beta1", "nodes", "NodeMetrics", namespaced=False, verbs=("get", "list"))

STORED = [PODS, EVENTS, NAMESPACES, NODES, DEPLOYMENTS, REPLICASETS, PDBS]
SERVED = [*STORED, POD_METRICS, NODE_METRICS]

GROUP_VERSIONS: dict[str, list[Resource]] = {}
for _r in SERVED:
    GROUP_VERSIONS.setdefault(_r.api_version, []).append(_r)


def lookup(group: str, version: str, plural: str) -> Resource | None:
    for r in GROUP_VERSIONS.get(f"{group}/{version}" if group else version, []):
        if r.plural == plural:
            return r
    return None


def resource_list(api_version: str) -> dict:
    """The ``APIResourceList`` of a group version (subresources as ``name/sub`` entries)."""
    entries = []
    for r in GROUP_VERSIONS.get(api_version, []):
        entry = {
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": list(r.verbs),
        }
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        entries.append(entry)
        for sub, spec in r.subresources.items():
            sub_entry = {"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": r.namespaced,
                         "kind": spec["kind"], "verbs": spec["verbs"]}
            if "group" in spec:
                sub_entry["group"] = spec["group"]
                sub_entry["version"] = spec["version"]
            entries.append(sub_entry)
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api_version, "resources": entries}


def group_list() -> dict:
    """``/apis``: every named group with its one version."""
    groups = []
    for api_version in GROUP_VERSIONS:
        if "/" not in api_version:
            continue
        name, version = api_version.split("/")
        gv = {"groupVersion": api_version, "version": version}
        groups.append({"name": name, "versions": [gv], "preferredVersion": gv})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
