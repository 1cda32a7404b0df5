"""Approval for large blast radii (tasks/approval.py): above a threshold a recovery publishes its plan and waits
in Prefect's Paused state for a typed form; approve -> it acts once and names who approved; reject or no answer
-> nothing changed, outcome refused with the reason. Real Prefect server (pause/resume API), sandbox cluster,
Redis and PostgreSQL; the person is this test, answering through the same API the UI's form posts to."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterName,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.input.actions import read_flow_run_input

from flows.dlq_replay import dlq_replay
from flows.stuck_runs import stuck_runs_sweep
from flows.worker_crash import worker_crash_recovery
from tasks import approval
from tasks.outcome import ActionStatus, Outcome
from tasks.queue import SweepPolicy, sweep_pending
from tasks.settings import Settings, use_settings
from tests.integration import _recovery_fixtures as fx
from tests.integration import runs_fixtures as rf
from tests.integration._recovery_fixtures import (
    ReplacementConsumer,
    deletions,
    queue_state,
    result_of,
    seed_pending,
    wait_for,
    worker_pods,
)
from tests.integration.queue_fixtures import add_steps, deliver

pytestmark = pytest.mark.timeout(120)
env = fx.env  # the per-test settings fixture (Redis keys, sandbox cluster, runs tables)


def gated(s: Settings, **update: Any) -> Settings:
    """``s`` with approval thresholds for the test, a short poll and timeout."""
    return s.model_copy(update={"approval_poll_s": 0.2, "approval_timeout_s": 60.0, **update})


class InBackground:
    """Runs one flow in a thread (as a served run would), under a unique run name the test can find."""

    def __init__(self, flow_obj: Any, **params: Any) -> None:
        self.name = f"approval-test-{uuid.uuid4().hex[:10]}"
        self.flow, self.params = flow_obj.with_options(flow_run_name=self.name), params
        self.state: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.state = self.flow(**self.params, return_state=True)

    def __enter__(self) -> InBackground:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(60)

    def run(self) -> FlowRun | None:
        with get_client(sync_client=True) as client:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[self.name])))
        return found[0] if found else None

    def paused(self, timeout: float = 60.0) -> FlowRun:
        def check() -> FlowRun | None:
            run = self.run()
            assert self.thread.is_alive() or (run and run.state and run.state.is_paused()), f"ended: {self.state}"
            return run if run is not None and run.state is not None and run.state.is_paused() else None

        return wait_for(check, timeout=timeout, what=f"{self.name} paused for approval", interval=0.1)

    def join(self, timeout: float = 90.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.name} still running"
        return self.state


def answer(run: FlowRun, **run_input: Any) -> SetStateStatus:
    """Submit the approval form of a paused run (what the UI's Resume form posts)."""
    with get_client(sync_client=True) as client:
        return client.resume_flow_run(run.id, run_input=run_input).status


def report(run: FlowRun, key: str) -> str:
    """The one artifact ``key`` of this flow run (the plan awaiting approval, or the final report)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert len(found) == 1, f"expected one `{key}` artifact of {run.name}, found {len(found)}"
    return found[0].data


def approval_events(run: FlowRun, *, want: set[str], prefix: str = "ferrumdeck.recovery.approval"
                    ) -> dict[str, list[dict]]:
    """The ``ferrumdeck.recovery.approval*`` (or ``prefix``) events about this flow run (stored asynchronously:
    polled)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"related": {"id": [f"prefect.flow-run.{run.id}"]},
                       "event": {"prefix": [prefix]}, "order": "ASC"}, "limit": 20}

    def fetch() -> dict[str, list[dict]] | None:
        r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        r.raise_for_status()
        found: dict[str, list[dict]] = {}
        for e in r.json()["events"]:
            found.setdefault(e["event"], []).append(e)
        return found if want <= set(found) else None

    return wait_for(fetch, timeout=20, what=f"events {sorted(want)}", interval=0.2)


def crashed(cluster, redis, s: Settings, *, n: int = 2) -> str:
    """Worker A crash-loops holding ``n`` fresh entries (their runs `running` in PostgreSQL)."""
    a, *_ = worker_pods(cluster, s)
    seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=n, tag=f"ap{uuid.uuid4().hex[:4]}")
    cluster.crash_loop(a, exit_code=1, reason="Error", logs=["Traceback (most recent call last):", "boom"])
    wait_for(lambda: a not in worker_pods(cluster, s), what=f"{a} not Ready")
    return a


# ------------------------------------------------------------------------------------------------ pure plans


def test_plans_over_their_threshold_need_a_person():
    s = Settings(approval_pod_deletions=2, approval_dlq_replays=100, approval_failed_runs=10)
    assert not approval.pod_deletions(s, ["a", "b"]).needed
    three = approval.pod_deletions(s, ["a", "b", "c"], evict=True)
    assert three.needed and three.action == "evict-pod" and three.rule == "3 pods > FD_APPROVAL_POD_DELETIONS = 2"
    assert three.plan == "evict 3 worker pods: a, b, c"
    assert approval.dlq_replays(s, 101, source="dlq -> steps").needed
    assert not approval.dlq_replays(s, 100, source="dlq -> steps").needed
    assert approval.failed_runs(s, 11, action="fail-runs").needed
    one = approval.failed_runs(Settings(approval_failed_runs=0), 1, action="fail-run", sample=["r1"])
    assert one.needed and one.plan == "fail 1 run: r1"
    assert not approval.llm_switch(s, deployment="worker", current="a/m", target="b/m").needed
    switch = approval.llm_switch(s.model_copy(update={"approval_llm_switch": True}), deployment="worker",
                                 current="a/m", target="b/m")
    assert switch.needed and switch.plan == "switch the workers' LLM model from a/m to b/m"
    many = approval.pod_deletions(s, [f"p{i}" for i in range(14)])
    assert many.plan.endswith("p9 (+4 more)")


def test_the_approval_form_is_typed_and_titled():
    from prefect._internal.pydantic.v2_schema import create_v2_schema

    schema = create_v2_schema("Approval", model_base=approval.Approval)
    props = schema["properties"]
    assert props["decision"]["enum"] == ["approve", "reject"] and set(schema["required"]) == {"decision", "approver"}
    assert [p["title"] for p in props.values()] == ["Decision", "Your name", "Reason"]
    with pytest.raises(ValueError):
        approval.Approval(decision="approve", approver="   ")


# ------------------------------------------------------------------------------------------------ the flows


def test_an_approved_plan_acts_once_and_names_who_approved(env, cluster, redis):
    s = gated(env, approval_pod_deletions=0)
    a = crashed(cluster, redis, s)
    before = queue_state(redis, s)
    with use_settings(s), ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)), \
            InBackground(worker_crash_recovery, pod=a, dry_run=False, verify_consuming_s=15) as bg:
        run = bg.paused()
        # while it waits: the plan is published, nothing has changed
        plan = report(run, "worker-crash-recovery-plan")
        assert "Awaiting approval: delete 1 worker pod: " + a in plan and "FD_APPROVAL_POD_DELETIONS = 0" in plan
        assert "Status: waiting for a person's approval" in plan and "not_verified" not in plan  # no outcome yet
        assert deletions(cluster) == [] and queue_state(redis, s) == before
        keys = {"schema": "paused-approval-delete-pod-schema", "description": "paused-approval-delete-pod-description"}
        form = read_flow_run_input(keys["schema"], flow_run_id=run.id)
        assert form["properties"]["approver"]["title"] == "Your name"
        description = read_flow_run_input(keys["description"], flow_run_id=run.id)
        assert f"delete 1 worker pod: {a}" in description and "`worker-crash-recovery-plan`" in description
        # a form without a name is refused by the server; the run stays paused
        assert answer(run, decision="approve") == SetStateStatus.REJECT
        assert bg.run().state.is_paused()
        # submitted twice: the first answer resumes it, the second finds it running and is refused
        assert answer(run, decision="approve", approver="alice", reason="one pod, known crash") == SetStateStatus.ACCEPT
        assert answer(run, decision="reject", approver="mallory", reason="too late") == SetStateStatus.ABORT
        state = bg.join()
    result = result_of(state)
    assert state.is_completed() and result.outcome is Outcome.RECOVERED
    assert deletions(cluster) == [a]  # acted once
    assert result.approval.decision == "approved" and result.approval.approver == "alice"
    assert result.approval.reason == "one pod, known crash" and result.approval.answered_at >= result.approval.asked_at
    done = [(x.kind, x.status) for x in result.actions]
    assert ("recover-entries", ActionStatus.DONE) in done and ("delete-pod", ActionStatus.DONE) in done
    md = report(run, "worker-crash-recovery")
    assert "Outcome: recovered" in md and "Approved by alice: one pod, known crash" in md
    events = approval_events(run, want={"ferrumdeck.recovery.approval-requested", "ferrumdeck.recovery.approval"})
    [decided] = events["ferrumdeck.recovery.approval"]
    assert decided["payload"]["approver"] == "alice" and decided["payload"]["decision"] == "approved"
    assert decided["resource"]["prefect.resource.id"] == "ferrumdeck.recovery.worker-crash-recovery"
    [outcome] = approval_events(run, want={"ferrumdeck.recovery.outcome"}, prefix="ferrumdeck.recovery.outcome")[
        "ferrumdeck.recovery.outcome"]
    assert outcome["payload"]["approval"] == {"decision": "approved", "approver": "alice",
                                              "reason": "one pod, known crash"}


def test_a_rejected_plan_changes_nothing_and_says_who_refused(env, cluster, redis):
    s = gated(env, approval_pod_deletions=0)
    a = crashed(cluster, redis, s)
    before = queue_state(redis, s)
    with use_settings(s), InBackground(worker_crash_recovery, pod=a, dry_run=False) as bg:
        run = bg.paused()
        assert answer(run, decision="reject", approver="bob", reason="investigating first") == SetStateStatus.ACCEPT
        state = bg.join()
    result = result_of(state)
    assert state.is_completed() and result.outcome is Outcome.REFUSED
    assert result.cause() == "refused: rejected by bob: investigating first"
    assert [(x.kind, x.target, x.status) for x in result.actions] == [("delete-pod", a, ActionStatus.REFUSED)]
    assert deletions(cluster) == [] and queue_state(redis, s) == before and a not in worker_pods(cluster, s)
    assert result.approval.decision == "rejected" and result.approval.approver == "bob"
    md = report(run, "worker-crash-recovery")
    assert "**Outcome: refused** — refused: rejected by bob: investigating first" in md
    [decided] = approval_events(run, want={"ferrumdeck.recovery.approval"})["ferrumdeck.recovery.approval"]
    assert (decided["payload"]["decision"], decided["payload"]["approver"]) == ("rejected", "bob")


def test_no_answer_in_time_is_a_rejection_and_the_run_ends_with_its_typed_result(env, cluster, redis):
    s = gated(env, approval_pod_deletions=0, approval_timeout_s=1.0)
    a = crashed(cluster, redis, s)
    before = queue_state(redis, s)
    with use_settings(s), InBackground(worker_crash_recovery, pod=a, dry_run=False) as bg:
        state = bg.join()
    result = result_of(state)
    assert result.outcome is Outcome.REFUSED and result.approval.decision == "timed_out"
    assert "no approval within 1 s" in result.cause() and result.approval.approver is None
    assert deletions(cluster) == [] and queue_state(redis, s) == before
    run = bg.run()
    assert run.state.is_completed(), run.state  # not Prefect's "paused and never resumed"
    assert answer(run, decision="approve", approver="late", reason="") == SetStateStatus.ABORT
    assert deletions(cluster) == []


def test_a_dry_run_never_pauses_and_says_a_real_run_would_ask(env, cluster, redis):
    s = gated(env, approval_pod_deletions=0)
    a = crashed(cluster, redis, s)
    with use_settings(s):
        result = worker_crash_recovery(pod=a, dry_run=True)
    assert result.outcome is Outcome.DRY_RUN and result.approval is None
    assert any("A real run would wait for a person's approval first: delete 1 worker pod" in str(d)
               for d in result.decided)


def _dead_letter(redis, s: Settings, jobs: list[str]) -> None:
    add_steps(redis, s, jobs, attempts=2)
    deliver(redis, s, "w-dead", len(jobs))
    sweep_pending(settings=s, policy=SweepPolicy(dead_consumers=["w-dead"]), dry_run=False)


def test_an_approved_replay_moves_no_more_than_was_approved(env, redis):
    s = gated(env, approval_dlq_replays=2)
    _dead_letter(redis, s, ["a", "b", "c"])
    with use_settings(s):
        dry = dlq_replay(replay_all=True, dry_run=True)  # never pauses; says a real run would ask
    assert dry.outcome is Outcome.DRY_RUN and dry.approval is None
    assert "A real run would wait for a person's approval first: replay 3 DLQ entries" in " ".join(map(str, dry.decided))
    with use_settings(s), InBackground(dlq_replay, replay_all=True, dry_run=False) as bg:
        run = bg.paused()
        assert "Awaiting approval: replay 3 DLQ entries" in report(run, "dlq-replay-plan")
        _dead_letter(redis, s, ["late1", "late2"])  # dead-lettered while the person reads the plan
        assert answer(run, decision="approve", approver="carol", reason="") == SetStateStatus.ACCEPT
        state = bg.join()
    result = result_of(state)
    assert result.outcome is Outcome.RECOVERED and result.replay.replayed == 3
    assert sorted(f["job_id"] for _, f in redis.xrange(s.dlq_stream)) == ["late1", "late2"]
    assert result.approval.approver == "carol"


def test_failing_many_stuck_runs_waits_and_a_rejection_leaves_them_running(env):
    s = gated(env, approval_failed_runs=2)
    ids = [f"run_stuck_{i}" for i in range(3)]
    rf.add_runs(s, [{"id": i, "status": "running", "started_at": rf.ago(120)} for i in ids])
    with use_settings(s), InBackground(stuck_runs_sweep, action="fail", dry_run=False) as bg:
        run = bg.paused()
        assert "Awaiting approval: fail 3 runs" in report(run, "stuck-runs-sweep-plan")
        assert answer(run, decision="reject", approver="dave", reason="DB incident, not workers") == SetStateStatus.ACCEPT
        state = bg.join()
    result = result_of(state)
    assert result.outcome is Outcome.REFUSED and result.failed == [] and "rejected by dave" in result.cause()
    assert {k: v for k, v in rf.statuses(s).items() if k in ids} == dict.fromkeys(ids, "running")
