"""Pure readers of Kubernetes pod objects (plain dicts as the sandbox cluster hands them to listeners)."""

from __future__ import annotations


def pod_name(pod: dict) -> str:
    return str(pod.get("metadata", {}).get("name", ""))


def pod_labels(pod: dict) -> dict[str, str]:
    return dict(pod.get("metadata", {}).get("labels") or {})


def pod_is_terminating(pod: dict) -> bool:
    """True once the pod has a deletionTimestamp (kubectl shows it as Terminating)."""
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


def pod_is_ready(pod: dict) -> bool:
    """Running, condition Ready True, and not being deleted."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or pod_is_terminating(pod):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def container_env(pod: dict, *, container: str, name: str) -> str | None:
    """The literal value of env var ``name`` in ``container`` of the pod spec (None when absent)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            for env in c.get("env") or []:
                if env.get("name") == name:
                    return env.get("value")
    return None


def parse_selector(selector: str) -> dict[str, str]:
    """An equality label selector (``app=worker,tier=x``) as a dict; other operators are not supported."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in selector.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or key.endswith("!"):
            raise ValueError(f"unsupported label selector term: {part!r} (use key=value)")
        value = value[1:] if value.startswith("=") else value  # "==" form
        out[key.strip()] = value.strip()
    return out


def matches(pod: dict, selector: dict[str, str]) -> bool:
    labels = pod_labels(pod)
    return all(labels.get(k) == v for k, v in selector.items())


def pod_is_crashing(pod: dict) -> bool:
    """A container of the pod is crash-looping or has terminated with an error (restarts counted)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        terminated = (cs.get("state") or {}).get("terminated") or {}
        if waiting.get("reason") == "CrashLoopBackOff" or terminated.get("reason") in ("Error", "OOMKilled"):
            return True
    return False
