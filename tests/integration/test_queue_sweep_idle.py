"""An idle `queue-sweep` is quiet: the same few Redis round trips whatever the pending list (held by busy live
workers), the backlog and the DLQ hold; no recovery event; ONE keyed report updated in place, not a new one per
run (read back through Prefect's API); and the `queue-sweep` report of the last run that acted stays as it was.
Retention runs inside the sweep only when the DLQ holds an entry over the limit, and reports what it trimmed.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis as redis_lib
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.events import emit_event
from prefect.settings import PREFECT_API_URL

import flows.queue_sweep as queue_sweep_module
from flows.queue_sweep import IDLE_KEY, queue_sweep
from tasks.outcome import ActionStatus, Outcome
from tasks.queue import index_keys
from tests.integration.queue_fixtures import add_steps, backdate, deliver, make_group
from tests.polling import wait_for

DAY_MS = 86_400_000


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Requests this process sends to Redis (one per command, one per pipeline): a client-side hook."""
    sent: Counter = Counter()
    real = redis_lib.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):  # noqa: ANN001
        sent["n"] += 1
        return real(self, command, check_health)

    monkeypatch.setattr(redis_lib.connection.AbstractConnection, "send_packed_command", counting)
    yield sent


def busy(redis: redis_lib.Redis, settings, *, pending: int, backlog: int, dlq: int, tag: str) -> None:
    """Live workers holding fresh entries, an undelivered backlog and a DLQ written by hand (recent)."""
    add_steps(redis, settings, [f"{tag}-p-{i}" for i in range(pending)])
    for w in range(5):
        deliver(redis, settings, f"w-live-{w}", pending // 5)
    add_steps(redis, settings, [f"{tag}-q-{i}" for i in range(backlog)])
    with redis.pipeline(transaction=False) as pipe:
        for i in range(dlq):
            pipe.xadd(settings.dlq_stream, {"job_id": f"{tag}-d-{i}", "error": "Max retries exceeded"})
        pipe.execute()


def idle_artifacts() -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[IDLE_KEY])))


def stored_events(resource_id: str, since: datetime) -> list[dict]:
    body = {"filter": {"resource": {"id": [resource_id]}, "occurred": {"since": since.isoformat()}}, "limit": 50}
    r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
    r.raise_for_status()
    return r.json()["events"]


def test_an_idle_sweep_is_a_few_round_trips_no_event_and_one_report_updated(active_settings, redis, round_trips, mocker):
    s = active_settings
    since = datetime.now(UTC) - timedelta(seconds=5)
    make_group(redis, s)
    busy(redis, s, pending=50, backlog=20, dlq=5, tag="small")
    events = mocker.spy(queue_sweep_module, "emit_recovery_event")
    queue_sweep(dry_run=False)  # first run: scripts loaded, indexes built
    before = idle_artifacts()

    round_trips.clear()
    small_state = queue_sweep(dry_run=False, return_state=True)
    small_trips = round_trips["n"]

    busy(redis, s, pending=5000, backlog=20_000, dlq=5000, tag="large")
    queue_sweep(dry_run=False)  # takes in what was added since (bounded steps), as every minute
    round_trips.clear()
    large_state = queue_sweep(dry_run=False, return_state=True)
    large_trips = round_trips["n"]
    small, large = small_state.result(), large_state.result()

    for out in (small, large):
        assert out.outcome is Outcome.NOTHING_TO_DO and out.actions == [] and out.idle
        assert out.sweep is not None and out.sweep.scanned == 0  # the busy workers' entries were not read
    assert large.sweep.decided == {"leave": 5050} and large.indexes.behind is False
    # O(1): one inspect, one filtered scan of the pending list, one index refresh — at any size
    assert small_trips == large_trips == 3
    # no recovery event: none emitted, none stored (a marker sent afterwards is stored, so storage caught up)
    assert events.call_count == 0
    marker = f"ferrumdeck.test.{uuid.uuid4().hex[:8]}"
    emit_event(event="ferrumdeck.test.marker", resource={"prefect.resource.id": marker})
    wait_for(lambda: stored_events(marker, since) or None, timeout=20, what="the marker event")
    assert stored_events(f"ferrumdeck.queue.{s.stream}", since) == []
    # one idle report, updated in place (same artifact, the last run's numbers), no new `queue-sweep` version
    after = idle_artifacts()
    assert len(after) == len(before) == 1 and after[0].id == before[0].id
    assert after[0].data != before[0].data and "| pending (delivered, not acked) | 5050 |" in after[0].data
    runs = [st.state_details.flow_run_id for st in (small_state, large_state)]
    with get_client(sync_client=True) as client:
        created = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs)))
    assert created == []  # the idle runs created no artifact of their own (the idle report is updated in place)


def test_the_sweep_trims_the_dlq_over_the_retention_limit_and_says_what(active_settings, redis):
    s = active_settings.model_copy(update={"dlq_max_age_days": 30, "dlq_trim_per_run": 2})
    make_group(redis, s)
    seconds, micros = redis.time()
    now = seconds * 1000 + micros // 1000
    for job, days in (("old-1", 45), ("old-2", 40), ("old-3", 35), ("kept", 20)):
        redis.xadd(s.dlq_stream, {"job_id": job, "error": "Max retries exceeded"}, id=f"{now - days * DAY_MS}-0")
    add_steps(redis, s, ["stale"])
    backdate(redis, s, "w-slow", deliver(redis, s, "w-slow", 1), idle_ms=600_000)
    from tasks.settings import use_settings

    with use_settings(s):
        first = queue_sweep(dry_run=False)
        second = queue_sweep(dry_run=False)
        third = queue_sweep(dry_run=False)

    assert first.outcome is Outcome.RECOVERED and first.retention.more  # 2 per run: bounded steps
    kinds = {a.kind: (a.status, a.count) for a in first.actions}
    assert kinds == {"requeue": (ActionStatus.DONE, 1), "trim-dlq": (ActionStatus.DONE, 2)}
    assert first.retention.job_ids == ["old-1", "old-2"]
    assert {c.target: c.ok for c in first.checks} == {"requeued": True, "dlq-retention": True}
    assert second.outcome is Outcome.RECOVERED and second.retention.job_ids == ["old-3"]
    assert not second.retention.more and third.retention is None and third.idle  # nothing over the limit now
    assert [f["job_id"] for _, f in redis.xrange(s.dlq_stream)] == ["kept"]
    assert set(redis.hgetall(index_keys(s).dlq_index)) == {"kept"}
    md = Artifact.get("queue-sweep").data
    assert "trimmed 1 (1 older than 30 days)" in md and "old-3" in md
