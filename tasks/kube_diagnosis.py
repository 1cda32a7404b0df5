"""Pure Kubernetes diagnosis: typed pod state, classification and a one-line summary, without any I/O.

`tasks/kube.py` turns API objects into these models and fetches events, logs and metrics; everything that
decides what a pod's state means lives here so unit tests need no server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONFIG_ERROR_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
STARTING_REASONS = frozenset({"ContainerCreating", "PodInitializing"})


class Classification(StrEnum):
    """What is wrong with a worker pod, most specific first (see `classify`)."""

    HEALTHY = "healthy"
    TERMINATING = "terminating"
    FAILED = "failed"
    UNKNOWN = "unknown"
    UNSCHEDULABLE = "unschedulable"
    IMAGE_PULL_FAILURE = "image-pull-failure"
    CONFIG_ERROR = "container-config-error"
    OOM_KILLED = "oom-killed"
    CRASH_LOOPING = "crash-looping"
    STARTING = "starting"
    NOT_READY = "not-ready"
    HUNG_SUSPECT = "hung-suspect"
    RECENTLY_RESTARTED = "recently-restarted"
    GONE = "gone"


class Termination(BaseModel):
    """How a container instance ended (`state.terminated` or `lastState.terminated`)."""

    reason: str | None = None
    exit_code: int | None = None
    message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class PodEvent(BaseModel):
    """One Kubernetes event about a pod (as `kubectl describe` shows them)."""

    type: str | None = None
    reason: str | None = None
    message: str | None = None
    count: int = 1
    last_seen: datetime | None = None


class PodInfo(BaseModel):
    """One worker pod, the one pod view every task and decision uses: its state as one list call shows it
    and, once diagnosed (``diagnosis``), its classification, CPU, events and relevant log lines."""

    name: str
    uid: str | None = None
    phase: str | None = None
    ready: bool = False
    restart_count: int = 0
    container: str | None = Field(None, description="The container reported on (the worker container).")
    waiting_reason: str | None = None
    waiting_message: str | None = None
    running_since: datetime | None = None
    current_termination: Termination | None = None
    last_termination: Termination | None = None
    unschedulable_message: str | None = None
    created_at: datetime | None = None
    deleting_since: datetime | None = Field(
        None, description="metadata.deletionTimestamp: when the pod will be gone (deletion time + grace)."
    )
    deletion_grace_s: int | None = None
    node: str | None = None
    pod_ip: str | None = None
    # filled by a diagnosis (``diagnosis``), or by a metrics read for ``cpu_millicores``
    classification: Classification | None = Field(None, description="None until the pod is diagnosed.")
    summary: str = ""
    cpu_millicores: float | None = None
    events: list[PodEvent] = Field(default_factory=list)
    log_tail: list[str] = Field(default_factory=list)
    log_source: str | None = Field(None, description="'previous' or 'current' container logs, if fetched.")
    log_error: str | None = None

    @property
    def terminating(self) -> bool:
        return self.deleting_since is not None

    @property
    def serving(self) -> bool:
        """Ready and not on its way out: counts towards healthy capacity."""
        return self.ready and not self.terminating

    @property
    def healthy(self) -> bool:
        return self.classification is Classification.HEALTHY

    @property
    def last_exit(self) -> Termination | None:
        """How the worker container last ended: the previous instance, else the current one if it exited."""
        return self.last_termination or self.current_termination


# ---------------------------------------------------------------- API object -> model (pure)


_CAMEL_EXCEPTIONS = {"pod_ip": "podIP", "host_ip": "hostIP"}


def _get(obj: Any, name: str) -> Any:
    """Attribute of a client model or key of a dict (camelCase or snake_case), None if absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        camel = _CAMEL_EXCEPTIONS.get(name) or re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
        return obj.get(camel)
    return getattr(obj, name, None)


def _termination(obj: Any) -> Termination | None:
    if obj is None:
        return None
    return Termination(
        reason=_get(obj, "reason"),
        exit_code=_get(obj, "exit_code"),
        message=_get(obj, "message"),
        started_at=_get(obj, "started_at"),
        finished_at=_get(obj, "finished_at"),
    )


def pod_info(pod: Any, *, container: str | None = None) -> PodInfo:
    """Turn a V1Pod (or its dict form) into a `PodInfo`, reporting on ``container`` (else the first one)."""
    meta, status, spec = _get(pod, "metadata"), _get(pod, "status"), _get(pod, "spec")
    statuses = list(_get(status, "container_statuses") or [])
    chosen = next((c for c in statuses if _get(c, "name") == container), statuses[0] if statuses else None)
    state = _get(chosen, "state")
    waiting, running = _get(state, "waiting"), _get(state, "running")
    unschedulable = None
    for cond in _get(status, "conditions") or []:
        scheduled = (_get(cond, "type"), _get(cond, "status"), _get(cond, "reason"))
        if scheduled == ("PodScheduled", "False", "Unschedulable"):
            unschedulable = _get(cond, "message") or "Unschedulable"
    return PodInfo(
        name=_get(meta, "name"),
        uid=_get(meta, "uid"),
        phase=_get(status, "phase"),
        ready=bool(statuses) and all(bool(_get(c, "ready")) for c in statuses),
        restart_count=sum(int(_get(c, "restart_count") or 0) for c in statuses),
        container=_get(chosen, "name") or container,
        waiting_reason=_get(waiting, "reason"),
        waiting_message=_get(waiting, "message"),
        running_since=_get(running, "started_at"),
        current_termination=_termination(_get(state, "terminated")),
        last_termination=_termination(_get(_get(chosen, "last_state"), "terminated")),
        unschedulable_message=unschedulable,
        created_at=_get(meta, "creation_timestamp"),
        deleting_since=_get(meta, "deletion_timestamp"),
        deletion_grace_s=_get(meta, "deletion_grace_period_seconds"),
        node=_get(spec, "node_name"),
        pod_ip=_get(status, "pod_ip"),
    )


def pod_event(event: Any) -> PodEvent:
    """Turn a CoreV1Event (or dict) into a `PodEvent`."""
    return PodEvent(
        type=_get(event, "type"),
        reason=_get(event, "reason"),
        message=_get(event, "message"),
        count=int(_get(event, "count") or 1),
        last_seen=_get(event, "last_timestamp")
        or _get(event, "event_time")
        or _get(event, "first_timestamp"),
    )


# ---------------------------------------------------------------- quantities

_CPU = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>n|u|m|k|)\s*$")
_CPU_FACTOR = {"n": 1e-6, "u": 1e-3, "m": 1.0, "": 1000.0, "k": 1_000_000.0}


def parse_cpu_millicores(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity in millicores: ``250m`` -> 250, ``12345678n`` -> 12.345678, ``1`` -> 1000."""
    if isinstance(quantity, int | float):
        return float(quantity) * 1000.0
    match = _CPU.match(quantity)
    if not match:
        raise ValueError(f"not a CPU quantity: {quantity!r}")
    return float(match["num"]) * _CPU_FACTOR[match["unit"]]


def pod_metrics_millicores(items: list[dict[str, Any]]) -> dict[str, float]:
    """Sum each pod's container CPU usage from a metrics.k8s.io PodMetrics list."""
    result: dict[str, float] = {}
    for item in items:
        name = (item.get("metadata") or {}).get("name")
        if not name:
            continue
        total = 0.0
        for container in item.get("containers") or []:
            cpu = (container.get("usage") or {}).get("cpu")
            if cpu is not None:
                total += parse_cpu_millicores(cpu)
        result[name] = round(total, 3)
    return result


# ---------------------------------------------------------------- classification


def classify(
    pod: PodInfo,
    *,
    cpu_millicores: float | None,
    now: datetime,
    hung_cpu_millicores: float = 5.0,
    recent_restart_s: float = 600.0,
) -> Classification:
    """The most specific thing wrong with ``pod`` (or healthy), from its state and CPU usage alone."""
    last = pod.last_exit
    recent = bool(last and last.finished_at and now - last.finished_at <= timedelta(seconds=recent_restart_s))
    if pod.terminating:
        return Classification.TERMINATING
    if pod.phase in ("Failed", "Succeeded"):
        return Classification.FAILED
    if pod.phase == "Unknown":
        return Classification.UNKNOWN
    if pod.unschedulable_message is not None:
        return Classification.UNSCHEDULABLE
    if pod.waiting_reason in IMAGE_PULL_REASONS:
        return Classification.IMAGE_PULL_FAILURE
    if pod.waiting_reason in CONFIG_ERROR_REASONS:
        return Classification.CONFIG_ERROR
    if last and last.reason == "OOMKilled" and (not pod.ready or recent):
        return Classification.OOM_KILLED
    crashed_now = pod.current_termination is not None and (
        pod.restart_count > 0 or (pod.current_termination.exit_code or 0) != 0
    )
    if pod.waiting_reason == "CrashLoopBackOff" or crashed_now:
        return Classification.CRASH_LOOPING
    if pod.phase == "Pending" or pod.waiting_reason in STARTING_REASONS:
        return Classification.STARTING
    if not pod.ready:
        return Classification.NOT_READY
    if cpu_millicores is not None and cpu_millicores < hung_cpu_millicores:
        return Classification.HUNG_SUSPECT
    if pod.restart_count > 0 and recent:
        return Classification.RECENTLY_RESTARTED
    return Classification.HEALTHY


def wants_logs(pod: PodInfo, classification: Classification) -> str | None:
    """Which logs explain this pod: 'previous' after a crash, 'current' if it runs, None if none exist."""
    if classification in (Classification.HEALTHY, Classification.GONE):
        return None
    if pod.last_termination is not None:
        return "previous"
    if pod.running_since is not None or classification is Classification.HUNG_SUSPECT:
        return "current"
    return None


def _ts(value: datetime | None) -> str:
    return value.strftime("%H:%M:%SZ") if value else "?"


def _clip(text: str | None, limit: int = 120) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarize(d: PodInfo) -> str:
    """One line a person on call understands: what is wrong, the key evidence, the last log line."""
    c = d.classification
    last = d.last_exit
    ended = f"exit {last.exit_code} ({last.reason or '?'}) at {_ts(last.finished_at)}" if last else "no exit"
    cpu = f", CPU {d.cpu_millicores:g}m" if d.cpu_millicores is not None else ""
    if c is Classification.HEALTHY:
        text = f"healthy: Running and Ready, {d.restart_count} restarts{cpu}"
    elif c is Classification.GONE:
        text = "gone: no such worker pod"
    elif c is Classification.TERMINATING:
        text = f"terminating (gone by {_ts(d.deleting_since)})"
    elif c is Classification.UNSCHEDULABLE:
        text = f"unschedulable: {_clip(d.unschedulable_message)}"
    elif c in (Classification.IMAGE_PULL_FAILURE, Classification.CONFIG_ERROR):
        text = f"{c.value}: {d.waiting_reason}: {_clip(d.waiting_message)}"
    elif c is Classification.OOM_KILLED:
        text = f"OOM-killed: {d.restart_count} restarts, last {ended}"
    elif c is Classification.CRASH_LOOPING:
        backoff = f", {d.waiting_reason}" if d.waiting_reason else ""
        text = f"crash-looping: {d.restart_count} restarts, last {ended}{backoff}"
    elif c is Classification.HUNG_SUSPECT:
        text = f"hung suspect: Running and Ready but CPU {d.cpu_millicores:g}m"
    elif c is Classification.RECENTLY_RESTARTED:
        text = f"recently restarted: {d.restart_count} restarts, last {ended}; Ready again{cpu}"
    elif c is Classification.STARTING:
        text = f"starting: {d.phase}{', ' + d.waiting_reason if d.waiting_reason else ''}"
    else:
        text = f"{c.value}: phase {d.phase}, ready {d.ready}, {d.restart_count} restarts"
    warning = next((e for e in reversed(d.events) if e.type == "Warning"), None)
    if warning and c is not Classification.HEALTHY:
        text += f"; event {warning.reason} x{warning.count}"
    line = next((ln for ln in reversed(d.log_tail) if ln.strip()), None)
    if line:
        text += f"; log: {_clip(line, 100)}"
    return f"{d.name}: {text}"


def diagnosis(
    pod: PodInfo,
    *,
    cpu_millicores: float | None,
    now: datetime,
    events: list[PodEvent] | None = None,
    log_tail: list[str] | None = None,
    log_source: str | None = None,
    log_error: str | None = None,
    hung_cpu_millicores: float = 5.0,
) -> PodInfo:
    """The pod with its evidence, classification and one-line summary filled in."""
    d = pod.model_copy(update={
        "cpu_millicores": cpu_millicores,
        "events": events or [],
        "log_tail": log_tail or [],
        "log_source": log_source,
        "log_error": log_error,
        "classification": classify(pod, cpu_millicores=cpu_millicores, now=now,
                                   hung_cpu_millicores=hung_cpu_millicores),
    })
    d.summary = summarize(d)
    return d


def gone(name: str) -> PodInfo:
    """The diagnosis of a requested pod that does not exist (any more)."""
    d = PodInfo(name=name, classification=Classification.GONE)
    d.summary = summarize(d)
    return d


_ERROR_LINE = re.compile(r"traceback|error|exception|fatal|panic|killed|oom", re.IGNORECASE)

NEXT_STEP: dict[Classification, str] = {
    Classification.CRASH_LOOPING: "run `worker-crash-recovery` (recover its pending steps, dead-letter a poison step)",
    Classification.OOM_KILLED: "run `worker-crash-recovery`; raise the worker's memory limit if it recurs",
    Classification.HUNG_SUSPECT: "run `worker-hang-recovery` (confirms the hang from the queue, then replaces it)",
    Classification.NOT_READY: "watch it; if it stays not Ready, `worker-hang-recovery`",
    Classification.RECENTLY_RESTARTED: "read the previous logs; `worker-crash-recovery` recovers its old entries",
    Classification.UNSCHEDULABLE: "add capacity or lower requests; deleting it will not help",
    Classification.IMAGE_PULL_FAILURE: "fix the image reference or registry credentials; deleting it will not help",
    Classification.CONFIG_ERROR: "fix the missing ConfigMap/Secret or container config; deleting it will not help",
    Classification.FAILED: "delete it so the ReplicaSet replaces it; read its logs first",
    Classification.TERMINATING: "wait for its replacement (`kubectl get pods -l app=worker -w`)",
    Classification.STARTING: "wait: it is starting",
    Classification.UNKNOWN: "check its node: the kubelet stopped reporting",
    Classification.GONE: "nothing: it no longer exists",
}


def relevant_log_lines(lines: list[str], *, limit: int = 20) -> list[str]:
    """The log lines worth showing: from the last traceback on, else the tail from its first error line."""
    lines = [ln for ln in lines if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith("Traceback"):
            return lines[i : i + limit]
    window = lines[-limit:]
    first_error = next((i for i, ln in enumerate(window) if _ERROR_LINE.search(ln)), 0)
    return window[first_error:]


# ---------------------------------------------------------------- report rows (like `kubectl get/describe pods`)


def status_column(d: PodInfo) -> str:
    """The STATUS column `kubectl get pods` would show."""
    if d.classification is Classification.GONE:
        return "NotFound"
    if d.terminating:
        return "Terminating"
    if d.waiting_reason:
        return d.waiting_reason
    if d.current_termination and d.current_termination.reason:
        return d.current_termination.reason
    return d.phase or "?"


def last_termination_text(d: PodInfo) -> str:
    t = d.last_termination
    if t is None:
        return ""
    when = t.finished_at.strftime("%Y-%m-%d %H:%M:%SZ") if t.finished_at else "?"
    return f"{t.reason or '?'} (exit {t.exit_code}) at {when}"


def pod_rows(pods: Iterable[PodInfo]) -> list[dict[str, object]]:
    """One row per pod, like `kubectl get pods` plus the diagnosis."""
    return [
        {
            "pod": d.name,
            "status": status_column(d),
            "ready": "-" if d.classification is Classification.GONE else ("1/1" if d.ready else "0/1"),
            "restarts": d.restart_count,
            "CPU (m)": "" if d.cpu_millicores is None else f"{d.cpu_millicores:g}",
            "classification": d.classification.value if d.classification else "",
            "last termination": last_termination_text(d),
        }
        for d in pods
    ]


def event_rows(d: PodInfo) -> list[dict[str, object]]:
    """A pod's recent events, like the Events section of `kubectl describe pod`."""
    return [{"type": e.type or "", "reason": e.reason or "", "count": e.count,
             "message": " ".join((e.message or "").split())} for e in d.events]


def next_step_rows(pods: Iterable[PodInfo]) -> list[dict[str, object]]:
    """For each pod that is not healthy: what to do next."""
    return [{"pod": d.name, "classification": d.classification.value,
             "next step": NEXT_STEP.get(d.classification, "")}
            for d in pods if d.classification is not None and not d.healthy]


# ---------------------------------------------------------------- replacements


def replacement_baseline(pods: Iterable[PodInfo], *, old_pod: str, since: datetime) -> set[str]:
    """Without the names from before the delete: the pods that cannot be the replacement — those already
    serving when the wait began and those created before ``since`` (when the old pod began terminating)."""
    return {
        p.name
        for p in pods
        if p.name != old_pod and (p.serving or (p.created_at is not None and p.created_at < since))
    }


def pick_replacement(pods: Iterable[PodInfo], *, old_pod: str, previous: set[str]) -> PodInfo | None:
    """The Ready pod, not in ``previous``, that replaced ``old_pod`` once ``old_pod`` is gone; else None."""
    pods = list(pods)
    if any(p.name == old_pod for p in pods):
        return None
    floor = datetime.min.replace(tzinfo=UTC)
    return next(
        (
            p
            for p in sorted(pods, key=lambda p: p.created_at or floor)
            if p.serving and p.name not in previous
        ),
        None,
    )


# ---------------------------------------------------------------- rollouts


def rollout_progress(deployment: Any) -> tuple[bool, str]:
    """``kubectl rollout status`` logic for a Deployment: (complete, message)."""
    meta, spec, status = _get(deployment, "metadata"), _get(deployment, "spec"), _get(deployment, "status")
    name = _get(meta, "name")
    generation = _get(meta, "generation") or 0
    observed = _get(status, "observed_generation") or 0
    if generation > observed:
        return False, "waiting for deployment spec update to be observed"
    for cond in _get(status, "conditions") or []:
        if _get(cond, "type") == "Progressing" and _get(cond, "reason") == "ProgressDeadlineExceeded":
            return False, f'deployment "{name}" exceeded its progress deadline'
    wanted = _get(spec, "replicas")
    wanted = 1 if wanted is None else wanted
    replicas = _get(status, "replicas") or 0
    updated = _get(status, "updated_replicas") or 0
    available = _get(status, "available_replicas") or 0
    if updated < wanted:
        return False, f"{updated} out of {wanted} new replicas have been updated"
    if replicas > updated:
        return False, f"{replicas - updated} old replicas are pending termination"
    if available < updated:
        return False, f"{available} of {updated} updated replicas are available"
    return True, f'deployment "{name}" successfully rolled out'


def container_env(deployment: Any, *, container: str, name: str) -> tuple[bool, str | None]:
    """(container found, value of env var ``name`` in it or None) of a Deployment's pod template."""
    spec = _get(_get(_get(deployment, "spec"), "template"), "spec")
    for c in _get(spec, "containers") or []:
        if _get(c, "name") == container:
            for var in _get(c, "env") or []:
                if _get(var, "name") == name:
                    value = _get(var, "value")
                    return True, "" if value is None and _get(var, "value_from") is None else value
            return True, None
    return False, None


def set_env_patch(*, container: str, name: str, value: str | None) -> dict[str, Any]:
    """The strategic-merge patch `kubectl set env` sends: set ``name`` (or delete it when value is None)."""
    entry: dict[str, Any] = (
        {"name": name, "value": value} if value is not None else {"$patch": "delete", "name": name}
    )
    return {"spec": {"template": {"spec": {"containers": [{"name": container, "env": [entry]}]}}}}


def restart_patch(*, restarted_at: str) -> dict[str, Any]:
    """The strategic-merge patch `kubectl rollout restart` sends."""
    return {
        "spec": {
            "template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": restarted_at}}}
        }
    }
