"""The worker pool: one ``sandbox.worker.Worker`` thread per Ready worker pod, following the sandbox cluster.

Registered as a ``SandboxCluster`` listener (``on_pod_event``): a worker pod that is Running and Ready starts
its worker (consumer name = the pod's name, model = the pod spec's ``LITELLM_MODEL``); a pod that is DELETED,
Terminating or no longer Ready has its worker stopped abruptly (no ACK: in-flight entries stay pending, as
for a killed process). A pod whose worker crashed (fault or poison entry) never gets a worker again: it
crash-loops until it is deleted and replaced by a pod with a new name.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sandbox.pods import (
    container_env,
    matches,
    parse_selector,
    pod_is_crashing,
    pod_is_ready,
    pod_is_terminating,
    pod_name,
)
from sandbox.worker import Worker

log = logging.getLogger("sandbox.workers")

WorkerFactory = Callable[[str, str], Worker]  # (pod, model) -> an unstarted Worker


class WorkerPool:
    """Starts and stops workers as the cluster's worker pods come and go (thread-safe listener)."""

    def __init__(
        self,
        *,
        factory: WorkerFactory,
        selector: str = "app=worker",
        container: str = "worker",
        model_env: str = "LITELLM_MODEL",
        default_model: str = "openai/gpt-4o",
    ) -> None:
        self.factory = factory
        self.selector = parse_selector(selector)
        self.container = container
        self.model_env = model_env
        self.default_model = default_model
        self._lock = threading.Lock()
        self._workers: dict[str, Worker] = {}
        self._crashed: set[str] = set()
        self._gone: set[str] = set()
        self._closed = False

    # --- following the cluster ---
    def sync(self, pods: list[dict]) -> None:
        """Bring the pool in line with a full list of pods (start-up; the listener only sees changes)."""
        names = set()
        for pod in pods:
            names.add(pod_name(pod))
            self.on_pod_event("MODIFIED", pod)
        with self._lock:
            missing = [name for name in self._workers if name not in names]
        for name in missing:
            self._stop(name, gone=True)

    def on_pod_event(self, event_type: str, pod: dict) -> None:
        """Cluster listener (called from the controller thread: quick, never blocks)."""
        if self._closed or not matches(pod, self.selector):
            return
        name = pod_name(pod)
        if event_type == "DELETED" or pod_is_terminating(pod):
            self._stop(name, gone=True)
        elif pod_is_ready(pod):
            model = container_env(pod, container=self.container, name=self.model_env) or self.default_model
            self._start(name, model)
        elif pod_is_crashing(pod):
            self.mark_crashed(name)
        else:
            self._stop(name, gone=False)

    def _start(self, pod: str, model: str) -> None:
        with self._lock:
            if self._closed or pod in self._crashed or pod in self._gone:
                return
            current = self._workers.get(pod)
            if current is not None and current.alive:
                return
            worker = self.factory(pod, model)
            self._workers[pod] = worker
        worker.start()
        log.info("worker %s started (model %s)", pod, model)

    def _stop(self, pod: str, *, gone: bool) -> None:
        with self._lock:
            if gone:
                self._gone.add(pod)
            worker = self._workers.get(pod)
        if worker is not None and worker.alive:
            worker.kill()
            log.info("worker %s stopped abruptly", pod)

    # --- faults and views ---
    def mark_crashed(self, pod: str) -> Worker | None:
        """Kill the pod's worker and never restart it (the pod crash-loops); returns the worker."""
        with self._lock:
            self._crashed.add(pod)
            worker = self._workers.get(pod)
        if worker is not None:
            worker.kill()
        return worker

    def worker(self, pod: str) -> Worker | None:
        with self._lock:
            return self._workers.get(pod)

    def running(self) -> dict[str, Worker]:
        """Workers whose loop is alive and not hung, by pod name."""
        with self._lock:
            return {p: w for p, w in self._workers.items() if w.alive and w.state == "running"}

    def all(self) -> dict[str, Worker]:
        with self._lock:
            return dict(self._workers)

    def crashed(self) -> set[str]:
        with self._lock:
            return set(self._crashed)

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop every worker (abruptly) and ignore further pod events."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
        for w in workers:
            w.kill()
        for w in workers:
            w.join(timeout_s)
