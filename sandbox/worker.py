"""One simulated FerrumDeck worker: the loop of a single worker pod, run as a thread.

The pod's name is its Redis consumer name. The loop reads a batch with ``XREADGROUP >`` (COUNT ``batch``),
records the batch's steps and runs as running in the runs database, and works through it entry by entry: an
``llm`` step "calls" the pod's ``LITELLM_MODEL`` (``sandbox.llm``, in-process), a ``tool`` step calls an MCP
tool over HTTP (``sandbox.mcp``). Finished steps are written (completed, or failed with their error JSON) and
then acknowledged with one ``XACK``, every ``flush_every`` steps and at the end of the batch: set-based writes
keep a dozen workers cheap even on SQLite, and an entry is acknowledged only after its result is committed
(at-least-once, like FerrumDeck). A provider outage fails the step with ``{"code": "LLM_PROVIDER_ERROR",
"model", "provider"}`` and an unreachable MCP with ``MCP_UNAVAILABLE``; a failed step is still acknowledged
(its failure is recorded where the recovery flows read it).

Faults behave like the real thing: ``kill()`` stops the loop at once without acknowledging anything more, so
the rest of the batch stays in the pending list under the pod's consumer name, like a killed process;
``hang()`` stops processing but keeps the entries (a deadlock); an entry whose payload says ``"poison": true``
makes the worker die while holding it (``on_crash`` is told, and the pool makes the pod crash-loop).
Threads, not processes: dozens of workers cost a few MB and no fork on a 2-core machine; the Redis, database
and HTTP traffic they produce is the same as separate processes would.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import redis
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from sandbox.llm import LLMProviders, ProviderError
from tasks.connections import db_engine
from tasks.runs import tables
from tasks.settings import Settings

log = logging.getLogger("sandbox.worker")

# Step kinds (payload ``kind``): "llm" calls the pod's model, "tool" calls an MCP tool (the runbook tells them apart:
# an MCP outage fails tool steps while LLM steps still work). Only "llm" steps count in the failover's numbers.
KINDS = ("llm", "tool")


@dataclass(frozen=True)
class Step:
    """One stream entry as the worker sees it."""

    entry_id: str
    run_id: str
    step_id: str
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    step: Step
    error: dict[str, Any] | None


class StepBook:
    """Set-based writes of the steps' lives into the runs database (tables from ``tasks.runs``)."""

    def __init__(self, *, settings: Settings) -> None:
        self.settings = settings
        self.t = tables(settings)

    def running(self, *, steps: list[Step], model: str) -> None:
        """The batch is taken: its steps and their runs are ``running`` (rows created if missing)."""
        if not steps:
            return
        now = datetime.now(UTC)
        t = self.t
        engine = db_engine(self.settings)
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        run_ids = list(dict.fromkeys(s.run_id for s in steps))
        runs = insert(t.runs).values([{"id": r, "status": "running", "started_at": now} for r in run_ids])
        runs = runs.on_conflict_do_update(
            index_elements=[t.runs.c.id],
            set_={"status": "running", "started_at": sa.func.coalesce(t.runs.c.started_at, runs.excluded.started_at)},
        )
        rows = [
            {"id": s.step_id, "run_id": s.run_id, "status": "running", "kind": s.kind,
             "model": model if s.kind == "llm" else None, "started_at": now}
            for s in {s.step_id: s for s in steps}.values()
        ]
        step_stmt = insert(t.steps).values(rows)
        step_stmt = step_stmt.on_conflict_do_update(
            index_elements=[t.steps.c.id],
            set_={"status": "running", "kind": step_stmt.excluded.kind, "model": step_stmt.excluded.model,
                  "started_at": step_stmt.excluded.started_at, "completed_at": None},
        )
        with engine.begin() as conn:
            conn.execute(runs)
            conn.execute(step_stmt)

    def finished(self, *, outcomes: list[Outcome]) -> None:
        """Steps done: completed ones in one UPDATE (and their runs), failed ones grouped by error."""
        if not outcomes:
            return
        now = datetime.now(UTC)
        s, r = self.t.steps, self.t.runs
        groups: dict[str, list[Outcome]] = {}
        for o in outcomes:
            groups.setdefault(json.dumps(o.error, sort_keys=True) if o.error else "", []).append(o)
        with db_engine(self.settings).begin() as conn:
            for key, group in groups.items():
                error = json.loads(key) if key else None
                status = "failed" if error else "completed"
                step_ids = [o.step.step_id for o in group]
                run_ids = list(dict.fromkeys(o.step.run_id for o in group))
                conn.execute(
                    sa.update(s).where(s.c.id.in_(step_ids)).values(status=status, error=error, completed_at=now)
                )
                conn.execute(
                    sa.update(r)
                    .where(r.c.id.in_(run_ids), r.c.status == "running")
                    .values(status=status, error=error, completed_at=now)
                )


class WorkerCrashed(Exception):
    """Raised inside a worker's loop when it takes a poison entry (the simulated process dies)."""


def parse_payload(fields: dict[str, str]) -> dict[str, Any]:
    """The entry's ``payload`` field as a dict ({} when absent or not a JSON object)."""
    raw = fields.get("payload")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def to_step(entry_id: str, fields: dict[str, str]) -> Step:
    payload = parse_payload(fields)
    kind = payload.get("kind") if payload.get("kind") in KINDS else "llm"
    step_id = fields.get("step_id") or fields.get("job_id", "")
    return Step(entry_id=entry_id, run_id=fields.get("run_id", ""), step_id=step_id, kind=kind, payload=payload)


class Worker:
    """The loop of one worker pod (see the module docstring); ``start()`` runs it in a daemon thread."""

    def __init__(
        self,
        *,
        pod: str,
        model: str,
        settings: Settings,
        redis_client: redis.Redis,
        llm: LLMProviders,
        mcp_url: str,
        step_ms: float = 20.0,
        batch: int = 50,
        flush_every: int = 10,
        idle_poll_s: float = 0.05,
        on_crash: Callable[[str, str], None] | None = None,
    ) -> None:
        self.pod = pod
        self.consumer = settings.consumer_for_pod(pod)
        self.model = model
        self.settings = settings
        self.redis = redis_client
        self.book = StepBook(settings=settings)
        self.llm = llm
        self.mcp_url = mcp_url.rstrip("/")
        self.step_ms = step_ms
        self.batch = batch
        self.flush_every = max(1, flush_every)
        self.idle_poll_s = idle_poll_s
        self.on_crash = on_crash
        self._killed = threading.Event()
        self._hung = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"worker-{pod}", daemon=True)
        self.state = "new"  # new | running | hung | killed | crashed | error
        self.held = 0  # entries read and not yet acknowledged (the in-flight batch)
        self.completed = 0
        self.failed = 0
        self.errors = 0
        self.error_pause_s = 0.5
        self.last_error: str | None = None

    # --- control ---
    def start(self) -> Worker:
        self.state = "running"
        self._thread.start()
        return self

    def kill(self) -> None:
        """Stop abruptly: nothing more is acknowledged; held entries stay pending under the consumer."""
        self._killed.set()

    def hang(self) -> None:
        """Stop processing but stay alive holding the entries (a deadlock)."""
        self._hung.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end; True when it has."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the loop ---
    def _stopping(self) -> bool:
        """True when the loop must leave now; a hang parks the thread here until it is killed."""
        if self._hung.is_set() and not self._killed.is_set():
            self.state = "hung"
            self._killed.wait()
        return self._killed.is_set()

    def _run(self) -> None:
        s = self.settings
        try:
            with httpx.Client(timeout=s.http_timeout_s) as http:
                while not self._stopping():
                    try:
                        reply = self.redis.xreadgroup(s.group, self.consumer, {s.stream: ">"}, count=self.batch)
                        entries = reply[0][1] if reply else []
                        if not entries:
                            self._killed.wait(self.idle_poll_s)
                            continue
                        self.held = len(entries)
                        if not self._work_batch(http, [to_step(i, f) for i, f in entries]):
                            return
                    except (redis.RedisError, sa.exc.SQLAlchemyError, httpx.HTTPError) as e:
                        # like a container restart: the unacknowledged rest of the batch stays pending under
                        # this consumer, and the loop goes on reading new entries after a pause
                        self.errors += 1
                        self.last_error = f"{type(e).__name__}: {e}"[:300]
                        log.warning("worker %s: batch failed (%s); continuing", self.pod, self.last_error)
                        self._killed.wait(self.error_pause_s)
        except WorkerCrashed as e:
            self.state = "crashed"
            self.last_error = str(e)
            if self.on_crash is not None:
                self.on_crash(self.pod, str(e))
            return
        except Exception as e:  # a bug: the simulated process dies; keep the cause for the pool
            self.state = "error"
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("worker %s died", self.pod)
            return
        finally:
            if self.state in ("running", "hung"):
                self.state = "killed"

    def _work_batch(self, http: httpx.Client, steps: list[Step]) -> bool:
        """Work a batch to its acknowledgement; False when a kill/hang interrupted it (rest not acknowledged)."""
        self.book.running(steps=steps, model=self.model)
        done: list[Outcome] = []
        for step in steps:
            if self._stopping():
                return False
            if step.payload.get("poison"):
                raise WorkerCrashed(
                    f"Traceback (most recent call last): poison step {step.step_id} (entry {step.entry_id})"
                )
            if self.step_ms > 0:  # the work itself: a configurable time, interruptible by a kill
                self._killed.wait(self.step_ms / 1000.0)
            if self._stopping():
                return False
            error = self._call_llm(step.payload) if step.kind == "llm" else self._call_tool(http, step.payload)
            done.append(Outcome(step=step, error=error))
            if len(done) >= self.flush_every:
                self._flush(done)
                done = []
        if self._stopping():
            return False
        self._flush(done)
        return True

    def _flush(self, done: list[Outcome]) -> None:
        """Commit the results, then acknowledge exactly those entries (one XACK)."""
        if not done:
            return
        self.book.finished(outcomes=done)
        self.redis.xack(self.settings.stream, self.settings.group, *[o.step.entry_id for o in done])
        failed = sum(1 for o in done if o.error)
        self.failed += failed
        self.completed += len(done) - failed
        self.held -= len(done)

    def _call_llm(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        try:
            self.llm.complete(model=self.model, prompt=str(payload.get("prompt", "")))
        except ProviderError as e:
            return e.error_json()
        return None

    def _call_tool(self, http: httpx.Client, payload: dict[str, Any]) -> dict[str, Any] | None:
        tool = str(payload.get("tool") or "search")
        try:
            response = http.post(f"{self.mcp_url}/tools/call", json={"name": tool, "arguments": {}})
        except httpx.HTTPError as e:
            return {"code": "MCP_UNAVAILABLE", "tool": tool, "message": f"{type(e).__name__}: {e}"}
        if response.status_code != 200:
            detail = response.text[:200]
            return {"code": "MCP_UNAVAILABLE", "tool": tool, "message": f"HTTP {response.status_code}: {detail}"}
        return None

