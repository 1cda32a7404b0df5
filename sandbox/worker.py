"""One simulated FerrumDeck worker: the loop of a single worker pod, run as a thread.

The pod's name is its Redis consumer name. The loop reads a batch with ``XREADGROUP >`` (COUNT ``batch``) and
works through it entry by entry: mark the step and its run running in the runs database (``tasks.runs``),
do the step — an ``llm`` step "calls" the pod's ``LITELLM_MODEL`` (``sandbox.llm``, in-process), a ``tool``
step calls an MCP tool over HTTP (``sandbox.mcp``) —, mark step and run completed, ``XACK``. A provider outage fails the step with
``{"code": "LLM_PROVIDER_ERROR", "model", "provider"}`` and an unreachable MCP with ``MCP_UNAVAILABLE``; a
failed step is still acknowledged (its failure is recorded where the recovery flows read it).

Faults behave like the real thing: ``kill()`` stops the loop at once without acknowledging anything, so the
rest of the batch stays in the pending list under the pod's consumer name, like a killed process; ``hang()``
stops processing but keeps the entries (a deadlock); an entry whose payload says ``"poison": true`` makes the
worker die while holding it (``on_crash`` is told, and the pool makes the pod crash-loop).
Threads, not processes: dozens of workers cost a few MB and no fork on a 2-core machine; the Redis, database
and HTTP traffic they produce is the same as separate processes would.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
import redis

from sandbox.llm import LLMProviders, ProviderError
from tasks.runs import record_step_finished, record_step_running
from tasks.settings import Settings

log = logging.getLogger("sandbox.worker")

# Step kinds (payload ``kind``): "llm" calls the pod's model, "tool" calls an MCP tool (the runbook tells them apart:
# an MCP outage fails tool steps while LLM steps still work). Only "llm" steps count in the failover's numbers.
KINDS = ("llm", "tool")


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
        idle_poll_s: float = 0.05,
        on_crash: Callable[[str, str], None] | None = None,
    ) -> None:
        self.pod = pod
        self.consumer = settings.consumer_for_pod(pod)
        self.model = model
        self.settings = settings
        self.redis = redis_client
        self.llm = llm
        self.mcp_url = mcp_url.rstrip("/")
        self.step_ms = step_ms
        self.batch = batch
        self.idle_poll_s = idle_poll_s
        self.on_crash = on_crash
        self._killed = threading.Event()
        self._hung = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"worker-{pod}", daemon=True)
        self.state = "new"  # new | running | hung | killed | crashed | error
        self.held = 0  # entries read and not yet acknowledged (the in-flight batch)
        self.completed = 0
        self.failed = 0
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
                    reply = self.redis.xreadgroup(s.group, self.consumer, {s.stream: ">"}, count=self.batch)
                    entries = reply[0][1] if reply else []
                    if not entries:
                        self._killed.wait(self.idle_poll_s)
                        continue
                    self.held = len(entries)
                    for entry_id, fields in entries:
                        if self._stopping() or not self._process(http, entry_id, fields):
                            return
                        self.held -= 1
        except WorkerCrashed as e:
            self.state = "crashed"
            self.last_error = str(e)
            if self.on_crash is not None:
                self.on_crash(self.pod, str(e))
            return
        except Exception as e:  # a real worker process would die too; keep the cause for the pool
            self.state = "error"
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("worker %s died", self.pod)
            return
        finally:
            if self.state in ("running", "hung"):
                self.state = "killed"

    def _process(self, http: httpx.Client, entry_id: str, fields: dict[str, str]) -> bool:
        """Work one entry to its acknowledgement; False when a kill/hang interrupted it (not acknowledged)."""
        payload = parse_payload(fields)
        kind = payload.get("kind") if payload.get("kind") in KINDS else "llm"
        run_id, step_id = fields.get("run_id", ""), fields.get("step_id") or fields.get("job_id", "")
        model = self.model if kind == "llm" else None
        record_step_running(settings=self.settings, run_id=run_id, step_id=step_id, kind=kind, model=model)
        if payload.get("poison"):
            raise WorkerCrashed(f"Traceback (most recent call last): poison step {step_id} (entry {entry_id})")
        # the work itself: a configurable amount of time, interruptible by a kill
        if self.step_ms > 0:
            self._killed.wait(self.step_ms / 1000.0)
        if self._stopping():
            return False
        error = self._call_llm(payload) if kind == "llm" else self._call_tool(http, payload)
        if self._stopping():
            return False  # killed/hung mid-step: not recorded, not acknowledged
        status = "completed" if error is None else "failed"
        record_step_finished(settings=self.settings, run_id=run_id, step_id=step_id, status=status, error=error)
        if error is None:
            self.completed += 1
        else:
            self.failed += 1
        self.redis.xack(self.settings.stream, self.settings.group, entry_id)
        return True

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

