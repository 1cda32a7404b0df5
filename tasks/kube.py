"""Kubernetes tasks: the runbook's `kubectl` steps through the official client, batched and guarded.

Each task makes as few API calls as the job allows (one list call, not N gets), returns a typed result,
and — when it mutates — honours ``dry_run`` and says whether it changed anything. Errors surface as the
``Kube*`` classes below; Prefect retries a task only for temporary ones (429, 5xx, connection errors).

RBAC (deployments/kubernetes/rbac.yaml) grants exactly what these tasks call; each docstring lists it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from pydantic import BaseModel

from tasks.errors import RETRY, RecoveryError
from tasks.guard import guarded, llm_failover_budget, pod_deletion_budget
from tasks.kube_diagnosis import (
    Classification,
    PodEvent,
    PodInfo,
    classify,
    container_env,
    diagnosis,
    gone,
    pick_replacement,
    pod_event,
    pod_info,
    pod_metrics_millicores,
    replacement_baseline,
    restart_patch,
    rollout_progress,
    set_env_patch,
    wants_logs,
)
from tasks.settings import Settings

__all__ = [
    "Classification",
    "EnvResult",
    "KubeConfigError",
    "KubeConflict",
    "KubeError",
    "KubeEvictionRefused",
    "KubeForbidden",
    "KubeNotFound",
    "KubeServerError",
    "KubeTooManyRequests",
    "KubeUnavailable",
    "PodActionResult",
    "PodInfo",
    "ReplacementResult",
    "RolloutRestartResult",
    "RolloutStatus",
    "ScaleResult",
    "delete_pod",
    "diagnose_pods",
    "get_deployment_env",
    "kube_api_client",
    "list_worker_pods",
    "pod_cpu_millicores",
    "ready_worker_count",
    "rollout_restart",
    "scale_deployment",
    "set_deployment_env",
    "wait_for_replacement_ready",
    "wait_for_rollout",
]

FIELD_MANAGER = "ferrumdeck-recovery"
REPLACEMENT_LOOKBACK_S = 30  # without previous_pods and with the old pod gone: "new" = created this recently
T = TypeVar("T")


# ---------------------------------------------------------------- errors


class KubeError(RecoveryError):
    """A Kubernetes API call failed; ``temporary`` errors are worth retrying. Messages never hold tokens."""


class KubeConfigError(KubeError):
    """No usable kubeconfig or in-cluster configuration."""


class KubeNotFound(KubeError):
    """404: the object (or API) does not exist."""


class KubeConflict(KubeError):
    """409: conflicting change or the object already exists."""


class KubeForbidden(KubeError):
    """401/403: our ServiceAccount may not do this (see deployments/kubernetes/rbac.yaml)."""


class KubeTooManyRequests(KubeError):
    """429: API throttling, or an eviction a PodDisruptionBudget refuses for now."""

    temporary = True


class KubeEvictionRefused(KubeTooManyRequests):
    """429 on an eviction: a PodDisruptionBudget allows no disruption now (retried; may clear later)."""


class KubeServerError(KubeError):
    """5xx from the API server."""

    temporary = True


class KubeUnavailable(KubeError):
    """The API server could not be reached or did not answer in time."""

    temporary = True


def _status_message(e: ApiException) -> str:
    """The `Status.message` of an error response (or its reason), shortened for logs."""
    text = e.reason or ""
    if e.body:
        try:
            body = json.loads(e.body)
            text = body.get("message") or text
        except (ValueError, AttributeError):
            text = str(e.body)
    return " ".join(str(text).split())[:300]


def _translate(e: ApiException, what: str) -> KubeError:
    status = e.status or 0
    cls: type[KubeError]
    if status == 404:
        cls = KubeNotFound
    elif status == 409:
        cls = KubeConflict
    elif status in (401, 403):
        cls = KubeForbidden
    elif status == 429:
        cls = KubeTooManyRequests
    elif status >= 500:
        cls = KubeServerError
    else:
        cls = KubeError
    return cls(f"{what}: HTTP {status} {_status_message(e)}".rstrip(), status=status)


def _api(what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one client call, turning client/transport errors into our `KubeError` classes."""
    try:
        return call(*args, **kwargs)
    except ApiException as e:
        raise _translate(e, what) from e
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise KubeUnavailable(f"{what}: Kubernetes API unreachable ({type(e).__name__})") from e


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger, or the module's when called through ``.fn`` outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def kube_task(name: str, **options: Any) -> Callable[[Callable[..., T]], Any]:
    """`@task` with the one retry policy (``tasks.errors.RETRY``): temporary errors only, back-off, no caching."""
    return task(name=name, **RETRY, **options)


# ---------------------------------------------------------------- client factory

_clients: dict[tuple, k8s.ApiClient] = {}
_clients_lock = threading.Lock()


def _kubeconfig_source(settings: Settings) -> tuple[str, str | None]:
    """('file', path) from FD_KUBECONFIG/KUBECONFIG/~/.kube/config, or ('incluster', None)."""
    path = settings.kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        return "file", path
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "incluster", None
    default = os.path.expanduser("~/.kube/config")
    if os.path.exists(default):
        return "file", default
    raise KubeConfigError("no kubeconfig (FD_KUBECONFIG, KUBECONFIG, ~/.kube/config) and not in a cluster")


def _mtimes(paths: str) -> tuple[int, ...]:
    return tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else 0 for p in paths.split(os.pathsep))


def kube_api_client(settings: Settings) -> k8s.ApiClient:
    """A shared `ApiClient` for the configured kubeconfig/context (or in-cluster), one per process.

    urllib3's own retries are off: Prefect's task retries are the one retry policy.
    """
    kind, path = _kubeconfig_source(settings)
    key = (kind, path, settings.kube_context, _mtimes(path) if path else ())
    with _clients_lock:
        api = _clients.get(key)
        if api is not None:
            return api
        cfg = k8s.Configuration()
        try:
            if kind == "file":
                k8s_config.load_kube_config(
                    config_file=path,
                    context=settings.kube_context,
                    client_configuration=cfg,
                    persist_config=False,
                )
            else:
                k8s_config.load_incluster_config(client_configuration=cfg)
        except (ConfigException, OSError, ValueError) as e:
            raise KubeConfigError(f"cannot load Kubernetes configuration ({kind}): {e}") from e
        cfg.retries = 0
        api = k8s.ApiClient(cfg)
        for stale in [k for k in _clients if k[:3] == key[:3]]:  # the kubeconfig file changed since
            _clients.pop(stale).close()
        _clients[key] = api
        return api


def reset_kube_clients() -> None:
    """Drop cached clients (tests that restart the API server, and after a fork)."""
    with _clients_lock:
        for api in _clients.values():
            api.close()
        _clients.clear()


def _core(settings: Settings) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(kube_api_client(settings))


def _apps(settings: Settings) -> k8s.AppsV1Api:
    return k8s.AppsV1Api(kube_api_client(settings))


def _timeout(settings: Settings) -> tuple[float, float]:
    return (min(5.0, settings.kube_timeout_s), settings.kube_timeout_s)


# ---------------------------------------------------------------- results


class PodActionResult(BaseModel):
    """Outcome of deleting/evicting a pod: ``changed`` is False in a dry run or when it was already gone."""

    pod: str
    action: str
    changed: bool
    existed: bool
    dry_run: bool
    detail: str


class ReplacementResult(BaseModel):
    """Outcome of waiting for a deleted worker's replacement: which pod became Ready, and how long it took."""

    old_pod: str
    new_pod: str | None
    ready: bool
    old_pod_gone: bool
    seconds: float


class ScaleResult(BaseModel):
    deployment: str
    previous: int
    requested: int
    changed: bool
    dry_run: bool


class EnvResult(BaseModel):
    deployment: str
    container: str
    name: str
    previous: str | None
    value: str | None
    changed: bool
    dry_run: bool


class RolloutRestartResult(BaseModel):
    deployment: str
    restarted_at: str | None
    changed: bool
    dry_run: bool


class RolloutStatus(BaseModel):
    """Like `kubectl rollout status`: whether the Deployment's latest template is fully rolled out."""

    deployment: str
    complete: bool
    message: str
    replicas: int = 0
    updated_replicas: int = 0
    ready_replicas: int = 0
    available_replicas: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------- observations


def _list_worker_pods(settings: Settings) -> Any:
    return _api(
        f"list pods {settings.worker_selector} in {settings.namespace}",
        _core(settings).list_namespaced_pod,
        settings.namespace,
        label_selector=settings.worker_selector,
        _request_timeout=_timeout(settings),
    )


def _worker_metrics(settings: Settings) -> dict[str, float]:
    listing = _api(
        f"list pod metrics in {settings.namespace}",
        k8s.CustomObjectsApi(kube_api_client(settings)).list_namespaced_custom_object,
        "metrics.k8s.io",
        "v1beta1",
        settings.namespace,
        "pods",
        label_selector=settings.worker_selector,
        _request_timeout=_timeout(settings),
    )
    return pod_metrics_millicores(listing.get("items") or [])


@kube_task("list-worker-pods")
def list_worker_pods(*, settings: Settings) -> list[PodInfo]:
    """Every worker pod (one list call with the worker label selector). RBAC: pods list."""
    listing = _list_worker_pods(settings)
    return sorted(
        (pod_info(p, container=settings.worker_container) for p in listing.items), key=lambda p: p.name
    )


@kube_task("ready-worker-count")
def ready_worker_count(*, settings: Settings) -> int:
    """How many worker pods are Ready and not terminating (for `min_healthy_workers`). RBAC: pods list."""
    listing = _list_worker_pods(settings)
    return sum(1 for p in listing.items if pod_info(p, container=settings.worker_container).serving)


@kube_task("pod-cpu-millicores")
def pod_cpu_millicores(*, settings: Settings) -> dict[str, float]:
    """CPU use per worker pod in millicores from metrics.k8s.io (one list). RBAC: metrics pods list."""
    return _worker_metrics(settings)


def _pod_events(settings: Settings, pod: PodInfo, limit: int = 10) -> list[PodEvent]:
    selector = f"involvedObject.name={pod.name},involvedObject.namespace={settings.namespace}"
    if pod.uid:
        selector += f",involvedObject.uid={pod.uid}"
    try:
        listing = _api(
            f"list events of pod {pod.name}",
            _core(settings).list_namespaced_event,
            settings.namespace,
            field_selector=selector,
            _request_timeout=_timeout(settings),
        )
    except KubeNotFound:
        return []
    events = [pod_event(e) for e in listing.items]
    floor = datetime.min.replace(tzinfo=UTC)
    events.sort(key=lambda e: e.last_seen or floor)
    return events[-limit:]


def _pod_logs(settings: Settings, pod: PodInfo, *, source: str, lines: int) -> tuple[list[str], str | None]:
    """The last ``lines`` log lines of the pod's current or previous container, or an error note."""
    try:
        text = _api(
            f"read {source} logs of pod {pod.name}",
            _core(settings).read_namespaced_pod_log,
            pod.name,
            settings.namespace,
            container=pod.container or settings.worker_container,
            previous=source == "previous",
            tail_lines=lines,
            _request_timeout=_timeout(settings),
        )
    except KubeError as e:
        if e.temporary:
            raise
        return [], str(e)
    return str(text).splitlines()[-lines:], None


@kube_task("diagnose-pods")
def diagnose_pods(
    *, settings: Settings, pods: list[str] | None = None, log_lines: int = 50
) -> list[PodInfo]:
    """Diagnose worker pods (all, or the named ones): one pod list + one metrics list, then events and
    logs only for pods that are not healthy. RBAC: pods list, pods/log get, events list, metrics pods list.
    """
    listing = _list_worker_pods(settings)
    try:
        cpu = _worker_metrics(settings)
    except (KubeNotFound, KubeForbidden, KubeServerError) as e:  # no (working) metrics API: no CPU figures
        _logger().warning("diagnosing without CPU metrics: %s", e)
        cpu = {}
    now = datetime.now(UTC)
    wanted = set(pods) if pods is not None else None
    result: list[PodInfo] = []
    for raw in listing.items:
        info = pod_info(raw, container=settings.worker_container)
        if wanted is not None and info.name not in wanted:
            continue
        millicores = cpu.get(info.name)
        kind = classify(
            info, cpu_millicores=millicores, now=now, hung_cpu_millicores=settings.hung_cpu_millicores
        )
        events: list[PodEvent] = []
        log_tail: list[str] = []
        log_error = None
        source = wants_logs(info, kind)
        if kind is not Classification.HEALTHY:
            events = _pod_events(settings, info)
            if source and log_lines > 0:
                log_tail, log_error = _pod_logs(settings, info, source=source, lines=log_lines)
        result.append(
            diagnosis(
                info,
                cpu_millicores=millicores,
                now=now,
                events=events,
                log_tail=log_tail,
                log_source=source if log_tail or log_error else None,
                log_error=log_error,
                hung_cpu_millicores=settings.hung_cpu_millicores,
            )
        )
    seen = {d.name for d in result}
    result += [gone(name) for name in sorted((wanted or set()) - seen)]
    return sorted(result, key=lambda d: d.name)


# ---------------------------------------------------------------- pod actions


@kube_task("delete-pod", task_run_name="delete {pod}")
@guarded("delete-pod", target=lambda kw: kw["pod"], budget=pod_deletion_budget, cooldown=True)
def delete_pod(*, settings: Settings, pod: str, evict: bool = False, dry_run: bool) -> PodActionResult:
    """Delete a pod (or evict it through the Eviction API so PodDisruptionBudgets apply); a pod that is
    already gone counts as deleted with ``changed=False``. RBAC: pods delete / pods/eviction create, pods get.
    """
    action = "evict" if evict else "delete"
    core, ns = _core(settings), settings.namespace
    if dry_run:
        try:
            _api(f"get pod {pod}", core.read_namespaced_pod, pod, ns, _request_timeout=_timeout(settings))
        except KubeNotFound:
            return PodActionResult(
                pod=pod, action=action, changed=False, existed=False, dry_run=True, detail="already gone"
            )
        return PodActionResult(
            pod=pod,
            action=action,
            changed=False,
            existed=True,
            dry_run=True,
            detail=f"dry run: would {action} the pod",
        )
    try:
        if evict:
            body = k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=pod, namespace=ns))
            _api(
                f"evict pod {pod}",
                core.create_namespaced_pod_eviction,
                pod,
                ns,
                body,
                _request_timeout=_timeout(settings),
            )
        else:
            _api(
                f"delete pod {pod}", core.delete_namespaced_pod, pod, ns, _request_timeout=_timeout(settings)
            )
    except KubeNotFound:
        return PodActionResult(
            pod=pod, action=action, changed=False, existed=False, dry_run=False, detail="already gone"
        )
    except KubeTooManyRequests as e:
        if evict and "disruption budget" in str(e).lower():
            raise KubeEvictionRefused(f"{e} (PodDisruptionBudget)", status=429) from e
        raise
    return PodActionResult(
        pod=pod, action=action, changed=True, existed=True, dry_run=False, detail=f"{action}d"
    )


def _watch_pods(settings: Settings, *, resource_version: str, seconds: float) -> Iterator[tuple[str, Any]]:
    """Worker pod watch events from ``resource_version`` for at most ``seconds`` (the server closes it)."""
    w = k8s_watch.Watch()
    stream = w.stream(
        _core(settings).list_namespaced_pod,
        settings.namespace,
        label_selector=settings.worker_selector,
        resource_version=resource_version,
        allow_watch_bookmarks=True,
        timeout_seconds=max(1, math.ceil(seconds)),
        _request_timeout=(_timeout(settings)[0], seconds + 5),
    )
    try:
        for event in stream:
            yield event["type"], event["object"]
    finally:
        stream.close()


def _object_rv(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else getattr(obj, "metadata", None)
    if isinstance(meta, dict):
        return meta.get("resourceVersion")
    return getattr(meta, "resource_version", None)


@kube_task("wait-for-replacement-ready", task_run_name="wait for replacement of {old_pod}")
def wait_for_replacement_ready(
    *, settings: Settings, old_pod: str, previous_pods: list[str] | None = None, timeout_s: float
) -> ReplacementResult:
    """Watch worker pods until a NEW one is Ready and ``old_pod`` is gone, or ``timeout_s`` passes.

    New means: not in ``previous_pods`` (pass the names listed before the delete). Without them: not yet
    Ready when the wait began and created since the old pod began terminating (if it is already gone: in
    the last 30 s). RBAC: pods list, watch.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    pods: dict[str, PodInfo] = {}
    previous = set(previous_pods or ())

    def relist() -> str:
        listing = _list_worker_pods(settings)
        pods.clear()
        pods.update(
            {p.metadata.name: pod_info(p, container=settings.worker_container) for p in listing.items}
        )
        return listing.metadata.resource_version

    rv = relist()
    if previous_pods is None:
        old = pods.get(old_pod)
        if old is not None and old.deleting_since is not None:  # deletionTimestamp = deletion time + grace
            mark = old.deleting_since - timedelta(seconds=old.deletion_grace_s or 0)
        else:
            mark = datetime.now(UTC) - timedelta(seconds=REPLACEMENT_LOOKBACK_S)
        since = mark.replace(microsecond=0) - timedelta(seconds=1)  # creationTimestamps have whole seconds
        previous = replacement_baseline(pods.values(), old_pod=old_pod, since=since)
    found = pick_replacement(pods.values(), old_pod=old_pod, previous=previous)
    while found is None and (remaining := deadline - time.monotonic()) > 0:
        try:
            for kind, obj in _watch_pods(settings, resource_version=rv, seconds=remaining):
                rv = _object_rv(obj) or rv
                if kind in ("ADDED", "MODIFIED"):
                    info = pod_info(obj, container=settings.worker_container)
                    pods[info.name] = info
                elif kind == "DELETED":
                    pods.pop(pod_info(obj).name, None)
                else:
                    continue
                found = pick_replacement(pods.values(), old_pod=old_pod, previous=previous)
                if found is not None or time.monotonic() >= deadline:
                    break
        except ApiException as e:
            if e.status != 410:
                raise _translate(e, "watch worker pods") from e
            rv = relist()  # our resourceVersion is too old: start again from a fresh list
            found = pick_replacement(pods.values(), old_pod=old_pod, previous=previous)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            if time.monotonic() >= deadline:
                break
            raise KubeUnavailable(
                f"watch worker pods: Kubernetes API unreachable ({type(e).__name__})"
            ) from e
    return ReplacementResult(
        old_pod=old_pod,
        new_pod=found.name if found else None,
        ready=found is not None,
        old_pod_gone=old_pod not in pods,
        seconds=round(time.monotonic() - started, 3),
    )


# ---------------------------------------------------------------- deployments


@kube_task("scale-deployment", task_run_name="scale {deployment} to {replicas}")
@guarded("scale-deployment", target=lambda kw: f"deployment/{kw['deployment']}")
def scale_deployment(
    *, settings: Settings, deployment: str, replicas: int, max_replicas: int | None = None, dry_run: bool
) -> ScaleResult:
    """Set a Deployment's replicas through the scale subresource, refusing above ``max_replicas``
    (default `FD_MAX_REPLICAS`). RBAC: deployments/scale get, patch.
    """
    limit = settings.max_replicas if max_replicas is None else max_replicas
    if not 0 <= replicas <= limit:
        raise ValueError(f"refusing to scale {deployment} to {replicas}: allowed 0..{limit} replicas")
    apps, ns = _apps(settings), settings.namespace
    scale = _api(
        f"get scale of deployment {deployment}",
        apps.read_namespaced_deployment_scale,
        deployment,
        ns,
        _request_timeout=_timeout(settings),
    )
    previous = int((scale.spec.replicas if scale.spec else 0) or 0)
    if previous == replicas or dry_run:
        return ScaleResult(
            deployment=deployment, previous=previous, requested=replicas, changed=False, dry_run=dry_run
        )
    _api(
        f"scale deployment {deployment}",
        apps.patch_namespaced_deployment_scale,
        deployment,
        ns,
        {"spec": {"replicas": replicas}},
        field_manager=FIELD_MANAGER,
        _content_type="application/merge-patch+json",
        _request_timeout=_timeout(settings),
    )
    return ScaleResult(
        deployment=deployment, previous=previous, requested=replicas, changed=True, dry_run=False
    )


def _read_deployment(settings: Settings, deployment: str) -> Any:
    return _api(
        f"get deployment {deployment}",
        _apps(settings).read_namespaced_deployment,
        deployment,
        settings.namespace,
        _request_timeout=_timeout(settings),
    )


def _env_of(settings: Settings, deployment: str, container: str, name: str) -> str | None:
    found, value = container_env(_read_deployment(settings, deployment), container=container, name=name)
    if not found:
        raise KubeNotFound(f"deployment {deployment} has no container {container!r}", status=404)
    return value


@kube_task("get-deployment-env")
def get_deployment_env(*, settings: Settings, deployment: str, container: str, name: str) -> str | None:
    """The value of env var ``name`` in a Deployment's container template (None if unset). RBAC: deployments get."""
    return _env_of(settings, deployment, container, name)


@kube_task("set-deployment-env", task_run_name="set {name} on {deployment}")
@guarded("set-deployment-env", target=lambda kw: f"deployment/{kw['deployment']}", budget=llm_failover_budget,
         cooldown=True)
def set_deployment_env(
    *, settings: Settings, deployment: str, container: str, name: str, value: str | None, dry_run: bool
) -> EnvResult:
    """Set (or, with None, remove) an env var like `kubectl set env` (strategic merge patch); a value that
    is already in place changes nothing. Returns the previous value. RBAC: deployments get, patch.
    """
    previous = _env_of(settings, deployment, container, name)
    result = EnvResult(
        deployment=deployment,
        container=container,
        name=name,
        previous=previous,
        value=value,
        changed=False,
        dry_run=dry_run,
    )
    if previous == value or dry_run:
        return result
    _api(
        f"set env {name} on deployment {deployment}",
        _apps(settings).patch_namespaced_deployment,
        deployment,
        settings.namespace,
        set_env_patch(container=container, name=name, value=value),
        field_manager=FIELD_MANAGER,
        _content_type="application/strategic-merge-patch+json",
        _request_timeout=_timeout(settings),
    )
    return result.model_copy(update={"changed": True})


@kube_task("rollout-restart", task_run_name="rollout restart {deployment}")
@guarded("rollout-restart", target=lambda kw: f"deployment/{kw['deployment']}", cooldown=True)
def rollout_restart(*, settings: Settings, deployment: str, dry_run: bool) -> RolloutRestartResult:
    """Restart a Deployment's pods like `kubectl rollout restart` (a restartedAt template annotation).
    RBAC: deployments get (dry run), patch.
    """
    if dry_run:
        _read_deployment(settings, deployment)
        return RolloutRestartResult(deployment=deployment, restarted_at=None, changed=False, dry_run=True)
    restarted_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _api(
        f"rollout restart deployment {deployment}",
        _apps(settings).patch_namespaced_deployment,
        deployment,
        settings.namespace,
        restart_patch(restarted_at=restarted_at),
        field_manager=FIELD_MANAGER,
        _content_type="application/strategic-merge-patch+json",
        _request_timeout=_timeout(settings),
    )
    return RolloutRestartResult(deployment=deployment, restarted_at=restarted_at, changed=True, dry_run=False)


def _rollout_status(deployment: str, obj: Any, started: float) -> RolloutStatus:
    complete, message = rollout_progress(obj)
    status = obj.status
    return RolloutStatus(
        deployment=deployment,
        complete=complete,
        message=message,
        replicas=(status.replicas if status else 0) or 0,
        updated_replicas=(status.updated_replicas if status else 0) or 0,
        ready_replicas=(status.ready_replicas if status else 0) or 0,
        available_replicas=(status.available_replicas if status else 0) or 0,
        seconds=round(time.monotonic() - started, 3),
    )


@kube_task("wait-for-rollout", task_run_name="wait for rollout of {deployment}")
def wait_for_rollout(*, settings: Settings, deployment: str, timeout_s: float) -> RolloutStatus:
    """Watch a Deployment until its rollout completes (like `kubectl rollout status`) or ``timeout_s``
    passes; the result says which. RBAC: deployments list, watch.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    apps, ns = _apps(settings), settings.namespace
    selector = f"metadata.name={deployment}"

    def relist() -> tuple[Any, str]:
        listing = _api(
            f"list deployment {deployment}",
            apps.list_namespaced_deployment,
            ns,
            field_selector=selector,
            _request_timeout=_timeout(settings),
        )
        if not listing.items:
            raise KubeNotFound(f"deployment {deployment} not found in {ns}", status=404)
        return listing.items[0], listing.metadata.resource_version

    current, rv = relist()
    status = _rollout_status(deployment, current, started)
    while not status.complete and (remaining := deadline - time.monotonic()) > 0:
        w = k8s_watch.Watch()
        stream = w.stream(
            apps.list_namespaced_deployment,
            ns,
            field_selector=selector,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, math.ceil(remaining)),
            _request_timeout=(_timeout(settings)[0], remaining + 5),
        )
        try:
            for event in stream:
                rv = _object_rv(event["object"]) or rv
                if event["type"] == "DELETED":
                    raise KubeNotFound(f"deployment {deployment} was deleted during its rollout", status=404)
                if event["type"] in ("ADDED", "MODIFIED"):
                    status = _rollout_status(deployment, event["object"], started)
                if status.complete or time.monotonic() >= deadline:
                    break
        except ApiException as e:
            if e.status != 410:
                raise _translate(e, f"watch deployment {deployment}") from e
            current, rv = relist()
            status = _rollout_status(deployment, current, started)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeUnavailable(
                f"watch deployment {deployment}: API unreachable ({type(e).__name__})"
            ) from e
        finally:
            stream.close()
    return status.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
