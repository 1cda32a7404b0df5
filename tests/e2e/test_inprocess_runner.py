"""The in-process runner of ``fd-recovery serve`` against the session's Prefect test server: it picks up
deployment runs (run_deployment, schedules, event triggers), runs them with Prefect's engine in this process,
claims each run exactly once across runners, and honours its limit."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Annotated

import httpx
import pytest
from prefect import flow
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

from deployments.inprocess_runner import InProcessRunner, start_health_server
from tasks.report import Report
from tests.polling import wait_for

EXECUTED: list[str] = []  # flow run ids, appended by the flows below (they run in this process)
RESULTS: dict[str, str] = {}  # flow run id -> what echo returned
GATE = threading.Event()  # the gated flow waits for it
ENTERED = threading.Semaphore(0)  # released once per gated flow that started


@flow(name="fd-test-echo")
def echo(word: Annotated[str, Field(min_length=1)], times: Annotated[int, Field(ge=1, le=5)] = 2) -> str:
    """Repeat a word and publish a report (what our flows do)."""
    EXECUTED.append(str(current_run.id))
    report = Report(title=f"echo {word}")
    report.add("Done", f"{word} x {times}")
    report.publish(key="fd-test-echo")
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
def runner() -> Iterator[InProcessRunner]:
    """One runner serving echo (with an event trigger), fail and echo without server-side parameter checks, polling in a background thread."""
    r = InProcessRunner(_served(), limit=4, poll_seconds=0.1, grace_seconds=10)
    thread = threading.Thread(target=r.run, name="in-process-runner", daemon=True)
    thread.start()
    wait_for(lambda: len(r.deployment_ids) == 3, timeout=30, what="the deployments registered")
    yield r
    r.stop()
    thread.join(15)
    assert not thread.is_alive(), "the runner did not stop"


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


def test_two_runners_never_run_the_same_flow_run_twice(runner):
    second = InProcessRunner(_served(), limit=4, poll_seconds=0.1)  # the same deployments: same ids
    thread = threading.Thread(target=second.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(second.deployment_ids) == 3, timeout=30, what="the second runner registered")
        assert set(second.deployment_ids) == set(runner.deployment_ids)
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("fd-test-echo/echo")
            ids = [client.create_flow_run_from_deployment(deployment.id, parameters={"word": f"w{i}"}).id
                   for i in range(12)]
        wait_for(lambda: all(_read(i).state.is_completed() for i in ids), timeout=40, what="all 12 runs completed")
    finally:
        second.stop()
        thread.join(15)
    counts = Counter(EXECUTED)
    assert [counts[str(i)] for i in ids] == [1] * 12


def test_a_claimed_run_cannot_be_claimed_again(runner):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("fd-test-fail/fail")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"reason": "claimed"},
                                                     state=_scheduled_later())
        other = InProcessRunner(_served(), limit=1)
        assert other._claim(client, run) is True
        assert other._claim(client, run) is False  # Pending -> Pending is rejected: someone has it
        client.set_flow_run_state(run.id, _cancelled(), force=True)


@pytest.mark.parametrize("state", ["Cancelling", "Cancelled"])
def test_a_run_cancelled_before_it_starts_is_not_claimed(runner, state):
    from prefect.states import Cancelled, Cancelling

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("fd-test-fail/fail")
        run = client.create_flow_run_from_deployment(deployment.id, state=_scheduled_later())
        client.set_flow_run_state(run.id, Cancelling() if state == "Cancelling" else Cancelled(), force=True)
        assert InProcessRunner(_served(), limit=1)._claim(client, run) is False
        assert _read(run.id).state.is_cancelled()  # (a Cancelling run that never started ends Cancelled)


def test_the_limit_is_honoured():
    """Driven poll by poll (no background loop): with limit 2, four due runs start two at a time."""
    suffix = uuid.uuid4().hex[:6]
    limited = InProcessRunner([(gated.to_deployment(name=f"gated-{suffix}"), gated)], limit=2, poll_seconds=0.1)
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


def test_health_fails_once_polling_stops():
    """The Kubernetes probes of runner.yaml read GET /health, as from Prefect's runner webserver."""
    idle = InProcessRunner(_served(), limit=1)  # not polling: the test sets when it last polled
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
    finally:
        server.shutdown()


def test_stop_lets_running_flows_finish_and_a_second_stop_reports_them_crashed():
    suffix = uuid.uuid4().hex[:6]
    r = InProcessRunner([(gated.to_deployment(name=f"drain-{suffix}"), gated)], limit=2, poll_seconds=0.1,
                        grace_seconds=30)
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
            r2 = InProcessRunner(r._served, limit=1, poll_seconds=0.1, grace_seconds=30)
            thread = threading.Thread(target=r2.run, daemon=True)
            thread.start()
            stuck = client.create_flow_run_from_deployment(deployment_id).id
            assert ENTERED.acquire(timeout=30), "the gated flow did not start"
            r2.stop()
            r2.stop()  # second stop: do not wait for it
            thread.join(10)
            assert not thread.is_alive()
            assert _read(stuck).state.is_crashed()
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
