"""Run served flow runs inside the ``fd-recovery serve`` process: an alert's recovery starts in milliseconds.

Prefect's Runner starts every flow run in a fresh spawned Python process that re-imports Prefect and our flows
(2-4 s before the first task). This runner keeps the flows imported and runs each flow run in a thread of this
process with Prefect's own engine (``prefect.flow_engine.run_flow``), so states, logs, artifacts, retries and
deployment concurrency limits (checked by the server on Pending -> Running) behave as with Prefect's Runner.

Loop: register the deployments (``RunnerDeployment.apply()``: schedules, triggers, concurrency limits), then
every ``poll_seconds`` ask the API for due scheduled runs of those deployments, CLAIM each one by proposing
Pending (a rejection means another runner took it, so two serve processes never run a flow run twice) and
run it in a daemon thread, at most ``limit`` at once; ``GET /health`` as Prefect's runner webserver has (when
PREFECT_RUNNER_SERVER_ENABLE). ``stop()`` (SIGTERM/SIGINT in ``serve_in_process``)
stops the polling and waits up to ``grace_seconds`` for running flows; runs still going then are reported
Crashed. Trade-off: fast start and shared memory, no process isolation, and a running flow cannot be killed
(a run cancelled before it starts is never started; one cancelled while running finishes its work).
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterNextScheduledStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import Abort
from prefect.flow_engine import run_flow
from prefect.flows import Flow
from prefect.logging import get_logger
from prefect.settings import PREFECT_RUNNER_PROCESS_LIMIT, PREFECT_RUNNER_SERVER_ENABLE, get_current_settings
from prefect.states import Crashed, Pending
from prefect.types._datetime import now
from prefect.utilities.engine import propose_state_sync

log = get_logger("runner.inprocess")
MARK_READY_S = 10.0  # how often the poll also tells the API the deployments are served (status Ready)


class InProcessRunner:
    """Serve RunnerDeployments by running their flow runs in threads of this process (see module docstring)."""

    def __init__(
        self,
        served: Sequence[tuple[Any, Flow[..., Any]]],
        *,
        limit: int | None = None,
        poll_seconds: float = 0.25,
        grace_seconds: float = 45.0,
    ) -> None:
        if not served:
            raise ValueError("nothing to serve: no deployments")
        self.limit = limit or PREFECT_RUNNER_PROCESS_LIMIT.value() or 5
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self._served = list(served)
        self._flows: dict[UUID, Flow[..., Any]] = {}
        self._running: dict[UUID, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self._next_mark_ready = 0.0
        self.last_polled: float | None = None  # time.monotonic() of the last successful poll

    @property
    def deployment_ids(self) -> list[UUID]:
        return list(self._flows)

    def running(self) -> list[UUID]:
        """Ids of the flow runs this runner is executing now."""
        with self._lock:
            return list(self._running)

    def register(self) -> list[UUID]:
        """Create or update every deployment with the API (schedules, triggers, concurrency limit); their ids."""
        for deployment, flow in self._served:
            self._flows[deployment.apply()] = flow
        log.info("registered %d deployments: %s", len(self._flows), ", ".join(d.name for d, _ in self._served))
        return self.deployment_ids

    def poll_once(self, client: SyncPrefectClient) -> list[UUID]:
        """Claim and start due scheduled runs while slots are free; the ids started."""
        free = self.limit - len(self.running())
        if free <= 0 or self._stopping.is_set():
            return []
        started = []
        for flow_run in self._due_runs(client):
            if len(started) >= free or self._stopping.is_set():
                break
            if flow_run.id in self._running or not self._claim(client, flow_run):
                continue
            self._start(flow_run)
            started.append(flow_run.id)
        return started

    def _due_runs(self, client: SyncPrefectClient) -> list[FlowRun]:
        """Scheduled runs of our deployments due by the next poll, earliest first.

        A plain read: ``get_scheduled_flow_runs`` (what Prefect's Runner calls) also queues a write marking the
        deployments Ready, too much for a SQLite server 4 times a second; it is called every ``MARK_READY_S``.
        """
        before = now("UTC") + timedelta(seconds=self.poll_seconds)
        if time.monotonic() >= self._next_mark_ready:
            self._next_mark_ready = time.monotonic() + MARK_READY_S
            due = client.get_scheduled_flow_runs_for_deployments(deployment_ids=self.deployment_ids,
                                                                 scheduled_before=before)
            return [FlowRun.model_validate(r.model_dump()) for r in due]
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=self.deployment_ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=before),
            ),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
            limit=self.limit,
        )

    def _claim(self, client: SyncPrefectClient, flow_run: FlowRun) -> bool:
        """Propose Pending: only one runner gets it (the server rejects the others, and cancelled runs)."""
        try:
            state = propose_state_sync(client, Pending(), flow_run_id=flow_run.id)
        except Abort as e:
            log.info("flow run %s not claimed: %s", flow_run.id, e)
            return False
        except Exception:  # deleted meanwhile, API error: the next poll sees it again if it is still due
            log.exception("could not claim flow run %s", flow_run.id)
            return False
        if not state.is_pending():
            log.info("flow run %s not claimed: it is %s", flow_run.id, state.type.value)
            return False
        flow_run.state = state
        return True

    def _start(self, flow_run: FlowRun) -> None:
        flow = self._flows[flow_run.deployment_id]
        thread = threading.Thread(
            target=self._execute, args=(flow, flow_run), name=f"flow-run-{flow_run.name}", daemon=True
        )
        with self._lock:
            self._running[flow_run.id] = thread
        log.info("starting flow run %s (%s) of %s", flow_run.name, flow_run.id, flow.name)
        thread.start()

    def _execute(self, flow: Flow[..., Any], flow_run: FlowRun) -> None:
        """Run one flow run with Prefect's engine (parameters: the run's, validated, flow defaults filled)."""
        try:
            state = run_flow(flow, flow_run=flow_run, return_type="state", error_logger=log)
            if inspect.isawaitable(state):  # an async flow: this thread runs its event loop
                state = asyncio.run(state)
            log.info("flow run %s finished: %s", flow_run.name, getattr(state, "type", state))
        except BaseException as e:  # the engine itself failed: never leave the run Pending/Running
            log.exception("flow run %s crashed in the engine", flow_run.name)
            _crash_if_unfinished(flow_run.id, message=f"fd-recovery serve: the engine failed: {type(e).__name__}")
        finally:
            with self._lock:
                self._running.pop(flow_run.id, None)

    def run(self) -> None:
        """Register, then poll until ``stop()``; then wait for running flows (``grace_seconds``)."""
        self.register()
        with get_client(sync_client=True) as client:
            while not self._stopping.is_set():
                t0 = time.monotonic()
                try:
                    self.poll_once(client)
                    self.last_polled = time.monotonic()
                except Exception:  # an unreachable API must not end the serve process
                    log.exception("polling the Prefect API for due flow runs failed; retrying")
                self._stopping.wait(max(0.0, self.poll_seconds - (time.monotonic() - t0)))  # poll
        self._drain()

    def stop(self) -> None:
        """Stop polling for new runs; ``run()`` returns once running flows finish or the grace period ends.
        A second call stops waiting for them."""
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()

    def _drain(self) -> None:
        """Wait for running flows until the grace period ends (or a second stop); report the rest Crashed."""
        deadline = time.monotonic() + self.grace_seconds
        while self.running() and time.monotonic() < deadline and not self._hurry.is_set():
            self._hurry.wait(0.2)  # poll
        for run_id in self.running():
            log.warning("flow run %s still running at shutdown: reported Crashed", run_id)
            _crash_if_unfinished(run_id, message="fd-recovery serve stopped before the flow run finished")


def _crash_if_unfinished(flow_run_id: UUID, *, message: str) -> None:
    """Propose Crashed for a run that is not in a final state (best effort: the API may be gone too)."""
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run_id)
            if current.state is None or not current.state.is_final():
                propose_state_sync(client, Crashed(message=message), flow_run_id=flow_run_id)
    except Exception:
        log.exception("could not report flow run %s as crashed", flow_run_id)


def serve_in_process(
    served: Sequence[tuple[Any, Flow[..., Any]]], *, limit: int | None = None, poll_seconds: float = 0.25
) -> None:
    """Serve until SIGTERM/SIGINT (main thread): the first stops polling and lets running flows finish."""
    runner = InProcessRunner(served, limit=limit, poll_seconds=poll_seconds)

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping; running flows get %g s to finish (again: stop now)", signal.Signals(signum).name,
                 runner.grace_seconds)
        runner.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    health = start_health_server(runner) if PREFECT_RUNNER_SERVER_ENABLE.value() else None
    try:
        runner.run()
    finally:
        if health is not None:
            health.shutdown()


def start_health_server(
    runner: InProcessRunner, *, host: str | None = None, port: int | None = None, threshold_s: float | None = None
) -> ThreadingHTTPServer:
    """``GET /health`` like Prefect's runner webserver (same PREFECT_RUNNER_SERVER_* settings, so the Kubernetes
    probes work either way): 503 once no poll succeeded for missed_polls_tolerance x PREFECT_RUNNER_POLL_FREQUENCY."""
    settings = get_current_settings().runner
    threshold = threshold_s or settings.server.missed_polls_tolerance * settings.poll_frequency
    host = host or settings.server.host
    port = settings.server.port if port is None else port
    started = time.monotonic()

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/health":
                self.send_error(404)
                return
            healthy = time.monotonic() - (runner.last_polled or started) <= threshold
            body = b'{"message": "OK"}' if healthy else b'{"message": "Runner is unresponsive at this time"}'
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # probes every few seconds: not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Health)
    threading.Thread(target=server.serve_forever, name="runner-health", daemon=True).start()
    log.info("health check on http://%s:%d/health", host, server.server_address[1])
    return server
