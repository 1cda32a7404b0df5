"""The kubelet and scheduler stand-in: pod start-up, readiness, graceful termination, scheduling blocks,
the injected faults (crash loop, hang, unschedulable) and the events they write.

A mixin of ``Controller``: it works on the controller's store, timers and per-pod simulation state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sandbox.kube.resources import EVENTS, NODES, PODS
from sandbox.kube.selectors import labels_match
from sandbox.kube.store import Store, fnv32a, now_iso, now_iso_micro
from sandbox.kube.timing import Timing

NODE_NAME = "sandbox-node-1"
NODE_IP = "10.0.0.10"
UNSCHEDULABLE_MESSAGE = ("0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: "
                         "1 No preemption victims found for incoming pod.")


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


def condition(ctype: str, status: str, *, reason: str | None = None, message: str | None = None) -> dict:
    cond = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": now_iso()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def set_condition(conditions: list[dict], new: dict) -> None:
    """Replace the condition of that type, keeping its transition time if the status did not change."""
    for i, cur in enumerate(conditions):
        if cur.get("type") == new["type"]:
            if cur.get("status") == new["status"]:
                new["lastTransitionTime"] = cur.get("lastTransitionTime", new["lastTransitionTime"])
            conditions[i] = new
            return
    conditions.append(new)


def pending_status(spec: dict) -> dict:
    """A just-scheduled pod: Pending, containers ContainerCreating."""
    names = " ".join(c["name"] for c in spec.get("containers") or [])
    return {
        "phase": "Pending",
        "conditions": [
            condition("PodReadyToStartContainers", "False"),
            condition("Initialized", "True"),
            condition("Ready", "False", reason="ContainersNotReady", message=f"containers with unready status: [{names}]"),
            condition("ContainersReady", "False", reason="ContainersNotReady",
                       message=f"containers with unready status: [{names}]"),
            condition("PodScheduled", "True"),
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


def is_pod_ready(pod: dict) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or []
    )


class Kubelet:
    """Pod-level behaviour of the one simulated node (mixed into ``Controller``)."""

    store: Store
    timing: Timing
    sims: dict[str, PodSim]
    schedule_block: list | None
    _last_prune: float
    after: Callable[[float, Callable[[], None]], None]
    _seq: object
    _ip: object

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
            o["status"] = pending_status(o["spec"])

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
            set_condition(status["conditions"], condition("PodReadyToStartContainers", "True"))
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
                set_condition(status["conditions"], condition(ctype, "True"))
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
                        set_condition(o["status"]["conditions"], condition(ctype, "False", reason="PodCompleted"))
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
                set_condition(status["conditions"], condition(
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
