"""Timed recovery drills on the running stack, shared by ``make demo`` and ``python -m bench.drills``.

A drill: set the scene under the steady load (e.g. a burst so one worker holds 50 steps), inject the fault
(``SandboxServices.crash/hang/poison/llm_outage/mcp_outage/backlog``), post the alert to the bridge exactly
as Alertmanager would (webhook v4 body, Bearer token), wait for the flow run its trigger starts (served by
``fd-recovery serve``), check what the recovery must have achieved (e.g. the 50 steps completed by other
workers), run ``post-recovery-check`` until it passes, and measure: MTTR = fault injected -> check passing.

Accounting of "lost": every step created during the scenario (rows in the runs DB; the load generator and
the scenario write the rows before the stream entries) must end completed or failed with its error recorded
(runs DB), dead-lettered (DLQ), or still legitimately queued (undelivered) or in flight with a live worker.
Anything else — pending under a dead or hung consumer, nowhere at all — is lost.

When a recovery leaves steps pending under consumers whose pods are gone (the sandbox kills a deleted pod's
worker abruptly, e.g. in a rollout), the drill fires ``StepsPendingWithoutWorker`` (team=ferrumdeck), which
the bridge routes to ``worker-failure-triage``, and reports that follow-up; MTTR includes it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa
from pydantic import BaseModel, Field

from sandbox.stack import StackError, wait_until
from tasks.connections import db_engine
from tasks.runs import tables

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
CHUNK = 5_000


class DrillError(Exception):
    """A drill could not be carried out (the stack misbehaved, a deadline passed)."""


class Accounting(BaseModel):
    """Where every step of a scenario ended."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    queued: int = 0
    in_flight: int = 0
    lost: int = 0
    lost_samples: list[str] = Field(default_factory=list)


class DrillResult(BaseModel):
    """One scenario's outcome: timings, the flow runs it caused, step accounting, its own checks."""

    scenario: str
    title: str
    alert: str
    fault_at: str = ""
    recovered_at: str = ""
    mttr_s: float | None = None
    target_s: float | None = None
    recovered: bool = False
    flow_runs: list[str] = Field(default_factory=list)
    steps: Accounting = Field(default_factory=Accounting)
    checks: dict[str, Any] = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.recovered and self.steps.lost == 0 and not self.problems

    def bench_row(self) -> dict[str, Any]:
        return {
            "mttr_s": self.mttr_s, "target_s": self.target_s,
            "met_target": None if self.target_s is None or self.mttr_s is None else self.mttr_s <= self.target_s,
            "recovered": self.recovered,
            "steps_total": self.steps.total, "steps_completed": self.steps.completed,
            "steps_failed": self.steps.failed, "steps_dead_lettered": self.steps.dead_lettered,
            "steps_queued_or_in_flight": self.steps.queued + self.steps.in_flight,
            "steps_lost": self.steps.lost, "flow_runs": self.flow_runs, **self.checks,
            **({"problems": self.problems} if self.problems else {}),
        }


def _now() -> datetime:
    return datetime.now(UTC)


def _clock(dt: datetime | None) -> str:
    return dt.astimezone().strftime("%H:%M:%S.%f")[:-4] if dt else "-"


def wait_for(predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """The stack's poll-with-deadline, failing as a drill error."""
    try:
        return wait_until(predicate, timeout_s=timeout_s, what=what, interval_s=interval_s)
    except StackError as e:
        raise DrillError(str(e)) from e


# ------------------------------------------------------------------------------------------ the alert


def alertmanager_body(alertname: str, *, labels: dict[str, str], annotations: dict[str, str] | None = None,
                      status: str = "firing", starts_at: datetime | None = None) -> dict[str, Any]:
    """The webhook body (version 4) Alertmanager sends for one alert of a group."""
    all_labels = {"alertname": alertname, "team": "ferrumdeck", "namespace": "ferrumdeck", **labels}
    fingerprint = hashlib.sha256(
        "\x1f".join(f"{k}={v}" for k, v in sorted(all_labels.items())).encode()).hexdigest()[:16]
    started = (starts_at or _now()).isoformat().replace("+00:00", "Z")
    alert = {
        "status": status, "labels": all_labels,
        "annotations": {"summary": f"{alertname} (sandbox drill)", **(annotations or {})},
        "startsAt": started, "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.sandbox/graph", "fingerprint": fingerprint,
    }
    return {
        "version": "4", "groupKey": f'{{}}/{{team="ferrumdeck"}}:{{alertname="{alertname}"}}',
        "truncatedAlerts": 0, "status": status, "receiver": "ferrumdeck-recovery",
        "groupLabels": {"alertname": alertname}, "commonLabels": all_labels,
        "commonAnnotations": alert["annotations"], "externalURL": "http://alertmanager.sandbox:9093",
        "alerts": [alert],
    }


def post_alert(stack: Any, alertname: str, *, labels: dict[str, str], annotations: dict[str, str] | None = None
               ) -> dict[str, Any]:
    """POST the alert to the stack's bridge as Alertmanager's webhook receiver would; the bridge's answer."""
    body = alertmanager_body(alertname, labels=labels, annotations=annotations)
    for attempt in range(5):  # like Alertmanager: a 5xx (Prefect busy) is retried with back-off
        r = httpx.post(f"{stack.bridge.url}/alertmanager", json=body, timeout=10,
                       headers={"Authorization": f"Bearer {stack.bridge_token}"})
        if r.status_code < 500:
            break
        time.sleep(0.5 * 2**attempt)  # back-off before the retry
    if r.status_code != 200:
        raise DrillError(f"the bridge refused {alertname}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


# ----------------------------------------------------------------------------------- Prefect (REST)


class FlowRuns:
    """The few Prefect API reads a drill needs (flow runs of a deployment, their state)."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        from sandbox.stack import api_call

        r = api_call(method, f"{self.stack.api_url}{path}", **kwargs)
        if r.status_code >= 300:
            raise DrillError(f"Prefect API {method} {path}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()

    def ids(self, deployment: str) -> set[str]:
        dep = self.stack.deployments[deployment]
        body = {"flow_runs": {"deployment_id": {"any_": [dep]}}, "limit": 200, "sort": "EXPECTED_START_TIME_DESC"}
        return {r["id"] for r in self._json("POST", "/flow_runs/filter", json=body)}

    def read(self, run_id: str) -> dict[str, Any]:
        return self._json("GET", f"/flow_runs/{run_id}")

    def wait_new(self, deployment: str, *, known: set[str], timeout_s: float) -> str:
        new = wait_for(lambda: self.ids(deployment) - known, timeout_s=timeout_s, interval_s=0.2,
                       what=f"a flow run of {deployment}")
        return sorted(new)[0]

    def wait_final(self, run_id: str, *, timeout_s: float, while_waiting: Callable[[], None] | None = None
                   ) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            if while_waiting is not None:
                while_waiting()
            run = self.read(run_id)
            return run if (run.get("state") or {}).get("type") in FINAL else None

        return wait_for(final, timeout_s=timeout_s, interval_s=0.25, what=f"flow run {run_id} to finish")

    def close(self) -> None:
        """Nothing held open (each call is one request)."""


def describe_run(run: dict[str, Any]) -> str:
    return f"{run.get('name')} ({(run.get('state') or {}).get('name', '?')})"


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def run_timeline(run: dict[str, Any], fired: datetime) -> dict[str, float | None]:
    """Seconds from the alert POST to the flow run's creation (event -> trigger), its start (runner pickup +
    subprocess) and its end."""
    def after(key: str) -> float | None:
        t = _ts(run.get(key))
        return round((t - fired).total_seconds(), 2) if t else None

    return {"created": after("created"), "started": after("start_time"), "ended": after("end_time")}


def run_end(run: dict[str, Any]) -> datetime:
    end = run.get("end_time")
    return datetime.fromisoformat(end.replace("Z", "+00:00")) if end else _now()


# ----------------------------------------------------------------------------------- the steps


def all_step_ids(stack: Any) -> set[str]:
    steps = tables(stack.flow_settings).steps
    with db_engine(stack.flow_settings).connect() as conn:
        return set(conn.execute(sa.select(steps.c.id)).scalars())


def step_rows(stack: Any, ids: Iterable[str]) -> dict[str, tuple[str, str | None, datetime | None]]:
    """id -> (status, model, completed_at) from the runs DB."""
    steps = tables(stack.flow_settings).steps
    ids = list(ids)
    out: dict[str, tuple[str, str | None, datetime | None]] = {}
    with db_engine(stack.flow_settings).connect() as conn:
        for i in range(0, len(ids), CHUNK):
            q = sa.select(steps.c.id, steps.c.status, steps.c.model, steps.c.completed_at).where(
                steps.c.id.in_(ids[i:i + CHUNK]))
            out.update({r.id: (r.status, r.model, r.completed_at) for r in conn.execute(q)})
    return out


def live_consumers(stack: Any) -> set[str]:
    s = stack.flow_settings
    return {s.consumer_for_pod(p) for p in stack.services.pool.running()}


def account(stack: Any, ids: Iterable[str]) -> Accounting:
    """Where each step ended (see the module docstring); O(1) Redis pages + one SELECT per 5 000 ids."""
    from tasks.queue import locate_steps

    ids = sorted(set(ids))
    rows = step_rows(stack, ids)
    acc = Accounting(total=len(ids))
    rest = []
    for i in ids:
        status = rows.get(i, ("missing", None, None))[0]
        if status == "completed":
            acc.completed += 1
        elif status == "failed":
            acc.failed += 1
        else:
            rest.append(i)
    if not rest:
        return acc
    live = live_consumers(stack)
    for step_id, loc in locate_steps(settings=stack.flow_settings, step_ids=rest).items():
        if loc.where == "dlq":
            acc.dead_lettered += 1
        elif loc.where == "queued":
            acc.queued += 1
        elif loc.where == "pending" and loc.consumer in live:
            acc.in_flight += 1
        else:
            acc.lost += 1
            if len(acc.lost_samples) < 5:
                acc.lost_samples.append(f"{step_id}: {loc.where}" + (f" under {loc.consumer}" if loc.consumer else ""))
    return acc


def settle(stack: Any, ids: set[str], *, timeout_s: float) -> Accounting:
    """Account ``ids`` once nothing of them is queued, in flight or unaccounted any more (or at the deadline).

    A step counted lost is looked at again until the deadline: the load generator writes a step's row a few
    milliseconds before its stream entry, so a step created right at the end is briefly "nowhere".
    """
    deadline = time.monotonic() + timeout_s
    while True:
        acc = account(stack, ids)
        if (acc.queued == 0 and acc.in_flight == 0 and acc.lost == 0) or time.monotonic() > deadline:
            return acc
        time.sleep(0.5)  # poll


def consumer_step_ids(stack: Any, consumer: str) -> list[str]:
    """The step ids a consumer holds (its pending entries' ``job_id``)."""
    s, client = stack.flow_settings, stack.services.redis
    pending = client.xpending_range(s.stream, s.group, min="-", max="+", count=10_000, consumername=consumer)
    pipe = client.pipeline(transaction=False)
    for p in pending:
        pipe.xrange(s.stream, min=p["message_id"], max=p["message_id"])
    return [entries[0][1].get("job_id", "") for entries in pipe.execute() if entries]


def orphaned_consumers(stack: Any) -> dict[str, int]:
    """Consumers holding pending entries whose pod no longer exists (nobody will ever acknowledge them)."""
    s, services = stack.flow_settings, stack.services
    pods = {s.consumer_for_pod(p["metadata"]["name"])
            for p in services.cluster.pods(namespace=s.namespace, selector=s.worker_selector)}
    return {c["name"]: c["pending"] for c in services.redis.xinfo_consumers(s.stream, s.group)
            if c["pending"] and c["name"] not in pods}


# ----------------------------------------------------------------------------------- the drill


class Drill:
    """One scenario being run: its clock, its flow runs, its result."""

    def __init__(self, stack: Any, runs: FlowRuns, *, scenario: str, title: str, alert: str,
                 target_s: float | None, say: Callable[[str], None]) -> None:
        self.stack, self.runs, self.say = stack, runs, say
        self.services = stack.services
        self.result = DrillResult(scenario=scenario, title=title, alert=alert, target_s=target_s)
        self.before = all_step_ids(stack)
        self.t0 = 0.0
        self.fault_dt: datetime | None = None

    def fault(self) -> None:
        """Mark the moment the fault is injected (call right before injecting)."""
        self.t0 = time.monotonic()
        self.fault_dt = _now()
        self.result.fault_at = self.fault_dt.isoformat()

    def since(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def fire_and_wait(self, alertname: str, deployment: str, *, labels: dict[str, str], timeout_s: float = 180.0,
                      while_waiting: Callable[[], None] | None = None) -> dict[str, Any]:
        """Post the alert to the bridge, wait for the triggered flow run of ``deployment`` to finish."""
        known = self.runs.ids(deployment)
        fired = _now()
        answer = post_alert(self.stack, alertname, labels=labels)
        if answer.get("events") != 1:
            raise DrillError(f"the bridge did not forward {alertname}: {answer}")
        self.say(f"    +{self.since():5.1f}s alert {alertname} {labels or ''} -> bridge -> Prefect event")
        run_id = self.runs.wait_new(deployment, known=known, timeout_s=30)
        run = self.runs.wait_final(run_id, timeout_s=timeout_s, while_waiting=while_waiting)
        self.result.flow_runs.append(describe_run(run))
        self.result.checks.setdefault("flow_timeline_s", []).append(run_timeline(run, fired))
        self.say(f"    +{self.since():5.1f}s flow run {describe_run(run)} of {deployment}")
        if run["state"]["type"] != "COMPLETED":
            self.result.problems.append(f"{deployment} run {run.get('name')} ended {run['state'].get('name')}")
        return run

    def recover_orphans(self) -> None:
        """Steps left pending under consumers whose pods are gone: the follow-up alert routes to triage."""
        orphans = orphaned_consumers(self.stack)
        if not orphans:
            return
        self.say(f"    +{self.since():5.1f}s steps pending under gone pods: {orphans}")
        self.result.checks["orphaned_consumers"] = orphans
        self.fire_and_wait("StepsPendingWithoutWorker", "worker-failure-triage",
                           labels={"severity": "warning"}, timeout_s=180)

    def post_check(self, *, timeout_s: float = 90.0) -> datetime:
        """Run ``post-recovery-check`` until it passes; when it first did."""
        self.stack.heartbeat()
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            ok, last = post_recovery_check_once(self.stack)
            if ok:
                self.say(f"    +{self.since():5.1f}s post-recovery-check passes")
                return _now()
            if time.monotonic() > deadline:
                raise DrillError(f"post-recovery-check still failing after {timeout_s:g} s: {last}")
            time.sleep(0.5)  # poll

    def finish(self, recovered_at: datetime) -> DrillResult:
        self.result.recovered = True
        self.result.recovered_at = recovered_at.isoformat()
        assert self.fault_dt is not None
        self.result.mttr_s = round((recovered_at - self.fault_dt).total_seconds(), 2)
        return self.result


def post_recovery_check_once(stack: Any) -> tuple[bool, str]:
    """One run of the ``post-recovery-check`` flow (in this process, against the stack); (passed, evidence)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.post_recovery_check import ALERTING, post_recovery_check
    from tasks.settings import use_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}), use_settings(stack.flow_settings):
        state = post_recovery_check(return_state=True)  # Failed (not_verified) until every check holds
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        return False, f"{type(result).__name__}: {result}"
    failing = "; ".join(f"{c.name}: {c.detail}" for c in result.failed_checks) or (result.error or "")
    return not result.outcome.failing and ALERTING not in result.open_items, failing  # all four ticked


# ----------------------------------------------------------------------------------- scenarios


def _burst_until_holding(d: Drill, n: int) -> str:
    """Enqueue bursts until one worker holds at least ``n`` unacknowledged steps; its pod."""
    from sandbox.services import SandboxError

    batch = n
    for _ in range(5):
        d.services.backlog(batch * 3, tool_every=4)
        try:
            return d.services.wait_for_holding(n, timeout_s=5)
        except SandboxError:
            continue
    raise DrillError(f"no worker held {n} steps after 5 bursts")


def scenario_crash(d: Drill, *, held: int = 50) -> None:
    pod = _burst_until_holding(d, held)
    d.fault()
    d.services.crash(pod)
    consumer = d.stack.flow_settings.consumer_for_pod(pod)
    held_ids = consumer_step_ids(d.stack, consumer)
    d.result.checks["held_by_crashed_worker"] = len(held_ids)
    d.say(f"    +{d.since():5.1f}s fault: worker {pod} crashed holding {len(held_ids)} steps (crash-looping)")
    d.fire_and_wait("WorkerCrashLooping", "worker-crash-recovery", labels={"pod": pod, "container": "worker"})

    def held_completed() -> bool:
        rows = step_rows(d.stack, held_ids)
        return all(rows.get(i, ("",))[0] == "completed" for i in held_ids)

    wait_for(held_completed, timeout_s=60, what=f"the {len(held_ids)} steps {pod} held to complete elsewhere")
    d.result.checks["held_completed_by_others"] = len(held_ids)
    d.say(f"    +{d.since():5.1f}s all {len(held_ids)} held steps completed by other workers")
    d.recover_orphans()
    d.finish(d.post_check())


def scenario_hang(d: Drill) -> None:
    pod = _burst_until_holding(d, 20)
    d.fault()
    d.services.hang(pod)
    consumer = d.stack.flow_settings.consumer_for_pod(pod)
    held_ids = consumer_step_ids(d.stack, consumer)
    d.result.checks["held_by_hung_worker"] = len(held_ids)
    d.say(f"    +{d.since():5.1f}s fault: worker {pod} hung holding {len(held_ids)} steps (Ready, CPU ~0)")
    d.fire_and_wait("WorkerHung", "worker-hang-recovery", labels={"pod": pod, "consumer": consumer})
    gone = pod not in {p["metadata"]["name"] for p in d.services.cluster.pods(
        namespace=d.stack.flow_settings.namespace, selector=d.stack.flow_settings.worker_selector)}
    d.result.checks["hung_pod_replaced"] = gone
    if not gone:
        d.result.problems.append(f"hung pod {pod} still exists")

    def held_completed() -> bool:
        rows = step_rows(d.stack, held_ids)
        return all(rows.get(i, ("",))[0] == "completed" for i in held_ids)

    wait_for(held_completed, timeout_s=60, what=f"the {len(held_ids)} steps {pod} held to complete elsewhere")
    d.result.checks["held_completed_by_others"] = len(held_ids)
    d.recover_orphans()
    d.finish(d.post_check())


def scenario_poison(d: Drill) -> None:
    from tasks.queue import locate_steps

    seen = set(d.services.pool.crashed())
    d.fault()
    poison = d.services.poison(count=1)[0]
    d.say(f"    +{d.since():5.1f}s fault: poison step {poison.step_id} enqueued (crashes whichever worker takes it)")
    deadline = time.monotonic() + 150
    crashes = 0
    while True:
        loc = locate_steps(settings=d.stack.flow_settings, step_ids=[poison.step_id])[poison.step_id]
        if loc.where == "dlq":
            d.result.checks["poison_dead_lettered_after_deliveries"] = loc.deliveries
            d.say(f"    +{d.since():5.1f}s poison step dead-lettered after {loc.deliveries} deliveries")
            break
        new = sorted(set(d.services.pool.crashed()) - seen)
        if new:
            seen.update(new)
            crashes += 1
            d.fire_and_wait("WorkerCrashLooping", "worker-crash-recovery", labels={"pod": new[0], "container": "worker"})
            continue
        if time.monotonic() > deadline:
            raise DrillError(f"poison step not dead-lettered after {crashes} crashes ({loc.where})")
        time.sleep(0.1)  # poll
    d.result.checks["workers_crashed_by_poison"] = crashes
    if d.result.checks["poison_dead_lettered_after_deliveries"] != 3:
        d.result.problems.append("poison step not dead-lettered after exactly 3 deliveries")
    d.recover_orphans()
    d.finish(d.post_check())


def scenario_llm_outage(d: Drill) -> None:
    from sandbox.llm import provider_of

    models = d.stack.flow_settings.llm_fallback_models
    primary, backup = models[0], models[1]
    provider = provider_of(primary)
    steps = tables(d.stack.flow_settings).steps
    engine = db_engine(d.stack.flow_settings)

    def count(model: str, status: str, after: datetime) -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(steps).where(
                steps.c.model == model, steps.c.status == status, steps.c.completed_at > after)).scalar_one())

    d.fault()
    d.services.llm_outage(provider)
    try:
        assert d.fault_dt is not None
        d.say(f"    +{d.since():5.1f}s fault: provider {provider} down (calls fail, status page major)")
        wait_for(lambda: count(primary, "failed", d.fault_dt) >= 3, timeout_s=30, what="LLM steps failing")
        run = d.fire_and_wait("LLMProviderErrors", "llm-provider-failover",
                              labels={"provider": provider, "model": primary})
        switched = run_end(run)
        d.result.checks["failover_s"] = round((switched - d.fault_dt).total_seconds(), 2)
        wait_for(lambda: count(backup, "completed", switched) >= 5, timeout_s=60,
                 what=f"steps succeeding on {backup}")
        d.result.checks["backup_model"] = backup
        d.result.checks["steps_ok_on_backup_after_failover"] = count(backup, "completed", switched)
        d.result.checks["steps_failed_on_primary"] = count(primary, "failed", d.fault_dt)
        d.say(f"    +{d.since():5.1f}s steps succeed on {backup}")
        d.recover_orphans()
        d.finish(d.post_check())
    finally:
        d.services.llm_restore(provider)


def scenario_mcp_outage(d: Drill) -> None:
    url = d.stack.flow_settings.mcp_url
    steps = tables(d.stack.flow_settings).steps
    engine = db_engine(d.stack.flow_settings)

    def tool_steps(ids: list[str], status: str) -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(steps).where(
                steps.c.id.in_(ids), steps.c.kind == "tool", steps.c.status == status)).scalar_one())

    d.fault()
    d.services.mcp_outage()
    during = [s.step_id for s in d.services.backlog(20, tool_every=2)]  # the symptom: tool steps fail
    d.say(f"    +{d.since():5.1f}s fault: MCP server unhealthy ({url} fails, tool steps fail)")
    wait_for(lambda: tool_steps(during, "failed") >= 1, timeout_s=30, what="tool steps failing")
    d.fire_and_wait("MCPServerDown", "mcp-server-recovery", labels={"deployment": "mcp-server"})
    healthy = httpx.get(url, timeout=5).status_code == 200
    d.result.checks["mcp_healthy_s"] = d.since() if healthy else None
    d.result.checks["tool_steps_failed_during_outage"] = tool_steps(during, "failed")
    if not healthy:
        d.result.problems.append("MCP /health still failing after the recovery")
    after = [s.step_id for s in d.services.backlog(10, payload={"kind": "tool"})]
    wait_for(lambda: tool_steps(after, "completed") == len(after), timeout_s=30,
             what="tool steps succeeding after the restart")
    d.result.checks["tool_steps_ok_after_restart"] = len(after)
    d.recover_orphans()
    d.finish(d.post_check())


def scenario_backlog(d: Drill, *, n: int = 10_000) -> None:
    s = d.stack.flow_settings
    before = len(d.services.ready_worker_pods())
    peak = {"workers": before}

    def watch() -> None:
        peak["workers"] = max(peak["workers"], len(d.services.ready_worker_pods()))

    d.fault()
    d.services.backlog(n)
    d.say(f"    +{d.since():5.1f}s fault: burst of {n} steps enqueued ({before} workers)")
    d.fire_and_wait("QueueBacklog", "scale-workers", labels={"stream": s.stream, "group": s.group},
                    timeout_s=360, while_waiting=watch)
    after = wait_for(lambda: (n := len(d.services.ready_worker_pods())) <= before and n, timeout_s=60,
                     what="workers scaled back")
    d.result.checks.update({"workers_before": before, "workers_peak": peak["workers"], "workers_after": after,
                            "backlog": n})
    if peak["workers"] <= before:
        d.result.problems.append("workers were not scaled up")
    d.say(f"    +{d.since():5.1f}s scaled {before} -> {peak['workers']} -> {after} workers")
    d.recover_orphans()
    d.finish(d.post_check())


#: name -> (title, alert, runner, MTTR target in seconds)
SCENARIOS: dict[str, tuple[str, str, Callable[..., None], float | None]] = {
    "crash": ("worker crash holding 50 in-flight steps", "WorkerCrashLooping", scenario_crash, 15.0),
    "hang": ("worker hung (Ready, CPU ~0) holding steps", "WorkerHung", scenario_hang, 30.0),
    "poison": ("poison step crashing each worker that takes it", "WorkerCrashLooping", scenario_poison, None),
    "llm_outage": ("LLM provider outage", "LLMProviderErrors", scenario_llm_outage, 30.0),
    "mcp_outage": ("MCP server down", "MCPServerDown", scenario_mcp_outage, 30.0),
    "backlog": ("backlog burst of 10 000 steps", "QueueBacklog", scenario_backlog, None),
}
SHORT = ["crash", "poison", "mcp_outage"]


def run_drill(stack: Any, name: str, *, say: Callable[[str], None] = print, settle_s: float = 30.0,
              **kwargs: Any) -> DrillResult:
    """Run one scenario on the stack; never raises for a failed drill (the result says what went wrong)."""
    title, alert, runner, target = SCENARIOS[name]
    runs = FlowRuns(stack)
    d = Drill(stack, runs, scenario=name, title=title, alert=alert, target_s=target, say=say)
    say(f"[{name}] {title}")
    try:
        runner(d, **kwargs)
    except DrillError as e:
        d.result.problems.append(str(e))
        say(f"    FAILED: {e}")
    finally:
        runs.close()
    ids = all_step_ids(stack) - d.before
    d.result.steps = settle(stack, ids, timeout_s=settle_s)
    r = d.result
    say(f"    steps_total {r.steps.total} completed {r.steps.completed} failed {r.steps.failed} "
        f"dead_lettered {r.steps.dead_lettered} queued/in-flight {r.steps.queued + r.steps.in_flight} "
        f"steps_lost {r.steps.lost}" + (f" {r.steps.lost_samples}" if r.steps.lost_samples else "")
        + (f"  MTTR {r.mttr_s} s" if r.mttr_s is not None else ""))
    return r


def run_drills(stack: Any, names: list[str], *, say: Callable[[str], None] = print,
               options: dict[str, dict[str, Any]] | None = None) -> list[DrillResult]:
    """Run the named scenarios one after the other."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    started = time.monotonic()
    ok, evidence = post_recovery_check_once(stack)  # warms the in-process flow engine; the baseline
    say(f"baseline post-recovery-check: {'passes' if ok else 'FAILING: ' + evidence} "
        f"({time.monotonic() - started:.1f} s)")
    return [run_drill(stack, n, say=say, **(options or {}).get(n, {})) for n in names]


def table(results: list[DrillResult]) -> str:
    """The demo's summary table (plain text, fixed columns)."""
    head = ["scenario", "fault injected", "alert", "flow run", "recovered at", "TTR s", "steps lost", "dead-lettered"]
    rows = []
    for r in results:
        fault = datetime.fromisoformat(r.fault_at) if r.fault_at else None
        rec = datetime.fromisoformat(r.recovered_at) if r.recovered_at else None
        runs = r.flow_runs[0] if r.flow_runs else "-"
        if len(r.flow_runs) > 1:
            runs += f" +{len(r.flow_runs) - 1}"
        rows.append([r.scenario, _clock(fault), r.alert, runs, _clock(rec) if rec else "NOT RECOVERED",
                     f"{r.mttr_s:.1f}" if r.mttr_s is not None else "-", str(r.steps.lost),
                     str(r.steps.dead_lettered)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(out)
