"""The in-process runner of ``fd-recovery serve`` against the session's Prefect test server: it picks up
deployment runs (run_deployment, schedules, event triggers), runs them with Prefect's engine in this process,
claims each run exactly once across runners (Redis claim, then Pending only if still Scheduled: a stale list
never re-runs a finished run; no claim store, no run; a dead runner's claim expires), and honours its limit.
``bench/runner_claims.py`` is the stress version (N runner processes x hundreds of runs due at once)."""

from __future__ import annotations

import ast
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
)
from prefect.deployments import run_deployment
from prefect.events import DeploymentEventTrigger, emit_event
from prefect.runtime import flow_run as current_run
from pydantic import Field

from deployments.inprocess_runner import InProcessRunner, RunClaims, start_health_server
from tasks.settings import Settings
from tests.polling import wait_for

PROJECT_ROOT = Path(__file__).resolve().parents[2]

EXECUTED: list[str] = []  # flow run ids, appended by the flows below (they run in this process)
RESULTS: dict[str, str] = {}  # flow run id -> what echo returned
GATE = threading.Event()  # the gated flow waits for it
ENTERED = threading.Semaphore(0)  # released once per gated flow that started


@flow(name="fd-test-echo")
def echo(word: Annotated[str, Field(min_length=1)], times: Annotated[int, Field(ge=1, le=5)] = 2) -> str:
    """Repeat a word and publish a report (what our flows do)."""
    EXECUTED.append(str(current_run.id))
    create_markdown_artifact(key="fd-test-echo", markdown=f"# echo {word}\n\n{word} x {times}")
    RESULTS[str(current_run.id)] = word * times
    return word * times


@flow(name="fd-test-fail")
def fail(reason: str = "broken") -> None:
    raise RuntimeError(reason)


@flow(name="fd-test-gated")
def gated() -> None:
    ENTERED.release()
    if not GATE.wait(30):
        raise TimeoutError("the test never opened the gate")


def _close_gate() -> None:
    """Gated flows wait from now on; starts counted by earlier tests are forgotten."""
    GATE.clear()
    while ENTERED.acquire(blocking=False):
        pass


def _served(suffix: str = "") -> list[tuple]:
    trigger = DeploymentEventTrigger(
        expect={"fd.test.inprocess"}, match={"prefect.resource.id": "fd.test.inprocess"},
        parameters={"word": "{{ event.payload.word }}", "times": 3},
    )
    return [
        (echo.to_deployment(name=f"echo{suffix}", triggers=[trigger]), echo),
        (fail.to_deployment(name=f"fail{suffix}"), fail),
        # the server checks parameters against the schema; this one leaves it to the engine
        (echo.to_deployment(name=f"unchecked{suffix}", enforce_parameter_schema=False), echo),
    ]


def _read(run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


@pytest.fixture(scope="module")
def runner(claim_settings: Settings) -> Iterator[InProcessRunner]:
    """One runner serving echo (with an event trigger), fail and echo without server-side parameter checks, polling in a background thread."""
    r = InProcessRunner(_served(), limit=4, poll_seconds=0.1, grace_seconds=10, settings=claim_settings)
    thread = threading.Thread(target=r.run, name="in-process-runner", daemon=True)
    thread.start()
    wait_for(lambda: len(r.deployment_ids) == 3, timeout=30, what="the deployments registered")
    yield r
    r.stop()
    thread.join(15)
    assert not thread.is_alive(), "the runner did not stop"


def _history(run_id) -> list[str]:
    """The run's state types in order, e.g. ['SCHEDULED', 'PENDING', 'RUNNING', 'COMPLETED']."""
    with get_client(sync_client=True) as client:
        return [s.type.value for s in client.read_flow_run_states(run_id)]


def test_run_deployment_completes_with_its_parameters_and_report(runner):
    run = run_deployment("fd-test-echo/echo", parameters={"word": "ab"}, timeout=30, poll_interval=0.1,
                         as_subflow=False)
    assert run.state.is_completed(), run.state
    assert run.parameters == {"word": "ab"}
    assert RESULTS[str(run.id)] == "abab"  # the flow's default times=2 filled in by the engine
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert [a.key for a in artifacts] == ["fd-test-echo"] and "ab x 2" in artifacts[0].data


def test_a_failing_run_ends_failed(runner):
    run = run_deployment("fd-test-fail/fail", parameters={"reason": "disk on fire"}, timeout=30, poll_interval=0.1,
                         as_subflow=False)
    assert run.state.is_failed(), run.state
    assert "disk on fire" in run.state.message


def test_invalid_parameters_fail_the_run_before_the_flow_body(runner):
    before = len(EXECUTED)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("fd-test-echo/unchecked")
        created = client.create_flow_run_from_deployment(deployment.id, parameters={"word": "x", "times": 99})
    run = wait_for(lambda: (r := _read(created.id)).state.is_final() and r, timeout=30, what="the run to end")
    assert run.state.is_failed() and "validation" in run.state.message.lower()
    assert len(EXECUTED) == before


def test_an_event_trigger_starts_a_run(runner):
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name("fd-test-echo/echo").id

        def triggered():
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
            return [r for r in runs if r.parameters.get("word") == "evt" and r.state.is_final()]

        def fire_and_check():  # the server loads new automations asynchronously: fire until one matches
            if found := triggered():
                return found
            emit_event(event="fd.test.inprocess", resource={"prefect.resource.id": "fd.test.inprocess"},
                       payload={"word": "evt"})
            return None

        [run, *_] = wait_for(fire_and_check, timeout=30, interval=0.5, what="a run started by the event trigger")
    assert run.state.is_completed() and run.parameters == {"word": "evt", "times": 3}
    assert RESULTS[str(run.id)] == "evtevtevt"


def test_three_runners_run_each_run_of_a_burst_exactly_once(claim_settings):
    """30 runs already due when three runners with the same deployment start at once (an alert storm)."""
    name = f"burst-{uuid.uuid4().hex[:6]}"
    runners = [InProcessRunner([(echo.to_deployment(name=name), echo)], limit=4, poll_seconds=0.1,
                               settings=claim_settings) for _ in range(3)]
    [deployment_id] = {d for r in runners for d in r.register()}
    assert len({r.identity for r in runners}) == 3
    with get_client(sync_client=True) as client:
        ids = [client.create_flow_run_from_deployment(deployment_id, parameters={"word": f"w{i}"}).id
               for i in range(30)]
    threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
    for t in threads:  # all three poll at once: every run is in every runner's first list
        t.start()
    try:
        wait_for(lambda: all(_read(i).state.is_completed() for i in ids), timeout=120, what="all 30 runs completed")
    finally:
        for r in runners:
            r.stop()
        for t in threads:
            t.join(15)
    counts = Counter(EXECUTED)
    assert [counts[str(i)] for i in ids] == [1] * 30
    with get_client(sync_client=True) as client:
        histories = [client.read_flow_run_states(i) for i in ids]
    types = [[s.type.value for s in h] for h in histories]  # (a run waiting long is also marked Late: SCHEDULED)
    assert all(t.count("PENDING") == 1 and t.count("RUNNING") == 1 and t[-1] == "COMPLETED" for t in types)
    claimers = Counter(s.message for h in histories for s in h if s.type.value == "PENDING")
    assert set(claimers) <= {f"claimed by fd-recovery serve {r.identity}" for r in runners}
    assert len(claimers) >= 2  # the burst was shared, not run by one runner alone


def test_a_runner_with_a_stale_list_does_not_rerun_a_finished_run(runner, claim_settings, monkeypatch):
    """The measured double execution: a run listed as Scheduled, completed meanwhile by another runner."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("fd-test-echo/echo")
        stale = client.create_flow_run_from_deployment(deployment.id, parameters={"word": "stale"})
        assert stale.state.is_scheduled()
        wait_for(lambda: _read(stale.id).state.is_completed(), timeout=30, what="the background runner ran it")
        late = InProcessRunner(_served(), limit=2, settings=claim_settings)
        late.register()
        monkeypatch.setattr(late, "_due_runs", lambda _client, limit: [stale])  # its list: still Scheduled
        assert late.poll_once(client) == []
        assert late._claim(client, stale) is False
    assert Counter(EXECUTED)[str(stale.id)] == 1
    assert _history(stale.id) == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    claims = RunClaims.from_settings(claim_settings)
    wait_for(lambda: claims.holder(stale.id) is None, timeout=10, what="the claim released (nothing left behind)")


def test_a_claimed_run_cannot_be_claimed_again(runner, claim_settings):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("fd-test-fail/fail")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"reason": "claimed"},
                                                     state=_scheduled_later())
        first, second = (InProcessRunner(_served(), limit=1, settings=claim_settings) for _ in range(2))
        assert first._claim(client, run) is True
        assert RunClaims.from_settings(claim_settings).holder(run.id) == first.identity
        assert _read(run.id).state.message == f"claimed by fd-recovery serve {first.identity}"
        assert second._claim(client, run) is False  # its claim is held
        first._unclaim(run.id)  # (as when its execution ends)
        assert second._claim(client, run) is False  # claim free, but the run is no longer Scheduled
        assert _history(run.id) == ["SCHEDULED", "PENDING"]
        client.set_flow_run_state(run.id, _cancelled(), force=True)


@pytest.mark.parametrize("state", ["Cancelling", "Cancelled"])
def test_a_run_cancelled_before_it_starts_is_not_claimed(runner, claim_settings, state):
    from prefect.states import Cancelled, Cancelling

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("fd-test-fail/fail")
        run = client.create_flow_run_from_deployment(deployment.id, state=_scheduled_later())
        client.set_flow_run_state(run.id, Cancelling() if state == "Cancelling" else Cancelled(), force=True)
        assert InProcessRunner(_served(), limit=1, settings=claim_settings)._claim(client, run) is False
        assert _read(run.id).state.is_cancelled()  # (a Scheduled run has nothing to cancel: straight Cancelled)
        assert "PENDING" not in _history(run.id)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_the_claim_store_no_run_is_started(claim_settings, caplog):
    suffix = uuid.uuid4().hex[:6]
    down = Settings(redis_url=f"redis://127.0.0.1:{_closed_port()}/0", state_prefix=claim_settings.state_prefix)
    blind = InProcessRunner([(echo.to_deployment(name=f"no-store-{suffix}"), echo)], limit=2, settings=down)
    [deployment_id] = blind.register()
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"word": "nostore"})
        with caplog.at_level(logging.ERROR, logger="prefect.runner.inprocess"):
            assert blind.poll_once(client) == []
            assert blind.poll_once(client) == []  # said once, not at every poll
        assert _read(run.id).state.is_scheduled() and _history(run.id) == ["SCHEDULED"]
        said = [r.getMessage() for r in caplog.records if "claim store" in r.getMessage()]
        assert len(said) == 1 and str(run.id) in said[0] and "starting no flow run" in said[0]

        blind.claims = RunClaims.from_settings(claim_settings)  # Redis is back
        assert blind.poll_once(client) == [run.id]
        wait_for(lambda: _read(run.id).state.is_completed(), timeout=30, what="the run to complete")
    assert Counter(EXECUTED)[str(run.id)] == 1


def test_a_dead_runners_claim_expires_or_is_released_and_another_runner_runs_the_run(claim_settings):
    """A runner that died after claiming (before Pending): its lease runs out; the zombie handling may free it
    sooner with ``release(owner=holder)``."""
    suffix = uuid.uuid4().hex[:6]
    live = InProcessRunner([(echo.to_deployment(name=f"heir-{suffix}"), echo)], limit=2, poll_seconds=0.1,
                           settings=claim_settings)
    [deployment_id] = live.register()
    dead = RunClaims.from_settings(claim_settings, owner="dead-host:1:deadbeef", lease_s=3)
    with get_client(sync_client=True) as client:
        expiring, released = (client.create_flow_run_from_deployment(deployment_id, parameters={"word": w}).id
                              for w in ("exp", "rel"))
        assert dead.acquire(expiring) and dead.acquire(released)
        assert live.poll_once(client) == []  # both held by the dead runner
        assert live.claims.holder(released) == "dead-host:1:deadbeef"
        assert live.claims.release(released) is False  # not ours to release...
        assert live.claims.release(released, owner=live.claims.holder(released)) is True  # ...unless named
        assert live.poll_once(client) == [released]
        t0 = time.monotonic()
        wait_for(lambda: live.poll_once(client) == [expiring], timeout=10, interval=0.1, what="the lease to expire")
        assert time.monotonic() - t0 < 5
        wait_for(lambda: all(_read(i).state.is_completed() for i in (expiring, released)), timeout=30,
                 what="both runs completed")
    assert Counter(EXECUTED)[str(expiring)] == 1 and Counter(EXECUTED)[str(released)] == 1


def test_a_runner_keeps_its_claim_while_the_run_lasts_longer_than_the_lease(claim_settings):
    suffix = uuid.uuid4().hex[:6]
    claims = RunClaims.from_settings(claim_settings, lease_s=2.0)
    keeper = InProcessRunner([(gated.to_deployment(name=f"lease-{suffix}"), gated)], limit=1, claims=claims)
    [deployment_id] = keeper.register()
    _close_gate()
    try:
        with get_client(sync_client=True) as client:
            run_id = client.create_flow_run_from_deployment(deployment_id).id
            assert keeper.poll_once(client) == [run_id]
            assert ENTERED.acquire(timeout=20), "the gated flow did not start"
            t0 = time.monotonic()
            wait_for(lambda: time.monotonic() - t0 > 5, timeout=10, what="2.5 leases")
            assert claims.holder(run_id) == keeper.identity  # renewed, not expired
    finally:
        GATE.set()
    wait_for(lambda: _read(run_id).state.is_completed(), timeout=20, what="the run to complete")
    wait_for(lambda: claims.holder(run_id) is None, timeout=5, what="the claim released")


def test_the_runner_uses_only_public_prefect_api():
    """Private Prefect modules/names (a ``_`` component) may move in any release: none in the project's code."""
    private = []
    for path in sorted(PROJECT_ROOT.glob("*/**/*.py")):
        if path.relative_to(PROJECT_ROOT).parts[0] not in {"flows", "tasks", "deployments", "sandbox", "bench"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "prefect":
                names = [*node.module.split("."), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [part for a in node.names if a.name.split(".")[0] == "prefect" for part in a.name.split(".")]
            else:
                continue
            if any(n.startswith("_") and not n.startswith("__") for n in names):
                private.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}: {'.'.join(names)}")
    assert private == [], "private Prefect API used:\n" + "\n".join(private)


def test_the_limit_is_honoured(claim_settings):
    """Driven poll by poll (no background loop): with limit 2, four due runs start two at a time."""
    suffix = uuid.uuid4().hex[:6]
    limited = InProcessRunner([(gated.to_deployment(name=f"gated-{suffix}"), gated)], limit=2, poll_seconds=0.1,
                              settings=claim_settings)
    [deployment_id] = limited.register()
    _close_gate()
    with get_client(sync_client=True) as client:
        ids = [client.create_flow_run_from_deployment(deployment_id).id for _ in range(4)]
        first = limited.poll_once(client)
        assert len(first) == 2
        for _ in first:
            assert ENTERED.acquire(timeout=20), "a gated flow did not start"
        assert limited.poll_once(client) == []  # full: nothing more claimed
        waiting = [i for i in ids if i not in first]
        assert all(_read(i).state.is_scheduled() for i in waiting)
        assert all(_read(i).state.is_running() for i in first)
        GATE.set()
        wait_for(lambda: not limited.running(), timeout=20, what="the first two runs to finish")
        second = limited.poll_once(client)
        assert sorted(second) == sorted(waiting)
        wait_for(lambda: not limited.running(), timeout=20, what="the last two runs to finish")
    assert all(_read(i).state.is_completed() for i in ids)


def test_health_fails_once_polling_stops(claim_settings):
    """The Kubernetes probes of runner.yaml read GET /health, as from Prefect's runner webserver."""
    idle = InProcessRunner(_served(), limit=1, settings=claim_settings)  # not polling: the test sets when it last polled
    server = start_health_server(idle, host="127.0.0.1", port=0, threshold_s=30)
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    try:
        assert httpx.get(url).status_code == 200  # just started: within the threshold
        idle.last_polled = time.monotonic() - 60  # the last successful poll a minute ago
        response = httpx.get(url)
        assert response.status_code == 503 and "unresponsive" in response.text
        idle.last_polled = time.monotonic()
        assert httpx.get(url).status_code == 200
        assert httpx.get(url.replace("/health", "/other")).status_code == 404
        metrics = httpx.get(url.replace("/health", "/metrics"))  # our own metrics, on the probes' port
        assert metrics.status_code == 200 and "ferrumdeck_recovery_" in metrics.text
    finally:
        server.shutdown()


def test_stop_lets_running_flows_finish_and_a_second_stop_reports_them_crashed(claim_settings):
    suffix = uuid.uuid4().hex[:6]
    r = InProcessRunner([(gated.to_deployment(name=f"drain-{suffix}"), gated)], limit=2, poll_seconds=0.1,
                        grace_seconds=30, settings=claim_settings)
    r2: InProcessRunner | None = None
    _close_gate()
    thread = threading.Thread(target=r.run, daemon=True)
    thread.start()
    try:
        [deployment_id] = wait_for(lambda: r.deployment_ids, timeout=30, what="the deployment registered")
        with get_client(sync_client=True) as client:
            finishing = client.create_flow_run_from_deployment(deployment_id).id
            assert ENTERED.acquire(timeout=20), "the gated flow did not start"
            r.stop()  # first stop: no new runs, the running one may finish
            late = client.create_flow_run_from_deployment(deployment_id).id
            assert thread.is_alive() and r.running() == [finishing]
            GATE.set()
            thread.join(20)
            assert not thread.is_alive()
            assert _read(finishing).state.is_completed()
            assert _read(late).state.is_scheduled()  # left for the next serve process
            client.set_flow_run_state(late, _cancelled(), force=True)

            _close_gate()
            r2 = InProcessRunner(r._served, limit=1, poll_seconds=0.1, grace_seconds=30, settings=claim_settings)
            thread = threading.Thread(target=r2.run, daemon=True)
            thread.start()
            stuck = client.create_flow_run_from_deployment(deployment_id).id
            assert ENTERED.acquire(timeout=30), "the gated flow did not start"
            r2.stop()
            r2.stop()  # second stop: do not wait for it
            thread.join(10)
            assert not thread.is_alive()
            crashed = _read(stuck).state
            assert crashed.is_crashed() and "was stopped before the flow run finished" in crashed.message
            [rerun] = _reruns_of(client, stuck)  # left for another runner
            assert rerun.state.is_scheduled() and "fd-rerun-depth:1" in rerun.tags
            assert RunClaims.from_settings(claim_settings).holder(stuck) is None
            client.set_flow_run_state(rerun.id, _cancelled(), force=True)
    finally:
        GATE.set()
        wait_for(lambda: not r.running() and not (r2 and r2.running()), timeout=20, what="the flows to end")


def _scheduled_later():
    from datetime import UTC, datetime, timedelta

    from prefect.states import Scheduled

    return Scheduled(scheduled_time=datetime.now(UTC) + timedelta(hours=1))


def _cancelled():
    from prefect.states import Cancelled

    return Cancelled(message="test cleanup")


# --------------------------------------------------------------------------------------- zombie runs

DEAD = "dead-host:1:deadbeef"


def _zombie(client, deployment_id, *, holder: str | None = DEAD, tags=(), parameters=None, message=None):
    """A run as a runner that died leaves it: claimed (Pending with the runner's claim message), Running (holding
    the deployment's concurrency slot), its claim gone (the lease lapsed)."""
    from prefect.states import Pending, Running

    run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters or {"word": "zz"},
                                                 tags=list(tags))
    client.set_flow_run_state(run.id, Pending(message=message or f"claimed by fd-recovery serve {holder}"))
    assert client.set_flow_run_state(run.id, Running()).state.is_running()
    return client.read_flow_run(run.id)


def _slots(client, deployment_id) -> int:
    return client.read_deployment(deployment_id).global_concurrency_limit.active_slots


def _reruns_of(client, run_id):
    from prefect.client.schemas.filters import FlowRunFilterTags

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"fd-rerun-of:{run_id}"])))


def test_a_zombie_run_is_crashed_once_its_slot_released_and_rerun_with_its_parameters(claim_settings):
    """Two live runners scan: the dead runner's Running run is Crashed by exactly one of them, the deployment's
    concurrency slot (limit 1) is free at once, and one new run of the deployment carries the same parameters."""
    suffix = uuid.uuid4().hex[:6]
    served = [(echo.to_deployment(name=f"zombie-{suffix}", concurrency_limit=1), echo)]
    first, second = (InProcessRunner(served, limit=1, settings=claim_settings) for _ in range(2))
    [deployment_id] = first.register()
    second.register()
    with get_client(sync_client=True) as client:
        zombie = _zombie(client, deployment_id, parameters={"word": "again", "times": 1})
        assert zombie.state.state_details.deployment_concurrency_lease_id is not None
        assert _slots(client, deployment_id) == 1  # the dead run holds the only slot
        assert [r.id for r in first.find_zombies(client)] == [zombie.id]
        reaped = first.reap_zombies(client) + second.reap_zombies(client)
        assert [(r.flow_run_id, r.was, r.now) for r in reaped] == [(zombie.id, "Running", "Crashed")]
        assert _slots(client, deployment_id) == 0  # released by the Crashed transition, not 300 s later
        crashed = client.read_flow_run(zombie.id).state
        assert crashed.is_crashed() and DEAD in crashed.message and "stopped renewing its claim" in crashed.message
        [rerun] = _reruns_of(client, zombie.id)
        assert rerun.id == reaped[0].rerun_id and rerun.state.is_scheduled()
        assert rerun.parameters == {"word": "again", "times": 1} and "fd-rerun-depth:1" in rerun.tags
        assert first.reap_zombies(client) == [] and second.reap_zombies(client) == []  # nothing twice
        assert first.poll_once(client) == [rerun.id]
    wait_for(lambda: _read(rerun.id).state.is_completed(), timeout=30, what="the re-run to complete")
    assert Counter(EXECUTED)[str(rerun.id)] == 1 and RESULTS[str(rerun.id)] == "again"
    assert RunClaims.from_settings(claim_settings).holder(zombie.id) is None  # the reaper's claim released


def test_runs_with_a_live_claim_or_another_runner_are_not_zombies(claim_settings):
    suffix = uuid.uuid4().hex[:6]
    reaper = InProcessRunner([(echo.to_deployment(name=f"alive-{suffix}"), echo)], limit=1, settings=claim_settings)
    [deployment_id] = reaper.register()
    alive = RunClaims.from_settings(claim_settings, owner="alive-host:2:cafe")
    with get_client(sync_client=True) as client:
        held = _zombie(client, deployment_id, holder=alive.owner)
        assert alive.acquire(held.id)  # its runner renews its claim: alive
        foreign = _zombie(client, deployment_id, message="a Prefect worker's Pending")  # not a serve claim
        assert reaper.find_zombies(client) == [] and reaper.reap_zombies(client) == []
        assert _read(held.id).state.is_running() and _read(foreign.id).state.is_running()
        alive.release(held.id)  # its runner died: the lease lapsed
        assert [r.flow_run_id for r in reaper.reap_zombies(client)] == [held.id]
        assert _read(foreign.id).state.is_running()
        for run_id in (held.id, foreign.id, *(r.id for r in _reruns_of(client, held.id))):
            client.set_flow_run_state(run_id, _cancelled(), force=True)


def test_a_zombie_rerun_too_often_is_only_crashed_and_a_cancelling_one_is_cancelled(claim_settings):
    suffix = uuid.uuid4().hex[:6]
    reaper = InProcessRunner([(echo.to_deployment(name=f"loop-{suffix}"), echo)], limit=1, settings=claim_settings)
    [deployment_id] = reaper.register()
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        looping = _zombie(client, deployment_id, tags=["fd-rerun", "fd-rerun-depth:2"])  # FD_RUNNER_MAX_RERUNS = 2
        cancelling = _zombie(client, deployment_id)
        client.set_flow_run_state(cancelling.id, Cancelling())
        reaped = {r.flow_run_id: r for r in reaper.reap_zombies(client)}
        assert set(reaped) == {looping.id, cancelling.id}
        assert reaped[looping.id].now == "Crashed" and reaped[looping.id].rerun_id is None
        assert reaped[cancelling.id].now == "Cancelled" and reaped[cancelling.id].rerun_id is None
        assert _read(cancelling.id).state.is_cancelled()
        assert _reruns_of(client, looping.id) == [] and _reruns_of(client, cancelling.id) == []


def test_a_runner_cut_off_from_redis_for_a_lease_has_its_run_crashed_and_rerun(claim_settings):
    """Alive but unable to renew its claim for a whole lease (Redis unreachable from it, process frozen): another
    runner Crashes and re-runs the run. Prefect still accepts the first runner's late Completed (Crashed is not
    final to its rules), so this case relies on the flows' guard: a runner cut off from Redis cannot take the
    cooldown any destructive action needs, and a rerun that acted first holds it."""
    suffix = uuid.uuid4().hex[:6]
    claims = RunClaims.from_settings(claim_settings, lease_s=3)
    cut_off = InProcessRunner([(gated.to_deployment(name=f"cutoff-{suffix}"), gated)], limit=1, claims=claims)
    [deployment_id] = cut_off.register()
    reaper = InProcessRunner(cut_off._served, limit=1, settings=claim_settings)
    reaper.register()
    _close_gate()
    try:
        with get_client(sync_client=True) as client:
            run_id = client.create_flow_run_from_deployment(deployment_id).id
            assert cut_off.poll_once(client) == [run_id]
            assert ENTERED.acquire(timeout=20), "the gated flow did not start"
            assert reaper.reap_zombies(client) == []  # its claim is renewed: alive
            cut_off._keeper_stop.set()  # its renewals stop (as when Redis is unreachable from it)
            wait_for(lambda: claims.holder(run_id) is None, timeout=10, what="the lease to lapse")
            [reaped] = reaper.reap_zombies(client)
            assert reaped.flow_run_id == run_id and reaped.rerun_id is not None
            client.set_flow_run_state(reaped.rerun_id, _cancelled(), force=True)
    finally:
        GATE.set()
    wait_for(lambda: not cut_off.running(), timeout=20, what="the cut-off flow to end")
    assert _history(run_id)[-3:] == ["RUNNING", "CRASHED", "COMPLETED"]
