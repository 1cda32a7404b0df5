"""`diagnose-workers`: the runbook's "Check worker status / crash loops / logs", read-only.

observe: one list call for the worker pods + one metrics list, then events and previous (or current) logs
only for pods that are not healthy -> decide (pure): classify each pod and name the next step -> act:
nothing (read-only) -> verify: every requested pod accounted for -> report: a table of pods (status, ready,
restarts, classification, last termination) and the relevant log lines and events of the unhealthy ones.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from tasks import kube
from tasks.kube_diagnosis import NEXT_STEP, Classification, PodDiagnosis, relevant_log_lines
from tasks.report import Report
from tasks.settings import get_settings

FLOW_NAME = "diagnose-workers"


def _run_name() -> str:
    pods = flow_run.parameters.get("pods")
    return f"diagnose {', '.join(pods)}" if pods else "diagnose all workers"


def _status(d: PodDiagnosis) -> str:
    """The STATUS column `kubectl get pods` would show."""
    if d.classification is Classification.GONE:
        return "NotFound"
    if d.terminating:
        return "Terminating"
    if d.waiting_reason:
        return d.waiting_reason
    if d.current_termination and d.current_termination.reason:
        return d.current_termination.reason
    return d.phase or "?"


def _last_termination(d: PodDiagnosis) -> str:
    t = d.last_termination
    if t is None:
        return ""
    when = t.finished_at.strftime("%Y-%m-%d %H:%M:%SZ") if t.finished_at else "?"
    return f"{t.reason or '?'} (exit {t.exit_code}) at {when}"


def pod_rows(diagnoses: list[PodDiagnosis]) -> list[dict[str, object]]:
    """The report's pod table, one row per pod, like `kubectl get pods` plus the diagnosis."""
    return [
        {
            "pod": d.name,
            "status": _status(d),
            "ready": "-" if d.classification is Classification.GONE else ("1/1" if d.ready else "0/1"),
            "restarts": d.restart_count,
            "CPU (m)": "" if d.cpu_millicores is None else f"{d.cpu_millicores:g}",
            "classification": d.classification.value,
            "last termination": _last_termination(d),
        }
        for d in diagnoses
    ]


def _evidence(d: PodDiagnosis) -> str:
    """Markdown block with the events and the relevant log lines of one unhealthy pod."""
    parts = [f"**{d.name}** — {d.summary.split(': ', 1)[-1]}"]
    if d.events:
        events = "\n".join(
            f"- {e.type or ''} {e.reason or ''} (x{e.count}): {' '.join((e.message or '').split())}"
            for e in d.events
        )
        parts.append("Recent events:\n\n" + events)
    if d.log_tail:
        lines = "\n".join(relevant_log_lines(d.log_tail)).replace("```", "'''")
        parts.append(
            f"{(d.log_source or '').capitalize()} container logs (relevant lines):\n\n```text\n{lines}\n```"
        )
    elif d.log_error:
        parts.append(f"Logs: {d.log_error}")
    return "\n\n".join(parts)


@flow(
    name=FLOW_NAME,
    flow_run_name=_run_name,
    description="Runbook 'Check worker status / crash loops / logs' (read-only): status, readiness, restarts, "
    "last termination, CPU, events and previous logs of every worker pod, classified (crash-looping, "
    "OOM-killed, hung suspect, ...) with the next step for each. Changes nothing.",
)
def diagnose_workers(
    pods: Annotated[
        list[str] | None,
        Field(description="Worker pods to diagnose; empty: every pod matching FD_WORKER_SELECTOR."),
    ] = None,
    log_lines: Annotated[
        int,
        Field(
            ge=0,
            le=1000,
            description="Log lines to read per unhealthy pod (previous container after a crash).",
        ),
    ] = 50,
) -> list[PodDiagnosis]:
    """Diagnose the worker pods and publish a report; returns one diagnosis per pod. Read-only.

    Args:
        pods: Names of worker pods to look at; empty means all worker pods.
        log_lines: How many log lines to read for each pod that is not healthy.
    """
    settings = get_settings()
    logger = get_run_logger()
    report = Report(title="Worker diagnosis")

    diagnoses = kube.diagnose_pods(settings=settings, pods=pods or None, log_lines=log_lines)
    counts = Counter(d.classification.value for d in diagnoses)
    unhealthy = [d for d in diagnoses if not d.healthy]
    serving = sum(1 for d in diagnoses if d.serving)

    scope = f"pods {', '.join(pods)}" if pods else f"`{settings.worker_selector}`"
    report.add(
        "Observed",
        f"{len(diagnoses)} worker pod(s) ({scope} in namespace `{settings.namespace}`), {serving} Ready: "
        + ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
        + ".",
    )
    report.table("Observed", pod_rows(diagnoses), caption="Worker pods")
    if diagnoses and all(
        d.cpu_millicores is None for d in diagnoses if d.classification is not Classification.GONE
    ):
        report.add(
            "Observed", "No CPU metrics (metrics.k8s.io unavailable): hung workers cannot be recognised."
        )
    for d in unhealthy:
        report.add("Observed", _evidence(d))
        logger.warning("%s", d.summary)

    if unhealthy:
        report.table(
            "Decided",
            [
                {
                    "pod": d.name,
                    "classification": d.classification.value,
                    "next step": NEXT_STEP.get(d.classification, ""),
                }
                for d in unhealthy
            ],
            caption="Suggested next steps",
        )
    else:
        report.add("Decided", "Every worker pod is healthy: nothing to do.")
    report.add("Done", "Nothing changed: this flow is read-only.")
    missing = [d.name for d in diagnoses if d.classification is Classification.GONE]
    report.add(
        "Verified",
        f"Diagnosed {len(diagnoses) - len(missing)} pod(s)"
        + (f"; not found: {', '.join(missing)}." if missing else "; every requested pod was found."),
    )
    report.outcome = "all healthy" if not unhealthy else f"{len(unhealthy)} pod(s) need attention"
    report.publish(key=FLOW_NAME)
    logger.info("diagnose-workers: %s", report.outcome)
    return diagnoses
