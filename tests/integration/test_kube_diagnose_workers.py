"""`diagnose-workers` end to end: sandbox cluster with faults, a real Prefect flow run, its report artifact."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from flows.diagnose_workers import diagnose_workers
from tasks.kube import Classification
from tasks.outcome import Outcome
from tasks.settings import use_settings

pytestmark = pytest.mark.usefixtures("record_kube_requests")


def report_of(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=["diagnose-workers"]),
            )
        )
    assert len(artifacts) == 1
    return artifacts[0].data


def names(cluster):
    return sorted(p["metadata"]["name"] for p in cluster.pods(selector="app=worker"))


def test_diagnose_workers_reports_a_crash_loop_and_changes_nothing(kube_settings, cluster):
    crashing, hung, healthy = names(cluster)
    cluster.crash_loop(
        crashing,
        exit_code=1,
        logs=[
            "step s-9 started",
            "Traceback (most recent call last):",
            '  File "worker.py", line 3',
            "ConnectionError: redis",
        ],
    )
    cluster.hang(hung)
    cluster.wait_until(lambda: cluster.pod(crashing)["status"]["containerStatuses"][0]["restartCount"] >= 1)
    spec_before = cluster.deployment("worker")["spec"]

    with use_settings(kube_settings):
        state = diagnose_workers(log_lines=20, return_state=True)
    result = state.result()
    diagnoses = {d.name: d for d in result.pods}

    assert state.is_completed() and result.outcome is Outcome.NOTHING_TO_DO  # read-only: it did nothing
    assert result.actions == [] and result.checks == []
    assert diagnoses[crashing].classification is Classification.CRASH_LOOPING
    assert diagnoses[hung].classification is Classification.HUNG_SUSPECT
    assert diagnoses[healthy].classification is Classification.HEALTHY
    assert [d.name for d in result.unhealthy] == sorted([crashing, hung]) and result.missing == []
    assert diagnoses[crashing].log_tail[-1] == "ConnectionError: redis" and diagnoses[crashing].log_source == "previous"
    # the report a person reads: the pod table, the crashed pod's relevant log lines, the next steps
    md = report_of(state.state_details.flow_run_id)
    assert "| pod | status | ready | restarts | CPU (m) | classification | last termination |" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {crashing} |"))
    assert "crash-looping" in row and "Error (exit 1)" in row and "0/1" in row
    assert f"| {hung} | Running | 1/1 |" in md
    assert "| ConnectionError: redis |" in md and "| step s-9 started |" not in md  # from the traceback on
    assert "worker-crash-recovery" in md and "worker-hang-recovery" in md  # next steps
    # read-only: nothing but GETs, and the workers are as they were
    assert [r for r in cluster.requests if r.method != "GET"] == []
    assert names(cluster) == [crashing, hung, healthy]
    assert cluster.deployment("worker")["spec"] == spec_before


def test_diagnose_workers_all_healthy_and_missing_pod(kube_settings, cluster):
    pods = names(cluster)
    with use_settings(kube_settings):
        state = diagnose_workers(pods=[pods[0], "worker-gone-00000"], return_state=True)
    result = state.result()
    assert [(d.name, d.classification) for d in result.pods] == [
        (pods[0], Classification.HEALTHY),
        ("worker-gone-00000", Classification.GONE),
    ]
    assert result.missing == ["worker-gone-00000"] and result.outcome is Outcome.NOTHING_TO_DO
    md = report_of(state.state_details.flow_run_id)
    assert "Not found: worker-gone-00000" in md and "| worker-gone-00000 | NotFound |" in md
    # a healthy pod costs no event or log reads
    assert not [r for r in cluster.requests if r.resource == "events" or r.subresource == "log"]


def test_diagnose_workers_rejects_bad_parameters(kube_settings, cluster):
    from prefect.exceptions import ParameterTypeError

    with use_settings(kube_settings), pytest.raises(ParameterTypeError):
        diagnose_workers(log_lines=-1)
    assert cluster.requests == []
