"""Run served flow runs inside the ``fd-recovery serve`` process: an alert's recovery starts in milliseconds.

Prefect's Runner starts every flow run in a fresh spawned Python process that re-imports Prefect and our flows
(2-4 s before the first task). This runner keeps the flows imported and runs each flow run in a thread of this
process with Prefect's own engine (``prefect.flow_engine.run_flow``), so states, logs, artifacts, retries and
deployment concurrency limits (checked by the server on Pending -> Running) behave as with Prefect's Runner.

Loop: register the deployments (``RunnerDeployment.apply()``: schedules, triggers, concurrency limits), then
every ``poll_seconds`` ask the API for due scheduled runs of those deployments, CLAIM each one (below) and run
it in a daemon thread, at most ``limit`` at once; ``GET /health`` as Prefect's runner webserver has (when
PREFECT_RUNNER_SERVER_ENABLE). ``stop()`` (SIGTERM/SIGINT in ``serve_in_process``) stops the polling and waits
up to ``grace_seconds`` for running flows; runs still going then are reported Crashed. Trade-off: fast start
and shared memory, no process isolation, and a running flow cannot be killed (a run cancelled before it starts
is never started; one cancelled while running finishes its work).

Exactly once, across any number of serve processes. Proposing Pending is not enough: Prefect refuses Pending
only from Pending/Running/Cancelling/Cancelled, so a runner whose list of due runs is stale would re-run a run
another runner already COMPLETED (Completed -> Pending is accepted). So a run is claimed in two steps:
1. a claim record ``<FD_STATE_PREFIX>:claim:flow-run:<id>`` created in Redis only if absent (``SET NX``), its
   value this runner's identity (host:pid:random), a lease of ``CLAIM_LEASE_S`` (30 s) that this runner renews
   (a thread of its own) while it holds the run and deletes when the run's execution ends. One holder at a time,
   whatever the lists say;
2. then, holding it, the run's state is READ AGAIN and Pending is proposed only if it is still Scheduled (the
   Pending's message names the runner: "claimed by fd-recovery serve <identity>").
Together: a run leaves a Scheduled state for Pending only through a runner that holds its claim and saw it
Scheduled after taking the claim, so a run that finished meanwhile is seen finished and skipped; a run put back
to Scheduled (Prefect's AwaitingConcurrencySlot, a retry from the UI) is claimable again once its execution
ended. The claim is held through the whole execution, which also covers a flow retry's AwaitingRetry state
(Scheduled, while the engine still holds the run). No claim, no run: when Redis is unavailable nothing is
started (logged). A runner that dies stops renewing: its claims expire ``CLAIM_LEASE_S`` later (a run it had
claimed but not yet moved to Pending is then taken by another runner); ``RunClaims.holder``/``release`` let the
zombie-run handling find and free the claim of a run whose runner is gone. If a runner could not renew a claim
for a whole lease (Redis unreachable, process frozen) before its Pending landed, it checks the state history
and runs the run only if its Pending came straight from Scheduled.

Zombies: a runner that dies (kill -9, OOM, node loss) leaves its runs Running, holding their deployment
concurrency slot (Prefect's slot lease lasts 300 s, renewed by the engine) — and the recovery they were doing
half done. Every runner looks, every ``FD_RUNNER_ZOMBIE_SCAN_S`` (``reap_zombies``), at the Pending/Running/
Cancelling runs of its deployments whose claim is gone (their holder stopped renewing it) and whose Pending
was a ``claimed by fd-recovery serve`` claim (runs of other runners are never touched). Such a run is taken
with the same ``SET NX`` claim (one reaper per run, whichever runner gets there first), its state read again,
and it is proposed Crashed (Cancelling: Cancelled) — which makes Prefect release its deployment concurrency
slot at once (its ``ReleaseFlowConcurrencySlots`` rule revokes the slot's lease on leaving Running). Then the
recovery is finished: a NEW run of the same deployment with the same parameters (idempotency key
``fd-recovery-rerun:<zombie id>``, tags ``fd-rerun``, ``fd-rerun-of:<id>``, ``fd-rerun-depth:<n>``; not for
scheduled runs, whose next slot re-runs them; not beyond ``FD_RUNNER_MAX_RERUNS`` in a row), run by whichever
runner claims it. The flows are idempotent and their guard keeps a cooldown only for an action that took
effect, so the re-run does what is left and nothing twice. Bound: a run is Crashed at most
``FD_RUNNER_CLAIM_LEASE_S + FD_RUNNER_ZOMBIE_SCAN_S`` (30 + 10 s) after its runner died. A runner stopped by
SIGTERM whose grace (``FD_RUNNER_GRACE_S``) ran out does the same for its own unfinished runs before it exits
(Crashed, re-run by another runner). A runner that is alive but could not reach Redis for a whole lease loses
its claims and may see its runs re-run by another runner (the engine's late state proposals are then refused,
the run being Crashed already): the flows' idempotence and guard are what make that safe.

Dependencies that come and go: the poll, the zombie scan and the event flush use a client without Prefect's
retry back-off (a poll that fails is simply the next poll, at most ``API_DOWN_WAIT_S`` later), so runs are
picked up within about a second of the API answering again; the flows keep Prefect's retries. Recovery events
wait in a Redis outbox while the API is unreachable (``tasks/events.py``); each runner flushes it every second.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.message import Message
from http.server import ThreadingHTTPServer
from typing import Any
from uuid import UUID

import redis
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterNextScheduledStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.flow_engine import run_flow
from prefect.flows import Flow
from prefect.logging import get_logger
from prefect.settings import (
    PREFECT_CLIENT_MAX_RETRIES,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_RUNNER_PROCESS_LIMIT,
    PREFECT_RUNNER_SERVER_ENABLE,
    get_current_settings,
    temporary_settings,
)
from prefect.states import Cancelled, Crashed, Pending
from pydantic import BaseModel

from deployments.http_server import serve_probes
from tasks.settings import Settings, get_settings

log = get_logger("runner.inprocess")
MARK_READY_S = 10.0  # how often the poll also tells the API the deployments are served (status Ready)
#: Prefect's flow-run heartbeats, off for the runs served here: a dead runner's runs are found by their lapsed
#: Redis claims (``reap_zombies``), not by heartbeats, and Prefect 3.9 joins the heartbeat thread (1 s steps) at
#: the end of every run — ~1 s of wall time per run (an idle queue-sweep: 1.1 s -> 0.1 s).
NO_HEARTBEATS = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
CLAIM_LEASE_S = 30.0  # a dead runner's claims expire this long after its last renewal (FD_RUNNER_CLAIM_LEASE_S)
CLAIM_TOKEN = "claimed by fd-recovery serve "  # + the runner's identity: the message of the Pending it proposes
CANDIDATES_PER_SLOT = 4  # due runs read per free slot: runs other runners hold are skipped at Redis cost
STORE_DOWN_LOG_S = 30.0  # while Redis is unavailable, say so at most this often
WAIT_CAP_S = 5.0  # longest wait honoured for one WAIT answer to a Pending proposal
API_DOWN_WAIT_S = 1.0  # while the Prefect API does not answer, poll at least this often
API_DOWN_LOG_S = 30.0  # ... and say so at most this often
UPKEEP_S = 1.0  # the upkeep thread's tick: flush the events outbox; reap zombies every FD_RUNNER_ZOMBIE_SCAN_S
ZOMBIE_SCAN_LIMIT = 200  # live runs of our deployments read per scan
RERUN_TAG = "fd-rerun"
RERUN_OF_TAG = "fd-rerun-of:"
RERUN_DEPTH_TAG = "fd-rerun-depth:"
LIVE_TYPES = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)


class ClaimStoreUnavailable(Exception):
    """The claim store (Redis) did not answer: no run may be started, since it cannot be claimed."""


class RunClaims:
    """Exactly one holder per flow run at a time: a Redis key created only if absent, a lease renewed by its holder.

    ``acquire`` -> ``SET <prefix>:claim:flow-run:<id> <owner> NX PX <lease>``; ``renew`` and ``release`` act only
    on claims this owner still holds (Lua compare-and-expire / compare-and-delete), so a claim that expired and
    was taken by another runner is never extended or deleted by the first. Redis errors raise
    ``ClaimStoreUnavailable``.
    """

    _RENEW = """
    local out = {}
    for i, key in ipairs(KEYS) do
      if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]); out[i] = 1 else out[i] = 0 end
    end
    return out
    """
    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

    def __init__(self, client: redis.Redis, *, prefix: str, owner: str | None = None,
                 lease_s: float = CLAIM_LEASE_S) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.redis = client
        self.prefix = prefix
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s
        self._renew = client.register_script(self._RENEW)
        self._release = client.register_script(self._RELEASE)

    @classmethod
    def from_settings(cls, settings: Settings, *, owner: str | None = None, lease_s: float | None = None) -> RunClaims:
        """Claims in ``settings.redis_url`` under ``settings.state_prefix`` (short timeouts: a poll must not hang),
        with a lease of ``lease_s`` (default ``FD_RUNNER_CLAIM_LEASE_S``)."""
        client = redis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True,
                                      socket_timeout=5, socket_connect_timeout=3, health_check_interval=30)
        return cls(client, prefix=settings.state_prefix, owner=owner,
                   lease_s=settings.runner_claim_lease_s if lease_s is None else lease_s)

    def key(self, flow_run_id: UUID) -> str:
        return f"{self.prefix}:claim:flow-run:{flow_run_id}"

    def acquire(self, flow_run_id: UUID) -> bool:
        """Create the run's claim for this owner if nobody holds it; False if somebody (this owner too) does."""
        with _store_errors():
            return bool(self.redis.set(self.key(flow_run_id), self.owner, nx=True, px=int(self.lease_s * 1000)))

    def renew(self, flow_run_ids: Iterable[UUID]) -> set[UUID]:
        """Extend this owner's claims by a full lease; the ids whose claim is no longer this owner's."""
        ids = list(flow_run_ids)
        if not ids:
            return set()
        with _store_errors():
            kept = self._renew(keys=[self.key(i) for i in ids], args=[self.owner, int(self.lease_s * 1000)])
        return {i for i, ok in zip(ids, kept, strict=True) if not ok}

    def release(self, flow_run_id: UUID, *, owner: str | None = None) -> bool:
        """Delete the run's claim if ``owner`` (default: this one) holds it. The zombie-run handling passes the
        dead runner's identity (from ``holder``) to free a run whose runner is gone."""
        with _store_errors():
            return bool(self._release(keys=[self.key(flow_run_id)], args=[owner or self.owner]))

    def holder(self, flow_run_id: UUID) -> str | None:
        """Identity of the runner holding the run's claim (None: nobody, or its lease expired)."""
        with _store_errors():
            return self.redis.get(self.key(flow_run_id))

    def holders(self, flow_run_ids: Sequence[UUID]) -> dict[UUID, str | None]:
        """``holder`` of many runs in one round trip (MGET)."""
        if not flow_run_ids:
            return {}
        with _store_errors():
            values = self.redis.mget([self.key(i) for i in flow_run_ids])
        return dict(zip(flow_run_ids, values, strict=True))


@contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except redis.RedisError as e:
        raise ClaimStoreUnavailable(f"{type(e).__name__}: {e}") from e


class InProcessRunner:
    """Serve RunnerDeployments by running their flow runs in threads of this process (see module docstring)."""

    def __init__(
        self,
        served: Sequence[tuple[Any, Flow[..., Any]]],
        *,
        limit: int | None = None,
        poll_seconds: float = 0.25,
        grace_seconds: float | None = None,
        claims: RunClaims | None = None,
        settings: Settings | None = None,
        zombie_scan_s: float | None = None,
    ) -> None:
        if not served:
            raise ValueError("nothing to serve: no deployments")
        self.limit = limit or PREFECT_RUNNER_PROCESS_LIMIT.value() or 5
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        self.settings = settings or get_settings()
        self.poll_seconds = poll_seconds
        self.grace_seconds = self.settings.runner_grace_s if grace_seconds is None else grace_seconds
        self.zombie_scan_s = self.settings.runner_zombie_scan_s if zombie_scan_s is None else zombie_scan_s
        self.claims = claims or RunClaims.from_settings(self.settings)
        self._served = list(served)
        self._flows: dict[UUID, Flow[..., Any]] = {}
        self._running: dict[UUID, threading.Thread] = {}
        self._claimed: dict[UUID, float] = {}  # run id -> time.monotonic() its claim was last confirmed ours
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._next_mark_ready = 0.0
        self._store_down_logged = 0.0  # time.monotonic() the claim store was last reported unavailable
        self._not_ours: dict[tuple[UUID, UUID | None], None] = {}  # (run, state) whose Pending was no serve claim
        self.last_polled: float | None = None  # time.monotonic() of the last successful poll
        self.reaped: list[Reaped] = []  # zombies this runner ended (newest last; for logs and tests)

    @property
    def identity(self) -> str:
        """This runner's identity in its claims (host:pid:random)."""
        return self.claims.owner

    @property
    def deployment_ids(self) -> list[UUID]:
        return list(self._flows)

    def running(self) -> list[UUID]:
        """Ids of the flow runs this runner is executing now."""
        with self._lock:
            return list(self._running)

    def claimed(self) -> list[UUID]:
        """Ids of the flow runs whose claim this runner holds (being started or running)."""
        with self._lock:
            return list(self._claimed)

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
        for flow_run in self._due_runs(client, limit=free * CANDIDATES_PER_SLOT):
            if len(started) >= free or self._stopping.is_set():
                break
            if flow_run.id in self._claimed:
                continue
            try:
                claimed = self._claim(client, flow_run)
            except ClaimStoreUnavailable as e:
                self._store_unavailable(flow_run, e)
                break
            if claimed:
                self._start(flow_run)
                started.append(flow_run.id)
        if self._store_down_logged and started:
            log.info("the claim store is available again: claiming and starting flow runs")
            self._store_down_logged = 0.0
        return started

    def _store_unavailable(self, flow_run: FlowRun, error: ClaimStoreUnavailable) -> None:
        """No claim, no run: say so (at most every STORE_DOWN_LOG_S), start nothing until Redis answers."""
        if time.monotonic() - self._store_down_logged >= STORE_DOWN_LOG_S:
            self._store_down_logged = time.monotonic()
            log.error("cannot claim flow run %s (%s): the claim store (Redis, FD_REDIS_URL) is unavailable: %s; "
                      "starting no flow run until it answers, so no run can be executed twice",
                      flow_run.name, flow_run.id, error)

    def _due_runs(self, client: SyncPrefectClient, *, limit: int) -> list[FlowRun]:
        """Scheduled runs of our deployments due by the next poll, earliest first.

        A plain read: ``get_scheduled_flow_runs`` (what Prefect's Runner calls) also queues a write marking the
        deployments Ready, too much for a SQLite server 4 times a second; it is called every ``MARK_READY_S``.
        The list may be stale by the time a run is claimed: ``_claim`` reads each run again.
        """
        before = datetime.now(UTC) + timedelta(seconds=self.poll_seconds)
        if time.monotonic() >= self._next_mark_ready:
            self._next_mark_ready = time.monotonic() + MARK_READY_S
            due = client.get_scheduled_flow_runs_for_deployments(deployment_ids=self.deployment_ids,
                                                                 scheduled_before=before, limit=limit)
            return [FlowRun.model_validate(r.model_dump()) for r in due]
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=self.deployment_ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=before),
            ),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
            limit=limit,
        )

    def _claim(self, client: SyncPrefectClient, flow_run: FlowRun) -> bool:
        """Take the run for this runner: its claim in Redis, then Pending if it is STILL Scheduled (read again).

        False when another runner holds it, or it is no longer Scheduled (finished, cancelled, deleted), or
        Prefect refuses Pending. Raises ``ClaimStoreUnavailable`` when Redis does not answer (nothing started).
        """
        if not self.claims.acquire(flow_run.id):
            log.debug("flow run %s is claimed by another runner", flow_run.id)
            return False
        self._hold(flow_run.id)
        token = f"{CLAIM_TOKEN}{self.identity}"
        try:
            current = client.read_flow_run(flow_run.id)
            if current.state is None or current.state.type != StateType.SCHEDULED:
                log.info("flow run %s not claimed: it is %s now", flow_run.id,
                         current.state.name if current.state else "without a state")
                self._unclaim(flow_run.id)
                return False
            state = self._propose_pending(client, flow_run.id, token)
        except ObjectNotFound:
            log.info("flow run %s not claimed: it was deleted", flow_run.id)
            self._unclaim(flow_run.id)
            return False
        except Exception:  # timeout, API error: did our Pending land before the error? The state says.
            log.exception("could not claim flow run %s", flow_run.id)
            state = self._pending_of(client, flow_run.id, token)
        if state is None or not (state.is_pending() and state.message == token):
            if state is not None:
                log.info("flow run %s not claimed: Prefect answered %s", flow_run.id, state.name)
            self._unclaim(flow_run.id)
            return False
        try:
            held = self._lease_held(client, flow_run.id, token)
        except Exception:
            log.exception("flow run %s: could not check its state history after a lapsed claim", flow_run.id)
            held = False
        if not held:
            self._unclaim(flow_run.id)
            return False
        flow_run.state = state
        return True

    @staticmethod
    def _propose_pending(client: SyncPrefectClient, flow_run_id: UUID, token: str) -> State | None:
        """Propose Pending (the claim token as its message); the accepted or the server's state, None if aborted."""
        while True:
            result = client.set_flow_run_state(flow_run_id, Pending(message=token))
            if result.status == SetStateStatus.WAIT:
                time.sleep(min(getattr(result.details, "delay_seconds", 0.1) or 0.1, WAIT_CAP_S))  # as told
                continue
            if result.status == SetStateStatus.ABORT:
                log.info("flow run %s not claimed: %s", flow_run_id, getattr(result.details, "reason", "aborted"))
                return None
            return result.state

    @staticmethod
    def _pending_of(client: SyncPrefectClient, flow_run_id: UUID, token: str) -> State | None:
        """After an error proposing Pending: the run's state if it is our Pending (it landed), else None."""
        try:
            state = client.read_flow_run(flow_run_id).state
        except Exception:
            log.exception("could not read flow run %s after the failed claim", flow_run_id)
            return None
        return state if state is not None and state.is_pending() and state.message == token else None

    def _lease_held(self, client: SyncPrefectClient, flow_run_id: UUID, token: str) -> bool:
        """Our Pending was accepted. If our claim may have lapsed meanwhile (not confirmed for a whole lease: Redis
        unreachable, this process frozen), make sure Pending came straight from a Scheduled state; if another
        runner ran the run meanwhile, put back the state it ended in and do not run it."""
        with self._lock:
            confirmed = self._claimed.get(flow_run_id, 0.0)
        if time.monotonic() - confirmed < self.claims.lease_s:
            return True
        states = client.read_flow_run_states(flow_run_id)
        ours = max((i for i, s in enumerate(states) if s.is_pending() and s.message == token), default=None)
        before = states[ours - 1] if ours else None
        if before is not None and before.type == StateType.SCHEDULED:
            return True
        log.error("flow run %s: our claim lapsed and the run was %s before our Pending: not running it; state put "
                  "back", flow_run_id, before.name if before else "unknown")
        if before is not None:
            client.set_flow_run_state(flow_run_id, State(type=before.type, name=before.name, message=before.message,
                                                         data=before.data), force=True)
        return False

    def _hold(self, flow_run_id: UUID) -> None:
        with self._lock:
            self._claimed[flow_run_id] = time.monotonic()
        self._ensure_keeper()

    def _unclaim(self, flow_run_id: UUID) -> None:
        """Forget and delete our claim (if Redis does not answer, it expires after the lease)."""
        with self._lock:
            self._claimed.pop(flow_run_id, None)
        try:
            self.claims.release(flow_run_id)
        except ClaimStoreUnavailable as e:
            log.warning("could not release the claim of flow run %s (%s): it expires in %g s", flow_run_id, e,
                        self.claims.lease_s)

    def _ensure_keeper(self) -> None:
        with self._lock:
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper_stop.clear()
                self._keeper = threading.Thread(target=self._keep_claims, name="runner-claims", daemon=True)
                self._keeper.start()

    def _keep_claims(self) -> None:
        """Renew this runner's claims every third of a lease while it holds any (a thread of its own, so a poll
        stuck in API retries does not let them lapse)."""
        while not self._keeper_stop.wait(self.claims.lease_s / 3):
            ids = self.claimed()
            if not ids:
                continue
            try:
                lost = self.claims.renew(ids)
            except ClaimStoreUnavailable as e:
                log.error("could not renew the claims of %d flow runs: the claim store is unavailable (%s)", len(ids), e)
                continue
            confirmed = time.monotonic()
            with self._lock:
                for run_id in (i for i in ids if i in self._claimed):  # (not those released meanwhile)
                    if run_id in lost:
                        log.error("the claim of flow run %s expired (this runner could not renew it in time)", run_id)
                    else:
                        self._claimed[run_id] = confirmed

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
            with temporary_settings(updates=NO_HEARTBEATS):
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
            self._unclaim(flow_run.id)  # its execution ended: a run put back to Scheduled may be claimed again

    def run(self) -> None:
        """Register (unless done), then poll until ``stop()``; then wait for running flows (``grace_seconds``).

        The poll's client does not retry (Prefect's back-off would hold the loop for up to half a minute after
        the API came back): a failed poll is logged (once per outage, then every ``API_DOWN_LOG_S``) and the
        next one follows within ``API_DOWN_WAIT_S``."""
        if not self._flows:
            self.register()
        self._ensure_keeper()
        upkeep = threading.Thread(target=self._upkeep, name="runner-upkeep", daemon=True)
        upkeep.start()
        try:
            with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
                down_since: float | None = None
                said = 0.0
                while not self._stopping.is_set():
                    t0 = time.monotonic()
                    wait = self.poll_seconds
                    try:
                        self.poll_once(client)
                        self.last_polled = time.monotonic()
                        if down_since is not None:
                            log.info("the Prefect API answers again (unreachable for %.1f s): polling resumed",
                                     time.monotonic() - down_since)
                            down_since = None
                    except Exception as e:  # an unreachable API must not end the serve process
                        wait = max(self.poll_seconds, API_DOWN_WAIT_S)
                        if down_since is None:
                            down_since, said = t0, t0
                            log.exception("polling the Prefect API for due flow runs failed; retrying every %g s",
                                          wait)
                        elif t0 - said >= API_DOWN_LOG_S:
                            said = t0
                            log.error("the Prefect API has not answered for %.0f s (%s: %s); still retrying",
                                      t0 - down_since, type(e).__name__, str(e)[:200])
                    self._stopping.wait(max(0.0, wait - (time.monotonic() - t0)))  # poll
            self._drain()
        finally:
            self._keeper_stop.set()
            upkeep.join(5)

    def stop(self) -> None:
        """Stop polling for new runs; ``run()`` returns once running flows finish or the grace period ends.
        A second call stops waiting for them."""
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()

    def _drain(self) -> None:
        """Wait for running flows until the grace period ends (or a second stop); the rest are Crashed, and re-run
        (by another runner) unless scheduled — still holding their claims, so no reaper races us."""
        deadline = time.monotonic() + self.grace_seconds
        while self.running() and time.monotonic() < deadline and not self._hurry.is_set():
            self._hurry.wait(0.2)  # poll
        left = self.running()
        if not left:
            return
        try:
            with get_client(sync_client=True) as client:
                for run_id in left:
                    log.warning("flow run %s still running at shutdown: Crashed (and re-run by another runner)", run_id)
                    try:
                        run = client.read_flow_run(run_id)
                        if run.state is not None and run.state.type in LIVE_TYPES:
                            self._end(client, run, why=f"fd-recovery serve {self.identity} was stopped before the "
                                      f"flow run finished (grace {self.grace_seconds:g} s)")
                    except Exception:
                        log.exception("could not end flow run %s at shutdown: another runner will (zombie)", run_id)
                    self._unclaim(run_id)
        except Exception:
            log.exception("could not reach the Prefect API at shutdown: other runners end the %d runs left", len(left))

    # ------------------------------------------------------------------------------------ upkeep, zombies

    def _upkeep(self) -> None:
        """Every ``UPKEEP_S``: flush the recovery events outbox; every ``zombie_scan_s`` (jittered, so replicas
        spread out): reap zombie runs. Its own client, without Prefect's back-off (the next tick retries)."""
        from tasks.events import EventOutbox

        outbox = EventOutbox.from_settings(self.settings)
        next_scan = time.monotonic() + self.zombie_scan_s * random.uniform(0.2, 1.0)
        with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
            while not self._keeper_stop.wait(UPKEEP_S):  # poll
                if outbox is not None:
                    try:
                        outbox.flush(owner=self.identity)
                    except Exception as e:  # Redis or the API down: the next tick tries again
                        log.debug("flushing the events outbox failed: %s", e)
                if time.monotonic() >= next_scan and not self._stopping.is_set():
                    next_scan = time.monotonic() + self.zombie_scan_s * random.uniform(0.8, 1.2)
                    try:
                        self.reap_zombies(client)
                    except ClaimStoreUnavailable as e:
                        log.warning("cannot look for zombie runs: the claim store is unavailable (%s)", e)
                    except Exception as e:
                        log.warning("looking for zombie runs failed (%s: %s); next scan in %g s", type(e).__name__,
                                    str(e)[:200], self.zombie_scan_s)

    def find_zombies(self, client: SyncPrefectClient) -> list[FlowRun]:
        """Pending/Running/Cancelling runs of our deployments that a ``serve`` runner claimed and nobody holds."""
        if not self.deployment_ids:
            return []
        live = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=self.deployment_ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(LIVE_TYPES))),
            ),
            limit=ZOMBIE_SCAN_LIMIT,
        )
        mine = set(self.claimed())
        holders = self.claims.holders([r.id for r in live if r.id not in mine])
        return [r for r in live if r.id in holders and holders[r.id] is None and self._serve_claimed(client, r)]

    def _serve_claimed(self, client: SyncPrefectClient, run: FlowRun) -> str | None:
        """The identity of the ``serve`` runner whose Pending started this run (None: another kind of runner)."""
        key = (run.id, run.state.id if run.state else None)
        if key in self._not_ours:
            return None
        if run.state is not None and run.state.is_pending() and (run.state.message or "").startswith(CLAIM_TOKEN):
            return run.state.message.removeprefix(CLAIM_TOKEN)
        pendings = [s for s in client.read_flow_run_states(run.id) if s.is_pending()]
        message = pendings[-1].message or "" if pendings else ""
        if message.startswith(CLAIM_TOKEN):
            return message.removeprefix(CLAIM_TOKEN)
        if len(self._not_ours) > 10_000:
            self._not_ours.clear()
        self._not_ours[key] = None
        return None

    def reap_zombies(self, client: SyncPrefectClient) -> list[Reaped]:
        """End the zombie runs of our deployments (see the module docstring); what was done to each."""
        done = []
        for zombie in self.find_zombies(client):
            if not self.claims.acquire(zombie.id):
                continue  # another runner is reaping it (or its holder is back)
            try:
                current = client.read_flow_run(zombie.id)
                holder = self._serve_claimed(client, current) if current.state else None
                if current.state is None or current.state.type not in LIVE_TYPES or holder is None:
                    continue  # it ended (or was re-claimed and ended) meanwhile
                reaped = self._end(client, current, why=(
                    f"its runner (fd-recovery serve {holder}) stopped renewing its claim for over "
                    f"{self.claims.lease_s:g} s: it died or lost Redis"))
                if reaped is not None:
                    done.append(reaped)
            finally:
                self.claims.release(zombie.id)
        return done

    def _end(self, client: SyncPrefectClient, run: FlowRun, *, why: str) -> Reaped | None:
        """Crash a live run whose execution is gone (Cancelling: Cancelled) and start its re-run; the caller holds
        the run's claim. Leaving Running releases the run's deployment concurrency slot (Prefect's rule)."""
        assert run.state is not None
        previous = run.state.name
        cancelling = run.state.type == StateType.CANCELLING
        proposed = (Cancelled(message=f"Cancelled: {why}") if cancelling
                    else Crashed(message=f"Crashed by fd-recovery serve {self.identity}: {why}"))
        result = client.set_flow_run_state(run.id, proposed)
        if result.status != SetStateStatus.ACCEPT:
            log.warning("flow run %s (%s): Prefect answered %s to %s: left as it is", run.name, run.id,
                        result.status.value, proposed.name)
            return None
        rerun = None if cancelling else self._rerun(client, run)
        reaped = Reaped(flow_run_id=run.id, name=run.name, was=previous, now=proposed.name,
                        rerun_id=rerun.id if rerun else None)
        log.warning("flow run %s (%s) was %s without a runner: %s (%s)%s", run.name, run.id, previous,
                    proposed.name, why, f"; re-run as {rerun.name} ({rerun.id})" if rerun else "")
        self.reaped.append(reaped)
        return reaped

    def _rerun(self, client: SyncPrefectClient, run: FlowRun) -> FlowRun | None:
        """A new run of the same deployment with the same parameters (once per zombie: idempotency key)."""
        depth = rerun_depth(run.tags)
        if not self.settings.runner_rerun_zombies or run.auto_scheduled or run.deployment_id is None:
            return None
        if depth >= self.settings.runner_max_reruns:
            log.error("flow run %s (%s) is already re-run %d times in a row (FD_RUNNER_MAX_RERUNS): not again",
                      run.name, run.id, depth)
            return None
        try:
            return client.create_flow_run_from_deployment(
                run.deployment_id, parameters=run.parameters, idempotency_key=f"fd-recovery-rerun:{run.id}",
                tags=[RERUN_TAG, f"{RERUN_OF_TAG}{run.id}", f"{RERUN_DEPTH_TAG}{depth + 1}"])
        except Exception:
            log.exception("could not re-run flow run %s (%s): start it again from the UI", run.name, run.id)
            return None


class Reaped(BaseModel):
    """A run ended because its runner was gone, and its re-run (if any)."""

    flow_run_id: UUID
    name: str
    was: str
    now: str
    rerun_id: UUID | None = None


def rerun_depth(tags: Iterable[str]) -> int:
    """How many re-runs in a row led to a run (0: an original run), from its ``fd-rerun-depth:<n>`` tag."""
    for tag in tags:
        if tag.startswith(RERUN_DEPTH_TAG) and tag.removeprefix(RERUN_DEPTH_TAG).isdigit():
            return int(tag.removeprefix(RERUN_DEPTH_TAG))
    return 0


def _crash_if_unfinished(flow_run_id: UUID, *, message: str) -> None:
    """Propose Crashed for a run that is not in a final state (best effort: the API may be gone too)."""
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run_id)
            if current.state is None or not current.state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=message))
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
    probes work either way): 503 once no poll succeeded for missed_polls_tolerance x PREFECT_RUNNER_POLL_FREQUENCY.
    ``GET /metrics``: our own Prometheus metrics."""
    settings = get_current_settings().runner
    threshold = threshold_s or settings.server.missed_polls_tolerance * settings.poll_frequency
    host = host or settings.server.host
    port = settings.server.port if port is None else port
    started = time.monotonic()

    def health(_headers: Message) -> tuple[int, str, bytes]:
        if time.monotonic() - (runner.last_polled or started) <= threshold:
            return 200, "application/json", b'{"message": "OK"}'
        return 503, "application/json", b'{"message": "Runner is unresponsive at this time"}'

    def metrics(headers: Message) -> tuple[int, str, bytes]:
        from tasks.metrics import exposition  # runs in this process + state read on scrape

        body, content_type = exposition(headers.get("Accept"))
        return 200, content_type, body

    server = serve_probes({"/health": health, "/metrics": metrics}, host=host, port=port, name="runner-health")
    log.info("health check on http://%s:%d/health", host, server.server_address[1])
    return server
