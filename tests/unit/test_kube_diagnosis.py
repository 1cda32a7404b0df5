"""Pure pod diagnosis: API objects -> PodInfo, classification, summaries, CPU quantities, rollout progress."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client as k8s

from tasks.kube_diagnosis import (
    NEXT_STEP,
    Classification,
    PodEvent,
    PodInfo,
    Termination,
    classify,
    container_env,
    diagnosis,
    event_rows,
    gone,
    next_step_rows,
    parse_cpu_millicores,
    pick_replacement,
    pod_event,
    pod_info,
    pod_metrics_millicores,
    pod_rows,
    relevant_log_lines,
    replacement_baseline,
    restart_patch,
    rollout_progress,
    set_env_patch,
    wants_logs,
)

NOW = datetime(2026, 11, 27, 21, 0, 0, tzinfo=UTC)


def v1_pod(
    name="worker-6f9c7d-abcde",
    *,
    phase="Running",
    ready=True,
    restarts=0,
    waiting=None,
    last_terminated=None,
    deleting=None,
    conditions=None,
    created=NOW - timedelta(hours=1),
):
    """A V1Pod as the official client deserializes it."""
    state = k8s.V1ContainerState(
        waiting=k8s.V1ContainerStateWaiting(reason=waiting[0], message=waiting[1]) if waiting else None,
        running=None if waiting else k8s.V1ContainerStateRunning(started_at=NOW - timedelta(minutes=5)),
    )
    last = k8s.V1ContainerState(terminated=last_terminated) if last_terminated else None
    status = k8s.V1ContainerStatus(
        name="worker",
        image="fd/worker:1",
        image_id="sha256:1",
        ready=ready,
        restart_count=restarts,
        state=state,
        last_state=last,
    )
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(
            name=name, uid="uid-" + name, creation_timestamp=created, deletion_timestamp=deleting
        ),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="worker")], node_name="node-1"),
        status=k8s.V1PodStatus(
            phase=phase, container_statuses=[status], conditions=conditions, pod_ip="10.0.0.7"
        ),
    )


def crashed(reason="Error", code=1, ago=timedelta(minutes=1)):
    return k8s.V1ContainerStateTerminated(
        exit_code=code, reason=reason, started_at=NOW - ago - timedelta(seconds=5), finished_at=NOW - ago
    )


def kind_of(pod, cpu=250.0):
    return classify(pod_info(pod, container="worker"), cpu_millicores=cpu, now=NOW)


def test_pod_info_reads_every_field_the_runbook_needs():
    info = pod_info(
        v1_pod(
            restarts=4, ready=False, waiting=("CrashLoopBackOff", "back-off 40s"), last_terminated=crashed()
        ),
        container="worker",
    )
    assert (info.name, info.phase, info.ready, info.restart_count) == (
        "worker-6f9c7d-abcde",
        "Running",
        False,
        4,
    )
    assert info.waiting_reason == "CrashLoopBackOff" and info.waiting_message == "back-off 40s"
    assert info.last_termination == Termination(
        reason="Error",
        exit_code=1,
        started_at=NOW - timedelta(minutes=1, seconds=5),
        finished_at=NOW - timedelta(minutes=1),
    )
    assert (info.node, info.pod_ip, info.uid, info.terminating) == (
        "node-1",
        "10.0.0.7",
        "uid-worker-6f9c7d-abcde",
        False,
    )


def test_pod_info_accepts_the_json_form_of_a_pod():
    raw = {
        "metadata": {"name": "w-1", "uid": "u1", "creationTimestamp": "2026-11-27T20:00:00Z"},
        "status": {
            "phase": "Running",
            "podIP": "10.1.1.1",
            "containerStatuses": [
                {
                    "name": "worker",
                    "ready": True,
                    "restartCount": 2,
                    "state": {"running": {"startedAt": "2026-11-27T20:00:05Z"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "OOMKilled",
                            "finishedAt": "2026-11-27T20:00:01Z",
                        }
                    },
                }
            ],
        },
    }
    info = pod_info(raw, container="worker")
    assert info.ready and info.restart_count == 2 and info.pod_ip == "10.1.1.1"
    assert info.last_termination.exit_code == 137 and info.created_at == datetime(
        2026, 11, 27, 20, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("pod", "cpu", "expected"),
    [
        (v1_pod(), 250.0, Classification.HEALTHY),
        (v1_pod(), None, Classification.HEALTHY),
        (v1_pod(), 0.4, Classification.HUNG_SUSPECT),
        (v1_pod(deleting=NOW), 250.0, Classification.TERMINATING),
        (v1_pod(phase="Failed", ready=False), None, Classification.FAILED),
        (v1_pod(phase="Unknown", ready=False), None, Classification.UNKNOWN),
        (
            v1_pod(
                ready=False, restarts=3, waiting=("CrashLoopBackOff", "back-off"), last_terminated=crashed()
            ),
            0.0,
            Classification.CRASH_LOOPING,
        ),
        (
            v1_pod(
                ready=False,
                restarts=3,
                waiting=("CrashLoopBackOff", "back-off"),
                last_terminated=crashed("OOMKilled", 137),
            ),
            0.0,
            Classification.OOM_KILLED,
        ),
        (v1_pod(restarts=1, last_terminated=crashed("OOMKilled", 137)), 250.0, Classification.OOM_KILLED),
        (
            v1_pod(restarts=1, last_terminated=crashed("OOMKilled", 137, ago=timedelta(hours=2))),
            250.0,
            Classification.HEALTHY,
        ),
        (v1_pod(restarts=1, last_terminated=crashed()), 250.0, Classification.RECENTLY_RESTARTED),
        (
            v1_pod(phase="Pending", ready=False, waiting=("ImagePullBackOff", "pull access denied")),
            None,
            Classification.IMAGE_PULL_FAILURE,
        ),
        (
            v1_pod(phase="Pending", ready=False, waiting=("CreateContainerConfigError", "secret not found")),
            None,
            Classification.CONFIG_ERROR,
        ),
        (
            v1_pod(phase="Pending", ready=False, waiting=("ContainerCreating", None)),
            None,
            Classification.STARTING,
        ),
        (v1_pod(ready=False), 250.0, Classification.NOT_READY),
        (
            v1_pod(
                phase="Pending",
                ready=False,
                waiting=("Pending", None),
                conditions=[
                    k8s.V1PodCondition(
                        type="PodScheduled",
                        status="False",
                        reason="Unschedulable",
                        message="0/3 nodes are available: 3 Insufficient cpu.",
                    )
                ],
            ),
            None,
            Classification.UNSCHEDULABLE,
        ),
    ],
)
def test_classification(pod, cpu, expected):
    assert kind_of(pod, cpu) is expected


def test_a_container_that_just_exited_with_an_error_is_crash_looping():
    pod = pod_info(v1_pod(ready=False)).model_copy(
        update={"running_since": None, "current_termination": Termination(reason="Error", exit_code=2)}
    )
    assert classify(pod, cpu_millicores=None, now=NOW) is Classification.CRASH_LOOPING
    clean = pod.model_copy(update={"current_termination": Termination(reason="Completed", exit_code=0)})
    assert classify(clean, cpu_millicores=None, now=NOW) is Classification.NOT_READY


def test_summary_of_a_crash_loop_names_restarts_exit_event_and_last_log_line():
    pod = pod_info(
        v1_pod(
            ready=False, restarts=5, waiting=("CrashLoopBackOff", "back-off 40s"), last_terminated=crashed()
        ),
        container="worker",
    )
    d = diagnosis(
        pod,
        cpu_millicores=0.0,
        now=NOW,
        events=[PodEvent(type="Warning", reason="BackOff", message="Back-off restarting", count=7)],
        log_tail=["starting", "Traceback (most recent call last):", "RuntimeError: boom", ""],
    )
    assert d.classification is Classification.CRASH_LOOPING and not d.healthy
    assert d.summary.startswith(
        "worker-6f9c7d-abcde: crash-looping: 5 restarts, last exit 1 (Error) at 20:59:00Z"
    )
    assert "event BackOff x7" in d.summary and d.summary.endswith("log: RuntimeError: boom")


def test_summaries_are_one_line_for_every_classification():
    pods = [v1_pod(), v1_pod(deleting=NOW), v1_pod(ready=False, waiting=("ErrImagePull", "no such\nimage"))]
    for pod in pods:
        d = diagnosis(pod_info(pod), cpu_millicores=1.0, now=NOW, log_tail=["a\nb"])
        assert "\n" not in d.summary and d.summary.startswith(d.name + ": ")
    assert gone("worker-x").summary == "worker-x: gone: no such worker pod"


def test_logs_are_wanted_only_for_unhealthy_pods_and_previous_after_a_crash():
    crash = pod_info(
        v1_pod(ready=False, restarts=2, waiting=("CrashLoopBackOff", ""), last_terminated=crashed())
    )
    hung = pod_info(v1_pod())
    pending = pod_info(v1_pod(phase="Pending", ready=False, waiting=("ContainerCreating", None)))
    assert wants_logs(crash, Classification.CRASH_LOOPING) == "previous"
    assert wants_logs(hung, Classification.HUNG_SUSPECT) == "current"
    assert wants_logs(hung, Classification.HEALTHY) is None
    assert wants_logs(pending, Classification.STARTING) is None


@pytest.mark.parametrize(
    ("quantity", "millicores"),
    [
        ("250m", 250.0),
        ("12345678n", 12.345678),
        ("500u", 0.5),
        ("1", 1000.0),
        ("1.5", 1500.0),
        ("0", 0.0),
        (2, 2000.0),
        ("2k", 2_000_000.0),
    ],
)
def test_parse_cpu_quantities(quantity, millicores):
    assert parse_cpu_millicores(quantity) == pytest.approx(millicores)


@pytest.mark.parametrize("bad", ["", "abc", "10Mi", "-"])
def test_parse_cpu_rejects_garbage(bad):
    with pytest.raises(ValueError):
        parse_cpu_millicores(bad)


@given(st.integers(min_value=0, max_value=10**12))
def test_nanocores_and_millicores_agree(n):
    assert parse_cpu_millicores(f"{n}n") == pytest.approx(n / 1e6)


def test_pod_metrics_sum_containers_per_pod():
    items = [
        {
            "metadata": {"name": "a"},
            "containers": [
                {"name": "w", "usage": {"cpu": "250m"}},
                {"name": "s", "usage": {"cpu": "1000000n"}},
            ],
        },
        {"metadata": {"name": "b"}, "containers": [{"name": "w", "usage": {"memory": "1Mi"}}]},
    ]
    assert pod_metrics_millicores(items) == {"a": 251.0, "b": 0.0}


def test_pick_replacement_waits_for_the_old_pod_to_go_and_a_new_one_to_be_ready():
    old = PodInfo(name="w-old", ready=True, created_at=NOW - timedelta(hours=1))
    other = PodInfo(name="w-other", ready=True, created_at=NOW - timedelta(hours=1))
    new_pending = PodInfo(name="w-new", ready=False, created_at=NOW)
    new_ready = new_pending.model_copy(update={"ready": True})
    previous = {"w-old", "w-other"}
    assert pick_replacement([old, other, new_ready], old_pod="w-old", previous=previous) is None
    assert pick_replacement([other, new_pending], old_pod="w-old", previous=previous) is None
    assert pick_replacement([other, new_ready], old_pod="w-old", previous=previous).name == "w-new"


def test_replacement_baseline_without_the_names_from_before():
    old = PodInfo(name="w-old", ready=True, created_at=NOW - timedelta(hours=1), deleting_since=NOW)
    other = PodInfo(name="w-other", ready=True, created_at=NOW)  # Ready at the start: not the replacement
    young = PodInfo(name="w-new", ready=False, created_at=NOW)
    stale = PodInfo(name="w-stale", ready=False, created_at=NOW - timedelta(hours=1))
    base = replacement_baseline([old, other, young, stale], old_pod="w-old", since=NOW - timedelta(seconds=1))
    assert base == {"w-other", "w-stale"}
    later = [other, young.model_copy(update={"ready": True})]
    assert pick_replacement(later, old_pod="w-old", previous=base).name == "w-new"


def _deployment(*, generation=2, observed=2, replicas=3, updated=3, total=3, available=3, conditions=None):
    return k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name="worker", generation=generation),
        spec=k8s.V1DeploymentSpec(
            replicas=replicas,
            selector=k8s.V1LabelSelector(match_labels={"app": "worker"}),
            template=k8s.V1PodTemplateSpec(),
        ),
        status=k8s.V1DeploymentStatus(
            observed_generation=observed,
            replicas=total,
            updated_replicas=updated,
            available_replicas=available,
            conditions=conditions,
        ),
    )


@pytest.mark.parametrize(
    ("deployment", "complete", "message"),
    [
        (_deployment(), True, 'deployment "worker" successfully rolled out'),
        (_deployment(observed=1), False, "waiting for deployment spec update to be observed"),
        (_deployment(updated=1, total=4), False, "1 out of 3 new replicas have been updated"),
        (_deployment(total=4), False, "1 old replicas are pending termination"),
        (_deployment(available=2), False, "2 of 3 updated replicas are available"),
        (
            _deployment(
                conditions=[
                    k8s.V1DeploymentCondition(
                        type="Progressing", status="False", reason="ProgressDeadlineExceeded"
                    )
                ]
            ),
            False,
            'deployment "worker" exceeded its progress deadline',
        ),
    ],
)
def test_rollout_progress_follows_kubectl(deployment, complete, message):
    assert rollout_progress(deployment) == (complete, message)


def test_container_env_and_patches():
    dep = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "worker",
                            "env": [{"name": "LITELLM_MODEL", "value": "openai/gpt-4o"}, {"name": "EMPTY"}],
                        }
                    ]
                }
            }
        }
    }
    assert container_env(dep, container="worker", name="LITELLM_MODEL") == (True, "openai/gpt-4o")
    assert container_env(dep, container="worker", name="EMPTY") == (True, "")
    assert container_env(dep, container="worker", name="NOPE") == (True, None)
    assert container_env(dep, container="sidecar", name="LITELLM_MODEL") == (False, None)
    assert set_env_patch(container="worker", name="K", value=None)["spec"]["template"]["spec"][
        "containers"
    ] == [{"name": "worker", "env": [{"$patch": "delete", "name": "K"}]}]
    assert set_env_patch(container="worker", name="K", value="v")["spec"]["template"]["spec"]["containers"][
        0
    ]["env"] == [{"name": "K", "value": "v"}]
    annotations = restart_patch(restarted_at="2026-11-27T21:00:00Z")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations == {"kubectl.kubernetes.io/restartedAt": "2026-11-27T21:00:00Z"}


def test_pod_event_prefers_last_timestamp():
    e = pod_event(
        k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(name="e"),
            involved_object=k8s.V1ObjectReference(name="p"),
            type="Warning",
            reason="BackOff",
            message="Back-off",
            count=3,
            first_timestamp=NOW - timedelta(minutes=5),
            last_timestamp=NOW,
        )
    )
    assert e == PodEvent(type="Warning", reason="BackOff", message="Back-off", count=3, last_seen=NOW)


def test_relevant_log_lines_start_at_the_last_traceback_or_first_error():
    tb = [
        "boot",
        "Traceback (most recent call last):",
        "  File x",
        "ValueError: a",
        "retry",
        "Traceback (most recent call last):",
        "  File y",
        "RuntimeError: b",
    ]
    assert relevant_log_lines(tb) == tb[5:]
    assert relevant_log_lines(["ok 1", "ok 2", "ERROR redis gone", "ok 3"]) == ["ERROR redis gone", "ok 3"]
    assert relevant_log_lines([f"line {i}" for i in range(40)], limit=3) == ["line 37", "line 38", "line 39"]
    assert relevant_log_lines(["", "  ", "x"]) == ["x"]


def test_every_problem_has_a_next_step():
    assert set(NEXT_STEP) == set(Classification) - {Classification.HEALTHY}


def test_one_pod_model_listed_then_diagnosed_and_its_report_rows():
    listed = pod_info(
        v1_pod(ready=False, restarts=3, waiting=("CrashLoopBackOff", "back-off"), last_terminated=crashed()),
        container="worker",
    )
    assert listed.classification is None and not listed.healthy  # not diagnosed yet: no verdict
    assert listed.last_exit == listed.last_termination
    d = diagnosis(listed, cpu_millicores=None, now=NOW,
                  events=[PodEvent(type="Warning", reason="BackOff", message="Back-off\n restarting", count=4)])
    assert type(d) is PodInfo and d.classification is Classification.CRASH_LOOPING and d.name == listed.name
    (row,) = pod_rows([d])
    assert row == {"pod": d.name, "status": "CrashLoopBackOff", "ready": "0/1", "restarts": 3, "CPU (m)": "",
                   "classification": "crash-looping", "last termination": "Error (exit 1) at 2026-11-27 20:59:00Z"}
    assert event_rows(d) == [{"type": "Warning", "reason": "BackOff", "count": 4, "message": "Back-off restarting"}]
    healthy = diagnosis(pod_info(v1_pod()), cpu_millicores=250.0, now=NOW)
    assert next_step_rows([d, healthy, gone("w-x")]) == [
        {"pod": d.name, "classification": "crash-looping", "next step": NEXT_STEP[Classification.CRASH_LOOPING]},
        {"pod": "w-x", "classification": "gone", "next step": NEXT_STEP[Classification.GONE]},
    ]
    assert pod_rows([gone("w-x")])[0]["status"] == "NotFound"
