"""Our own metrics after real recoveries: `queue-sweep` on a real Redis against the session's Prefect server —
the run, its actions, refusals, duration and heartbeat in the registry, its outcome event in Prefect, and the
kill switch and budget state read back from Prefect at scrape time."""

from __future__ import annotations

import time

import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.variables import Variable

from flows.queue_sweep import queue_sweep
from tasks import guard
from tasks.errors import Refused
from tasks.metrics import REGISTRY, StateCollector
from tasks.outcome import Outcome
from tasks.report import OUTCOME_EVENT
from tests.integration.queue_fixtures import add_steps, deliver, make_group
from tests.polling import wait_for

FLOW = "queue-sweep"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def state(settings) -> dict[str, float]:
    collector = StateCollector(lambda: settings, cache_s=0)
    return {(s.name + "".join(f"{{{v}}}" for v in s.labels.values())): s.value
            for family in collector.collect() for s in family.samples}


def outcome_events(flow_run_id: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_events(filter=EventFilter(
            event=EventNameFilter(name=[OUTCOME_EVENT]),
            related=EventRelatedFilter(resources_in_roles=[(f"prefect.flow-run.{flow_run_id}", "flow-run")]),
        ), limit=10).events


def test_a_recovered_sweep_counts_its_run_actions_duration_and_heartbeat_and_emits_its_outcome(active_settings, redis):
    settings = active_settings
    make_group(redis, settings)
    add_steps(redis, settings, [f"dead-{i}" for i in range(5)])
    deliver(redis, settings, "w-dead", 5)
    runs = value("ferrumdeck_recovery_runs_total", flow=FLOW, outcome="recovered")
    requeues = value("ferrumdeck_recovery_actions_total", flow=FLOW, kind="requeue", result="done")
    durations = value("ferrumdeck_recovery_duration_seconds_count", flow=FLOW, outcome="recovered")
    before = time.time()

    run_state = queue_sweep(dead_consumers=["w-dead"], dry_run=False, return_state=True)

    assert run_state.result().outcome is Outcome.RECOVERED
    assert value("ferrumdeck_recovery_runs_total", flow=FLOW, outcome="recovered") == runs + 1
    assert value("ferrumdeck_recovery_actions_total", flow=FLOW, kind="requeue", result="done") == requeues + 1
    assert value("ferrumdeck_recovery_duration_seconds_count", flow=FLOW, outcome="recovered") == durations + 1
    assert value("ferrumdeck_recovery_last_run_timestamp_seconds", flow=FLOW) >= before
    flow_run_id = str(run_state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        ended = client.read_flow_run(flow_run_id).end_time
    assert state(settings)["ferrumdeck_recovery_heartbeat_timestamp_seconds"] >= ended.timestamp()  # newest sweep
    [event] = wait_for(lambda: outcome_events(flow_run_id), timeout=30, interval=0.5, what="the outcome event")
    assert event.resource["ferrumdeck.flow"] == FLOW and event.resource["ferrumdeck.outcome"] == "recovered"
    assert event.resource["ferrumdeck.target"] == f"{settings.stream}/{settings.group}"  # what the sweep acted on
    assert event.payload["flow_run_id"] == flow_run_id and event.payload["outcome"] == "recovered"


def test_the_kill_switch_counts_a_refusal_and_shows_as_engaged_while_on(active_settings, redis):
    settings = active_settings
    make_group(redis, settings)
    add_steps(redis, settings, ["k-1"])
    deliver(redis, settings, "w-dead", 1)
    refusals = value("ferrumdeck_recovery_guard_refusals_total", flow=FLOW, reason="kill_switch")
    refused_runs = value("ferrumdeck_recovery_runs_total", flow=FLOW, outcome="refused")
    assert state(settings)["ferrumdeck_recovery_kill_switch_engaged"] == 0
    Variable.set(settings.kill_switch_variable, True, overwrite=True)
    try:
        assert state(settings)["ferrumdeck_recovery_kill_switch_engaged"] == 1
        out = queue_sweep(dead_consumers=["w-dead"], dry_run=False)
    finally:
        Variable.unset(settings.kill_switch_variable)
    assert out.outcome is Outcome.REFUSED
    assert value("ferrumdeck_recovery_guard_refusals_total", flow=FLOW, reason="kill_switch") == refusals + 1
    assert value("ferrumdeck_recovery_runs_total", flow=FLOW, outcome="refused") == refused_runs + 1
    assert state(settings)["ferrumdeck_recovery_kill_switch_engaged"] == 0
    assert state(settings)["ferrumdeck_recovery_state_up"] == 1


def test_budget_remaining_falls_with_each_action_the_guard_allows(settings):
    settings = settings.model_copy(update={"pod_deletions_per_hour": 2})
    budget = guard.pod_deletion_budget(settings)
    key = "ferrumdeck_recovery_budget_remaining{pod-deletions}"
    assert state(settings)[key] == 2  # never used: the limit does not exist yet
    for left in (1, 0):
        guard.authorize(action="delete-pod", target=f"w-{left}", settings=settings, budget=budget, cooldown_s=0)
        assert state(settings)[key] == left
    with pytest.raises(Refused, match="budget"):
        guard.authorize(action="delete-pod", target="w-x", settings=settings, budget=budget, cooldown_s=0)
    assert state(settings)["ferrumdeck_recovery_budget_limit{pod-deletions}"] == 2
