"""The controllers: Deployment -> ReplicaSet -> Pods (rolling updates, scaling, garbage collection, PDB status).

One thread runs them and the kubelet stand-in (``kubelet.py``): it wakes on every store change and on timers,
reconciles until nothing changes, then hands pod changes to the listeners (the simulated FerrumDeck workers
follow pods that way).
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
from collections import deque
from collections.abc import Callable

from sandbox.kube.kubelet import (
    NODE_NAME,
    Kubelet,
    PodSim,
    condition,
    is_pod_ready,
    pending_status,
    set_condition,
)
from sandbox.kube.resources import DEPLOYMENTS, EVENTS, PDBS, PODS, REPLICASETS, Resource
from sandbox.kube.selectors import labels_match, selector_from_match_labels
from sandbox.kube.store import Store, WatchEvent, fnv32a, random_suffix, safe_encode
from sandbox.kube.timing import Timing

log = logging.getLogger(__name__)

REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"


def template_hash(template: dict, collisions: int = 0) -> str:
    """``pod-template-hash``: fnv32a over the template, rendered in the vowel-free alphabet."""
    data = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    if collisions:
        data += str(collisions).encode()
    return safe_encode(str(fnv32a(data)))[:10]


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


class Controller(Kubelet):
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
                avail = condition("Available", "True", reason="MinimumReplicasAvailable",
                                   message="Deployment has minimum availability.")
            else:
                avail = condition("Available", "False", reason="MinimumReplicasUnavailable",
                                   message="Deployment does not have minimum availability.")
            if complete:
                prog = condition("Progressing", "True", reason="NewReplicaSetAvailable",
                                  message=f'ReplicaSet "{new_name}" has successfully progressed.')
            else:
                prog = condition("Progressing", "True", reason="ReplicaSetUpdated",
                                  message=f'ReplicaSet "{new_name}" is progressing.')
            for cond in (avail, prog):
                cond.pop("lastProbeTime", None)
                previous = next((c for c in conditions if c.get("type") == cond["type"]), None)
                if previous and previous.get("reason") == cond.get("reason") and previous.get("status") == cond["status"]:
                    continue
                cond["lastUpdateTime"] = cond["lastTransitionTime"]
                set_condition(conditions, cond)
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
            "status": pending_status(spec),
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
