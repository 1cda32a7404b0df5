"""Chaos under ``fd-recovery serve``: real serve processes against a Prefect server of this module's own
(PostgreSQL), the sandbox cluster, real Redis and PostgreSQL.

- ``kill -9`` of the serve running ``worker-crash-recovery`` while it waits for the crashed pod's replacement
  (the sandbox schedules no new worker pod meanwhile): a second serve marks the dead run Crashed within the
  stated bound (FD_RUNNER_CLAIM_LEASE_S + 1.2 x FD_RUNNER_ZOMBIE_SCAN_S = 42 s, production defaults), its deployment's
  concurrency slot is free at once, and its re-run finishes the recovery: the pod replaced once, every entry
  recovered once (stream, PEL, DLQ), the poison's run failed, the crashed consumer removed, no step lost;
- SIGTERM of that serve during a rolling restart, its grace running out mid-recovery: it Crashes its own run
  and leaves the re-run to the others (a new replica here), with the same end state;
- the Prefect API restarting under serve: serve survives, picks up a run created after the restart within a
  couple of seconds, and the recovery events emitted while the API was down are delivered (outbox);
- the Kubernetes API answering 503 for 30 s as a recovery starts: its retries ride it out (a retry budget of
  FD_RETRY_DELAYS_S longer than the blip) and the recovery completes.

Every wait polls with a deadline.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.events import EventOutbox, emit_recovery_event
from tasks.settings import Settings, use_settings
from tests.e2e.conftest import PrefectServer, Serve, holder_pid, settings_env
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import (
    ReplacementConsumer,
    queue_state,
    run_status,
    seed_pending,
    worker_pods,
)
from tests.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]
env = fx.env  # the per-test settings fixture (its Redis keys, runs tables, the sandbox cluster)

DEPLOYMENT = "worker-crash-recovery"
LEASE_S, SCAN_S = Settings().runner_claim_lease_s, Settings().runner_zombie_scan_s  # production defaults
BOUND_S = LEASE_S + 1.2 * SCAN_S  # the stated bound (scans are jittered +-20%): a dead runner's run is Crashed by then
SLACK_S = 5.0  # one scan's own time on 2 busy cores


@pytest.fixture
def api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """This module's Prefect server, in force for the test's own client calls."""
    if not prefect_server.healthy():
        prefect_server.start()
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server


class Replicas:
    """The serve replicas of one test (same FD_* settings), stopped at the end."""

    def __init__(self, api: PrefectServer, settings: Settings, tmp_path, **extra: str) -> None:
        self.env = {**api.client_env(), **settings_env(settings), "PREFECT_LOGGING_LEVEL": "INFO",
                    "FD_RETRY_DELAYS_S": "[1, 2, 4]", **extra}
        self.tmp_path = tmp_path
        self.all: list[Serve] = []

    def start(self, *names: str) -> list[Serve]:
        started = [Serve(n, env=self.env, log_dir=self.tmp_path, only=[DEPLOYMENT]) for n in names]
        self.all += started
        for serve in started:
            wait_for(serve.registered, timeout=120, interval=0.25, what=f"serve {serve.name} registered")
        return started

    def by_pid(self, pid: int | None) -> Serve:
        [serve] = [s for s in self.all if s.pid == pid]
        return serve

    def stop(self) -> None:
        for serve in self.all:
            serve.stop()


@pytest.fixture
def replicas(api, env, tmp_path) -> Iterator[Replicas]:
    r = Replicas(api, env, tmp_path)
    yield r
    r.stop()


def crash_scene(cluster, redis, s):
    """Worker A crash-loops holding 5 fresh entries (one delivered 3 times: poison); worker B is healthy and
    busy with 4; every entry's run is `running`. The node then takes no new worker pod (slow scheduling)."""
    a, b, _c = worker_pods(cluster, s)
    crashed = seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=5, tag="a", redeliver={2: 2})
    busy = seed_pending(redis, s, consumer=s.consumer_for_pod(b), n=4, tag="b")
    cluster.set_schedulable(False, selector=s.worker_selector)
    cluster.crash_loop(a, exit_code=1, reason="Error", logs=["Traceback (most recent call last):", "KeyError: 'payload'"])
    wait_for(lambda: a not in worker_pods(cluster, s), what=f"{a} not Ready")
    return a, b, crashed, busy


def deletions(cluster) -> list[str]:
    """Pods deleted or evicted through the API (requests that took effect: a 503'd attempt is not a deletion)."""
    return [r.name for r in cluster.requests if r.status < 300 and (
        (r.verb == "delete" and r.resource == "pods" and not r.subresource)
        or (r.verb == "create" and r.subresource == "eviction"))]


def _read(run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _states(run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run_states(run_id)


def _start_recovery(pod: str):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{DEPLOYMENT}/{DEPLOYMENT}")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "pod": pod, "dry_run": False, "replacement_timeout_s": 120, "verify_consuming_s": 15})
    return deployment.id, run.id


def _mid_recovery(cluster, run_id, pod: str) -> int:
    """Wait until the run deleted the crashed pod and waits for its replacement; the pid of its runner."""
    wait_for(lambda: deletions(cluster) == [pod] and _read(run_id).state.is_running(), timeout=90, interval=0.1,
             what="the recovery to delete the pod and wait for its replacement")
    [pending] = [s for s in _states(run_id) if s.is_pending()]
    return holder_pid(pending.message)


def _rerun_of(run_id):
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"fd-rerun-of:{run_id}"])))
    return runs[0] if len(runs) == 1 else None


def _report(run_id) -> str:
    """The run's keyed report (what a person reads)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return artifact.data


def _slots(deployment_id) -> int:
    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id).global_concurrency_limit.active_slots


def _budget_used(s: Settings) -> int:
    from tasks.guard import pod_deletion_budget

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(pod_deletion_budget(s).name).active_slots


def assert_recovered_once(s: Settings, cluster, redis, *, a, b, crashed, busy, consumer: ReplacementConsumer):
    """The end state of a crash recovery done exactly once, whatever happened to its first run."""
    poison = crashed[2]
    requeued = [f for i, f in enumerate(crashed) if i != 2]
    # Kubernetes: A deleted once (the budget spent once), a new Ready worker in its place
    assert deletions(cluster) == [a]
    assert _budget_used(s) == 1
    wait_for(lambda: len(worker_pods(cluster, s)) == 3, timeout=30, what="three Ready workers again")
    assert a not in worker_pods(cluster, s) and b in worker_pods(cluster, s)
    # Redis: each of A's entries requeued once (one copy, attempts 1) or dead-lettered once; B's untouched
    wait_for(lambda: sorted(consumer.acked) == sorted(f["job_id"] for f in requeued), timeout=30,
             what="the replacement to process the requeued entries")
    qs = queue_state(redis, s)
    copies = Counter(fields["job_id"] for _, fields in qs["stream"] if fields.get("attempts"))
    assert copies == Counter(f["job_id"] for f in requeued) and Counter(consumer.acked) == copies
    assert [fields["job_id"] for _, fields in qs["dlq"]] == [poison["job_id"]]
    assert qs["pending"] == sorted((f["entry_id"], b, 1) for f in busy)
    assert s.consumer_for_pod(a) not in qs["consumers"]  # the crashed consumer removed
    # steps lost: none — every crashed entry is done by a worker or dead-lettered, exactly once
    done = Counter(consumer.acked) + Counter(fields["job_id"] for _, fields in qs["dlq"])
    assert done == Counter(f["job_id"] for f in crashed)
    # PostgreSQL: the poison's run failed, the requeued ones completed by the replacement, B's still B's
    status = run_status(s, [f["run_id"] for f in crashed + busy])
    assert status[poison["run_id"]] == ("failed", "WORKER_TIMEOUT")
    assert all(status[f["run_id"]] == ("completed", None) for f in requeued)
    assert all(status[f["run_id"]] == ("running", None) for f in busy)


def test_kill_9_of_the_runner_mid_recovery_is_crashed_within_the_bound_and_the_rerun_finishes_it(
        replicas, env, cluster, redis):
    s = env
    first, second = replicas.start("a", "b")
    a, b, crashed, busy = crash_scene(cluster, redis, s)
    with ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)) as consumer:
        deployment_id, run_id = _start_recovery(a)
        victim = replicas.by_pid(_mid_recovery(cluster, run_id, a))
        survivor = second if victim is first else first
        assert _slots(deployment_id) == 1  # the recovery holds its deployment's only slot (ENQUEUE)
        victim.signal(signal.SIGKILL)
        killed_at = datetime.now(UTC)
        victim.proc.wait(10)
        cluster.set_schedulable(True, selector=s.worker_selector)  # the replacement is scheduled, late

        crashed_state = wait_for(lambda: (st := _read(run_id).state).is_crashed() and st,
                                 timeout=BOUND_S + SLACK_S + 30, interval=0.2, what="the dead run Crashed")
        took = (crashed_state.timestamp - killed_at).total_seconds()
        print(f"\nkill -9 -> Crashed: {took:.1f} s (bound {BOUND_S:g} s)")
        assert took <= BOUND_S + SLACK_S
        assert "stopped renewing its claim" in crashed_state.message and str(victim.pid) in crashed_state.message
        rerun = wait_for(lambda: _rerun_of(run_id), timeout=10, what="the re-run")
        done = wait_for(lambda: (r := _read(rerun.id)).state.is_final() and r, timeout=120, interval=0.25,
                        what="the re-run to finish")
        assert done.state.is_completed(), done.state
        assert done.parameters == _read(run_id).parameters
        [pending] = [st for st in _states(rerun.id) if st.is_pending()]
        assert holder_pid(pending.message) == survivor.pid
        running = next(st for st in _states(rerun.id) if st.is_running())
        rerun_after = (running.timestamp - crashed_state.timestamp).total_seconds()
        print(f"re-run Running {rerun_after:.1f} s after the Crashed")
        assert rerun_after < 10  # the slot was free at once (not after its 300 s lease)
        assert "Outcome: recovered" in _report(rerun.id)
        assert _slots(deployment_id) == 0
        assert_recovered_once(s, cluster, redis, a=a, b=b, crashed=crashed, busy=busy, consumer=consumer)
    assert survivor.alive()


def test_sigterm_whose_grace_runs_out_mid_recovery_crashes_the_run_and_another_replica_finishes_it(
        api, env, cluster, redis, tmp_path):
    """A rolling restart: the old replica gets SIGTERM and 3 s of grace, the new one starts meanwhile."""
    s = env
    replicas = Replicas(api, s, tmp_path, FD_RUNNER_GRACE_S="3")
    try:
        [old] = replicas.start("old")
        a, b, crashed, busy = crash_scene(cluster, redis, s)
        with ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)) as consumer:
            deployment_id, run_id = _start_recovery(a)
            assert _mid_recovery(cluster, run_id, a) == old.pid
            old.signal(signal.SIGTERM)
            stopped_at = datetime.now(UTC)
            [new] = replicas.start("new")
            assert old.proc.wait(30) == 0
            cluster.set_schedulable(True, selector=s.worker_selector)

            crashed_state = _read(run_id).state
            assert crashed_state.is_crashed() and "was stopped before the flow run finished" in crashed_state.message
            assert (crashed_state.timestamp - stopped_at).total_seconds() <= 3 + SLACK_S
            rerun = wait_for(lambda: _rerun_of(run_id), timeout=10, what="the re-run")
            done = wait_for(lambda: (r := _read(rerun.id)).state.is_final() and r, timeout=120, interval=0.25,
                            what="the re-run to finish")
            assert done.state.is_completed(), done.state
            [pending] = [st for st in _states(rerun.id) if st.is_pending()]
            assert holder_pid(pending.message) == new.pid
            assert "Outcome: recovered" in _report(rerun.id)
            assert _slots(deployment_id) == 0
            assert_recovered_once(s, cluster, redis, a=a, b=b, crashed=crashed, busy=busy, consumer=consumer)
    finally:
        replicas.stop()


def _events(api: PrefectServer, resource_ids: list[str]) -> list[str]:
    body = {"filter": {"resource": {"id": resource_ids}, "event": {"prefix": ["ferrumdeck.recovery."]},
                       "occurred": {"since": "2020-01-01T00:00:00Z"}}, "limit": 50}
    response = httpx.post(f"{api.api_url}/events/filter", json=body, timeout=10)
    response.raise_for_status()
    return sorted(e["event"] for e in response.json()["events"])


def test_a_prefect_api_restart_under_serve_loses_no_event_and_delays_no_run(replicas, api, env, cluster):
    """The API goes away for ~20 s under a running serve: recovery events emitted meanwhile wait in the outbox
    and are delivered once it is back; serve survives and starts a new run ~1 s after the API answers."""
    s = env
    [serve] = replicas.start("a")
    tag = uuid.uuid4().hex[:8]
    api.stop()
    down_at = time.monotonic()
    with use_settings(s):
        for i in range(3):  # as a recovery running in some process would, while Prefect is down
            emit_recovery_event(action="pod-deleted", resource_id=f"pod.chaos-{tag}-{i}", payload={"i": i})
    outbox = EventOutbox.from_settings(s)
    assert outbox.pending() == 3
    wait_for(lambda: time.monotonic() - down_at >= 20, timeout=30, interval=0.5, what="20 s of outage")
    assert serve.alive()
    api.start()
    _, run_id = _start_recovery("no-such-pod")  # as soon as the API answers: a cheap run (nothing to recover)
    started = wait_for(lambda: next((st for st in _states(run_id) if st.is_running()), None), timeout=30,
                       interval=0.1, what="serve to start the run")
    pickup = (started.timestamp - _read(run_id).created).total_seconds()
    print(f"\nrun created right after the restart started {pickup:.2f} s after its creation")
    assert pickup < 3.0  # (Prefect's client back-off used to hold the poll ~28 s)
    wait_for(lambda: outbox.pending() == 0, timeout=20, interval=0.2, what="serve to flush the outbox")
    ids = [f"ferrumdeck.pod.chaos-{tag}-{i}" for i in range(3)]
    wait_for(lambda: _events(api, ids) == ["ferrumdeck.recovery.pod-deleted"] * 3, timeout=30, interval=0.5,
             what="the three events stored by Prefect")
    wait_for(lambda: _read(run_id).state.is_final(), timeout=60, what="the run to finish")
    assert serve.alive() and "polling resumed" in serve.log()


def test_a_kubernetes_api_503_for_30_s_is_ridden_out_by_the_retries(api, env, cluster, redis, tmp_path):
    """The API server answers 503 to everything for 30 s from the moment the recovery starts: every Kubernetes
    call retries (FD_RETRY_DELAYS_S 1, 2, 4, 8, 16, 16: 47 s, at least 37.6 s with the 20% jitter) and the
    recovery ends recovered, the pod deleted once."""
    import threading

    s = env
    replicas = Replicas(api, s, tmp_path, FD_RETRY_DELAYS_S="[1, 2, 4, 8, 16, 16]")
    try:
        replicas.start("a")
        a, b, crashed, busy = crash_scene(cluster, redis, s)
        cluster.set_schedulable(True, selector=s.worker_selector)
        with ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)) as consumer:
            cluster.fail_api(503, count=1_000_000)
            blip = threading.Timer(30, cluster.clear_faults)
            blip.start()
            blip_from = time.monotonic()
            try:
                _, run_id = _start_recovery(a)
                done = wait_for(lambda: (r := _read(run_id)).state.is_final() and r, timeout=180, interval=0.5,
                                what="the recovery to finish")
            finally:
                blip.cancel()
                cluster.clear_faults()
            assert time.monotonic() - blip_from >= 30
            assert done.state.is_completed(), done.state
            assert "Outcome: recovered" in _report(run_id)
            refused = [r for r in cluster.requests if r.status == 503]
            assert refused, "the blip hit no request"
            assert_recovered_once(s, cluster, redis, a=a, b=b, crashed=crashed, busy=busy, consumer=consumer)
    finally:
        replicas.stop()


def test_the_outbox_delivers_once_drops_what_is_too_old_and_leaves_no_key(env):
    """Against the session's Prefect server: a fresh event is delivered, one older than FD_EVENTS_MAX_AGE_S is
    dropped (not sent late), and an emptied outbox leaves no Redis key behind."""
    from datetime import timedelta

    from prefect.events import Event

    s = env.model_copy(update={"events_max_age_s": 600.0})
    outbox = EventOutbox.from_settings(s)
    tag = uuid.uuid4().hex[:8]
    fresh = Event(event="ferrumdeck.recovery.test", resource={"prefect.resource.id": f"ferrumdeck.fresh-{tag}"})
    stale = Event(event="ferrumdeck.recovery.test", resource={"prefect.resource.id": f"ferrumdeck.stale-{tag}"},
                  occurred=datetime.now(UTC) - timedelta(hours=1))
    outbox.put(stale)
    outbox.put(fresh)
    assert outbox.pending() == 2
    assert outbox.flush(min_age_ms=0) == 1
    assert outbox.pending() == 0 and not outbox.redis.exists(outbox.key)
    found = fx.recovery_events([f"ferrumdeck.fresh-{tag}", f"ferrumdeck.stale-{tag}"], want={"ferrumdeck.recovery.test"})
    [event] = found["ferrumdeck.recovery.test"]
    assert event["id"] == str(fresh.id) and event["resource"]["prefect.resource.id"] == f"ferrumdeck.fresh-{tag}"
