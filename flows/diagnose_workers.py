"""`diagnose-workers`: the runbook's "Check worker status / crash loops / logs", read-only.

observe: one list call for the worker pods + one metrics list, then events and previous (or current) logs
only for pods that are not healthy -> decide (pure, ``tasks.kube_diagnosis``): classify each pod and name the
next step -> act: nothing (read-only, so the outcome is ``nothing_to_do``) -> report: a table of pods (status,
ready, restarts, classification, last termination), the events and relevant log lines of the unhealthy ones,
and the next steps.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from flows._ui import LoggedResult, describe_parameters, keep_typed_name
from tasks import kube
from tasks.kube_diagnosis import (
    Classification,
    PodInfo,
    event_rows,
    next_step_rows,
    pod_rows,
    relevant_log_lines,
)
from tasks.outcome import Table
from tasks.report import conclude, recording
from tasks.settings import get_settings

FLOW_NAME = "diagnose-workers"


def _run_name() -> str:
    pods = flow_run.parameters.get("pods")
    return f"diagnose {', '.join(pods)}" if pods else "diagnose all workers"


class WorkerDiagnosis(LoggedResult):
    """What a read-only diagnosis saw: every worker pod, classified, with the evidence of the unhealthy ones."""

    pods: list[PodInfo] = Field(default_factory=list)

    @property
    def unhealthy(self) -> list[PodInfo]:
        return [d for d in self.pods if not d.healthy]

    @property
    def missing(self) -> list[str]:
        return [d.name for d in self.pods if d.classification is Classification.GONE]


def evidence(d: PodInfo) -> list[Table | str]:
    """Pure: the events and relevant log lines of one unhealthy pod, as report blocks."""
    blocks: list[Table | str] = []
    if d.events:
        blocks.append(Table(caption=f"{d.summary} — recent events", rows=event_rows(d)))
    else:
        blocks.append(d.summary)
    if d.log_tail:
        blocks.append(Table(caption=f"{d.name}: {(d.log_source or '').capitalize()} container logs (relevant lines)",
                            rows=[{"log": line} for line in relevant_log_lines(d.log_tail)]))
    elif d.log_error:
        blocks.append(f"{d.name}: logs unavailable: {d.log_error}")
    return blocks


@flow(
    name=FLOW_NAME,
    flow_run_name=keep_typed_name(_run_name),
    description="Runbook 'Check worker status / crash loops / logs' (read-only): status, readiness, restarts, "
    "last termination, CPU, events and previous logs of every worker pod, classified (crash-looping, "
    "OOM-killed, hung suspect, ...) with the next step for each. Changes nothing.",
)
@describe_parameters
def diagnose_workers(
    pods: Annotated[
        list[str] | None,
        Field(title="Pods", description="Worker pods to diagnose; empty: every pod matching FD_WORKER_SELECTOR."),
    ] = None,
    log_lines: Annotated[
        int,
        Field(ge=0, le=1000, title="Log lines (lines)",
              description="Log lines to read per unhealthy pod (the previous container's after a crash)."),
    ] = 50,
) -> WorkerDiagnosis:
    """Diagnose the worker pods and publish a report; returns one diagnosis per pod. Read-only."""
    settings = get_settings()
    logger = get_run_logger()
    with recording(WorkerDiagnosis(flow=FLOW_NAME, title="Worker diagnosis")) as result:
        # observe (the classification is part of each pod's diagnosis)
        result.pods = kube.diagnose_pods(settings=settings, pods=pods or None, log_lines=log_lines)
        counts = Counter(d.classification.value for d in result.pods if d.classification)
        scope = f"pods {', '.join(pods)}" if pods else settings.worker_selector
        result.note("observed", f"{len(result.pods)} worker pod(s) ({scope} in namespace {settings.namespace}), "
                    f"{sum(1 for d in result.pods if d.serving)} Ready: "
                    + ", ".join(f"{n} {c}" for c, n in sorted(counts.items())) + ".")
        result.note("observed", Table(caption="Worker pods", rows=pod_rows(result.pods)))
        present = [d for d in result.pods if d.classification is not Classification.GONE]
        if present and all(d.cpu_millicores is None for d in present):
            result.note("observed", "No CPU metrics (metrics.k8s.io unavailable): hung workers cannot be recognised.")
        if result.missing:
            result.note("observed", f"Not found: {', '.join(result.missing)}.")
        for d in result.unhealthy:
            logger.warning("%s", d.summary)
            for block in evidence(d):
                result.note("observed", block)
        # decide: the next step for each pod that needs attention; act: nothing (read-only)
        result.note("decided", Table(caption="Suggested next steps", rows=next_step_rows(result.pods))
                    if result.unhealthy else "Every worker pod is healthy: nothing to do.")
    return conclude(result)
