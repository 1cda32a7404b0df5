"""Controllers and a kubelet stand-in: Deployment -> ReplicaSet -> Pods, pod start-up, termination, crash loops.

One thread runs them: it wakes on every store change and on timers, reconciles until nothing changes, and
then hands pod changes to the listeners (the simulated FerrumDeck workers follow pods that way).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sandbox.kube.resources import DEPLOYMENTS, EVENTS, NODES, PDBS, PODS, REPLICASETS, Resource
from sandbox.kube.selectors import labels_match, selector_from_match_labels
from sandbox.kube.store import Store, WatchEvent, fnv32a, now_iso, now_iso_micro, random_suffix, safe_encode

log = logging.getLogger(__name__)

NODE_NAME = "sandbox-node-1"
NODE_IP = "10.0.0.10"
REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"
UNSCHEDULABLE_MESSAGE = ("0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: "
                         "1 No preemption victims found for incoming pod.")


@dataclass(frozen=True)
class Timing:
    """How fast simulated time runs (seconds). Defaults are fast, for tests; ``Timing.demo()`` is slower."""

    start_delay: float = 0.1  # Pending (ContainerCreating) -> Running
    ready_delay: float = 0.1  # Running -> Ready
    grace: float = 0.1  # Terminating -> gone (a request with gracePeriodSeconds=0 removes at once)
    backoff_base: float = 0.5  # first crash-loop back-off (Kubernetes: 10 s), doubling ...
    backoff_max: float = 5.0  # ... up to this (Kubernetes: 300 s)
    bookmark_interval: float = 1.0  # BOOKMARK events on watches that allow them
    api_timeout: float = 2.0  # a "timeout" fault holds the request this long, then answers 504
    watch_timeout: float = 1800.0  # a watch without timeoutSeconds closes after this
    event_ttl: float = 3600.0  # events are dropped this long after they were last seen (kube-apiserver: 1 h)
    event_prune_interval: float = 10.0  # how often expired events are looked for

    @classmethod
    def demo(cls) -> Timing:
        return cls(start_delay=1.5, ready_delay=2.0, grace=2.0, backoff_base=10.0, backoff_max=60.0,
                   bookmark_interval=10.0, api_timeout=10.0)


@dataclass
class PodSim:
    """What the kubelet and metrics-server know about a pod that is not in the pod object."""

    logs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # container -> [(timestamp, line)]
    previous: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    cpu_m: int = 250
    memory_mi: int = 64
    fault: str | None = None  # "crash-loop" | "hang" | "unschedulable"
    blocked: bool = False  # Unschedulable because of a scheduling block or a cordoned node (lifted -> scheduled)
    crash: dict = field(default_factory=dict)
    backoffs: int = 0


def template_hash(template: dict, collisions: int = 0) -> str:
    """``pod-template-hash``: fnv32a over the template, rendered in the vowel-free alphabet."""
    data = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    if collisions:
        data += str(collisions).encode()
    return safe_encode(str(fnv32a(data)))[:10]


def _condition(ctype: str, status: str, *, reason: str | None = None, message: str | None = None) -> dict:
    cond = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": now_iso()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def _set_condition(conditions: list[dict], new: dict) -> None:
    """Replace the condition of that type, keeping its transition time if the status did not change."""
    for i, cur in enumerate(conditions):
        if cur.get("type") == new["type"]:
            if cur.get("status") == new["status"]:
                new["lastTransitionTime"] = cur.get("lastTransitionTime", new["lastTransitionTime"])
            conditions[i] = new
            return
    conditions.append(new)


def _pending_status(spec: dict) -> dict:
    """A just-scheduled pod: Pending, containers ContainerCreating."""
    names = " ".join(c["name"] for c in spec.get("containers") or [])
    return {
        "phase": "Pending",
        "conditions": [
            _condition("PodReadyToStartContainers", "False"),
            _condition("Initialized", "True"),
            _condition("Ready", "False", reason="ContainersNotReady", message=f"containers with unready status: [{names}]"),
            _condition("ContainersReady", "False", reason="ContainersNotReady",
                       message=f"containers with unready status: [{names}]"),
            _condition("PodScheduled", "True"),
        ],
        "hostIP": NODE_IP,
        "hostIPs": [{"ip": NODE_IP}],
        "startTime": now_iso(),
        "qosClass": "BestEffort",
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"waiting": {"reason": "ContainerCreating"}},
                "lastState": {},
            }
            for c in spec.get("containers") or []
        ],
    }


def _owner(obj: dict) -> dict | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def _owner_ref(obj: dict) -> dict:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_pod_ready(pod: dict) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or []
    )


def _int_or_percent(value: object, total: int, *, round_up: bool) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    text = str(value)
    if text.endswith("%"):
        raw = int(text[:-1]) * total / 100
        return math.ceil(raw) if round_up else math.floor(raw)
    return int(text)


class Controller:
    """Reconciles deployments, replica sets and pods, and runs the timed kubelet transitions."""

    def __init__(self, store: Store, timing: Timing) -> None:
        self.store = store
        self.timing = timing
        self.sims: dict[str, PodSim] = {}  # by pod uid
        self.mutex = threading.RLock()  # held while the controller works; reset() takes it too
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_lock = threading.Lock()
        self._seq = itertools.count()
        self._ip = itertools.count(2)
        self.listeners: list[Callable[[str, dict], None]] = []
        self._pod_events: deque[tuple[str, dict]] = deque()
        self._dispatching = False
        self._last_prune = 0.0
        self.schedule_block: list | None = None  # label requirements of pods that cannot be scheduled
        self._thread: threading.Thread | None = None
        store.subscribe(self._on_event)

    # --- thread ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sandbox-kube-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _on_event(self, event: WatchEvent) -> None:
        if event.resource == PODS.key:
            self._pod_events.append((event.type, event.new))
        if event.resource != EVENTS.key:
            self._wake.set()

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the controller thread in ``delay`` seconds."""
        with self._timer_lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
        self._wake.set()

    def clear_timers(self) -> None:
        with self._timer_lock:
            self._timers.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._timer_lock:
                due = self._timers[0][0] if self._timers else None
            timeout = None if due is None else max(0.0, due - time.monotonic())
            self._wake.wait(timeout=timeout if timeout is not None else 1.0)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                with self.mutex:
                    self._run_timers()
                    self.reconcile()
            except Exception:  # a bug here must not kill the cluster; it is logged loudly
                log.exception("sandbox controller failed")
            self._dispatch()

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._timer_lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, fn = heapq.heappop(self._timers)
            fn()

    def _dispatch(self) -> None:
        self._dispatching = True
        try:
            while self._pod_events:
                kind, pod = self._pod_events.popleft()
                for listener in list(self.listeners):
                    try:
                        listener(kind, copy.deepcopy(pod))
                    except Exception:
                        log.exception("pod listener %r failed", listener)
        finally:
            self._dispatching = False

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the controller thread has handed every pod change so far to the listeners."""
        if threading.current_thread() is self._thread or self._thread is None or not self._thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        self._wake.set()
        while (self._pod_events or self._dispatching) and time.monotonic() < deadline:
            time.sleep(0.002)  # poll

    def drain_listener_queue(self) -> None:
        """Drop pending pod notifications (reset)."""
        self._pod_events.clear()

    # --- reconcile ---
    def reconcile(self) -> None:
        """Drive every object towards its spec; repeat until a pass changes nothing (bounded)."""
        with self.store.lock:
            for _ in range(10):
                before = self.store.rv
                self._gc()
                self._retry_scheduling()
                for d in self.store.list(DEPLOYMENTS):
                    self._sync_deployment(d)
                for rs in self.store.list(REPLICASETS):
                    self._sync_replicaset(rs)
                for d in self.store.list(DEPLOYMENTS):
                    self._deployment_status(d)
                for pdb in self.store.list(PDBS):
                    self._pdb_status(pdb)
                if self.store.rv == before:
                    return

    def _prune_events(self) -> None:
        """Drop events not seen for ``event_ttl`` (checked every ``event_prune_interval``)."""
        now = time.time()
        if now - self._last_prune < self.timing.event_prune_interval:
            return
        self._last_prune = now
        cutoff = datetime.fromtimestamp(now - self.timing.event_ttl, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for ev in self.store.list(EVENTS):
            if (ev.get("lastTimestamp") or ev["metadata"].get("creationTimestamp") or "") < cutoff:
                self.store.remove(EVENTS, ev["metadata"]["namespace"], ev["metadata"]["name"])

    def _gc(self) -> None:
        self._prune_events()
        deployments = {d["metadata"]["uid"] for d in self.store.list(DEPLOYMENTS)}
        for rs in self.store.list(REPLICASETS):
            ref = _owner(rs)
            if ref and ref["kind"] == "Deployment" and ref["uid"] not in deployments:
                self.store.remove(REPLICASETS, rs["metadata"]["namespace"], rs["metadata"]["name"])
        replicasets = {rs["metadata"]["uid"] for rs in self.store.list(REPLICASETS)}
        for pod in self.store.list(PODS):
            ref = _owner(pod)
            orphan = ref and ref["kind"] == "ReplicaSet" and ref["uid"] not in replicasets
            if orphan and not pod["metadata"].get("deletionTimestamp"):
                self.terminate_pod(pod["metadata"]["namespace"], pod["metadata"]["name"])
        live = {p["metadata"]["uid"] for p in self.store.list(PODS)}
        for uid in [u for u in list(self.sims) if u not in live]:
            del self.sims[uid]

    def owned(self, res: Resource, owner: dict) -> list[dict]:
        uid = owner["metadata"]["uid"]
        return [
            o
            for o in self.store.list(res, owner["metadata"]["namespace"])
            if (_owner(o) or {}).get("uid") == uid
        ]

    def active_pods(self, rs: dict) -> list[dict]:
        return [p for p in self.owned(PODS, rs) if not p["metadata"].get("deletionTimestamp")]

    def _sync_deployment(self, d: dict) -> None:
        spec = d.get("spec") or {}
        if spec.get("paused"):
            return
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        desired = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        pod_hash = template_hash(template, int((d.get("status") or {}).get("collisionCount", 0)))
        rss = self.owned(REPLICASETS, d)
        new = next((rs for rs in rss if rs["metadata"].get("labels", {}).get(HASH_LABEL) == pod_hash), None)
        max_rev = max((int(rs["metadata"].get("annotations", {}).get(REVISION, "0")) for rs in rss), default=0)
        if new is None:
            new = self._create_replicaset(d, pod_hash, max_rev + 1)
        elif int(new["metadata"].get("annotations", {}).get(REVISION, "0")) < max_rev:
            new = self.store.mutate(
                REPLICASETS, ns, new["metadata"]["name"],
                lambda o: o["metadata"].setdefault("annotations", {}).__setitem__(REVISION, str(max_rev + 1)),
            )
        revision = new["metadata"]["annotations"][REVISION]
        if d["metadata"].get("annotations", {}).get(REVISION) != revision:
            self.store.mutate(
                DEPLOYMENTS, ns, name,
                lambda o: o["metadata"].setdefault("annotations", {}).__setitem__(REVISION, revision),
            )
        old = [rs for rs in rss if rs["metadata"]["uid"] != new["metadata"]["uid"]]
        strategy = (spec.get("strategy") or {}).get("type", "RollingUpdate")
        old_active = [rs for rs in old if int(rs["spec"].get("replicas", 0)) > 0]
        if strategy == "Recreate":
            for rs in old_active:
                self._scale_rs(d, rs, 0)
            if not any(self.active_pods(rs) for rs in old):
                self._scale_rs(d, new, desired)
            return
        if not old_active:
            self._scale_rs(d, new, desired)
            return
        rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        surge = _int_or_percent(rolling.get("maxSurge", "25%"), desired, round_up=True)
        unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), desired, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        all_rs = [new, *old]
        total = sum(int(rs["spec"].get("replicas", 0)) for rs in all_rs)
        new_spec = int(new["spec"].get("replicas", 0))
        if new_spec < desired:
            room = max(0, desired + surge - total)
            target = min(desired, new_spec + room)
            if target != new_spec:
                self._scale_rs(d, new, target)
                total += target - new_spec
                new_spec = target
        elif new_spec > desired:
            self._scale_rs(d, new, desired)
            total -= new_spec - desired
            new_spec = desired
        min_available = desired - unavailable
        new_available = sum(1 for p in self.active_pods(new) if is_pod_ready(p))
        max_down = total - min_available - (new_spec - new_available)
        if max_down <= 0:
            return
        old_sorted = sorted(old_active, key=lambda rs: rs["metadata"].get("creationTimestamp", ""))
        for rs in old_sorted:  # unhealthy replicas of old sets go first
            spec_n = int(rs["spec"].get("replicas", 0))
            healthy = sum(1 for p in self.active_pods(rs) if is_pod_ready(p))
            cut = min(max_down, max(0, spec_n - healthy))
            if cut:
                self._scale_rs(d, rs, spec_n - cut)
                max_down -= cut
                total -= cut
        available = sum(1 for rs in all_rs for p in self.active_pods(rs) if is_pod_ready(p))
        allowed = min(max_down, available - min_available)
        for rs in old_sorted:
            if allowed <= 0:
                break
            current = self.store.get(REPLICASETS, ns, rs["metadata"]["name"])
            spec_n = int(current["spec"].get("replicas", 0))
            cut = min(allowed, spec_n)
            if cut:
                self._scale_rs(d, current, spec_n - cut)
                allowed -= cut

    def _create_replicaset(self, d: dict, pod_hash: str, revision: int) -> dict:
        spec = d["spec"]
        template = copy.deepcopy(spec.get("template") or {})
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = pod_hash
        selector = copy.deepcopy(spec.get("selector") or {})
        selector.setdefault("matchLabels", {})[HASH_LABEL] = pod_hash
        labels = dict(template["metadata"]["labels"])
        rs = {
            "metadata": {
                "name": f"{d['metadata']['name']}-{pod_hash}",
                "namespace": d["metadata"]["namespace"],
                "labels": labels,
                "annotations": {
                    REVISION: str(revision),
                    "deployment.kubernetes.io/desired-replicas": str(spec.get("replicas", 1)),
                    "deployment.kubernetes.io/max-replicas": str(spec.get("replicas", 1) + 1),
                },
                "ownerReferences": [_owner_ref(d)],
                "generation": 1,
            },
            "spec": {"replicas": 0, "minReadySeconds": spec.get("minReadySeconds", 0), "selector": selector,
                     "template": template},
            "status": {"replicas": 0, "observedGeneration": 1},
        }
        return self.store.create(REPLICASETS, rs)

    def _scale_rs(self, d: dict, rs: dict, replicas: int) -> None:
        current = int(rs["spec"].get("replicas", 0))
        if current == replicas:
            return

        def apply(o: dict) -> None:
            o["spec"]["replicas"] = replicas
            o["metadata"]["generation"] = int(o["metadata"].get("generation", 1)) + 1
            ann = o["metadata"].setdefault("annotations", {})
            ann["deployment.kubernetes.io/desired-replicas"] = str(d["spec"].get("replicas", 1))

        self.store.mutate(REPLICASETS, rs["metadata"]["namespace"], rs["metadata"]["name"], apply)
        direction = "up" if replicas > current else "down"
        self.record_event(
            d, "Normal", "ScalingReplicaSet",
            f"Scaled {direction} replica set {rs['metadata']['name']} from {current} to {replicas}",
            component="deployment-controller",
        )

    def _sync_replicaset(self, rs: dict) -> None:
        ns = rs["metadata"]["namespace"]
        desired = int(rs["spec"].get("replicas", 1))
        selector = selector_from_match_labels(rs["spec"].get("selector"))
        for pod in self.owned(PODS, rs):  # a pod relabelled out of the selector is released (orphaned)
            if not labels_match(selector, pod["metadata"].get("labels")):
                self.store.mutate(PODS, ns, pod["metadata"]["name"], lambda o: o["metadata"].pop("ownerReferences", None))
        pods = self.active_pods(rs)
        if len(pods) < desired:
            for _ in range(desired - len(pods)):
                pod = self._create_pod(rs)
                self.record_event(rs, "Normal", "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}",
                                  component="replicaset-controller")
        elif len(pods) > desired:
            def rank(p: dict) -> tuple:
                status = p.get("status") or {}
                restarts = sum(int(c.get("restartCount", 0)) for c in status.get("containerStatuses") or [])
                return (
                    bool((p.get("spec") or {}).get("nodeName")),
                    {"Pending": 0, "Unknown": 1, "Running": 2}.get(status.get("phase"), 2),
                    is_pod_ready(p),
                    -restarts,
                    # newer pods go first
                    "".join(chr(255 - ord(c)) for c in p["metadata"].get("creationTimestamp", "")),
                )

            for pod in sorted(pods, key=rank)[: len(pods) - desired]:
                self.terminate_pod(ns, pod["metadata"]["name"])
                self.record_event(rs, "Normal", "SuccessfulDelete", f"Deleted pod: {pod['metadata']['name']}",
                                  component="replicaset-controller")
        self._replicaset_status(rs)

    def _replicaset_status(self, rs: dict) -> None:
        pods = self.active_pods(rs)
        ready = sum(1 for p in pods if is_pod_ready(p))

        def apply(o: dict) -> None:
            labels_sel = selector_from_match_labels(o["spec"].get("selector"))
            o["status"] = {
                "replicas": len(pods),
                "fullyLabeledReplicas": sum(1 for p in pods if labels_match(labels_sel, p["metadata"].get("labels"))),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "observedGeneration": int(o["metadata"].get("generation", 1)),
            }
            for key in ("readyReplicas", "availableReplicas"):
                if not o["status"][key]:
                    del o["status"][key]

        self.store.mutate(REPLICASETS, rs["metadata"]["namespace"], rs["metadata"]["name"], apply)

    def _deployment_status(self, d: dict) -> None:
        spec = d.get("spec") or {}
        desired = int(spec.get("replicas", 1))
        pod_hash = template_hash(spec.get("template") or {}, int((d.get("status") or {}).get("collisionCount", 0)))
        rss = self.owned(REPLICASETS, d)
        new = next((rs for rs in rss if rs["metadata"].get("labels", {}).get(HASH_LABEL) == pod_hash), None)
        pods_by_rs = {rs["metadata"]["uid"]: self.active_pods(rs) for rs in rss}
        replicas = sum(len(p) for p in pods_by_rs.values())
        updated = len(pods_by_rs.get(new["metadata"]["uid"], [])) if new else 0
        ready = sum(1 for ps in pods_by_rs.values() for p in ps if is_pod_ready(p))
        rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        max_unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), desired, round_up=False)
        if (spec.get("strategy") or {}).get("type") == "Recreate":
            max_unavailable = desired
        complete = updated == desired and replicas == updated and ready >= updated
        new_name = new["metadata"]["name"] if new else d["metadata"]["name"]

        def apply(o: dict) -> None:
            status = o.setdefault("status", {})
            conditions = status.setdefault("conditions", [])
            if ready >= desired - max_unavailable:
                avail = _condition("Available", "True", reason="MinimumReplicasAvailable",
                                   message="Deployment has minimum availability.")
            else:
                avail = _condition("Available", "False", reason="MinimumReplicasUnavailable",
                                   message="Deployment does not have minimum availability.")
            if complete:
                prog = _condition("Progressing", "True", reason="NewReplicaSetAvailable",
                                  message=f'ReplicaSet "{new_name}" has successfully progressed.')
            else:
                prog = _condition("Progressing", "True", reason="ReplicaSetUpdated",
                                  message=f'ReplicaSet "{new_name}" is progressing.')
            for cond in (avail, prog):
                cond.pop("lastProbeTime", None)
                previous = next((c for c in conditions if c.get("type") == cond["type"]), None)
                if previous and previous.get("reason") == cond.get("reason") and previous.get("status") == cond["status"]:
                    continue
                cond["lastUpdateTime"] = cond["lastTransitionTime"]
                _set_condition(conditions, cond)
            status["observedGeneration"] = int(o["metadata"].get("generation", 1))
            status["replicas"] = replicas
            status["updatedReplicas"] = updated
            status["readyReplicas"] = ready
            status["availableReplicas"] = ready
            status["unavailableReplicas"] = max(0, replicas - ready)
            for key in ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas", "unavailableReplicas"):
                if not status[key]:
                    del status[key]

        self.store.mutate(DEPLOYMENTS, d["metadata"]["namespace"], d["metadata"]["name"], apply)

    def pdb_health(self, pdb: dict) -> tuple[int, int, int]:
        """(currentHealthy, desiredHealthy, expectedPods) of a PodDisruptionBudget."""
        spec = pdb.get("spec") or {}
        reqs = selector_from_match_labels(spec.get("selector"))
        pods = [
            p for p in self.store.list(PODS, pdb["metadata"]["namespace"])
            if labels_match(reqs, p["metadata"].get("labels")) and not p["metadata"].get("deletionTimestamp")
        ]
        expected = len(pods)
        for d in self.store.list(DEPLOYMENTS, pdb["metadata"]["namespace"]):
            tmpl_labels = ((d["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
            if reqs and labels_match(reqs, tmpl_labels):
                expected = max(expected, int(d["spec"].get("replicas", 1)))
        healthy = sum(1 for p in pods if is_pod_ready(p))
        if "minAvailable" in spec:
            desired = _int_or_percent(spec["minAvailable"], expected, round_up=True)
        elif "maxUnavailable" in spec:
            desired = max(0, expected - _int_or_percent(spec["maxUnavailable"], expected, round_up=True))
        else:
            desired = expected
        return healthy, desired, expected

    def _pdb_status(self, pdb: dict) -> None:
        healthy, desired, expected = self.pdb_health(pdb)

        def apply(o: dict) -> None:
            o["status"] = {
                "currentHealthy": healthy,
                "desiredHealthy": desired,
                "expectedPods": expected,
                "disruptionsAllowed": max(0, healthy - desired),
                "observedGeneration": int(o["metadata"].get("generation", 1)),
            }

        self.store.mutate(PDBS, pdb["metadata"]["namespace"], pdb["metadata"]["name"], apply)

    # --- pods (the kubelet) ---
    def _create_pod(self, rs: dict) -> dict:
        template = copy.deepcopy(rs["spec"].get("template") or {})
        tmeta = template.get("metadata") or {}
        spec = template.get("spec") or {}
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("securityContext", {})
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        spec.setdefault("priority", 0)
        spec["nodeName"] = NODE_NAME
        spec.setdefault("tolerations", [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        ])
        for c in spec.get("containers") or []:
            c.setdefault("imagePullPolicy", "IfNotPresent")
            c.setdefault("resources", {})
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
        pod = {
            "metadata": {
                "generateName": f"{rs['metadata']['name']}-",
                "namespace": rs["metadata"]["namespace"],
                "labels": dict(tmeta.get("labels") or {}),
                "ownerReferences": [_owner_ref(rs)],
            },
            "spec": spec,
            "status": _pending_status(spec),
        }
        if tmeta.get("annotations"):
            pod["metadata"]["annotations"] = dict(tmeta["annotations"])
        pod["metadata"]["name"] = f"{rs['metadata']['name']}-{random_suffix()}"
        while self.store.get(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"]) is not None:
            pod["metadata"]["name"] = f"{rs['metadata']['name']}-{random_suffix()}"
        created = self.store.create(PODS, pod)
        uid = created["metadata"]["uid"]
        self.sims[uid] = PodSim()
        ns, name = created["metadata"]["namespace"], created["metadata"]["name"]
        reason = self._scheduling_blocked(created)
        if reason:
            self.sims[uid].blocked = True
            return self.unschedulable(ns, name, message=reason)
        self._scheduled(created)
        return created

    def _scheduling_blocked(self, pod: dict) -> str | None:
        """Why the scheduler cannot place this pod now (a cordoned node or a block), or None."""
        node = self.store.get(NODES, None, NODE_NAME)
        if node is None or (node.get("spec") or {}).get("unschedulable"):
            return ("0/1 nodes are available: 1 node(s) were unschedulable. preemption: 0/1 nodes are available: "
                    "1 Preemption is not helpful for scheduling.")
        if self.schedule_block is not None and labels_match(self.schedule_block, pod["metadata"].get("labels")):
            return UNSCHEDULABLE_MESSAGE
        return None

    def _retry_scheduling(self) -> None:
        """Pods held back by a block or a cordon are scheduled once it is lifted (checked every reconcile)."""
        for pod in self.store.list(PODS):
            sim = self.sims.get(pod["metadata"]["uid"])
            if sim is None or not sim.blocked or pod["metadata"].get("deletionTimestamp"):
                continue
            if self._scheduling_blocked(pod) is None:
                self._schedule_now(pod, sim)

    def _schedule_now(self, pod: dict, sim: PodSim) -> None:
        sim.fault, sim.blocked, sim.cpu_m = None, False, 250

        def apply(o: dict) -> None:
            o["spec"]["nodeName"] = NODE_NAME
            o["status"] = _pending_status(o["spec"])

        self._scheduled(self.store.mutate(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], apply))

    def _scheduled(self, pod: dict) -> None:
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        self.record_event(pod, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to {NODE_NAME}",
                          component="default-scheduler")
        self.after(self.timing.start_delay, lambda: self.start_containers(ns, name, uid))

    def set_schedulable(self, enabled: bool, selector: list | None = None) -> None:
        """Block scheduling of new pods (matching ``selector``; all if empty), or lift every block: pods left
        Unschedulable are then scheduled, like capacity added to the cluster."""
        if not enabled:
            self.schedule_block = list(selector or [])
            return
        self.schedule_block = None
        for pod in self.store.list(PODS):
            sim = self.sims.get(pod["metadata"]["uid"])
            if sim is None or sim.fault != "unschedulable" or pod["metadata"].get("deletionTimestamp"):
                continue
            sim.blocked = True  # manual faults too: scheduled now unless the node is cordoned
        self._retry_scheduling()

    def _sim(self, pod: dict) -> PodSim:
        return self.sims.setdefault(pod["metadata"]["uid"], PodSim())

    def _current(self, ns: str, name: str, uid: str | None) -> dict | None:
        pod = self.store.get(PODS, ns, name)
        if pod is None or (uid and pod["metadata"]["uid"] != uid) or pod["metadata"].get("deletionTimestamp"):
            return None
        return pod

    def start_containers(self, ns: str, name: str, uid: str | None = None, *, ready_now: bool = False) -> None:
        """ContainerCreating -> Running (not yet Ready); Ready follows after ``ready_delay``."""
        pod = self._current(ns, name, uid)
        if pod is None or (pod.get("status") or {}).get("phase") != "Pending":
            return
        sim = self._sim(pod)
        if sim.fault == "unschedulable":
            return
        started = now_iso()
        ip = f"10.244.0.{next(self._ip) % 250 + 2}"

        def apply(o: dict) -> None:
            status = o["status"]
            status["phase"] = "Running"
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
            _set_condition(status["conditions"], _condition("PodReadyToStartContainers", "True"))
            for cs in status.get("containerStatuses") or []:
                cs["state"] = {"running": {"startedAt": started}}
                cs["started"] = True
                cs["containerID"] = f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}"
                cs["imageID"] = f"{cs['image'].split(':')[0]}@sha256:{fnv32a(cs['image'].encode()):08x}" + "0" * 56

        pod = self.store.mutate(PODS, ns, name, apply)
        for c in pod["spec"].get("containers") or []:
            self.record_event(pod, "Normal", "Pulled", f'Container image "{c.get("image", "")}" already present on machine',
                              component="kubelet", field_path=f"spec.containers{{{c['name']}}}")
            self.record_event(pod, "Normal", "Created", f"Created container: {c['name']}", component="kubelet",
                              field_path=f"spec.containers{{{c['name']}}}")
            self.record_event(pod, "Normal", "Started", f"Started container {c['name']}", component="kubelet",
                              field_path=f"spec.containers{{{c['name']}}}")
            sim.logs.setdefault(c["name"], []).append(
                (now_iso_micro(), f"{c['name']} started in pod {name} (image {c.get('image', '')})")
            )
        pod_uid = pod["metadata"]["uid"]
        if ready_now:
            self.make_ready(ns, name, pod_uid)
        else:
            self.after(self.timing.ready_delay, lambda: self.make_ready(ns, name, pod_uid))

    def make_ready(self, ns: str, name: str, uid: str | None = None) -> None:
        pod = self._current(ns, name, uid)
        if pod is None or (pod.get("status") or {}).get("phase") != "Running":
            return
        if self._sim(pod).fault == "crash-loop":
            return

        def apply(o: dict) -> None:
            status = o["status"]
            for ctype in ("Ready", "ContainersReady"):
                _set_condition(status["conditions"], _condition(ctype, "True"))
            for cs in status.get("containerStatuses") or []:
                cs["ready"] = True

        self.store.mutate(PODS, ns, name, apply)

    def terminate_pod(self, ns: str, name: str, grace_seconds: int | None = None) -> dict | None:
        """Graceful deletion: deletionTimestamp set (Terminating), the pod removed after the simulated grace."""
        pod = self.store.get(PODS, ns, name)
        if pod is None:
            return None
        if grace_seconds is None:
            grace_seconds = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        if grace_seconds == 0 or (pod.get("status") or {}).get("phase") == "Pending" and not pod["spec"].get("nodeName"):
            return self.store.remove(PODS, ns, name)
        if pod["metadata"].get("deletionTimestamp"):
            return pod
        uid = pod["metadata"]["uid"]
        deadline = datetime.fromtimestamp(time.time() + grace_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        def apply(o: dict) -> None:
            o["metadata"]["deletionTimestamp"] = deadline
            o["metadata"]["deletionGracePeriodSeconds"] = grace_seconds
            for ctype in ("Ready", "ContainersReady"):
                for cond in o["status"].get("conditions") or []:
                    if cond["type"] == ctype and cond["status"] == "True":
                        _set_condition(o["status"]["conditions"], _condition(ctype, "False", reason="PodCompleted"))
            for cs in o["status"].get("containerStatuses") or []:
                cs["ready"] = False

        updated = self.store.mutate(PODS, ns, name, apply)
        for c in pod["spec"].get("containers") or []:
            self.record_event(pod, "Normal", "Killing", f"Stopping container {c['name']}", component="kubelet",
                              field_path=f"spec.containers{{{c['name']}}}")

        def finish() -> None:
            current = self.store.get(PODS, ns, name)
            if current is not None and current["metadata"]["uid"] == uid:
                self.store.remove(PODS, ns, name)

        self.after(self.timing.grace, finish)
        return updated

    # --- faults ---
    def crash_loop(self, ns: str, name: str, *, exit_code: int, reason: str, logs: list[str]) -> dict:
        pod = self.store.get(PODS, ns, name)
        if pod is None:
            raise KeyError(f"pod {ns}/{name} not found")
        sim = self._sim(pod)
        sim.fault = "crash-loop"
        generation = int(sim.crash.get("generation", 0)) + 1  # a new crash_loop() replaces the old back-off chain
        sim.crash = {"exit_code": exit_code, "reason": reason, "logs": list(logs), "generation": generation}
        sim.backoffs = 0
        sim.cpu_m = 0
        return self._crash_once(ns, name, pod["metadata"]["uid"], generation)

    def _crash_once(self, ns: str, name: str, uid: str, generation: int) -> dict | None:
        pod = self._current(ns, name, uid)
        if pod is None:
            return None
        sim = self._sim(pod)
        if sim.fault != "crash-loop" or sim.crash.get("generation") != generation:
            return None
        finished = now_iso()
        stamp = now_iso_micro()
        for c in pod["spec"].get("containers") or []:
            sim.previous[c["name"]] = [(stamp, line) for line in sim.crash["logs"]]
            sim.logs[c["name"]] = []
        restarts = int(((pod["status"].get("containerStatuses") or [{}])[0]).get("restartCount", 0)) + 1
        nominal = min(10 * 2 ** (restarts - 1), 300)
        cname = [c["name"] for c in pod["spec"].get("containers") or []]

        def apply(o: dict) -> None:
            status = o["status"]
            status["phase"] = "Running"
            for ctype in ("Ready", "ContainersReady"):
                _set_condition(status["conditions"], _condition(
                    ctype, "False", reason="ContainersNotReady", message=f"containers with unready status: [{' '.join(cname)}]"))
            for cs in status.get("containerStatuses") or []:
                previous_start = (cs.get("state") or {}).get("running", {}).get("startedAt") or (
                    (cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt") or finished
                cs["lastState"] = {"terminated": {
                    "exitCode": sim.crash["exit_code"], "reason": sim.crash["reason"], "startedAt": previous_start,
                    "finishedAt": finished,
                    "containerID": cs.get("containerID") or f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}",
                }}
                cs["state"] = {"waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {nominal}s restarting failed container={cs['name']} pod={name}_{ns}({uid})",
                }}
                cs["ready"] = False
                cs["started"] = False
                cs["restartCount"] = int(cs.get("restartCount", 0)) + 1
                cs["containerID"] = f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}"

        updated = self.store.mutate(PODS, ns, name, apply)
        for c in cname:
            self.record_event(updated, "Warning", "BackOff",
                              f"Back-off restarting failed container {c} in pod {name}_{ns}({uid})",
                              component="kubelet", field_path=f"spec.containers{{{c}}}")
        delay = min(self.timing.backoff_base * 2 ** sim.backoffs, self.timing.backoff_max)
        sim.backoffs += 1
        self.after(delay, lambda: self._crash_once(ns, name, uid, generation))
        return updated

    def hang(self, ns: str, name: str) -> None:
        pod = self.store.get(PODS, ns, name)
        if pod is None:
            raise KeyError(f"pod {ns}/{name} not found")
        sim = self._sim(pod)
        sim.fault = "hang"
        sim.cpu_m = 0

    def unschedulable(self, ns: str, name: str, *, message: str = "") -> dict:
        pod = self.store.get(PODS, ns, name)
        if pod is None:
            raise KeyError(f"pod {ns}/{name} not found")
        sim = self._sim(pod)
        sim.fault = "unschedulable"
        sim.cpu_m = 0
        message = message or UNSCHEDULABLE_MESSAGE

        def apply(o: dict) -> None:
            o["spec"].pop("nodeName", None)
            o["status"] = {
                "phase": "Pending",
                "qosClass": o["status"].get("qosClass", "BestEffort"),
                "conditions": [{"type": "PodScheduled", "status": "False", "lastProbeTime": None,
                                "lastTransitionTime": now_iso(), "reason": "Unschedulable", "message": message}],
            }

        updated = self.store.mutate(PODS, ns, name, apply)
        self.record_event(updated, "Warning", "FailedScheduling", message, component="default-scheduler")
        return updated

    # --- events ---
    def record_event(self, obj: dict, etype: str, reason: str, message: str, *, component: str,
                     field_path: str | None = None) -> dict:
        """A core/v1 Event about ``obj``; a repeat (same object, reason, message) bumps ``count``."""
        ns = obj["metadata"].get("namespace") or "default"
        uid = obj["metadata"]["uid"]
        for ev in self.store.list(EVENTS, ns):
            inv = ev.get("involvedObject") or {}
            if inv.get("uid") == uid and ev.get("reason") == reason and ev.get("message") == message:
                def bump(o: dict) -> None:
                    o["count"] = int(o.get("count", 1)) + 1
                    o["lastTimestamp"] = now_iso()

                return self.store.mutate(EVENTS, ns, ev["metadata"]["name"], bump)
        involved = {
            "kind": obj["kind"],
            "namespace": ns,
            "name": obj["metadata"]["name"],
            "uid": uid,
            "apiVersion": obj["apiVersion"],
            "resourceVersion": obj["metadata"].get("resourceVersion", ""),
        }
        if field_path:
            involved["fieldPath"] = field_path
        stamp = now_iso()
        event = {
            "metadata": {"name": f"{obj['metadata']['name']}.{time.time_ns() + next(self._seq):x}", "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": {"component": component, **({"host": NODE_NAME} if component == "kubelet" else {})},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "type": etype,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": NODE_NAME if component == "kubelet" else "",
        }
        return self.store.create(EVENTS, event)
