"""Pure correlation and decisions: which workers crashed or hung, poison suspects, triage plans, checklist.

They take the one model of each thing: ``PodInfo`` (a pod), ``ConsumerInfo`` (a consumer), ``PendingEntry``
(a pending entry, deliveries counted over its copies).
"""

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.correlate import (
    Sample,
    TriageObservation,
    consumer_reading,
    correlate,
    crash_cause,
    decide_crash,
    decide_hang,
    lag_falling,
    lag_growing,
    live_consumers,
    no_stuck_runs,
    plan_crash,
    plan_moves,
    plan_triage,
    pod_of_consumer,
    poison_entries,
    queue_depth_ok,
    removal_refused,
    root_cause,
    workers_ready_and_consuming,
)
from tasks.kube_diagnosis import Classification, PodInfo, Termination
from tasks.queue import ConsumerInfo, PendingEntry


def ident(pod: str) -> str:
    return pod


def prefixed(pod: str) -> str:
    return f"fd-{pod}"


def pod(name: str, *, ready: bool = True, phase: str = "Running", classification=Classification.HEALTHY,
             restarts: int = 0, terminating: bool = False, cpu_millicores=None, last_reason=None,
             last_exit_code=None, log_tail=()) -> PodInfo:
    """A worker pod as a diagnosis gives it (Running and Ready and healthy unless told otherwise)."""
    last = Termination(reason=last_reason, exit_code=last_exit_code) if last_reason or last_exit_code is not None else None
    return PodInfo(name=name, ready=ready, phase=phase, classification=classification, restart_count=restarts,
                   deleting_since=datetime.now(UTC) if terminating else None, cpu_millicores=cpu_millicores,
                   last_termination=last, log_tail=list(log_tail))


def consumer(name: str, *, pending: int = 0, idle_ms: int = 0) -> ConsumerInfo:
    return ConsumerInfo(name=name, pending=pending, idle_ms=idle_ms)


def entry(entry_id: str, consumer: str, *, deliveries: int = 1, attempts: int = 0, step_id: str = "",
          run_id: str = "", exists: bool = True) -> PendingEntry:
    return PendingEntry(entry_id, consumer, 10, deliveries, exists, attempts, step_id, step_id, run_id)


def pods_and_consumers():
    pods = [
        pod(name="w-ok", cpu_millicores=250),
        pod(name="w-crash", ready=False, classification=Classification.CRASH_LOOPING, restarts=4,
                 last_exit_code=1, log_tail=["Traceback (most recent call last):", "ValueError: bad step"]),
        pod(name="w-oom", ready=False, classification=Classification.OOM_KILLED, last_reason="OOMKilled",
                 last_exit_code=137),
    ]
    consumers = [
        consumer(name="w-ok", pending=5, idle_ms=10),
        consumer(name="w-crash", pending=3, idle_ms=100),
        consumer(name="w-gone", pending=7, idle_ms=5),
        consumer(name="w-gone-empty", pending=0, idle_ms=5),
    ]
    return pods, consumers


def test_correlate_joins_pods_and_consumers_and_keeps_podless_consumers():
    pods, consumers = pods_and_consumers()
    links = correlate(pods=pods, consumers=consumers, consumer_for_pod=ident)
    by = {lnk.consumer: lnk for lnk in links}
    assert by["w-ok"].pod == "w-ok" and by["w-ok"].pending == 5
    assert by["w-oom"].consumer_state is None and by["w-oom"].pending == 0
    assert by["w-gone"].pod is None and not by["w-gone"].pod_exists and by["w-gone"].pending == 7
    assert [lnk.pod for lnk in links][-2:] == [None, None]


def test_correlate_uses_the_mapping_template():
    links = correlate(pods=[pod(name="w-1")], consumers=[consumer(name="fd-w-1", pending=2)],
                      consumer_for_pod=prefixed)
    assert len(links) == 1 and links[0].pending == 2
    assert pod_of_consumer("fd-w-1", consumer_for_pod=prefixed) == "w-1"
    assert pod_of_consumer("other", consumer_for_pod=prefixed) == "other"


def test_crash_targets_are_crashed_pods_and_podless_consumers_with_entries_never_a_healthy_one():
    pods, consumers = pods_and_consumers()
    links = correlate(pods=pods, consumers=consumers, consumer_for_pod=ident)
    d = decide_crash(links=links, pod=None, consumer_for_pod=ident)
    got = {t.pod: (t.cause, t.replace_pod, t.pending) for t in d.targets}
    assert got == {"w-crash": (Classification.CRASH_LOOPING, True, 3), "w-oom": (Classification.OOM_KILLED, True, 0),
                   "w-gone": (Classification.GONE, False, 7)}
    assert "w-ok" not in got and "w-gone-empty" not in got


def test_crash_for_a_named_healthy_pod_takes_nothing_and_says_why():
    pods, consumers = pods_and_consumers()
    links = correlate(pods=pods, consumers=consumers, consumer_for_pod=ident)
    d = decide_crash(links=links, pod="w-ok", consumer_for_pod=ident)
    assert d.targets == [] and "healthy" in d.skipped[0].reason
    unknown = decide_crash(links=links, pod="w-nope", consumer_for_pod=ident)
    assert unknown.targets == [] and "nothing to recover" in unknown.skipped[0].reason
    one = decide_crash(links=links, pod="w-crash", consumer_for_pod=ident)
    assert [t.pod for t in one.targets] == ["w-crash"]
    gone_empty = decide_crash(links=links, pod="w-gone-empty", consumer_for_pod=ident)
    assert [t.cause for t in gone_empty.targets] == [Classification.GONE]


def test_terminating_crashed_pod_is_not_deleted_again():
    links = correlate(pods=[pod(name="w", ready=False, classification=Classification.CRASH_LOOPING, terminating=True)],
                      consumers=[], consumer_for_pod=ident)
    assert decide_crash(links=links, pod=None, consumer_for_pod=ident).targets[0].replace_pod is False


def test_crash_cause_is_a_classification_never_a_free_string():
    assert crash_cause(pod("w", ready=False, classification=Classification.CRASH_LOOPING)) is Classification.CRASH_LOOPING
    assert crash_cause(pod("w", phase="Failed", ready=False, classification=None)) is Classification.FAILED
    unclassified_oom = pod("w", ready=False, classification=None, last_reason="OOMKilled", last_exit_code=137)
    assert crash_cause(unclassified_oom) is Classification.OOM_KILLED
    assert crash_cause(pod("w", classification=Classification.HUNG_SUSPECT)) is None
    assert crash_cause(pod("w", ready=False, classification=Classification.UNSCHEDULABLE)) is None


def test_poison_is_the_crashed_consumers_entry_delivered_twice_or_more():
    entries = [
        entry("1-0", "w-crash", deliveries=1),
        entry("3-0", "w-crash", deliveries=5),
        entry("2-0", "w-crash", deliveries=1, attempts=1),  # requeued once: 2 deliveries over its copies
        entry("4-0", "w-ok", deliveries=9),
    ]
    # several suspects, no log evidence: the oldest, the one a worker working in id order died on
    assert [e.entry_id for e in poison_entries(entries, consumer="w-crash")] == ["2-0"]
    assert [e.entry_id for e in poison_entries(entries, consumer="w-crash", min_deliveries=3)] == ["3-0"]
    assert poison_entries(entries, consumer="w-crash", min_deliveries=6) == []
    assert poison_entries(entries, consumer="w-none") == []


def test_poison_named_in_the_crash_log_wins_over_its_batch_mates():
    batch = [entry(f"10-{i}", "w", deliveries=2, step_id=f"step_{i}") for i in range(5)]
    log = ["Traceback (most recent call last): poison step step_3 (entry 10-3)", "WorkerCrashed"]
    assert [e.entry_id for e in poison_entries(batch, consumer="w", log_lines=log)] == ["10-3"]
    by_step = poison_entries(batch, consumer="w", log_lines=["KeyError while handling step_4"])
    assert [e.entry_id for e in by_step] == ["10-4"]


def test_root_cause_names_oom_error_exit_poison_and_gone():
    oom = pod(name="w", classification=Classification.OOM_KILLED, last_reason="OOMKilled", last_exit_code=137)
    assert "OOMKilled" in root_cause(cause=Classification.OOM_KILLED, state=oom, poison=[])
    err = pod(name="w", classification=Classification.CRASH_LOOPING, last_exit_code=1,
                   log_tail=["x", "ValueError: bad", ""])
    text = root_cause(cause=Classification.CRASH_LOOPING, state=err, poison=[entry("9-0", "w", deliveries=3)])
    assert "poison entry suspected (9-0" in text and "named in the crash log" not in text and "code 1" in text and "ValueError: bad" in text
    assert "gone" in root_cause(cause=Classification.GONE, state=None, poison=[])


def test_moves_follow_the_sweep_rule_for_a_dead_owner_with_the_poison_set_apart():
    held = [entry("1-0", "w", deliveries=1), entry("2-0", "w", deliveries=2), entry("3-0", "w", deliveries=2, attempts=1),
            entry("4-0", "w", exists=False), entry("5-0", "other", deliveries=9)]
    moves = plan_moves(held, consumer="w", poison=[held[1]], max_deliveries=3)
    assert (moves.poison, moves.requeue, moves.dead_letter, moves.orphan) == (["2-0"], ["1-0"], ["3-0"], ["4-0"])
    assert moves.dead_lettered == ["2-0", "3-0"]


def _crash_plans(*, ready_workers=3, min_healthy=1, replace_pod=True, crashed_ready=False):
    pods, consumers = pods_and_consumers()
    if crashed_ready:  # a crash-classified pod that still reports Ready (just restarted)
        pods[1] = pods[1].model_copy(update={"ready": True})
    links = correlate(pods=pods, consumers=consumers, consumer_for_pod=ident)
    decision = decide_crash(links=links, pod=None, consumer_for_pod=ident)
    entries = {"w-crash": [entry("1-0", "w-crash"), entry("2-0", "w-crash", deliveries=2, run_id="run-2"),
                           entry("3-0", "w-crash", deliveries=3, run_id="run-3")],
               "w-gone": [entry("7-0", "w-gone", deliveries=4, run_id="run-7")]}
    plans = plan_crash(decision=decision, pods={p.name: p for p in pods}, entries=entries, poison_min_deliveries=2,
                       max_deliveries=3, replace_pod=replace_pod, ready_workers=ready_workers,
                       min_healthy_workers=min_healthy)
    return {p.target.pod: p for p in plans}


def test_crash_plan_names_the_poison_the_moves_the_pod_action_and_the_root_cause():
    plans = _crash_plans()
    crash, oom, gone = plans["w-crash"], plans["w-oom"], plans["w-gone"]
    assert [e.entry_id for e in crash.poison] == ["2-0"]  # the oldest suspect: no log names one
    assert (crash.moves.requeue, crash.moves.dead_letter) == (["1-0"], ["3-0"])
    assert crash.replace and crash.replace_refused is None and crash.run_ids == ["run-2", "run-3"]
    assert "poison entry suspected (2-0" in crash.root_cause and "ValueError: bad step" in crash.root_cause
    assert oom.entries == [] and oom.replace and "OOMKilled" in oom.root_cause
    # a pod that is merely gone: no process died on its entries, so no poison (max_deliveries still applies)
    assert gone.poison == [] and gone.moves.dead_letter == ["7-0"] and not gone.replace
    row = crash.row()
    assert row["cause"] == "crash-looping" and row["poison"] == "2-0" and row["pod action"] == "replace"
    assert all(not isinstance(v, list | dict | tuple) for v in row.values())  # no Python reprs in the report


def test_crash_plan_never_replaces_a_ready_pod_below_the_minimum_and_honours_replace_pod():
    refused = _crash_plans(ready_workers=1, min_healthy=1, crashed_ready=True)["w-crash"]
    assert not refused.replace and "fewer than 1 Ready" in refused.replace_refused
    assert _crash_plans(ready_workers=3, min_healthy=1, crashed_ready=True)["w-crash"].replace
    kept = _crash_plans(replace_pod=False)
    assert not any(p.replace for p in kept.values()) and not any(p.replace_refused for p in kept.values())


def test_safety_rules_and_verification_helpers():
    assert removal_refused(pod="w", ready_workers=2, min_healthy_workers=1) is None
    assert "min_healthy_workers=1" in removal_refused(pod="w", ready_workers=1, min_healthy_workers=1)
    assert consumer_reading(seen=True, lag=50) and consumer_reading(seen=False, lag=0)
    assert not consumer_reading(seen=False, lag=3)
    pods, consumers = pods_and_consumers()
    links = correlate(pods=pods + [pod("w-term", terminating=True)], consumers=consumers, consumer_for_pod=ident)
    assert live_consumers(links) == ["w-ok"] and live_consumers(links, besides=["w-ok"]) == []


def _sample(at, lag, cpu, idle, pending=4, ready=True, phase="Running"):
    return Sample(
        at=at, lag=lag,
        pods=[pod(name="w-hung", ready=ready, phase=phase, cpu_millicores=cpu),
              pod(name="w-busy", cpu_millicores=400)],
        consumers=[consumer(name="w-hung", pending=pending, idle_ms=idle),
                   consumer(name="w-busy", pending=10, idle_ms=idle)],
    )


def test_hang_needs_ready_pending_idle_low_cpu_and_growing_lag():
    samples = [_sample(0, 10, 1, 5_000), _sample(1, 14, 0, 6_000), _sample(2, 20, 0, 7_000)]
    d = decide_hang(samples=samples, consumer_for_pod=ident, min_idle_ms=5_000, max_cpu_millicores=5)
    assert [v.pod for v in d.hung] == ["w-hung"] and d.lag_growing
    busy = next(v for v in d.verdicts if v.pod == "w-busy")
    assert not busy.hung and "busy" in busy.reason


@pytest.mark.parametrize(
    ("samples", "why"),
    [
        ([_sample(0, 10, 1, 5_000), _sample(1, 10, 0, 6_000)], "lag is not growing"),
        ([_sample(0, 10, 1, 5_000), _sample(1, 12, 50, 6_000)], "busy"),
        ([_sample(0, 10, 1, 5_000), _sample(1, 12, None, 6_000)], "no CPU metrics"),
        ([_sample(0, 10, 1, 5_000), _sample(1, 12, 0, 100)], "active"),
        ([_sample(0, 10, 1, 5_000), _sample(1, 12, 0, 6_000, pending=0)], "no pending"),
        ([_sample(0, 10, 1, 5_000), _sample(1, 12, 0, 6_000, ready=False)], "not Running+Ready"),
    ],
)
def test_hang_refuses_without_every_piece_of_evidence(samples, why):
    d = decide_hang(samples=samples, consumer_for_pod=ident, pod="w-hung", min_idle_ms=5_000, max_cpu_millicores=5)
    assert d.hung == [] and why in d.verdicts[0].reason


def test_hang_without_lag_requirement_and_unknown_pod():
    samples = [_sample(0, 10, 1, 5_000), _sample(1, 10, 0, 6_000)]
    d = decide_hang(samples=samples, consumer_for_pod=ident, pod="w-hung", min_idle_ms=5_000, max_cpu_millicores=5,
                    require_lag_growth=False)
    assert [v.pod for v in d.hung] == ["w-hung"]
    gone = decide_hang(samples=samples, consumer_for_pod=ident, pod="w-x", min_idle_ms=1, max_cpu_millicores=5)
    assert gone.hung == [] and "no such pod" in gone.verdicts[0].reason
    with pytest.raises(ValueError):
        decide_hang(samples=[], consumer_for_pod=ident, min_idle_ms=1, max_cpu_millicores=1)


def test_a_lag_back_to_normal_counts_as_falling():
    """Under a steady load the lag wobbles (0 -> 1): at or under the normal depth is not a backlog."""
    assert lag_falling([0, 0, 1], normal=100) and lag_falling([0, 1, 0]) and lag_falling([50, 40])
    assert not lag_falling([0, 0, 1]) and not lag_falling([0, 101, 101], normal=100) and not lag_falling([])


@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=0, max_size=8))
def test_lag_growing_and_falling_are_exclusive(series):
    assert not (lag_growing(series) and lag_falling(series) and series[-1] != 0)
    if lag_growing(series):
        assert series[-1] > series[0]


def test_checklist_items_carry_evidence():
    pods, consumers = pods_and_consumers()
    links = correlate(pods=pods, consumers=consumers, consumer_for_pod=ident)
    bad = workers_ready_and_consuming(links=links, desired=3, max_consumer_idle_ms=1000)
    assert bad.ok is False and "w-crash" in bad.evidence and "w-oom" in bad.evidence
    idle = correlate(pods=[pod(name="a"), pod(name="b")], consumers=[consumer(name="a", idle_ms=5)],
                     consumer_for_pod=ident)
    quiet = workers_ready_and_consuming(links=idle, desired=None, max_consumer_idle_ms=1000, lag=0)
    assert quiet.ok and "1 idle with nothing waiting" in quiet.evidence
    stuck = workers_ready_and_consuming(links=idle, desired=None, max_consumer_idle_ms=1000, lag=7)
    assert stuck.ok is False and "7 steps waiting" in stuck.evidence and ": b" in stuck.evidence
    good_links = correlate(pods=[pod(name="a"), pod(name="b")],
                           consumers=[consumer(name="a", idle_ms=5), consumer(name="b", idle_ms=5)],
                           consumer_for_pod=ident)
    good = workers_ready_and_consuming(links=good_links, desired=2, max_consumer_idle_ms=1000)
    assert good.ok and "2 worker pods" in good.evidence
    assert queue_depth_ok(lag=5, pending=1, length=9, max_depth=10).ok
    assert not queue_depth_ok(lag=50, pending=1, length=90, max_depth=10).ok
    assert not no_stuck_runs(stuck=["run_1"], older_than_minutes=30).ok and no_stuck_runs(stuck=[], older_than_minutes=30).ok


def test_triage_plan_orders_dependencies_then_workers_and_ends_with_the_check():
    pods, consumers = pods_and_consumers()
    pods.append(pod(name="w-hung", cpu_millicores=0))
    consumers.append(consumer(name="w-hung", pending=4, idle_ms=600_000))
    obs = TriageObservation(links=correlate(pods=pods, consumers=consumers, consumer_for_pod=ident),
                            lag=500, stuck_runs=2, mcp_healthy=False, llm_failing_models=["openai/gpt-4o"])
    plan = plan_triage(obs=obs, consumer_for_pod=ident, hang_min_idle_ms=60_000, hang_max_cpu_millicores=5,
                       backlog_threshold=100, max_replicas=10)
    flows = [s.flow for s in plan]
    assert flows[:2] == ["mcp-server-recovery", "llm-provider-failover"]
    assert flows[-1] == "post-recovery-check" and flows[-2] == "stuck-runs-sweep"
    assert {s.parameters.get("pod") for s in plan if s.flow == "worker-crash-recovery"} == {"w-crash", "w-oom", "w-gone"}
    assert [s.parameters for s in plan if s.flow == "worker-hang-recovery"] == [{"pod": "w-hung"}]
    assert "scale-workers" not in flows  # the backlog has a cause being fixed


def test_triage_scales_a_backlog_only_when_workers_are_healthy_and_plans_only_the_check_when_calm():
    links = correlate(pods=[pod(name="a", cpu_millicores=300)], consumers=[consumer(name="a", pending=1)],
                      consumer_for_pod=ident)
    busy = plan_triage(obs=TriageObservation(links=links, lag=5000, ready_workers=3, desired_workers=3),
                       consumer_for_pod=ident, hang_min_idle_ms=60_000, hang_max_cpu_millicores=5,
                       backlog_threshold=100, max_replicas=5)
    assert [(s.flow, s.parameters) for s in busy] == [("scale-workers", {"replicas": 5}), ("post-recovery-check", {})]
    calm = plan_triage(obs=TriageObservation(links=links, mcp_healthy=True), consumer_for_pod=ident,
                       hang_min_idle_ms=60_000, hang_max_cpu_millicores=5, backlog_threshold=100, max_replicas=5)
    assert [s.flow for s in calm] == ["post-recovery-check"]
