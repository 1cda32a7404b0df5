"""Pure pieces of the recovery flows: one pod view end to end, dry-run previews, typed results, triage params."""

from datetime import UTC, datetime

from tasks.correlate import decide_crash
from tasks.kube_diagnosis import Classification, PodInfo, Termination, gone
from tasks.queue import ConsumerInfo, PendingEntry, QueueSnapshot
from tasks.recovery import EntriesRecovered, SettledRuns, build_view, recover_worker_entries
from tasks.settings import Settings


def snapshot(*consumers: ConsumerInfo) -> QueueSnapshot:
    return QueueSnapshot(stream="s", group="g", dlq_stream="d", stream_exists=True, group_exists=True,
                         consumers=list(consumers))


def test_a_diagnosis_is_the_pod_view_the_decisions_use_no_conversion():
    d = PodInfo(
        name="worker-1", phase="Running", ready=False, restart_count=4, classification=Classification.OOM_KILLED,
        last_termination=Termination(reason="OOMKilled", exit_code=137, finished_at=datetime.now(UTC)),
        cpu_millicores=12.5, log_tail=["MemoryError"],
    )
    view = build_view(settings=Settings(), pods=[d], snapshot=snapshot(ConsumerInfo(name="worker-1", pending=2, idle_ms=5)))
    assert view.links[0].pod_state is view.pods["worker-1"] and view.pods["worker-1"] == d
    (target,) = decide_crash(links=view.links, pod=None, consumer_for_pod=str).targets
    assert target.cause is Classification.OOM_KILLED and target.pending == 2 and target.replace_pod
    row = view.pod_rows()[0]
    assert (row["class"], row["restarts"], row["cpu m"]) == ("oom-killed", 4, "12.5")


def test_build_view_drops_gone_diagnoses_and_keeps_podless_consumers():
    ok = PodInfo(name="worker-1", phase="Running", ready=True, classification=Classification.HEALTHY)
    view = build_view(settings=Settings(), pods=[ok, gone("worker-old")], snapshot=snapshot(
        ConsumerInfo(name="worker-1", pending=2, idle_ms=5), ConsumerInfo(name="worker-old", pending=3, idle_ms=9)))
    assert sorted(view.pods) == ["worker-1"] and view.ready_workers == 1
    assert [(lnk.pod, lnk.consumer, lnk.pending) for lnk in view.links] == [
        ("worker-1", "worker-1", 2), (None, "worker-old", 3)]
    assert view.pod_rows()[1]["class"] == "pod gone"


def test_recovering_entries_in_a_dry_run_previews_from_the_entries_read_and_touches_nothing(mocker):
    from tasks import queue

    for name in ("iter_pending", "scan_pending", "dead_letter_pending", "recover_consumers", "redis_client"):
        mocker.patch.object(queue, name, side_effect=AssertionError(f"a dry run called queue.{name}"))
    held = [PendingEntry("1-0", "w", 10, 1), PendingEntry("2-0", "w", 10, 2, True, 0, "s2", "s2", "r2"),
            PendingEntry("3-0", "w", 10, 1, True, 2), PendingEntry("4-0", "w", 10, 1, False)]
    preview = recover_worker_entries.fn(settings=Settings(), pod="w", consumer="w", entries=held, poison=[held[1]],
                                        reason="poison", max_deliveries=3, dry_run=True)
    assert (preview.requeued, preview.dead_lettered, preview.poison, preview.orphans_acked) == (1, 2, ["2-0"], 1)
    assert preview.dry_run and not preview.changed  # a preview is never "done"
    assert preview.summary() == "1 would be requeued at once, 2 would be dead-lettered (poison 2-0), " \
                                "1 orphans would be acknowledged"


def test_typed_results_say_whether_they_changed_anything():
    assert not EntriesRecovered(consumer="w", dry_run=False).changed
    assert EntriesRecovered(consumer="w", dry_run=False, requeued=1).changed
    settled = SettledRuns(dry_run=False, decisions=[{"run": "r1"}], failed=["r1"], errors={"gateway": "HTTP 503"})
    assert settled.changed and "1 failed (r1)" in settled.summary() and "gateway: HTTP 503" in settled.summary()
    assert not SettledRuns(dry_run=False).changed


def test_triage_passes_only_the_parameters_a_flow_takes():
    from flows.triage import FLOWS, split_parameters
    from flows.worker_crash import worker_crash_recovery

    params, dropped = split_parameters(worker_crash_recovery, {"pod": "w", "dry_run": False, "replicas": 3})
    assert params == {"pod": "w", "dry_run": False} and dropped == ["replicas"]
    assert set(FLOWS) >= {"worker-crash-recovery", "worker-hang-recovery", "post-recovery-check"}


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
