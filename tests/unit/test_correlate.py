"""Pure correlation and decisions: which workers crashed or hung, poison suspects, triage plans, checklist."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.correlate import (
    ConsumerState,
    PendingEntry,
    PodState,
    Sample,
    TriageObservation,
    correlate,
    decide_crash,
    decide_hang,
    lag_falling,
    lag_growing,
    no_stuck_runs,
    plan_triage,
    pod_of_consumer,
    poison_entries,
    queue_depth_ok,
    root_cause,
    workers_ready_and_consuming,
)


def ident(pod: str) -> str:
    return pod


def prefixed(pod: str) -> str:
    return f"fd-{pod}"


def pods_and_consumers():
    pods = [
        PodState(name="w-ok", cpu_millicores=250),
        PodState(name="w-crash", ready=False, classification="crash-looping", restarts=4, last_exit_code=1,
                 log_tail=["Traceback (most recent call last):", "ValueError: bad step"]),
        PodState(name="w-oom", ready=False, classification="oom-killed", last_reason="OOMKilled", last_exit_code=137),
    ]
    consumers = [
        ConsumerState(name="w-ok", pending=5, idle_ms=10),
        ConsumerState(name="w-crash", pending=3, idle_ms=100),
        ConsumerState(name="w-gone", pending=7, idle_ms=5),
        ConsumerState(name="w-gone-empty", pending=0, idle_ms=5),
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
    links = correlate(pods=[PodState(name="w-1")], consumers=[ConsumerState(name="fd-w-1", pending=2)],
                      consumer_for_pod=prefixed)
    assert len(links) == 1 and links[0].pending == 2
    assert pod_of_consumer("fd-w-1", consumer_for_pod=prefixed) == "w-1"
    assert pod_of_consumer("other", consumer_for_pod=prefixed) == "other"


def test_crash_targets_are_crashed_pods_and_podless_consumers_with_entries_never_a_healthy_one():
    pods, consumers = pods_and_consumers()
    links = correlate(pods=pods, consumers=consumers, consumer_for_pod=ident)
    d = decide_crash(links=links, pod=None, consumer_for_pod=ident)
    got = {t.pod: (t.cause, t.replace_pod, t.pending) for t in d.targets}
    assert got == {"w-crash": ("crash-looping", True, 3), "w-oom": ("oom-killed", True, 0),
                   "w-gone": ("pod-gone", False, 7)}
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
    assert [t.cause for t in gone_empty.targets] == ["pod-gone"]


def test_terminating_crashed_pod_is_not_deleted_again():
    links = correlate(pods=[PodState(name="w", ready=False, classification="crash-looping", terminating=True)],
                      consumers=[], consumer_for_pod=ident)
    assert decide_crash(links=links, pod=None, consumer_for_pod=ident).targets[0].replace_pod is False


def test_poison_is_the_crashed_consumers_entry_delivered_twice_or_more():
    entries = [
        PendingEntry(entry_id="1-0", consumer="w-crash", deliveries=1),
        PendingEntry(entry_id="3-0", consumer="w-crash", deliveries=5),
        PendingEntry(entry_id="2-0", consumer="w-crash", deliveries=2),
        PendingEntry(entry_id="4-0", consumer="w-ok", deliveries=9),
    ]
    # several suspects, no log evidence: the oldest, the one a worker working in id order died on
    assert [e.entry_id for e in poison_entries(entries, consumer="w-crash")] == ["2-0"]
    assert [e.entry_id for e in poison_entries(entries, consumer="w-crash", min_deliveries=3)] == ["3-0"]
    assert poison_entries(entries, consumer="w-crash", min_deliveries=6) == []
    assert poison_entries(entries, consumer="w-none") == []


def test_poison_named_in_the_crash_log_wins_over_its_batch_mates():
    batch = [PendingEntry(entry_id=f"10-{i}", consumer="w", deliveries=2, step_id=f"step_{i}") for i in range(5)]
    log = ["Traceback (most recent call last): poison step step_3 (entry 10-3)", "WorkerCrashed"]
    assert [e.entry_id for e in poison_entries(batch, consumer="w", log_lines=log)] == ["10-3"]
    by_step = poison_entries(batch, consumer="w", log_lines=["KeyError while handling step_4"])
    assert [e.entry_id for e in by_step] == ["10-4"]


def test_root_cause_names_oom_error_exit_poison_and_gone():
    oom = PodState(name="w", classification="oom-killed", last_reason="OOMKilled", last_exit_code=137)
    assert "OOMKilled" in root_cause(cause="oom-killed", state=oom, poison=[])
    err = PodState(name="w", classification="crash-looping", last_exit_code=1, log_tail=["x", "ValueError: bad", ""])
    text = root_cause(cause="crash-looping", state=err, poison=[PendingEntry(entry_id="9-0", consumer="w", deliveries=3)])
    assert "poison entry suspected (9-0" in text and "named in the crash log" not in text and "code 1" in text and "ValueError: bad" in text
    assert "gone" in root_cause(cause="pod-gone", state=None, poison=[])


def _sample(at, lag, cpu, idle, pending=4, ready=True, phase="Running"):
    return Sample(
        at=at, lag=lag,
        pods=[PodState(name="w-hung", ready=ready, phase=phase, cpu_millicores=cpu),
              PodState(name="w-busy", cpu_millicores=400)],
        consumers=[ConsumerState(name="w-hung", pending=pending, idle_ms=idle),
                   ConsumerState(name="w-busy", pending=10, idle_ms=idle)],
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
    idle = correlate(pods=[PodState(name="a"), PodState(name="b")], consumers=[ConsumerState(name="a", idle_ms=5)],
                     consumer_for_pod=ident)
    quiet = workers_ready_and_consuming(links=idle, desired=None, max_consumer_idle_ms=1000, lag=0)
    assert quiet.ok and "1 idle with nothing waiting" in quiet.evidence
    stuck = workers_ready_and_consuming(links=idle, desired=None, max_consumer_idle_ms=1000, lag=7)
    assert stuck.ok is False and "7 steps waiting" in stuck.evidence and ": b" in stuck.evidence
    good_links = correlate(pods=[PodState(name="a"), PodState(name="b")],
                           consumers=[ConsumerState(name="a", idle_ms=5), ConsumerState(name="b", idle_ms=5)],
                           consumer_for_pod=ident)
    good = workers_ready_and_consuming(links=good_links, desired=2, max_consumer_idle_ms=1000)
    assert good.ok and "2 worker pods" in good.evidence
    assert queue_depth_ok(lag=5, pending=1, length=9, max_depth=10).ok
    assert not queue_depth_ok(lag=50, pending=1, length=90, max_depth=10).ok
    assert not no_stuck_runs(stuck=["run_1"], older_than_minutes=30).ok and no_stuck_runs(stuck=[], older_than_minutes=30).ok


def test_triage_plan_orders_dependencies_then_workers_and_ends_with_the_check():
    pods, consumers = pods_and_consumers()
    pods.append(PodState(name="w-hung", cpu_millicores=0))
    consumers.append(ConsumerState(name="w-hung", pending=4, idle_ms=600_000))
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
    links = correlate(pods=[PodState(name="a", cpu_millicores=300)], consumers=[ConsumerState(name="a", pending=1)],
                      consumer_for_pod=ident)
    busy = plan_triage(obs=TriageObservation(links=links, lag=5000, ready_workers=3, desired_workers=3),
                       consumer_for_pod=ident, hang_min_idle_ms=60_000, hang_max_cpu_millicores=5,
                       backlog_threshold=100, max_replicas=5)
    assert [(s.flow, s.parameters) for s in busy] == [("scale-workers", {"replicas": 5}), ("post-recovery-check", {})]
    calm = plan_triage(obs=TriageObservation(links=links, mcp_healthy=True), consumer_for_pod=ident,
                       hang_min_idle_ms=60_000, hang_max_cpu_millicores=5, backlog_threshold=100, max_replicas=5)
    assert [s.flow for s in calm] == ["post-recovery-check"]
