"""Pure pieces of the recovery flows: Kubernetes diagnoses as pod states, triage's subflow parameters."""

from datetime import UTC, datetime

from flows.triage import FLOWS, _summary, split_parameters
from flows.worker_crash import worker_crash_recovery
from tasks.kube_diagnosis import Classification, PodDiagnosis, Termination, gone
from tasks.queue import ConsumerInfo, QueueSnapshot
from tasks.recovery import build_view, pod_state
from tasks.settings import Settings


def test_a_diagnosis_becomes_a_pod_state_with_its_last_termination_and_logs():
    d = PodDiagnosis(
        name="worker-1", phase="Running", ready=False, restart_count=4, classification=Classification.OOM_KILLED,
        last_termination=Termination(reason="OOMKilled", exit_code=137, finished_at=datetime.now(UTC)),
        cpu_millicores=12.5, log_tail=["MemoryError"], deleting_since=None,
    )
    s = pod_state(d)
    assert (s.classification, s.last_reason, s.last_exit_code, s.restarts, s.cpu_millicores, s.log_tail) == (
        "oom-killed", "OOMKilled", 137, 4, 12.5, ["MemoryError"])
    assert not s.ready and not s.terminating


def test_build_view_drops_gone_diagnoses_and_keeps_podless_consumers():
    snapshot = QueueSnapshot(stream="s", group="g", dlq_stream="d", stream_exists=True, group_exists=True,
                             consumers=[ConsumerInfo(name="worker-1", pending=2, idle_ms=5),
                                        ConsumerInfo(name="worker-old", pending=3, idle_ms=9)])
    ok = PodDiagnosis(name="worker-1", phase="Running", ready=True)
    view = build_view(settings=Settings(), pods=[ok, gone("worker-old")], snapshot=snapshot)
    assert sorted(view.pods) == ["worker-1"] and view.ready_workers == 1
    assert [(lnk.pod, lnk.consumer, lnk.pending) for lnk in view.links] == [
        ("worker-1", "worker-1", 2), (None, "worker-old", 3)]
    assert view.pod_rows()[1]["class"] == "pod gone"


def test_triage_passes_only_the_parameters_a_flow_takes():
    params, dropped = split_parameters(worker_crash_recovery, {"pod": "w", "dry_run": False, "replicas": 3})
    assert params == {"pod": "w", "dry_run": False} and dropped == ["replicas"]
    assert set(FLOWS) >= {"worker-crash-recovery", "worker-hang-recovery", "post-recovery-check"}


def test_triage_summarises_a_subflow_from_its_report_outcome():
    class R:
        report = "# x\n\nOutcome: **recovered** · started 2026-11-27\n"

    assert _summary(R()) == "recovered"


def test_only_temporary_errors_are_retried():
    import redis
    import sqlalchemy as sa

    from tasks.errors import is_temporary
    from tasks.kube import KubeNotFound, KubeServerError, KubeUnavailable
    from tasks.queue import QueueError

    assert is_temporary(KubeServerError("list pods: HTTP 500", status=500))
    assert is_temporary(KubeUnavailable("unreachable"))
    assert not is_temporary(KubeNotFound("gone", status=404))
    assert is_temporary(redis.ConnectionError("reset"))
    wrapped = QueueError("cannot scan")
    wrapped.__cause__ = redis.TimeoutError("slow")
    assert is_temporary(wrapped)
    assert not is_temporary(QueueError("group missing"))
    assert not is_temporary(ValueError("bad input"))
    assert not is_temporary(sa.exc.ArgumentError("bad"))
