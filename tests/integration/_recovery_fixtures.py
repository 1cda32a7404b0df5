"""Fixtures and fault set-ups shared by the crash / hang / post-recovery / triage integration tests.

Each test gets: the sandbox cluster (reset to 3 Ready worker pods), its own Redis keys, its own runs/steps
tables in the session's PostgreSQL database, and an empty pod-deletion budget. Faults are set up directly
in the cluster, Redis and PostgreSQL, so the end state can be asserted exactly.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis as redis_lib
from pydantic import SecretStr

from tasks import runs
from tasks.guard import pod_deletion_budget
from tasks.settings import Settings, use_settings
from tests.integration import runs_fixtures as rf_worker
from tests.polling import wait_for


def worker_pods(cluster, settings: Settings, *, ready_only: bool = True) -> list[str]:
    pods = cluster.pods(namespace=settings.namespace, selector=settings.worker_selector)
    out = []
    for p in pods:
        if p["metadata"].get("deletionTimestamp"):
            continue
        statuses = (p.get("status") or {}).get("containerStatuses") or []
        ready = bool(statuses) and all(c.get("ready") for c in statuses)
        if ready or not ready_only:
            out.append(p["metadata"]["name"])
    return sorted(out)


def wait_for_workers(cluster, settings: Settings, n: int, timeout: float = 15.0) -> list[str]:
    cluster.wait_until(lambda: len(worker_pods(cluster, settings)) >= n, timeout=timeout)
    return worker_pods(cluster, settings)


def reset_budget(settings: Settings) -> None:
    """Drop the pod-deletion budget's limit so each test starts with a full budget of its own size."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(pod_deletion_budget(settings).name)


@pytest.fixture
def env(settings: Settings, cluster, pg_database_url: str) -> Iterator[Settings]:
    """Settings for one test: its Redis keys, the sandbox cluster, its own runs tables; put in force for flows."""
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={
        "kubeconfig": str(cluster.kubeconfig),
        "database_url": SecretStr(pg_database_url),
        "runs_table": f"runs_{tag}",
        "steps_table": f"steps_{tag}",
        "min_healthy_workers": 1,
        "pod_deletions_per_hour": 3,
        "replacement_timeout_s": 20.0,
        "alerting_check": "none",
    })
    runs.create_schema(settings=s)
    client = redis_lib.Redis.from_url(s.redis_url.get_secret_value(), decode_responses=True)
    client.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    client.close()
    reset_budget(s)
    wait_for_workers(cluster, s, 3)
    try:
        with use_settings(s):
            yield s
    finally:
        reset_budget(s)
        runs.drop_schema(settings=s)


def seed_pending(
    client: redis_lib.Redis, settings: Settings, *, consumer: str, n: int, tag: str, redeliver: dict[int, int] | None = None,
    run_started: datetime | None = None,
) -> list[dict[str, str]]:
    """XADD ``n`` steps (each its own running run in the DB), deliver them all to ``consumer`` (XREADGROUP);
    ``redeliver`` {index: extra deliveries} bumps an entry's delivery count (XCLAIM to the same consumer)."""
    steps = []
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            fields = {"job_id": f"step_{tag}_{i}", "run_id": f"run_{tag}_{i}", "step_id": f"step_{tag}_{i}"}
            steps.append(fields)
            pipe.xadd(settings.stream, fields)
        ids = pipe.execute()
    for fields, entry_id in zip(steps, ids, strict=True):
        fields["entry_id"] = entry_id
    got = client.xreadgroup(settings.group, consumer, {settings.stream: ">"}, count=n)
    assert sum(len(batch) for _, batch in got) == n
    for index, extra in (redeliver or {}).items():
        for _ in range(extra):
            client.xclaim(settings.stream, settings.group, consumer, 0, [ids[index]])
    started = run_started or datetime.now(UTC) - timedelta(minutes=1)
    for fields in steps:
        rf_worker.record_step_running(settings=settings, run_id=fields["run_id"], step_id=fields["step_id"], kind="llm",
                                 now=started)
    return steps


def run_status(settings: Settings, run_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    rows = runs.read_runs(settings=settings, run_ids=run_ids)
    return {rid: (r.status, (r.error or {}).get("code")) for rid, r in rows.items()}


def queue_state(client: redis_lib.Redis, settings: Settings) -> dict:
    """Everything a recovery could change in Redis, for byte-for-byte comparisons."""
    pending = client.xpending_range(settings.stream, settings.group, min="-", max="+", count=10_000)
    return {
        "stream": client.xrange(settings.stream),
        "dlq": client.xrange(settings.dlq_stream) if client.exists(settings.dlq_stream) else [],
        "pending": sorted((p["message_id"], p["consumer"], p["times_delivered"]) for p in pending),
        "consumers": sorted(c["name"] for c in client.xinfo_consumers(settings.stream, settings.group)),
    }


def report_of(state, key: str) -> str:
    """The keyed markdown report a flow run published (every run publishes one, failed runs too)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(artifacts) == 1, f"expected one `{key}` report for this flow run, found {len(artifacts)}"
    return artifacts[0].data


def result_of(state):
    """The typed result a flow run returned, whether it ended Completed or Failed."""
    return state.result(raise_on_failure=False)


def cooldowns(client: redis_lib.Redis, settings: Settings) -> list[str]:
    """Cooldown keys the guard holds (an action that took effect holds one; a failed one gave it back)."""
    return sorted(client.scan_iter(match=f"{settings.state_prefix}:cooldown:*"))


def deletions(cluster) -> list[str]:
    """Names of pods deleted or evicted through the API (recorded requests)."""
    return [r.name for r in cluster.requests
            if (r.verb == "delete" and r.resource == "pods" and not r.subresource)
            or (r.verb == "create" and r.subresource == "eviction")]


class ReplacementConsumer:
    """Plays the FerrumDeck workers of NEW pods: reads `>` as each new Ready pod's consumer, completes each step
    (its run too, if still running) in the runs database, then ACKs — a worker's order, so a step is never
    acknowledged while still unfinished in the database."""

    def __init__(self, cluster, settings: Settings, *, known: list[str]):
        self.cluster, self.settings, self.known = cluster, settings, set(known)
        self.client = redis_lib.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
        self.acked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReplacementConsumer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            new = [p for p in worker_pods(self.cluster, self.settings) if p not in self.known]
            for pod in new:
                got = self.client.xreadgroup(self.settings.group, self.settings.consumer_for_pod(pod),
                                             {self.settings.stream: ">"}, count=100)
                for _, batch in got:
                    for _, fields in batch:
                        rf_worker.record_step_finished(settings=self.settings, run_id=fields.get("run_id", ""),
                                                  step_id=fields.get("step_id", ""))
                    if batch:
                        self.client.xack(self.settings.stream, self.settings.group, *[i for i, _ in batch])
                        self.acked += [f.get("job_id", "") for _, f in batch]
            self._stop.wait(0.05)  # poll


class Producer:
    """Adds a step to the stream every ``every_s`` seconds, so the lag grows while nobody reads."""

    def __init__(self, settings: Settings, *, every_s: float = 0.03):
        self.settings, self.every_s = settings, every_s
        self.client = redis_lib.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.added = 0

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.client.xadd(self.settings.stream, {"job_id": f"bg_{self.added}", "run_id": f"bg_{self.added}",
                                                    "step_id": f"bg_{self.added}"})
            self.added += 1
            self._stop.wait(self.every_s)  # poll



def recovery_events(resource_ids: list[str], *, want: set[str], timeout: float = 20.0) -> dict[str, list[dict]]:
    """``ferrumdeck.recovery.*`` events Prefect stored about these resources, once every wanted name arrived
    (storage is flushed every few seconds, so poll with a deadline)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"resource": {"id": resource_ids}, "event": {"prefix": ["ferrumdeck.recovery."]},
                       "order": "ASC"}, "limit": 50}

    def fetch() -> dict[str, list[dict]] | None:
        r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        r.raise_for_status()
        found: dict[str, list[dict]] = {}
        for e in r.json()["events"]:
            found.setdefault(e["event"], []).append(e)
        return found if want <= set(found) else None

    return wait_for(fetch, timeout=timeout, what=f"events {sorted(want)}")
