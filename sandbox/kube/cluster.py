"""``SandboxCluster``: the sandbox API server in-process, its kubeconfig, seeding, and the fault injection API."""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sandbox.http_server import ServedApp, ServeError, serve_app
from sandbox.kube import resources as R
from sandbox.kube.controllers import Controller
from sandbox.kube.kubelet import NODE_IP, NODE_NAME
from sandbox.kube.selectors import make_filter, parse_label_selector
from sandbox.kube.server import ApiState, FaultRule, KubeApp, RecordedRequest, default_workload
from sandbox.kube.store import Store, now_iso, now_iso_micro
from sandbox.kube.timing import Timing

log = logging.getLogger(__name__)

NAMESPACE = "ferrumdeck"
WORKER_IMAGE = "ghcr.io/ferrumdeck/worker:1.8.2"
MCP_IMAGE = "ghcr.io/ferrumdeck/mcp-server:0.9.1"

T = TypeVar("T")


class SandboxError(Exception):
    """The sandbox cluster did not start, stop, or reach a state in time."""


def seed_deployment(name: str, *, replicas: int, image: str, env: list[dict] | None = None,
                    port: int | None = None) -> dict:
    """A Deployment the way FerrumDeck's manifests define it (label ``app=<name>``, one container)."""
    container: dict[str, Any] = {"name": name, "image": image}
    if env:
        container["env"] = env
    if port:
        container["ports"] = [{"containerPort": port, "protocol": "TCP"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [container]}},
        },
    }


def seed_objects() -> list[tuple[R.Resource, dict]]:
    return [
        (R.NAMESPACES, {"metadata": {"name": "default"}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        (R.NAMESPACES, {"metadata": {"name": "kube-system"}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        (R.NAMESPACES, {"metadata": {"name": NAMESPACE, "labels": {"kubernetes.io/metadata.name": NAMESPACE}},
                        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        (R.NODES, {
            "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux"}},
            "spec": {},
            "status": {
                "addresses": [{"type": "InternalIP", "address": NODE_IP}, {"type": "Hostname", "address": NODE_NAME}],
                "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
                "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status", "lastHeartbeatTime": now_iso(),
                                "lastTransitionTime": now_iso()}],
                "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "sandbox", "containerRuntimeVersion": "containerd://1.7",
                             "architecture": "amd64", "operatingSystem": "linux", "kernelVersion": "6.1",
                             "kubeProxyVersion": "v1.32.0", "machineID": "sandbox", "systemUUID": "sandbox", "bootID": "sandbox"},
            },
        }),
        (R.DEPLOYMENTS, seed_deployment("worker", replicas=3, image=WORKER_IMAGE,
                                        env=[{"name": "LITELLM_MODEL", "value": "openai/gpt-4o"}])),
        (R.DEPLOYMENTS, seed_deployment("mcp-server", replicas=1, image=MCP_IMAGE, port=3000)),
    ]


def write_kubeconfig(path: Path, url: str, *, namespace: str = NAMESPACE) -> Path:
    """A kubeconfig with cluster, user and context ``sandbox`` (current) pointing at ``url``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: sandbox\n"
        "  cluster:\n"
        f"    server: {url}\n"
        "contexts:\n"
        "- name: sandbox\n"
        "  context:\n"
        "    cluster: sandbox\n"
        "    user: sandbox\n"
        f"    namespace: {namespace}\n"
        "current-context: sandbox\n"
        "users:\n"
        "- name: sandbox\n"
        "  user:\n"
        "    token: sandbox-token\n"
        "preferences: {}\n"
    )
    return path


class SandboxCluster:
    """A Kubernetes API server with controllers, in this process, on its own thread."""

    def __init__(self, *, timing: Timing | None = None) -> None:
        self._base_timing = timing or Timing()
        self.store = Store()
        self.controller = Controller(self.store, self._base_timing)
        self.state = ApiState(store=self.store, controller=self.controller)
        self.app = KubeApp(self.state)
        self.url = ""
        self.port = 0
        self.kubeconfig = ""
        self._served: ServedApp | None = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None

    # --- lifecycle ---
    @classmethod
    def start(cls, port: int = 0, kubeconfig_path: str | Path | None = None, timing: Timing | None = None,
              *, host: str = "127.0.0.1") -> SandboxCluster:
        """Seed, start serving on ``host:port`` (0 = a free port) and write the kubeconfig; returns when serving."""
        cluster = cls(timing=timing)
        cluster._serve(host, port)
        if kubeconfig_path is None:
            cluster._tmpdir = tempfile.TemporaryDirectory(prefix="sandbox-kube-")
            kubeconfig_path = Path(cluster._tmpdir.name) / "kubeconfig"
        cluster.kubeconfig = str(write_kubeconfig(Path(kubeconfig_path), cluster.url))
        cluster.controller.start()
        cluster.reset()
        return cluster

    def _serve(self, host: str, port: int) -> None:
        try:
            self._served = serve_app(self.app, host=host, port=port, name=f"kube-{port}", timeout_s=10,
                                     timeout_graceful_shutdown=1, http="h11")
        except ServeError as e:
            raise SandboxError(f"sandbox API server did not start on {host}:{port}") from e
        self.port = self._served.port
        self.url = self._served.url
        self.state.server_address = f"{host}:{self.port}"

    def stop(self) -> None:
        """Close every watch, stop serving and stop the controller (idempotent)."""
        self.state.stopping.set()
        self.store.wake_watchers()
        if self._served is not None:
            self._served.stop(timeout_s=5)
        self.controller.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> SandboxCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Back to the seeded namespace, every pod Running and Ready; clears faults, timing changes and requests.

        Every old object goes with a DELETED event (listeners hear of it), the watch history is compacted
        (older resourceVersions get 410) and open watches end. Listeners stay registered.
        """
        ctl = self.controller
        with ctl.mutex:
            with self.state.lock:
                self.state.faults.clear()
            ctl.clear_timers()
            ctl.timing = self._base_timing
            ctl.schedule_block = None
            with self.store.lock:
                for res in (R.PODS, R.REPLICASETS, R.DEPLOYMENTS, R.PDBS, R.EVENTS, R.NODES, R.NAMESPACES):
                    for obj in self.store.list(res):
                        self.store.remove(res, obj["metadata"].get("namespace"), obj["metadata"]["name"])
                ctl.sims.clear()
                for res, obj in seed_objects():
                    if res is R.DEPLOYMENTS:
                        default_workload(res, obj)
                        obj["metadata"]["generation"] = 1
                    self.store.create(res, obj)
                ctl.reconcile()
                for pod in self.store.list(R.PODS):
                    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
                    ctl.start_containers(ns, name, pod["metadata"]["uid"], ready_now=True)
                ctl.reconcile()
                ctl.clear_timers()
                self.store.compact()
                self.store.epoch += 1
            self.store.wake_watchers()
        ctl.flush()  # listeners have heard of the reset before it returns; later listeners hear only later changes
        with self.state.lock:
            self.state.requests.clear()

    # --- reading ---
    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request since the last reset, oldest first (a copy of the list)."""
        with self.state.lock:
            return list(self.state.requests)

    def clear_requests(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def pods(self, namespace: str = NAMESPACE, selector: str | None = None) -> list[dict]:
        """Current pod objects (copies), optionally filtered by a label selector."""
        predicate = make_filter(selector, None, allowed=set())
        return [copy.deepcopy(p) for p in self.store.list(R.PODS, namespace) if predicate(p)]

    def pod(self, name: str, namespace: str = NAMESPACE) -> dict | None:
        obj = self.store.get(R.PODS, namespace, name)
        return copy.deepcopy(obj) if obj else None

    def deployment(self, name: str, namespace: str = NAMESPACE) -> dict:
        obj = self.store.get(R.DEPLOYMENTS, namespace, name)
        if obj is None:
            raise KeyError(f"deployment {namespace}/{name} not found")
        return copy.deepcopy(obj)

    def replicasets(self, namespace: str = NAMESPACE) -> list[dict]:
        return [copy.deepcopy(o) for o in self.store.list(R.REPLICASETS, namespace)]

    def events(self, namespace: str = NAMESPACE, *, involved: str | None = None) -> list[dict]:
        """Events of the namespace, optionally only those about the object named ``involved``."""
        return [copy.deepcopy(e) for e in self.store.list(R.EVENTS, namespace)
                if involved is None or (e.get("involvedObject") or {}).get("name") == involved]

    def pod_fault(self, pod: str, namespace: str = NAMESPACE) -> str | None:
        """The fault injected into a pod: "crash-loop", "hang", "unschedulable" or None."""
        obj = self.store.get(R.PODS, namespace, pod)
        sim = self.controller.sims.get(obj["metadata"]["uid"]) if obj else None
        return sim.fault if sim else None

    def logs(self, pod: str, namespace: str = NAMESPACE, *, previous: bool = False) -> list[str]:
        obj = self._pod(pod, namespace)
        sim = self.controller._sim(obj)
        source = sim.previous if previous else sim.logs
        container = obj["spec"]["containers"][0]["name"]
        return [line for _, line in source.get(container, [])]

    @staticmethod
    def wait_until(predicate: Callable[[], T], timeout: float = 10.0, *, interval: float = 0.02,
                   message: str = "") -> T:
        """Poll ``predicate`` until it returns something truthy (returned) or raise ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(message or f"condition not met within {timeout} s: {predicate!r}")
            time.sleep(interval)  # poll

    # --- faults ---
    def _pod(self, pod: str, namespace: str) -> dict:
        obj = self.store.get(R.PODS, namespace, pod)
        if obj is None:
            raise KeyError(f"pod {namespace}/{pod} not found")
        return obj

    def crash_loop(self, pod: str, *, exit_code: int | None = None, reason: str = "Error",
                   logs: list[str] | None = None, namespace: str = NAMESPACE) -> dict:
        """Make the pod crash-loop: not Ready, CrashLoopBackOff, restartCount and back-off growing, BackOff events,
        ``logs`` as the previous container's log. ``reason="OOMKilled"`` defaults the exit code to 137."""
        if exit_code is None:
            exit_code = 137 if reason == "OOMKilled" else 1
        if logs is None:
            logs = ["Traceback (most recent call last):", '  File "/app/worker.py", line 42, in <module>',
                    "RuntimeError: worker crashed"]
        with self.controller.mutex:
            return self.controller.crash_loop(namespace, pod, exit_code=exit_code, reason=reason, logs=logs)

    def hang(self, pod: str, *, namespace: str = NAMESPACE) -> None:
        """The pod stays Running and Ready but does nothing: CPU ~0 in metrics."""
        self._pod(pod, namespace)
        with self.controller.mutex:
            self.controller.hang(namespace, pod)

    def unschedulable(self, pod: str, *, namespace: str = NAMESPACE) -> dict:
        """The pod goes Pending with PodScheduled False (Unschedulable) and a FailedScheduling event."""
        with self.controller.mutex:
            return self.controller.unschedulable(namespace, pod)

    def set_schedulable(self, enabled: bool, *, selector: str | None = None) -> None:
        """``False``: new pods (matching ``selector``) stay Pending/Unschedulable with a FailedScheduling event;
        ``True``: lift the block and schedule every pod left Unschedulable (they start as usual)."""
        reqs = parse_label_selector(selector)
        with self.controller.mutex, self.store.lock:
            self.controller.set_schedulable(enabled, reqs)

    def fail_api(self, status: int | str = 500, count: int = 1, path_contains: str | None = None, *,
                 retry_after: int | None = None) -> None:
        """The next ``count`` requests (whose path contains ``path_contains``) answer ``status`` (429, 500, 503 or
        "timeout": held for ``timing.api_timeout`` then 504). A 429 carries ``Retry-After`` only if ``retry_after``
        is given: urllib3 (under the official client) silently retries such answers itself."""
        if status != "timeout" and not isinstance(status, int):
            raise ValueError(f"status must be an HTTP code or 'timeout', not {status!r}")
        with self.state.lock:
            self.state.faults.append(FaultRule(status=status, remaining=count, path_contains=path_contains,
                                                 retry_after=retry_after))

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def set_cpu(self, pod: str, millicores: int, *, namespace: str = NAMESPACE) -> None:
        obj = self._pod(pod, namespace)
        self.controller._sim(obj).cpu_m = int(millicores)

    def set_memory(self, pod: str, mebibytes: int, *, namespace: str = NAMESPACE) -> None:
        obj = self._pod(pod, namespace)
        self.controller._sim(obj).memory_mi = int(mebibytes)

    def append_log(self, pod: str, line: str, *, container: str | None = None, namespace: str = NAMESPACE) -> None:
        """Append a line to the current container's log."""
        obj = self._pod(pod, namespace)
        name = container or obj["spec"]["containers"][0]["name"]
        self.controller._sim(obj).logs.setdefault(name, []).append((now_iso_micro(), line))

    def add_listener(self, callback: Callable[[str, dict], None]) -> None:
        """``callback(event_type, pod)`` on every pod change from now on, called from the controller thread."""
        self.controller.flush()
        self.controller.listeners.append(callback)

    def remove_listener(self, callback: Callable[[str, dict], None]) -> None:
        if callback in self.controller.listeners:
            self.controller.listeners.remove(callback)

    def set_timing(self, **changes: float) -> Timing:
        """Change simulated delays (see ``Timing``) until the next ``reset()``; returns the timing in force."""
        self.controller.timing = dataclasses.replace(self.controller.timing, **changes)
        return self.controller.timing

    @property
    def timing(self) -> Timing:
        return self.controller.timing

    def compact(self) -> None:
        """Forget the watch history: a watch from any earlier resourceVersion now gets 410 Expired."""
        self.store.compact()

    @property
    def resource_version(self) -> str:
        return str(self.store.rv)
