"""Server-side ``Table`` output for ``kubectl get`` (the columns and cells the real printers produce)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sandbox.kube.selectors import selector_string


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    text = text.replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """``duration.HumanDuration`` of apimachinery (what the AGE column shows)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    return f"{hours // 24 // 365}y"


def age(timestamp: str | None) -> str:
    when = parse_time(timestamp)
    if when is None:
        return "<unknown>"
    return human_duration((datetime.now(UTC) - when).total_seconds())


def _col(name: str, typ: str = "string", *, priority: int = 0, fmt: str = "", description: str = "") -> dict:
    return {"name": name, "type": typ, "format": fmt, "description": description or name, "priority": priority}


def pod_status_text(pod: dict) -> tuple[str, int, int, str]:
    """(STATUS, ready containers, restarts, last restart timestamp) like kubectl's pod printer."""
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Unknown"
    restarts, ready, last_restart = 0, 0, ""
    has_running = False
    for cs in status.get("containerStatuses") or []:
        restarts += int(cs.get("restartCount") or 0)
        finished = ((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
        if finished and finished > last_restart:
            last_restart = finished
        state = cs.get("state") or {}
        if (state.get("waiting") or {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif (state.get("terminated") or {}).get("reason"):
            reason = state["terminated"]["reason"]
        elif "terminated" in state:
            term = state["terminated"]
            reason = f"Signal:{term['signal']}" if term.get("signal") else f"ExitCode:{term.get('exitCode', 0)}"
        elif cs.get("ready") and "running" in state:
            has_running = True
            ready += 1
    if reason == "Completed" and has_running:
        reason = "Running"
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        reason = "Terminating"
    return reason, ready, restarts, last_restart


def _pod_row(pod: dict) -> list:
    reason, ready, restarts, last_restart = pod_status_text(pod)
    total = len((pod.get("spec") or {}).get("containers") or [])
    restarts_text = str(restarts)
    if last_restart:
        restarts_text = f"{restarts} ({age(last_restart)} ago)"
    status = pod.get("status") or {}
    gates = (pod.get("spec") or {}).get("readinessGates") or []
    return [
        pod["metadata"]["name"],
        f"{ready}/{total}",
        reason,
        restarts_text,
        age(pod["metadata"].get("creationTimestamp")),
        status.get("podIP") or "<none>",
        (pod.get("spec") or {}).get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        f"0/{len(gates)}" if gates else "<none>",
    ]


POD_COLUMNS = [
    _col("Name", fmt="name", description="Name must be unique within a namespace."),
    _col("Ready", description="The aggregate readiness state of this pod for accepting traffic."),
    _col("Status", description="The aggregate status of the containers in this pod."),
    _col("Restarts", description="The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
    _col("Age", description="CreationTimestamp"),
    _col("IP", priority=1, description="IP address allocated to the pod."),
    _col("Node", priority=1, description="Name of the Node this pod is scheduled on."),
    _col("Nominated Node", priority=1, description="Nominated node name."),
    _col("Readiness Gates", priority=1, description="Pod readiness gates."),
]


def _containers(template_spec: dict) -> tuple[str, str]:
    containers = template_spec.get("containers") or []
    return ",".join(c.get("name", "") for c in containers), ",".join(c.get("image", "") for c in containers)


DEPLOYMENT_COLUMNS = [
    _col("Name", fmt="name"),
    _col("Ready", description="Number of the pod with ready state"),
    _col("Up-to-date", "integer", description="Total number of non-terminated pods targeted by this deployment that have the desired template spec."),
    _col("Available", "integer", description="Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."),
    _col("Age"),
    _col("Containers", priority=1, description="Names of each container in the template."),
    _col("Images", priority=1, description="Images referenced by each container in the template."),
    _col("Selector", priority=1, description="Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment."),
]


def _deployment_row(d: dict) -> list:
    status, spec = d.get("status") or {}, d.get("spec") or {}
    names, images = _containers((spec.get("template") or {}).get("spec") or {})
    return [
        d["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
        int(status.get("updatedReplicas", 0)),
        int(status.get("availableReplicas", 0)),
        age(d["metadata"].get("creationTimestamp")),
        names,
        images,
        selector_string(spec.get("selector")),
    ]


REPLICASET_COLUMNS = [
    _col("Name", fmt="name"),
    _col("Desired", "integer"),
    _col("Current", "integer"),
    _col("Ready", "integer"),
    _col("Age"),
    _col("Containers", priority=1),
    _col("Images", priority=1),
    _col("Selector", priority=1),
]


def _replicaset_row(rs: dict) -> list:
    status, spec = rs.get("status") or {}, rs.get("spec") or {}
    names, images = _containers((spec.get("template") or {}).get("spec") or {})
    return [
        rs["metadata"]["name"],
        int(spec.get("replicas", 1)),
        int(status.get("replicas", 0)),
        int(status.get("readyReplicas", 0)),
        age(rs["metadata"].get("creationTimestamp")),
        names,
        images,
        selector_string(spec.get("selector")),
    ]


EVENT_COLUMNS = [
    _col("Last Seen"),
    _col("Type"),
    _col("Reason"),
    _col("Object"),
    _col("Subobject", priority=1),
    _col("Source", priority=1),
    _col("Message"),
    _col("First Seen", priority=1),
    _col("Count", priority=1),
    _col("Name", priority=1),
]


def _event_row(ev: dict) -> list:
    inv = ev.get("involvedObject") or {}
    source = (ev.get("source") or {}).get("component", "")
    return [
        age(ev.get("lastTimestamp") or ev.get("eventTime") or ev["metadata"].get("creationTimestamp")),
        ev.get("type", ""),
        ev.get("reason", ""),
        f"{(inv.get('kind') or '').lower()}/{inv.get('name', '')}",
        inv.get("fieldPath", ""),
        source,
        ev.get("message", ""),
        age(ev.get("firstTimestamp")),
        str(ev.get("count", 1)),
        ev["metadata"]["name"],
    ]


NAMESPACE_COLUMNS = [_col("Name", fmt="name"), _col("Status"), _col("Age")]
NODE_COLUMNS = [_col("Name", fmt="name"), _col("Status"), _col("Roles"), _col("Age"), _col("Version")]
PDB_COLUMNS = [
    _col("Name", fmt="name"),
    _col("Min Available"),
    _col("Max Unavailable"),
    _col("Allowed Disruptions", "integer"),
    _col("Age"),
]
GENERIC_COLUMNS = [_col("Name", fmt="name"), _col("Age")]


def _pdb_row(p: dict) -> list:
    spec = p.get("spec") or {}
    return [
        p["metadata"]["name"],
        str(spec["minAvailable"]) if "minAvailable" in spec else "N/A",
        str(spec["maxUnavailable"]) if "maxUnavailable" in spec else "N/A",
        int((p.get("status") or {}).get("disruptionsAllowed", 0)),
        age(p["metadata"].get("creationTimestamp")),
    ]


PRINTERS: dict[str, tuple[list[dict], Callable[[dict], list]]] = {
    "pods": (POD_COLUMNS, _pod_row),
    "deployments.apps": (DEPLOYMENT_COLUMNS, _deployment_row),
    "replicasets.apps": (REPLICASET_COLUMNS, _replicaset_row),
    "events": (EVENT_COLUMNS, _event_row),
    "namespaces": (NAMESPACE_COLUMNS, lambda n: [n["metadata"]["name"], (n.get("status") or {}).get("phase", "Active"), age(n["metadata"].get("creationTimestamp"))]),
    "nodes": (NODE_COLUMNS, lambda n: [n["metadata"]["name"], "Ready", "<none>", age(n["metadata"].get("creationTimestamp")), "v1.32.0"]),
    "poddisruptionbudgets.policy": (PDB_COLUMNS, _pdb_row),
}


def _row_object(obj: dict, include: str) -> dict | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


def table(resource_key: str, objects: list[dict], *, resource_version: str, include_object: str = "Metadata") -> dict:
    """A ``meta.k8s.io/v1`` Table of ``objects`` with the resource's printer columns."""
    columns, row_fn = PRINTERS.get(
        resource_key, (GENERIC_COLUMNS, lambda o: [o["metadata"]["name"], age(o["metadata"].get("creationTimestamp"))])
    )
    rows = []
    for obj in objects:
        row: dict = {"cells": row_fn(obj)}
        ro = _row_object(obj, include_object)
        if ro is not None:
            row["object"] = ro
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns,
        "rows": rows,
    }
