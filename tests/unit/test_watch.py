"""The direct watcher's pure decisions (no I/O), its event shape against prefect.yaml's real triggers, the
delivery to Prefect (a stub API), the CLI and the manifest."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.watch import (
    EVENTS,
    Condition,
    ConsumerSample,
    Episode,
    Policy,
    PrefectEvents,
    State,
    backoff_delay,
    decide_consumers,
    decide_pod,
    decide_relist,
    event_json,
    lag_growing,
    selector_string,
    tick,
    track,
)
from tasks.kube_diagnosis import pod_info

P = Policy(reemit_s=300, clear_after_s=60, hang_min_idle_ms=10_000, lag_samples=3)
T0 = 1_700_000_000.0
MANIFEST = Path(__file__).resolve().parents[2] / "deployments" / "kubernetes" / "watcher.yaml"


def pod(name: str, *, ready: bool = True, waiting: str | None = None, last_reason: str | None = None,
        restarts: int = 0, unschedulable: bool = False, deleting: bool = False) -> dict:
    """A pod as the watch sends it (camelCase JSON)."""
    status: dict = {"phase": "Pending" if unschedulable else "Running"}
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": "0/1 nodes are available: 1 Insufficient cpu."}]
    else:
        state = {"waiting": {"reason": waiting}} if waiting else {"running": {"startedAt": "2024-01-01T00:00:00Z"}}
        cs: dict = {"name": "worker", "ready": ready, "restartCount": restarts, "state": state}
        if last_reason:
            cs["lastState"] = {"terminated": {"reason": last_reason, "exitCode": 137 if last_reason == "OOMKilled" else 1,
                                              "finishedAt": "2024-01-01T00:00:00Z"}}
        status["containerStatuses"] = [cs]
    meta: dict = {"name": name, "uid": f"uid-{name}", "namespace": "ferrumdeck"}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:30Z"
    return {"metadata": meta, "status": status, "spec": {"nodeName": "node-1"}}


def info(name: str, **kw):
    return pod_info(pod(name, **kw), container="worker")


def see(state: State, name: str, *, now: float, kind: str = "MODIFIED", role: str = "worker", **kw):
    return decide_pod(state, kind=kind, pod=info(name, **kw), role=role, now=now, policy=P)


def crash_looping(name: str, restarts: int = 1) -> dict:
    return {"waiting": "CrashLoopBackOff", "ready": False, "last_reason": "Error", "restarts": restarts}


# ----------------------------------------------------------------------------- the episode rule


def test_track_emits_once_per_episode_re_emits_after_the_interval_and_clears_after_healthy_for_a_while():
    ep, emit = track(None, active=True, healthy=False, now=T0, policy=P)
    assert emit and ep == Episode(started=T0, emitted=T0, count=1)
    ep, emit = track(ep, active=True, healthy=False, now=T0 + 299, policy=P)
    assert not emit
    ep, emit = track(ep, active=True, healthy=False, now=T0 + 300, policy=P)
    assert emit and ep.count == 2 and ep.started == T0  # the same episode, reported again
    ep, emit = track(ep, active=False, healthy=True, now=T0 + 310, policy=P)  # healthy, not long enough yet
    assert not emit and ep.healthy_since == T0 + 310
    ep2, emit = track(ep, active=True, healthy=False, now=T0 + 320, policy=P)  # back before it cleared
    assert not emit and ep2.started == T0 and ep2.healthy_since is None
    cleared, emit = track(ep, active=False, healthy=True, now=T0 + 370, policy=P)  # healthy for 60 s: over
    assert cleared is None and not emit
    new, emit = track(ep, active=True, healthy=False, now=T0 + 370, policy=P)  # active again after it cleared
    assert emit and new.started == T0 + 370


def test_track_keeps_an_episode_while_neither_active_nor_healthy():
    ep, _ = track(None, active=True, healthy=False, now=T0, policy=P)
    kept, emit = track(ep, active=False, healthy=False, now=T0 + 1000, policy=P)  # e.g. restarting, not Ready
    assert kept == ep and not emit


# ----------------------------------------------------------------------------- pods


def test_a_crash_loop_gives_one_event_across_restarts_and_the_runs_between_them():
    state, found = see(State(), "w1", now=T0, ready=True)
    assert found == []
    events = []
    for i, kw in enumerate([crash_looping("w1", 1), {"ready": False, "restarts": 1},  # running, unready, between
                            crash_looping("w1", 2), crash_looping("w1", 3)]):
        state, found = see(state, "w1", now=T0 + 10 + i, **kw)
        events += found
    [d] = events
    assert d.event == "ferrumdeck.pod.crash-looping" and d.subject == "w1" and d.repeat == 0
    assert d.labels == {"pod": "w1", "namespace": "ferrumdeck", "role": "worker", "condition": "crash-looping",
                        "consumer": "w1"}
    assert d.evidence["restart_count"] == 1 and d.evidence["waiting_reason"] == "CrashLoopBackOff"
    assert "crash-looping" in d.detail


def test_oom_killed_is_reported_as_such_not_also_as_a_crash_loop():
    _, found = see(State(), "w1", now=T0, waiting="CrashLoopBackOff", ready=False, last_reason="OOMKilled", restarts=2)
    assert [d.event for d in found] == ["ferrumdeck.pod.oom-killed"]
    assert found[0].evidence["last_exit_reason"] == "OOMKilled" and found[0].evidence["last_exit_code"] == 137


def test_unschedulable_pod():
    _, found = see(State(), "w4", now=T0, unschedulable=True)
    [d] = found
    assert d.event == "ferrumdeck.pod.unschedulable" and "Insufficient cpu" in d.evidence["unschedulable_message"]


def test_mcp_pods_have_their_own_event_names():
    _, found = see(State(), "mcp-1", now=T0, role="mcp", **crash_looping("mcp-1"))
    [d] = found
    assert d.event == "ferrumdeck.mcp.crash-looping" and d.role == "mcp" and "consumer" not in d.labels


def test_healthy_terminating_and_merely_restarting_pods_give_nothing():
    state = State()
    for kw in ({"ready": True}, {"ready": True, "deleting": True}, {"ready": False}, {"ready": True, "restarts": 1}):
        state, found = see(state, "w1", now=T0, **kw)
        assert found == []


def test_a_recovered_pod_that_crashes_again_later_is_a_new_episode():
    state, [first] = see(State(), "w1", now=T0, **crash_looping("w1"))
    state, _ = see(state, "w1", now=T0 + 100, ready=True, restarts=1)
    state, found = see(state, "w1", now=T0 + 130, **crash_looping("w1", 2))  # Ready only 30 s: the same episode
    assert found == []
    state, _ = see(state, "w1", now=T0 + 200, ready=True, restarts=2)
    state, _ = see(state, "w1", now=T0 + 260, ready=True, restarts=2)  # Ready for 60 s: it cleared
    state, [second] = see(state, "w1", now=T0 + 300, **crash_looping("w1", 3))
    assert second.started == T0 + 300 and second.started != first.started


def test_tick_re_emits_a_lasting_condition_without_any_new_observation():
    state, [_] = see(State(), "w4", now=T0, unschedulable=True)
    state, found = tick(state, now=T0 + 100, policy=P)
    assert found == []
    state, [again] = tick(state, now=T0 + 301, policy=P)
    assert again.event == "ferrumdeck.pod.unschedulable" and again.repeat == 1 and again.started == T0
    _, found = tick(state, now=T0 + 302, policy=P)
    assert found == []


def test_deleting_a_pod_forgets_it_and_remembers_a_recovery_was_under_way():
    state, _ = see(State(), "w1", now=T0, **crash_looping("w1"))
    state, _ = see(state, "w2", now=T0, unschedulable=True)
    state, found = see(state, "w1", now=T0 + 5, kind="DELETED", ready=False)
    state, _ = see(state, "w2", now=T0 + 5, kind="DELETED", unschedulable=True)
    assert found == [] and state.pods == {} and state.episodes == {}
    assert state.handled == {"w1": T0 + 5}  # crash-looping starts a recovery; unschedulable does not


def test_a_relist_deletes_what_is_missing_and_judges_the_rest():
    state, _ = see(State(), "gone", now=T0, **crash_looping("gone"))
    state, found, gone = decide_relist(state, pods=[info("w1"), info("w2", unschedulable=True)], role="worker",
                                       now=T0 + 1, policy=P)
    assert gone == ["gone"] and set(state.pods) == {"w1", "w2"} and "worker" in state.synced
    assert [(d.event, d.subject) for d in found] == [("ferrumdeck.pod.unschedulable", "w2")]
    assert state.handled == {"gone": T0 + 1}
    _, _, gone = decide_relist(state, pods=[], role="mcp", now=T0 + 2, policy=P)  # other roles untouched
    assert gone == []


# ----------------------------------------------------------------------------- the consumer group


def synced(*names: str, **kw) -> State:
    state = State()
    for name in names:
        state, _ = see(state, name, now=T0, **kw)
    return State(pods=state.pods, episodes=state.episodes, synced=frozenset({"worker"}))


def test_a_ready_workers_consumer_holding_entries_silent_beyond_the_threshold_is_hung_once():
    state = synced("w1", "w2")
    c = [ConsumerSample("w1", pending=3, idle_ms=10_000), ConsumerSample("w2", pending=3, idle_ms=9_999)]
    state, [d] = decide_consumers(state, consumers=c, lag=None, now=T0, policy=P)
    assert d.event == "ferrumdeck.consumer.hung" and d.subject == "w1" and d.labels["consumer"] == "w1"
    assert d.evidence["pending"] == 3 and d.evidence["idle_ms"] == 10_000
    c[0] = ConsumerSample("w1", pending=3, idle_ms=20_000)
    _, found = decide_consumers(state, consumers=c, lag=None, now=T0 + 10, policy=P)
    assert found == []  # the same episode


def test_not_hung_an_empty_consumer_or_a_worker_that_is_not_ready():
    state = synced("w1")
    _, found = decide_consumers(state, consumers=[ConsumerSample("w1", 0, 999_999)], lag=None, now=T0, policy=P)
    assert found == []
    state, _ = see(state, "w1", now=T0, **crash_looping("w1"))  # crash-looping: the crash recovery's business
    _, found = decide_consumers(state, consumers=[ConsumerSample("w1", 5, 999_999)], lag=None, now=T0, policy=P)
    assert found == []


def test_a_deleted_pods_consumer_still_holding_entries():
    state = synced("w2")
    consumers = [ConsumerSample("w1", pending=2, idle_ms=5), ConsumerSample("w2", pending=0, idle_ms=5)]
    state, [d] = decide_consumers(state, consumers=consumers, lag=None, now=T0, policy=P)
    assert d.event == "ferrumdeck.pod.deleted-holding-entries" and d.labels["pod"] == "w1"
    _, found = decide_consumers(state, consumers=consumers, lag=None, now=T0 + 1, policy=P)
    assert found == []
    # before the first list of the worker pods nothing is known to be deleted
    _, found = decide_consumers(State(), consumers=consumers, lag=None, now=T0, policy=P)
    assert found == []
    # and an emptied consumer is no event
    _, found = decide_consumers(synced("w2"), consumers=[ConsumerSample("w1", 0, 5)], lag=None, now=T0, policy=P)
    assert found == []


def test_a_pod_deleted_by_its_recovery_is_not_reported_again_until_the_re_emit_interval():
    state, _ = see(synced("w1"), "w1", now=T0, **crash_looping("w1"))
    state, _ = see(state, "w1", now=T0 + 1, kind="DELETED", ready=False)
    holding = [ConsumerSample("w1", pending=4, idle_ms=5)]
    state, found = decide_consumers(state, consumers=holding, lag=None, now=T0 + 2, policy=P)
    assert found == []
    _, [d] = decide_consumers(state, consumers=holding, lag=None, now=T0 + 301, policy=P)  # still held: report it
    assert d.condition is Condition.DELETED_HOLDING


def test_the_consumer_template_maps_consumers_back_to_pods():
    p = Policy(consumer_template="fd-{pod}-c")
    assert p.consumer("w1") == "fd-w1-c" and p.pod_of("fd-w1-c") == "w1"
    assert p.pod_of("w1") is None and p.pod_of("fd--c") is None
    assert Policy().pod_of("anything") == "anything"


def test_lag_growth_over_the_last_samples():
    assert lag_growing([1, 5, 9], samples=3, min_growth=1)
    assert not lag_growing([5, 9], samples=3, min_growth=1)
    assert not lag_growing([1, 5, 5], samples=3, min_growth=1)
    assert not lag_growing([1, 2, 3], samples=3, min_growth=5)
    state = synced("w1")
    events = []
    for i, lag in enumerate([10, 20, 30, 40, 50]):
        state, found = decide_consumers(state, consumers=[], lag=lag, now=T0 + i, policy=P)
        events += found
    [d] = events
    assert d.event == "ferrumdeck.queue.lag-growing" and d.subject == P.stream and d.evidence["lag_series"] == [10, 20, 30]
    state, found = decide_consumers(state, consumers=[], lag=None, now=T0 + 9, policy=P)  # no reading: no change
    assert found == [] and state.lags == (30, 40, 50)


# ----------------------------------------------------------------------------- the event, against prefect.yaml


def _event_of(detection) -> dict:
    return event_json(detection, event_id=uuid.uuid4(), occurred=datetime.now(UTC))


def test_event_shape_follows_the_bridge():
    _, [d] = see(State(), "worker-abc", now=T0, **crash_looping("worker-abc"))
    e = _event_of(d)
    assert e["event"] == "ferrumdeck.pod.crash-looping"
    assert e["resource"]["prefect.resource.id"] == "ferrumdeck.pod.worker-abc"
    assert e["resource"]["ferrumdeck.label.pod"] == "worker-abc" and e["resource"]["ferrumdeck.source"] == "watcher"
    assert e["payload"]["labels"]["pod"] == "worker-abc" and e["payload"]["status"] == "firing"
    assert all(isinstance(v, str) for v in e["resource"].values())
    # the fingerprint names the episode: a re-emit keeps it, a new episode changes it
    _, [again] = tick(see(State(), "worker-abc", now=T0, **crash_looping("worker-abc"))[0], now=T0 + 400, policy=P)
    assert _event_of(again)["resource"]["ferrumdeck.fingerprint"] == e["resource"]["ferrumdeck.fingerprint"]


def _routes() -> dict[str, list[tuple[str, dict]]]:
    """For every watcher event: the deployments whose prefect.yaml triggers Prefect's server would fire, with the
    parameters it would render."""
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.server.utilities.user_templates import render_user_template_sync

    from deployments.serve import read_deployment_specs

    samples = {
        "ferrumdeck.pod.crash-looping": see(State(), "w-1", now=T0, **crash_looping("w-1"))[1],
        "ferrumdeck.pod.oom-killed": see(State(), "w-1", now=T0, waiting="CrashLoopBackOff", ready=False,
                                         last_reason="OOMKilled", restarts=1)[1],
        "ferrumdeck.pod.unschedulable": see(State(), "w-1", now=T0, unschedulable=True)[1],
        "ferrumdeck.mcp.crash-looping": see(State(), "w-1", now=T0, role="mcp", **crash_looping("w-1"))[1],
        "ferrumdeck.mcp.oom-killed": see(State(), "w-1", now=T0, role="mcp", waiting="CrashLoopBackOff", ready=False,
                                         last_reason="OOMKilled", restarts=1)[1],
        "ferrumdeck.mcp.unschedulable": see(State(), "w-1", now=T0, role="mcp", unschedulable=True)[1],
        "ferrumdeck.consumer.hung": decide_consumers(synced("w-1"), consumers=[ConsumerSample("w-1", 1, 10**6)],
                                                     lag=None, now=T0, policy=P)[1],
        "ferrumdeck.pod.deleted-holding-entries": decide_consumers(
            synced(), consumers=[ConsumerSample("w-1", 1, 5)], lag=None, now=T0, policy=P)[1],
        "ferrumdeck.queue.lag-growing": decide_consumers(
            decide_consumers(decide_consumers(State(), consumers=[], lag=1, now=T0, policy=P)[0],
                             consumers=[], lag=2, now=T0, policy=P)[0], consumers=[], lag=3, now=T0, policy=P)[1],
    }
    assert set(samples) == set(EVENTS)
    routes: dict[str, list[tuple[str, dict]]] = {}
    for name, detections in samples.items():
        [d] = detections
        event = ReceivedEvent.model_validate(_event_of(d) | {"received": datetime.now(UTC).isoformat()})
        routes[name] = []
        for spec in read_deployment_specs():
            for t in spec.get("triggers", []):
                trigger = EventTrigger(match=t["match"], expect=set(t["expect"]), posture="Reactive")
                if trigger.covers(event):
                    params = {k: render_user_template_sync(v, {"event": event}) if isinstance(v, str) else v
                              for k, v in (t.get("parameters") or {}).items()}
                    routes[name].append((spec["name"], params))
    return routes


def test_prefect_yaml_triggers_the_same_recoveries_on_the_watchers_events_with_the_pod_templated():
    routes = _routes()
    crash = [("worker-crash-recovery", {"pod": "w-1", "dry_run": False})]
    assert routes == {
        "ferrumdeck.pod.crash-looping": crash,
        "ferrumdeck.pod.oom-killed": crash,
        "ferrumdeck.pod.deleted-holding-entries": crash,
        "ferrumdeck.consumer.hung": [("worker-hang-recovery", {"pod": "w-1", "dry_run": False})],
        "ferrumdeck.mcp.crash-looping": [("mcp-server-recovery", {"dry_run": False})],
        "ferrumdeck.mcp.oom-killed": [("mcp-server-recovery", {"dry_run": False})],
        # deleting or restarting does not help an unschedulable pod; lag alone is the scaler's (QueueBacklog)
        "ferrumdeck.pod.unschedulable": [],
        "ferrumdeck.mcp.unschedulable": [],
        "ferrumdeck.queue.lag-growing": [],
    }


def test_the_watcher_triggers_ignore_alerts_and_the_recoveries_own_events():
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    from deployments.serve import read_deployment_specs

    watcher_triggers = [EventTrigger(match=t["match"], expect=set(t["expect"]), posture="Reactive")
                        for s in read_deployment_specs() for t in s.get("triggers", [])
                        if t["match"].get("ferrumdeck.source") == "watcher"]
    assert len(watcher_triggers) == 3
    others = [
        {"event": "ferrumdeck.recovery.pod-deleted", "resource": {"prefect.resource.id": "ferrumdeck.pod.w-1"}},
        {"event": "ferrumdeck.alert.firing", "resource": {"prefect.resource.id": "ferrumdeck.alert.WorkerCrashLooping"}},
        {"event": "ferrumdeck.pod.crash-looping", "resource": {"prefect.resource.id": "ferrumdeck.pod.w-1"}},  # no source
    ]
    for other in others:
        event = ReceivedEvent.model_validate(other | {"id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(),
                                                      "received": datetime.now(UTC).isoformat()})
        assert not any(t.covers(event) for t in watcher_triggers), other


# ----------------------------------------------------------------------------- small pure helpers


def test_selector_string_from_a_deployments_selector():
    assert selector_string({"matchLabels": {"app": "mcp-server", "tier": "x"}}) == "app=mcp-server,tier=x"
    assert selector_string({"match_labels": {"app": "a"}, "match_expressions": [
        {"key": "env", "operator": "In", "values": ["a", "b"]}, {"key": "k", "operator": "Exists"},
        {"key": "n", "operator": "DoesNotExist"}, {"key": "z", "operator": "NotIn", "values": ["q"]}]}) == (
        "app=a,env in (a,b),k,!n,z notin (q)")
    with pytest.raises(ValueError):
        selector_string({})


def test_backoff_doubles_with_jitter_up_to_the_cap():
    assert backoff_delay(0, initial=1, maximum=30, rand=lambda: 1.0) == 1
    assert backoff_delay(3, initial=1, maximum=30, rand=lambda: 1.0) == 8
    assert backoff_delay(3, initial=1, maximum=30, rand=lambda: 0.0) == 4
    assert backoff_delay(100, initial=1, maximum=30, rand=lambda: 1.0) == 30


# ----------------------------------------------------------------------------- delivery to Prefect


class StubPrefect:
    """POST /api/events: fails the first ``failures`` calls (503, then a connection error), then takes them."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.received: list[dict] = []
        self.lock = threading.Lock()
        self.authorization: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        import json

        with self.lock:
            self.calls += 1
            self.authorization.append(request.headers.get("authorization"))
            if self.calls <= self.failures:
                if self.calls % 2:
                    return httpx.Response(503)
                raise httpx.ConnectError("refused", request=request)
            self.received += json.loads(request.content)
            return httpx.Response(204)


def _events(n: int) -> list[dict]:
    return [{"id": str(uuid.uuid4()), "event": "ferrumdeck.pod.crash-looping", "n": i} for i in range(n)]


def _wait(predicate, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)  # poll


def test_events_are_kept_and_retried_while_prefect_is_down_then_delivered_once():
    from pydantic import SecretStr

    stub = StubPrefect(failures=3)
    sink = PrefectEvents(url="http://prefect.test/api/events", authorization=SecretStr("Bearer k"),
                         backoff_initial_s=0.01, backoff_max_s=0.02, client=httpx.Client(transport=httpx.MockTransport(stub)))
    sink.start()
    sent = _events(5)
    sink.put(sent[:2])
    sink.put(sent[2:])
    _wait(lambda: len(stub.received) == 5)
    sink.stop()
    assert [e["id"] for e in stub.received] == [e["id"] for e in sent]  # once each, in order, same ids
    assert sink.failures == 3 and sink.sent == 5 and sink.dropped == 0 and sink.buffered == 0
    assert set(stub.authorization) == {"Bearer k"}


def test_the_buffer_is_bounded_and_drops_the_oldest():
    stub = StubPrefect(failures=10**9)  # Prefect never answers
    sink = PrefectEvents(url="http://prefect.test/api/events", max_buffer=3, backoff_initial_s=0.01,
                         backoff_max_s=0.02, client=httpx.Client(transport=httpx.MockTransport(stub)))
    sink.start()
    sent = _events(5)
    sink.put(sent)
    _wait(lambda: stub.calls >= 2)
    sink.stop(flush_timeout_s=0.1)
    assert sink.dropped == 2 and sink.sent == 0
    assert [e["n"] for e in sink._buffer] == [2, 3, 4]


# ----------------------------------------------------------------------------- CLI and manifest


def test_cli_has_the_watch_subcommand_and_the_manifest_runs_it():
    from deployments.cli import build_parser

    args = build_parser().parse_args(["watch", "--poll-interval", "2", "--health-port", "8081"])
    assert args.poll_interval == 2 and args.health_port == 8081
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["fd-recovery", "watch"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert int(env["FD_WATCH_HEALTH_PORT"]) == pod["containers"][0]["ports"][0]["containerPort"]


def test_manifest_is_valid_kubernetes_and_its_settings_exist():
    import kubernetes_validate

    from deployments.watch import WatchSettings
    from tasks.settings import Settings

    known = {f"FD_{n.upper()}" for n in Settings.model_fields} | {f"FD_WATCH_{n.upper()}" for n in WatchSettings.model_fields}
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        if doc:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)
            assert doc["metadata"]["namespace"] == "ferrumdeck"
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                assert {e["name"] for e in c["env"] if e["name"].startswith("FD_")} <= known


def test_cli_watch_says_clearly_what_is_missing(monkeypatch, capsys, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.cli import main

    monkeypatch.setenv("FD_KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main(["watch"]) == 2
    assert "no Prefect API: set PREFECT_API_URL" in capsys.readouterr().err
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["watch"]) == 2
    assert "fd-recovery watch: cannot load Kubernetes configuration" in capsys.readouterr().err
    monkeypatch.setenv("FD_WATCH_POLL_INTERVAL_S", "-1")
    assert main(["watch"]) == 2
    assert "poll_interval_s" in capsys.readouterr().err
