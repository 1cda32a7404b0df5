"""The sandbox's ``/metrics``: kube-state-metrics' series for its cluster, and the FerrumDeck worker metrics.

kube-state-metrics is not packaged for Debian, so the sandbox serves the same metric names and labels itself,
derived at scrape time from its own cluster's objects (read from the store: a scrape makes no API request, so
tests that count API calls are not disturbed). The FerrumDeck series are what the real workers and gateway
expose in production; here they are computed from the sandbox's own state:

- ``ferrumdeck_llm_requests_total{namespace,provider,model,outcome}``: the fake LLM providers' per-model
  counts of answered (``ok``) and refused (``error``) calls;
- ``ferrumdeck_tool_calls_total{namespace,outcome}``: the MCP stub's answered and refused tool calls;
- ``ferrumdeck_runs_stuck{namespace}``: runs ``running`` since before ``stuck_after_s``, one indexed
  ``count(*)`` on the runs table per scrape (the query the rules file documents for postgres_exporter).

Nothing here calls the recovery's own tasks: the numbers the alerts fire on come from the sandbox, so a bug in
the product cannot hide itself. Each source that fails to answer (the runs database down, say) is logged and
reported as ``ferrumdeck_sandbox_source_up{source} 0``; the rest of the scrape is still served.

``serve_sandbox_metrics(cluster, settings, llm=..., mcp=...)`` (or ``serve_services_metrics(services)``) serves
``/metrics`` (everything), ``/metrics/kube-state`` and ``/metrics/ferrumdeck`` on a free loopback port.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.http_server import ServedApp, serve_app
from sandbox.llm import provider_of

log = logging.getLogger("sandbox.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: the runbook's stuck-run threshold (a run ``running`` for longer than this is stuck)
STUCK_AFTER_S = 30 * 60
POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")


def _parse_time(value: str | None) -> float | None:
    """An RFC 3339 timestamp of a Kubernetes object as Unix seconds (None when absent or unreadable)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _condition_labels(status: str | None) -> dict[str, float]:
    """kube-state-metrics' three series for a condition: ``true``/``false``/``unknown``, one of them 1."""
    value = (status or "Unknown").lower()
    value = value if value in ("true", "false") else "unknown"
    return {c: float(c == value) for c in ("true", "false", "unknown")}


class _Families:
    """Metric families by name, created on first use (so an empty cluster gives no empty families)."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, kind: str, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        family = self._families.get(name)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = self._families[name] = cls(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class KubeStateCollector(Collector):
    """kube-state-metrics' pod, container and Deployment series, from the sandbox cluster's store."""

    def __init__(self, cluster: Any, *, namespaces: Iterable[str] | None = None) -> None:
        self.cluster = cluster
        self.namespaces = set(namespaces) if namespaces else None

    def _objects(self) -> tuple[list[dict], list[dict]]:
        from sandbox.kube import resources as R

        store = self.cluster.store
        with store.lock:  # one consistent picture, copied (the controllers mutate objects under this lock)
            pods = copy.deepcopy(store.list(R.PODS))
            deployments = copy.deepcopy(store.list(R.DEPLOYMENTS))
        keep = (lambda o: o["metadata"].get("namespace") in self.namespaces) if self.namespaces else (lambda o: True)
        return [p for p in pods if keep(p)], [d for d in deployments if keep(d)]

    def collect(self) -> Iterator[Metric]:
        pods, deployments = self._objects()
        out = _Families()
        for pod in pods:
            self._pod(out, pod)
        for deployment in deployments:
            self._deployment(out, deployment)
        yield from out

    @staticmethod
    def _pod(out: _Families, pod: dict) -> None:
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        base = {"namespace": meta.get("namespace", ""), "pod": meta["name"], "uid": meta.get("uid", "")}
        owner = next(iter(meta.get("ownerReferences") or []), {})
        out.add("gauge", "kube_pod_info", "Information about pod.", {
            **base, "host_ip": status.get("hostIP", ""), "pod_ip": status.get("podIP", ""),
            "node": spec.get("nodeName", ""), "created_by_kind": owner.get("kind", ""),
            "created_by_name": owner.get("name", ""), "priority_class": spec.get("priorityClassName", ""),
            "host_network": str(bool(spec.get("hostNetwork"))).lower(),
        }, 1)
        out.add("gauge", "kube_pod_owner", "Information about the Pod's owner.", {
            **base, "owner_kind": owner.get("kind", "<none>"), "owner_name": owner.get("name", "<none>"),
            "owner_is_controller": str(bool(owner.get("controller"))).lower() if owner else "<none>",
        }, 1)
        if (created := _parse_time(meta.get("creationTimestamp"))) is not None:
            out.add("gauge", "kube_pod_created", "Unix creation timestamp", base, created)
        if (started := _parse_time(status.get("startTime"))) is not None:
            out.add("gauge", "kube_pod_start_time", "Start time in unix timestamp for a pod.", base, started)
        if (deleting := _parse_time(meta.get("deletionTimestamp"))) is not None:
            out.add("gauge", "kube_pod_deletion_timestamp", "Unix deletion timestamp", base, deleting)
        phase = status.get("phase") or "Unknown"
        for p in POD_PHASES:
            out.add("gauge", "kube_pod_status_phase", "The pods current phase.", {**base, "phase": p}, float(p == phase))
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        for ctype, name, doc in (("Ready", "kube_pod_status_ready", "Describes whether the pod is ready to serve requests."),
                                 ("PodScheduled", "kube_pod_status_scheduled", "Describes the status of the scheduling process for the pod.")):
            if ctype in conditions:
                for value, v in _condition_labels(conditions[ctype].get("status")).items():
                    out.add("gauge", name, doc, {**base, "condition": value}, v)
        scheduled = conditions.get("PodScheduled") or {}
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            out.add("gauge", "kube_pod_status_unschedulable", "Describes the unschedulable status for the pod.", base, 1)
        images = {c["name"]: c.get("image", "") for c in spec.get("containers") or []}
        for cs in status.get("containerStatuses") or []:
            KubeStateCollector._container(out, base, cs, image_spec=images.get(cs.get("name"), ""))

    @staticmethod
    def _container(out: _Families, base: dict[str, str], cs: dict, *, image_spec: str) -> None:
        labels = {**base, "container": cs.get("name", "")}
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        out.add("gauge", "kube_pod_container_info", "Information about a container in a pod.", {
            **labels, "image_spec": image_spec, "image": cs.get("image", ""), "image_id": cs.get("imageID", ""),
            "container_id": cs.get("containerID", ""),
        }, 1)
        for key in ("waiting", "running", "terminated"):
            out.add("gauge", f"kube_pod_container_status_{key}", f"Describes whether the container is currently in {key} state.",
                    labels, float(key in state))
        if "waiting" in state:
            out.add("gauge", "kube_pod_container_status_waiting_reason",
                    "Describes the reason the container is currently in waiting state.",
                    {**labels, "reason": (state["waiting"] or {}).get("reason", "")}, 1)
        if "terminated" in state:
            out.add("gauge", "kube_pod_container_status_terminated_reason",
                    "Describes the reason the container is currently in terminated state.",
                    {**labels, "reason": (state["terminated"] or {}).get("reason", "")}, 1)
        if "terminated" in last:
            out.add("gauge", "kube_pod_container_status_last_terminated_reason",
                    "Describes the last reason the container was in terminated state.",
                    {**labels, "reason": (last["terminated"] or {}).get("reason", "")}, 1)
            out.add("gauge", "kube_pod_container_status_last_terminated_exitcode",
                    "Describes the exit code for the last container in terminated state.",
                    labels, float((last["terminated"] or {}).get("exitCode", 0)))
        out.add("gauge", "kube_pod_container_status_ready", "Describes whether the containers readiness check succeeded.",
                labels, float(bool(cs.get("ready"))))
        out.add("counter", "kube_pod_container_status_restarts_total",
                "The number of container restarts per container.", labels, float(cs.get("restartCount", 0)))

    @staticmethod
    def _deployment(out: _Families, d: dict) -> None:
        meta, spec, status = d["metadata"], d.get("spec") or {}, d.get("status") or {}
        base = {"namespace": meta.get("namespace", ""), "deployment": meta["name"]}
        if (created := _parse_time(meta.get("creationTimestamp"))) is not None:
            out.add("gauge", "kube_deployment_created", "Unix creation timestamp", base, created)
        out.add("gauge", "kube_deployment_spec_replicas", "Number of desired pods for a deployment.",
                base, float(spec.get("replicas", 1)))
        out.add("gauge", "kube_deployment_spec_paused", "Whether the deployment is paused and will not be processed "
                "by the deployment controller.", base, float(bool(spec.get("paused"))))
        out.add("gauge", "kube_deployment_metadata_generation", "Sequence number representing a specific generation "
                "of the desired state.", base, float(meta.get("generation", 0)))
        for key, name, doc in (
            ("replicas", "kube_deployment_status_replicas", "The number of replicas per deployment."),
            ("readyReplicas", "kube_deployment_status_replicas_ready", "The number of ready replicas per deployment."),
            ("availableReplicas", "kube_deployment_status_replicas_available",
             "The number of available replicas per deployment."),
            ("unavailableReplicas", "kube_deployment_status_replicas_unavailable",
             "The number of unavailable replicas per deployment."),
            ("updatedReplicas", "kube_deployment_status_replicas_updated", "The number of updated replicas per deployment."),
            ("observedGeneration", "kube_deployment_status_observed_generation",
             "The generation observed by the deployment controller."),
        ):
            out.add("gauge", name, doc, base, float(status.get(key, 0)))  # Kubernetes omits zero counts
        for c in status.get("conditions") or []:
            for value, v in _condition_labels(c.get("status")).items():
                out.add("gauge", "kube_deployment_status_condition", "The current status conditions of a deployment.",
                        {**base, "condition": c.get("type", ""), "status": value}, v)


class FerrumDeckCollector(Collector):
    """The FerrumDeck worker/gateway series the rules use, from the sandbox's LLM and MCP stubs and runs DB."""

    def __init__(
        self,
        *,
        namespace: str,
        llm: Any = None,
        mcp: Any = None,
        database_url: str | None = None,
        runs_table: str = "runs",
        stuck_after_s: float = STUCK_AFTER_S,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.namespace = namespace
        self.llm = llm
        self.mcp = mcp
        self.runs_table = runs_table
        self.stuck_after_s = stuck_after_s
        self.now = now
        self._engine = sa.create_engine(database_url, pool_pre_ping=True) if database_url else None
        self._last_error: dict[str, str] = {}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def collect(self) -> Iterator[Metric]:
        ns = self.namespace
        source_up = GaugeMetricFamily("ferrumdeck_sandbox_source_up",
                                      "1 when the sandbox source of these series answered this scrape.", labels=["source"])
        if self.llm is not None:
            calls, failures = dict(self.llm.calls), dict(self.llm.failures)  # dict copies are atomic in CPython
            llm = CounterMetricFamily("ferrumdeck_llm_requests", "LLM calls made by the workers, by outcome.",
                                      labels=["namespace", "provider", "model", "outcome"])
            for model in sorted(set(calls) | set(failures)):
                provider = provider_of(model)
                llm.add_metric([ns, provider, model, "ok"], float(calls.get(model, 0)))
                llm.add_metric([ns, provider, model, "error"], float(failures.get(model, 0)))
            yield llm
        if self.mcp is not None:
            tools = CounterMetricFamily("ferrumdeck_tool_calls", "MCP tool calls made by the workers, by outcome.",
                                        labels=["namespace", "outcome"])
            tools.add_metric([ns, "ok"], float(self.mcp.calls))
            tools.add_metric([ns, "error"], float(self.mcp.refused))
            yield tools
        if self._engine is not None:
            stuck = self._stuck_runs()
            source_up.add_metric(["runs_db"], float(stuck is not None))
            if stuck is not None:
                gauge = GaugeMetricFamily("ferrumdeck_runs_stuck", "Runs in status 'running' started longer ago "
                                          "than the stuck threshold.", labels=["namespace"])
                gauge.add_metric([ns], float(stuck))
                yield gauge
        yield source_up

    def _stuck_runs(self) -> int | None:
        """``SELECT count(*) FROM runs WHERE status='running' AND started_at < now - threshold``, None on error."""
        assert self._engine is not None
        cutoff = self.now() - timedelta(seconds=self.stuck_after_s)
        if self._engine.dialect.name == "sqlite":  # the sandbox's SQLite stores naive UTC ISO text
            cutoff = cutoff.astimezone(UTC).replace(tzinfo=None)
        runs = sa.table(self.runs_table, sa.column("status"), sa.column("started_at"))
        query = sa.select(sa.func.count()).select_from(runs).where(
            runs.c.status == "running", runs.c.started_at < sa.bindparam("cutoff", cutoff, type_=sa.DateTime()))
        try:
            with self._engine.connect() as conn:
                value = int(conn.execute(query).scalar_one())
        except sa.exc.SQLAlchemyError as e:
            message = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if self._last_error.get("runs_db") != message:
                log.warning("sandbox metrics: runs database did not answer (%s); ferrumdeck_runs_stuck left out",
                            message)
            self._last_error["runs_db"] = message
            return None
        self._last_error.pop("runs_db", None)
        return value


class _Guarded(Collector):
    """A collector whose failure costs only its own series (logged, and ``source_up`` 0), not the scrape."""

    def __init__(self, name: str, inner: Collector) -> None:
        self.name, self.inner = name, inner

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ferrumdeck_sandbox_source_up",
                               "1 when the sandbox source of these series answered this scrape.", labels=["source"])
        try:
            metrics = list(self.inner.collect())
        except Exception:  # a bug in a collector must not take the whole endpoint down
            log.exception("sandbox metrics: collecting %s failed", self.name)
            up.add_metric([self.name], 0.0)
            yield up
            return
        up.add_metric([self.name], 1.0)
        yield from metrics
        yield up


def _merge_source_up(metrics: Iterable[Metric]) -> list[Metric]:
    """One ``ferrumdeck_sandbox_source_up`` family (collectors each yield their own samples of it)."""
    merged: list[Metric] = []
    up: Metric | None = None
    for m in metrics:
        if m.name == "ferrumdeck_sandbox_source_up":
            if up is None:
                up = m
                merged.append(m)
            else:
                up.samples.extend(m.samples)
        else:
            merged.append(m)
    return merged


class _Registry(CollectorRegistry):
    """A registry that merges the per-source ``source_up`` families into one (valid exposition)."""

    def collect(self) -> Iterator[Metric]:
        return iter(_merge_source_up(super().collect()))


def registry_of(*collectors: Collector) -> CollectorRegistry:
    """A registry of ``collectors`` (collected at scrape time; no describe, so registering reads nothing)."""
    registry = _Registry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


@dataclass
class MetricsEndpoint:
    """The sandbox's metrics, served: ``url`` is ``.../metrics`` (everything); ``stop()`` ends it."""

    served: ServedApp
    collector: FerrumDeckCollector

    @property
    def base_url(self) -> str:
        return self.served.url

    @property
    def url(self) -> str:
        return f"{self.served.url}/metrics"

    @property
    def kube_state_url(self) -> str:
        return f"{self.served.url}/metrics/kube-state"

    @property
    def ferrumdeck_url(self) -> str:
        return f"{self.served.url}/metrics/ferrumdeck"

    @property
    def address(self) -> str:
        """``host:port``, for a Prometheus ``static_configs`` target."""
        return self.served.url.split("://", 1)[1]

    def stop(self) -> None:
        self.served.stop()
        self.collector.close()


def metrics_app(*, kube: Collector, ferrumdeck: Collector) -> Starlette:
    """``/metrics`` (both), ``/metrics/kube-state``, ``/metrics/ferrumdeck``; sync routes run in a thread pool."""
    kube, ferrumdeck = _Guarded("kube_state", kube), _Guarded("ferrumdeck", ferrumdeck)

    def render(registry: CollectorRegistry) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE)

        return endpoint

    return Starlette(routes=[
        Route("/metrics", render(registry_of(kube, ferrumdeck)), methods=["GET"]),
        Route("/metrics/kube-state", render(registry_of(kube)), methods=["GET"]),
        Route("/metrics/ferrumdeck", render(registry_of(ferrumdeck)), methods=["GET"]),
    ])


def serve_sandbox_metrics(
    cluster: Any,
    settings: Any = None,
    *,
    llm: Any = None,
    mcp: Any = None,
    stuck_after_s: float = STUCK_AFTER_S,
    namespaces: Iterable[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> MetricsEndpoint:
    """Serve the sandbox's metrics for ``cluster`` (and, with ``settings``, the runs DB's stuck runs; with
    ``llm``/``mcp``, the LLM and tool-call counters) on ``host:port`` (0: a free port)."""
    namespace = getattr(settings, "namespace", "ferrumdeck")
    database_url = settings.database_url.get_secret_value() if settings is not None else None
    if database_url and database_url.startswith(("postgresql://", "postgres://")):
        database_url = "postgresql+psycopg://" + database_url.split("://", 1)[1]
    collector = FerrumDeckCollector(
        namespace=namespace, llm=llm, mcp=mcp, database_url=database_url,
        runs_table=getattr(settings, "runs_table", "runs"), stuck_after_s=stuck_after_s,
    )
    app = metrics_app(kube=KubeStateCollector(cluster, namespaces=namespaces), ferrumdeck=collector)
    try:
        served = serve_app(app, host=host, port=port, name="sandbox-metrics")
    except BaseException:
        collector.close()
        raise
    return MetricsEndpoint(served=served, collector=collector)


def serve_services_metrics(services: Any, *, stuck_after_s: float = STUCK_AFTER_S, port: int = 0) -> MetricsEndpoint:
    """``serve_sandbox_metrics`` for a running ``SandboxServices`` (its cluster, settings, LLM and MCP stubs)."""
    return serve_sandbox_metrics(services.cluster, services.settings, llm=services.llm, mcp=services.mcp,
                                 stuck_after_s=stuck_after_s, port=port)
