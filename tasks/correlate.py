"""Pure correlation of worker pods with their Redis consumers, and the decisions built on it (no I/O).

A worker pod's name is its Redis consumer name (``Settings.consumer_for_pod``). Joining the pod list with the
consumer group's view tells exactly which pending entries a crashed, gone or hung pod holds, so the recovery
flows take those entries at once and never touch the entries of a healthy, busy worker.

Everything here is plain functions over the one model of each thing — a pod (``kube_diagnosis.PodInfo``), a
consumer (``queue.ConsumerInfo``), a pending entry (``queue.PendingEntry``); the flows feed them from
``tasks.kube`` / ``tasks.queue`` and unit tests feed them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from pydantic import BaseModel, Field

from tasks.guard import may_remove_worker
from tasks.kube_diagnosis import Classification, PodInfo
from tasks.queue import ConsumerInfo, PendingEntry, SweepPolicy
from tasks.queue import decide as decide_entry

#: classifications that mean "this worker process keeps dying"
CRASH_CLASSES = frozenset({Classification.CRASH_LOOPING, Classification.OOM_KILLED, Classification.FAILED})


class WorkerLink(BaseModel):
    """A pod joined with its consumer; either side may be missing (a consumer whose pod is gone)."""

    pod: str | None
    consumer: str
    pod_state: PodInfo | None = None
    consumer_state: ConsumerInfo | None = None

    @property
    def pod_exists(self) -> bool:
        return self.pod_state is not None

    @property
    def pending(self) -> int:
        return self.consumer_state.pending if self.consumer_state else 0


def correlate(
    *, pods: Sequence[PodInfo], consumers: Sequence[ConsumerInfo], consumer_for_pod: Callable[[str], str]
) -> list[WorkerLink]:
    """Join pods and consumers through the pod -> consumer mapping; pod-less consumers come last."""
    by_name = {c.name: c for c in consumers}
    links: list[WorkerLink] = []
    seen: set[str] = set()
    for pod in sorted(pods, key=lambda p: p.name):
        consumer = consumer_for_pod(pod.name)
        seen.add(consumer)
        links.append(WorkerLink(pod=pod.name, consumer=consumer, pod_state=pod, consumer_state=by_name.get(consumer)))
    for c in sorted(consumers, key=lambda c: c.name):
        if c.name not in seen:
            links.append(WorkerLink(pod=None, consumer=c.name, consumer_state=c))
    return links


def pod_of_consumer(consumer: str, *, consumer_for_pod: Callable[[str], str]) -> str:
    """Invert the pod -> consumer template for a consumer name (identity when the template is ``{pod}``)."""
    probe = consumer_for_pod("\x00")
    prefix, _, suffix = probe.partition("\x00")
    if consumer.startswith(prefix) and consumer.endswith(suffix) and len(consumer) > len(prefix) + len(suffix):
        return consumer[len(prefix) : len(consumer) - len(suffix)]
    return consumer


def live_consumers(links: Iterable[WorkerLink], *, besides: Iterable[str] = ()) -> list[str]:
    """Consumers of Ready, not terminating pods (the live workers), except the pods ``besides``."""
    skip = set(besides)
    return sorted(lnk.consumer for lnk in links
                  if lnk.pod_state is not None and lnk.pod_state.serving and lnk.pod not in skip)


# --------------------------------------------------------------------------------------------- crash


class CrashTarget(BaseModel):
    """A worker whose process is dead or dying: its entries are recovered now, whatever their idle time."""

    pod: str
    consumer: str
    cause: Classification = Field(description="crash-looping, oom-killed, failed; gone: the consumer outlived its pod.")
    pod_exists: bool
    pending: int
    replace_pod: bool = Field(description="Delete the pod so its Deployment starts a fresh one.")


class Skipped(BaseModel):
    """A worker the decision left alone, and why (shown in the report)."""

    pod: str
    reason: str


class CrashDecision(BaseModel):
    targets: list[CrashTarget] = Field(default_factory=list)
    skipped: list[Skipped] = Field(default_factory=list)


def crash_cause(state: PodInfo) -> Classification | None:
    """Why this pod counts as crashed (its classification, a Failed phase, an OOM kill), or None."""
    if state.classification in CRASH_CLASSES:
        return state.classification
    if state.phase == "Failed":
        return Classification.FAILED
    last = state.last_exit
    if last is not None and last.reason == "OOMKilled" and not state.ready:
        return Classification.OOM_KILLED
    return None


def decide_crash(*, links: Sequence[WorkerLink], pod: str | None, consumer_for_pod: Callable[[str], str]) -> CrashDecision:
    """Pick the crashed workers: crash-looping/OOM-killed/failed pods, and consumers whose pod is gone.

    With ``pod`` given only that worker is considered. A pod that is Ready and not crash-classified is a
    healthy worker: it is never a target, so its (busy) entries are never taken.
    """
    decision = CrashDecision()
    wanted = consumer_for_pod(pod) if pod else None
    for link in links:
        if wanted is not None and link.consumer != wanted:
            continue
        name = link.pod or pod_of_consumer(link.consumer, consumer_for_pod=consumer_for_pod)
        state = link.pod_state
        if state is None:
            if link.pending > 0 or wanted is not None:
                decision.targets.append(
                    CrashTarget(pod=name, consumer=link.consumer, cause=Classification.GONE, pod_exists=False,
                                pending=link.pending, replace_pod=False)
                )
            continue
        cause = crash_cause(state)
        if cause is None:
            if wanted is not None:
                why = "healthy and Ready: not crashed, its entries are left to it" if state.ready else (
                    f"not crashed ({state.classification or 'unclassified'}): left alone")
                decision.skipped.append(Skipped(pod=name, reason=why))
            continue
        decision.targets.append(
            CrashTarget(pod=name, consumer=link.consumer, cause=cause, pod_exists=True, pending=link.pending,
                        replace_pod=not state.terminating)
        )
    if wanted is not None and not decision.targets and not decision.skipped:
        decision.skipped.append(Skipped(pod=pod or "", reason="no such pod and no consumer: nothing to recover"))
    return decision


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() and (seq or "0").isdigit() else (0, 0)


def poison_entries(
    entries: Iterable[PendingEntry], *, consumer: str, min_deliveries: int = 2, log_lines: Sequence[str] = ()
) -> list[PendingEntry]:
    """The poison among a crashed consumer's entries: delivered ``min_deliveries`` times or more (all copies),
    and the one that killed it.

    Delivery counts alone cannot tell the poison from its batch-mates (a worker takes entries in batches, and
    the batch that crashed one worker crashes the next together), so among the suspects: those the crash log
    names (entry id or step id), else the oldest one — the entry a worker working in id order was on when it
    died. The other suspects are requeued; the usual ``max_deliveries`` still dead-letters a repeat offender.
    """
    suspects = sorted((e for e in entries if e.consumer == consumer and e.total_deliveries >= min_deliveries),
                      key=lambda e: _id_key(e.entry_id))
    if not suspects:
        return []
    text = "\n".join(log_lines)
    named = [e for e in suspects if e.entry_id in text or any(s and s in text for s in (e.step_id, e.job_id))]
    return named or suspects[:1]


def root_cause(*, cause: Classification, state: PodInfo | None, poison: Sequence[PendingEntry]) -> str:
    """One line an SRE can act on: OOM vs error exit vs poison entry vs pod gone, with the evidence."""
    parts: list[str] = []
    if poison:
        ids = ", ".join(e.entry_id + (f" step {e.step_id or e.job_id}" if e.step_id or e.job_id else "")
                        for e in poison[:5])
        named = state is not None and any(e.entry_id in "\n".join(state.log_tail) for e in poison)
        parts.append(f"poison entry suspected ({ids}; delivered >= {min(e.total_deliveries for e in poison)} times"
                     + ("; named in the crash log" if named else "") + ")")
    last = state.last_exit if state is not None else None
    if cause is Classification.OOM_KILLED or (last is not None and last.reason == "OOMKilled"):
        parts.append("out of memory (OOMKilled, exit 137): raise the memory limit or find the oversized step")
    elif cause is Classification.GONE:
        parts.append("the pod is gone while its consumer still held entries (node loss, eviction or kill)")
    elif state is not None:
        code = last.exit_code if last is not None else None
        line = next((ln for ln in reversed(state.log_tail) if ln.strip()), "")
        parts.append(f"process error exit{f' (code {code})' if code is not None else ''}"
                     + (f": `{line.strip()[:200]}`" if line else ""))
    return "; ".join(parts) or "unknown"


class EntryMoves(BaseModel):
    """Where a dead consumer's entries go: the poison and repeat offenders to the DLQ, the rest requeued at once,
    entries whose stream entry is gone acknowledged (orphans)."""

    poison: list[str] = Field(default_factory=list)
    requeue: list[str] = Field(default_factory=list)
    dead_letter: list[str] = Field(default_factory=list)
    orphan: list[str] = Field(default_factory=list)

    @property
    def dead_lettered(self) -> list[str]:
        return self.poison + self.dead_letter


def plan_moves(entries: Iterable[PendingEntry], *, consumer: str, poison: Iterable[PendingEntry],
               max_deliveries: int) -> EntryMoves:
    """Pure: what recovering a dead ``consumer``'s entries does to each (the queue sweep's own rule, owner dead)."""
    moves = EntryMoves(poison=[e.entry_id for e in poison])
    policy = SweepPolicy(min_idle_ms=0, max_deliveries=max_deliveries, dead_consumers=[consumer])
    for e in entries:
        if e.entry_id in moves.poison or e.consumer != consumer:
            continue
        action = decide_entry(e, policy).action
        {"dead_letter": moves.dead_letter, "orphan": moves.orphan}.get(action, moves.requeue).append(e.entry_id)
    return moves


class CrashPlan(BaseModel):
    """What recovering one crashed worker will do, decided from what was observed (its entries read once)."""

    target: CrashTarget
    entries: list[PendingEntry] = Field(default_factory=list)
    poison: list[PendingEntry] = Field(default_factory=list)
    moves: EntryMoves = Field(default_factory=EntryMoves)
    replace: bool = Field(False, description="Delete (or evict) the pod so its Deployment starts a fresh one.")
    replace_refused: str | None = Field(None, description="Why the pod is not replaced though it should be.")
    root_cause: str = ""

    @property
    def run_ids(self) -> list[str]:
        return sorted({e.run_id for e in self.entries if e.run_id})

    def row(self) -> dict[str, object]:
        """One row of the report's decision table."""
        pod_action = ("replace" if self.replace else self.replace_refused
                      or ("none (pod gone)" if not self.target.pod_exists else "none"))
        return {"pod": self.target.pod, "cause": self.target.cause.value, "entries": len(self.entries),
                "requeue": len(self.moves.requeue), "dead-letter": len(self.moves.dead_lettered),
                "poison": ", ".join(self.moves.poison), "pod action": pod_action, "likely root cause": self.root_cause}


def plan_crash(
    *,
    decision: CrashDecision,
    pods: Mapping[str, PodInfo],
    entries: Mapping[str, Sequence[PendingEntry]],
    poison_min_deliveries: int,
    max_deliveries: int,
    replace_pod: bool,
    ready_workers: int,
    min_healthy_workers: int,
) -> list[CrashPlan]:
    """Pure: for each crashed worker, its poison (not for a pod that is merely gone: no process died on it),
    where each entry goes, whether its pod is replaced (never below ``min_healthy_workers`` Ready), the root cause."""
    plans: list[CrashPlan] = []
    ready = ready_workers
    for t in decision.targets:
        held = list(entries.get(t.consumer, ()))
        state = pods.get(t.pod)
        poison = [] if t.cause is Classification.GONE else poison_entries(
            held, consumer=t.consumer, min_deliveries=poison_min_deliveries, log_lines=state.log_tail if state else ())
        plan = CrashPlan(target=t, entries=held, poison=poison,
                         moves=plan_moves(held, consumer=t.consumer, poison=poison, max_deliveries=max_deliveries),
                         root_cause=root_cause(cause=t.cause, state=state, poison=poison))
        if t.replace_pod and replace_pod:
            serving = state is not None and state.serving
            if serving and not may_remove_worker(ready_workers=ready, min_healthy_workers=min_healthy_workers):
                plan.replace_refused = f"refused: would leave fewer than {min_healthy_workers} Ready workers"
            else:
                plan.replace = True
                ready -= 1 if serving else 0
        plans.append(plan)
    return plans


def removal_refused(*, pod: str, ready_workers: int, min_healthy_workers: int) -> str | None:
    """Pure safety rule: why removing Ready ``pod`` now is refused (it would go below the minimum), or None."""
    if may_remove_worker(ready_workers=ready_workers, min_healthy_workers=min_healthy_workers):
        return None
    return (f"{ready_workers} Ready worker(s); removing `{pod}` would go below "
            f"min_healthy_workers={min_healthy_workers}")


def consumer_reading(*, seen: bool, lag: int) -> bool:
    """A replacement's consumer counts as reading once it appears in the group; with nothing waiting (lag 0) it
    cannot appear yet (Redis 7.0 creates a consumer only when it first receives an entry), which is fine."""
    return seen or lag == 0


# ---------------------------------------------------------------------------------------------- hang


class Sample(BaseModel):
    """One observation of the workers and the queue at a moment (seconds on any monotonic clock)."""

    at: float
    lag: int
    pods: list[PodInfo]
    consumers: list[ConsumerInfo]


class HangVerdict(BaseModel):
    pod: str
    consumer: str
    hung: bool
    reason: str
    pending: int = 0
    idle_ms: int = 0
    cpu_millicores: float | None = None


class HangDecision(BaseModel):
    lag_series: list[int]
    lag_growing: bool
    verdicts: list[HangVerdict] = Field(default_factory=list)

    @property
    def hung(self) -> list[HangVerdict]:
        return [v for v in self.verdicts if v.hung]


def lag_growing(series: Sequence[int]) -> bool:
    """Lag grows across the samples: it never fell and the last is above the first."""
    return len(series) >= 2 and series[-1] > series[0] and all(b >= a for a, b in zip(series, series[1:], strict=False))


def lag_falling(series: Sequence[int], *, normal: int = 0) -> bool:
    """Lag is falling or back to normal: the last sample is at most ``normal`` (what the workers keep in flight
    under a steady load: 0 -> 1 is not a backlog) or below the first."""
    return bool(series) and (series[-1] <= normal or (len(series) >= 2 and series[-1] < series[0]))


def decide_hang(
    *,
    samples: Sequence[Sample],
    consumer_for_pod: Callable[[str], str],
    pod: str | None = None,
    min_idle_ms: int,
    max_cpu_millicores: float,
    require_lag_growth: bool = True,
) -> HangDecision:
    """A pod is hung when in every sample it is Running+Ready, its consumer holds entries, its CPU is near
    zero, its consumer is idle beyond ``min_idle_ms`` at the end, and the queue lag grows across samples.

    Missing CPU metrics count against hanging (never delete on absent evidence).
    """
    if not samples:
        raise ValueError("at least one sample is needed")
    series = [s.lag for s in samples]
    growing = lag_growing(series)
    decision = HangDecision(lag_series=series, lag_growing=growing)
    last = samples[-1]
    names = [p.name for p in last.pods if pod is None or p.name == pod]
    for name in sorted(names):
        consumer = consumer_for_pod(name)
        verdict = _hang_verdict(name, consumer, samples, min_idle_ms, max_cpu_millicores)
        if verdict.hung and require_lag_growth and not growing:
            verdict.hung = False
            verdict.reason = f"looks stuck but queue lag is not growing ({', '.join(map(str, series))}): left alone"
        decision.verdicts.append(verdict)
    if pod is not None and not names:
        decision.verdicts.append(HangVerdict(pod=pod, consumer=consumer_for_pod(pod), hung=False,
                                             reason="no such pod now: nothing to do"))
    return decision


def _hang_verdict(name: str, consumer: str, samples: Sequence[Sample], min_idle_ms: int, max_cpu: float) -> HangVerdict:
    cpus: list[float | None] = []
    for s in samples:
        state = next((p for p in s.pods if p.name == name), None)
        c = next((c for c in s.consumers if c.name == consumer), None)
        if state is None:
            return HangVerdict(pod=name, consumer=consumer, hung=False, reason="pod missing from a sample")
        if state.phase != "Running" or not state.ready or state.terminating:
            return HangVerdict(pod=name, consumer=consumer, hung=False,
                               reason=f"not Running+Ready ({state.phase}, ready={state.ready}): not a hang")
        if c is None or c.pending == 0:
            return HangVerdict(pod=name, consumer=consumer, hung=False, reason="holds no pending entries")
        cpus.append(state.cpu_millicores)
    c_last = next(c for c in samples[-1].consumers if c.name == consumer)
    base = dict(pod=name, consumer=consumer, pending=c_last.pending, idle_ms=c_last.idle_ms, cpu_millicores=cpus[-1])
    if any(cpu is None for cpu in cpus):
        return HangVerdict(**base, hung=False, reason="no CPU metrics: not enough evidence")
    peak = max(float(cpu or 0.0) for cpu in cpus)
    if peak > max_cpu:
        return HangVerdict(**base, hung=False, reason=f"busy (CPU up to {peak:g}m): a working worker")
    if c_last.idle_ms < min_idle_ms:
        return HangVerdict(**base, hung=False, reason=f"consumer active {c_last.idle_ms} ms ago (< {min_idle_ms})")
    return HangVerdict(**base, hung=True,
                       reason=f"Ready, {c_last.pending} pending idle {c_last.idle_ms} ms, CPU {peak:g}m")


# --------------------------------------------------------------------------------------- post-check


class ChecklistItem(BaseModel):
    """One line of the runbook's post-recovery checklist, ticked or not, with the evidence behind it."""

    item: str
    ok: bool | None = Field(description="True ticked, False failed, None open (needs a human).")
    evidence: str


def workers_ready_and_consuming(
    *, links: Sequence[WorkerLink], desired: int | None, max_consumer_idle_ms: int, lag: int = 0
) -> ChecklistItem:
    """Every worker pod Ready (and as many as desired), each one's consumer recently talked to Redis.

    With nothing waiting (lag 0) a Ready worker that has not read recently is idle, not stuck (Redis 7.0
    creates a consumer only when it first receives an entry), so it is not held against the check.
    """
    pods = [lnk for lnk in links if lnk.pod_state is not None and not lnk.pod_state.terminating]
    not_ready = [lnk.pod for lnk in pods if not lnk.pod_state.ready]  # type: ignore[union-attr]
    silent = [lnk.pod for lnk in pods if lnk.pod not in not_ready
              and (lnk.consumer_state is None or lnk.consumer_state.idle_ms > max_consumer_idle_ms)]
    problems: list[str] = []
    if not pods:
        problems.append("no worker pods")
    if not_ready:
        problems.append(f"not Ready: {', '.join(map(str, not_ready))}")
    if silent and lag > 0:
        problems.append(f"not consuming ({lag} steps waiting, no read within {max_consumer_idle_ms} ms): "
                        f"{', '.join(map(str, silent))}")
    if desired is not None and len(pods) - len(not_ready) < desired:
        problems.append(f"{len(pods) - len(not_ready)} Ready of {desired} desired")
    if problems:
        return ChecklistItem(item="All workers healthy and processing", ok=False, evidence="; ".join(problems))
    evidence = f"{len(pods)} worker pods Ready and consuming"
    if silent:
        evidence += f" ({len(silent)} idle with nothing waiting)"
    return ChecklistItem(item="All workers healthy and processing", ok=True, evidence=evidence)


def queue_depth_ok(*, lag: int, pending: int, length: int, max_depth: int) -> ChecklistItem:
    """Undelivered backlog (lag) back under the threshold."""
    ok = lag <= max_depth
    return ChecklistItem(item="Queue depth returning to normal", ok=ok,
                         evidence=f"lag {lag} (threshold {max_depth}), pending {pending}, stream length {length}")


def no_stuck_runs(*, stuck: Sequence[str], older_than_minutes: int) -> ChecklistItem:
    ok = not stuck
    shown = ", ".join(stuck[:10]) + (f" and {len(stuck) - 10} more" if len(stuck) > 10 else "")
    return ChecklistItem(item="No runs stuck in invalid states", ok=ok,
                         evidence=(f"no run `running` for over {older_than_minutes} min" if ok
                                   else f"{len(stuck)} running for over {older_than_minutes} min: {shown}"))


# -------------------------------------------------------------------------------------------- triage


class TriageObservation(BaseModel):
    """Everything triage looked at once."""

    links: list[WorkerLink]
    lag: int = 0
    pending: int = 0
    stuck_runs: int = 0
    mcp_healthy: bool | None = None
    llm_failing_models: list[str] = Field(default_factory=list)
    ready_workers: int = 0
    desired_workers: int | None = None


class PlanStep(BaseModel):
    """One recovery flow triage will run, with its parameters and why."""

    flow: str
    parameters: dict[str, object] = Field(default_factory=dict)
    why: str


def plan_triage(
    *,
    obs: TriageObservation,
    consumer_for_pod: Callable[[str], str],
    hang_min_idle_ms: int,
    hang_max_cpu_millicores: float,
    backlog_threshold: int,
    max_replicas: int,
) -> list[PlanStep]:
    """Order: fix the dependencies workers need (MCP, LLM), then crashed workers, hung suspects, capacity,
    stuck runs; always end with the post-recovery check."""
    steps: list[PlanStep] = []
    if obs.mcp_healthy is False:
        steps.append(PlanStep(flow="mcp-server-recovery", why="MCP health check failed"))
    if obs.llm_failing_models:
        steps.append(PlanStep(flow="llm-provider-failover",
                              why=f"LLM steps failing for {', '.join(obs.llm_failing_models)}"))
    crash = decide_crash(links=obs.links, pod=None, consumer_for_pod=consumer_for_pod)
    for t in crash.targets:
        steps.append(PlanStep(flow="worker-crash-recovery", parameters={"pod": t.pod},
                              why=f"{t.pod}: {t.cause}, {t.pending} pending entries"))
    crashed = {t.consumer for t in crash.targets}
    hang_suspects = []
    for link in obs.links:
        s, c = link.pod_state, link.consumer_state
        if s is None or c is None or link.consumer in crashed:
            continue
        if (s.phase == "Running" and s.ready and not s.terminating and c.pending > 0 and c.idle_ms >= hang_min_idle_ms
                and s.cpu_millicores is not None and s.cpu_millicores <= hang_max_cpu_millicores):
            hang_suspects.append(link.pod)
            steps.append(PlanStep(flow="worker-hang-recovery", parameters={"pod": link.pod},
                                  why=f"{link.pod}: Ready, {c.pending} pending idle {c.idle_ms} ms, "
                                      f"CPU {s.cpu_millicores:g}m (confirmed by sampling)"))
    if obs.lag > backlog_threshold and not crash.targets and not hang_suspects:
        current = max(obs.desired_workers or obs.ready_workers, 1)
        replicas = min(max_replicas, current * 2)
        if replicas > current:
            steps.append(PlanStep(flow="scale-workers", parameters={"replicas": replicas},
                                  why=f"backlog: lag {obs.lag} > {backlog_threshold} with all workers healthy"))
    if obs.stuck_runs:
        steps.append(PlanStep(flow="stuck-runs-sweep", why=f"{obs.stuck_runs} runs stuck in `running`"))
    steps.append(PlanStep(flow="post-recovery-check", why="always: confirm the runbook's checklist"))
    return steps
