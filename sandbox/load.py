"""Load for the sandbox: runs and steps created in the runs database and enqueued on the step stream.

``enqueue_steps`` is the set-based primitive (one multi-row INSERT per table and one pipelined XADD batch per
1 000 steps); ``LoadGenerator`` calls it a few times a second for a steady rate (every 4th step a ``tool``
step by default); ``backlog(n)`` on the services object calls it once for a burst. One step per run, so a run
completes (or fails) with its step.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tasks.runs import tables
from tasks.settings import Settings

CHUNK = 1_000


@dataclass(frozen=True)
class EnqueuedStep:
    run_id: str
    step_id: str
    entry_id: str


def _ids(n: int) -> Iterator[str]:
    for _ in range(n):
        yield uuid.uuid4().hex[:16]


def enqueue_steps(
    *,
    settings: Settings,
    redis_client: redis.Redis,
    engine: Engine,
    n: int,
    payload: dict[str, Any] | None = None,
    tool_every: int = 0,
    first_index: int = 0,
    agent_version_id: str = "agv_sandbox",
) -> list[EnqueuedStep]:
    """Create ``n`` queued runs of one step each, then XADD the steps; returns what was added.

    Steps are ``llm`` steps unless ``payload`` says otherwise; with ``tool_every`` k > 0, every k-th is a
    ``tool`` step (an MCP call), counting from ``first_index`` so a steady load of small batches still
    mixes them in. Rows first, then the stream, so a worker never meets a step without rows.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if tool_every < 0:
        raise ValueError("tool_every must be >= 0")
    t = tables(settings)
    base = dict(payload or {})
    out: list[EnqueuedStep] = []
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        rows: list[tuple[str, str, str]] = []  # run_id, step_id, payload text
        for i, suffix in enumerate(_ids(size)):
            body = dict(base)
            if tool_every and (first_index + start + i) % tool_every == tool_every - 1:
                body["kind"] = "tool"
            body.setdefault("kind", "llm")
            rows.append((f"run_{suffix}", f"step_{suffix}", json.dumps(body, separators=(",", ":"))))
        with engine.begin() as conn:
            conn.execute(
                sa.insert(t.runs),
                [{"id": r, "status": "queued", "agent_version_id": agent_version_id} for r, _, _ in rows],
            )
            conn.execute(
                sa.insert(t.steps),
                [
                    {"id": s, "run_id": r, "status": "queued", "kind": json.loads(p)["kind"], "attempts": 0}
                    for r, s, p in rows
                ],
            )
        pipe = redis_client.pipeline(transaction=False)
        for r, s, p in rows:
            pipe.xadd(settings.stream, {"job_id": s, "run_id": r, "step_id": s, "payload": p})
        entry_ids = pipe.execute()
        out.extend(EnqueuedStep(run_id=r, step_id=s, entry_id=e) for (r, s, _), e in zip(rows, entry_ids, strict=True))
    return out


class LoadGenerator:
    """A steady rate of new runs, enqueued a few times a second from a daemon thread until ``stop()``."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis_client: redis.Redis,
        engine: Engine,
        rate_per_s: float,
        tick_s: float = 0.2,
        payload: dict[str, Any] | None = None,
        tool_every: int = 4,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        self.settings, self.redis, self.engine = settings, redis_client, engine
        self.rate_per_s, self.tick_s, self.payload, self.tool_every = rate_per_s, tick_s, payload, tool_every
        self.created = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandbox-load", daemon=True)

    def start(self) -> LoadGenerator:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        owed, last = 0.0, time.monotonic()
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            owed += (now - last) * self.rate_per_s
            last = now
            n = int(owed)
            if n < 1:
                continue
            owed -= n
            try:
                enqueue_steps(
                    settings=self.settings,
                    redis_client=self.redis,
                    engine=self.engine,
                    n=n,
                    payload=self.payload,
                    tool_every=self.tool_every,
                    first_index=self.created,
                )
                self.created += n
            except Exception as e:  # keep generating: a sandbox database hiccup must not end the demo's load
                self.last_error = f"{type(e).__name__}: {e}"
