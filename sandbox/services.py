"""The living sandbox FerrumDeck in one object: cluster, stream, runs DB, gateway, MCP, LLM status, workers.

``SandboxServices.start(...)`` starts, in this process: the sandbox Kubernetes API server (or uses the one
given), the consumer group on the step stream, the runs schema, the gateway stub, the MCP stub, the LLM
providers' status pages, and the worker pool that follows the cluster's worker pods. ``services.settings`` is
the ``Settings`` the recovery flows need to act on all of it (kubeconfig, gateway URL and key, MCP health URL,
status page URLs). Faults are methods: ``crash``, ``hang``, ``poison``, ``llm_outage``, ``mcp_outage``,
``backlog``. ``stop()`` ends everything it started.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr

from sandbox.http_server import ServedApp, serve_app
from sandbox.llm import LLMProviders, provider_of
from sandbox.load import EnqueuedStep, LoadGenerator, enqueue_steps
from sandbox.mcp import MCPServer
from sandbox.pods import pod_is_ready, pod_name
from sandbox.worker import Worker
from sandbox.workers import WorkerPool
from tasks.connections import db_engine, redis_client
from tasks.runs import create_schema
from tasks.settings import Settings

log = logging.getLogger("sandbox.services")


class SandboxError(Exception):
    """The sandbox could not start, or a fault could not be applied."""


def ensure_group(*, client: redis.Redis, settings: Settings) -> bool:
    """Create the workers' consumer group (and the stream) if missing; True when it was created."""
    try:
        client.xgroup_create(settings.stream, settings.group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise SandboxError(f"could not create consumer group {settings.group!r}: {e}") from e
        return False
    return True


class SandboxServices:
    """Everything the recovery flows act on, running in-process (see the module docstring)."""

    def __init__(self) -> None:  # use SandboxServices.start(...)
        self.cluster: Any = None
        self.settings: Settings
        self.urls: dict[str, str] = {}
        self.llm = LLMProviders()
        self.mcp = MCPServer()
        self.pool: WorkerPool
        self.redis: redis.Redis
        self.gateway_api_key: str = ""
        self.load: LoadGenerator | None = None
        self.gateway: Any = None
        self._served: list[ServedApp] = []
        self._own_cluster = False
        self._stopped = False

    # --- lifecycle ---
    @classmethod
    def start(
        cls,
        *,
        settings: Settings | None = None,
        cluster: Any = None,
        cluster_timing: Any = None,
        database_url: str | None = None,
        state_dir: str | Path | None = None,
        step_ms: float = 20.0,
        batch: int = 50,
        gateway_api_key: str | None = None,
        load_rate_per_s: float = 0.0,
        kube_port: int = 0,
        gateway_port: int = 0,
        mcp_port: int = 0,
        llm_port: int = 0,
        host: str = "127.0.0.1",
    ) -> SandboxServices:
        """Start the sandbox FerrumDeck; returns once workers follow the cluster (their pods may still start)."""
        self = cls()
        base = settings or Settings()
        if database_url:
            base = base.model_copy(update={"database_url": SecretStr(database_url)})
        state = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="fd-sandbox-"))
        state.mkdir(parents=True, exist_ok=True)
        self.gateway_api_key = gateway_api_key or secrets.token_urlsafe(24)
        try:
            self._start(
                base=base, cluster=cluster, timing=cluster_timing, state=state, step_ms=step_ms, batch=batch, host=host,
                ports={"kube": kube_port, "gateway": gateway_port, "mcp": mcp_port, "llm": llm_port},
            )
            if load_rate_per_s > 0:
                self.start_load(rate_per_s=load_rate_per_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(
        self,
        *,
        base: Settings,
        cluster: Any,
        timing: Any,
        state: Path,
        step_ms: float,
        batch: int,
        host: str,
        ports: dict[str, int],
    ) -> None:
        if cluster is None:
            from sandbox.kube import SandboxCluster

            cluster = SandboxCluster.start(
                port=ports["kube"], kubeconfig_path=str(state / "kubeconfig"), timing=timing, host=host
            )
            self._own_cluster = True
        self.cluster = cluster
        self.redis = redis_client(base)
        ensure_group(client=self.redis, settings=base)
        create_schema(settings=base)

        mcp = serve_app(self.mcp.app(), host=host, port=ports["mcp"], name="mcp")
        self._served.append(mcp)
        llm = serve_app(self.llm.app(), host=host, port=ports["llm"], name="llm")
        self._served.append(llm)
        providers = dict.fromkeys(provider_of(m) for m in base.llm_fallback_models)
        status_urls = {p: f"{llm.url}/{p}/api/v2/status.json" for p in providers}
        update: dict[str, Any] = {
            "kubeconfig": str(cluster.kubeconfig),
            "mcp_url": f"{mcp.url}/health",
            "llm_status_urls": status_urls,
            "gateway_api_key": SecretStr(self.gateway_api_key),
        }
        gateway = self._start_gateway(base=base, host=host, port=ports["gateway"])
        update["gateway_url"] = gateway.url
        self.settings = base.model_copy(update=update)
        self.urls = {
            "kubernetes": cluster.url,
            "mcp": mcp.url,
            "mcp_health": f"{mcp.url}/health",
            "llm": llm.url,
            "gateway": gateway.url,
            **{f"status_{p}": u for p, u in status_urls.items()},
        }

        self.pool = WorkerPool(
            factory=self._worker_factory(step_ms=step_ms, batch=batch, mcp_url=mcp.url),
            selector=base.worker_selector,
            container=base.worker_container,
            model_env=getattr(base, "llm_model_env", "LITELLM_MODEL"),
            default_model=base.llm_fallback_models[0] if base.llm_fallback_models else "openai/gpt-4o",
        )
        self.mcp.app_label = base.mcp_deployment
        cluster.add_listener(self._on_pod_event)
        self.pool.sync(cluster.pods(namespace=base.namespace, selector=base.worker_selector))

    def _start_gateway(self, *, base: Settings, host: str, port: int) -> Any:
        """The gateway stub (``sandbox.gateway``): re-enqueues a step on ``POST .../retry`` with the Bearer key."""
        from sandbox.gateway import GatewayServer

        self.gateway = GatewayServer(settings=base, api_key=SecretStr(self.gateway_api_key), host=host, port=port)
        self.gateway.start()
        return self.gateway

    def _worker_factory(self, *, step_ms: float, batch: int, mcp_url: str) -> Callable[[str, str], Worker]:
        def make(pod: str, model: str) -> Worker:
            return Worker(
                pod=pod,
                model=model,
                settings=self.settings,
                redis_client=self.redis,
                llm=self.llm,
                mcp_url=mcp_url,
                step_ms=step_ms,
                batch=batch,
                on_crash=self._on_worker_crash,
            )

        return make

    def _on_pod_event(self, event_type: str, pod: dict) -> None:
        if self._stopped:
            return
        self.pool.on_pod_event(event_type, pod)
        self.mcp.on_pod_event(event_type, pod)

    def _on_worker_crash(self, pod: str, message: str) -> None:
        """A worker died on a poison entry: its pod crash-loops, with the traceback in its previous logs."""
        self.pool.mark_crashed(pod)
        if not self._stopped:
            self.cluster.crash_loop(pod, exit_code=1, reason="Error", logs=[message, "WorkerCrashed: poison step"])

    def stop(self) -> None:
        """Stop the load, the workers, the HTTP stubs and (if it started it) the cluster. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.cluster is not None and hasattr(self.cluster, "remove_listener"):
            self.cluster.remove_listener(self._on_pod_event)
        if self.load is not None:
            self.load.stop()
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.stop()
        for served in reversed(self._served):
            served.stop()
        if self.gateway is not None:
            self.gateway.stop()
        if self._own_cluster and self.cluster is not None:
            self.cluster.stop()

    def __enter__(self) -> SandboxServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- load ---
    def start_load(self, *, rate_per_s: float, tool_every: int = 4) -> LoadGenerator:
        """A steady load of new runs (``rate_per_s`` steps a second) until ``stop()``."""
        if self.load is not None:
            self.load.stop()
        self.load = LoadGenerator(
            settings=self.settings,
            redis_client=self.redis,
            engine=db_engine(self.settings),
            rate_per_s=rate_per_s,
            tool_every=tool_every,
        ).start()
        return self.load

    def backlog(self, n: int, *, payload: dict[str, Any] | None = None, tool_every: int = 0) -> list[EnqueuedStep]:
        """A burst: ``n`` runs of one step each, inserted set-based and XADDed in pipelines."""
        return enqueue_steps(
            settings=self.settings,
            redis_client=self.redis,
            engine=db_engine(self.settings),
            n=n,
            payload=payload,
            tool_every=tool_every,
        )

    # --- faults ---
    def crash(self, pod: str, *, exit_code: int = 1, reason: str = "Error") -> int:
        """The pod's worker dies holding its in-flight entries and the pod crash-loops; returns entries held."""
        worker = self.pool.mark_crashed(pod)
        held = 0
        if worker is not None:
            worker.join(5.0)
            held = worker.held
        logs = ["Traceback (most recent call last):", f"RuntimeError: worker {pod} crashed (sandbox fault)"]
        self.cluster.crash_loop(pod, exit_code=exit_code, reason=reason, logs=logs)
        return held

    def hang(self, pod: str) -> Worker:
        """The pod's worker stops processing but keeps its entries; the pod stays Ready with CPU ~0."""
        worker = self.pool.worker(pod)
        if worker is None:
            raise SandboxError(f"no worker runs for pod {pod!r}")
        worker.hang()
        self.cluster.hang(pod)
        return worker

    def poison(self, *, count: int = 1) -> list[EnqueuedStep]:
        """Enqueue ``count`` poison steps: whichever worker takes one dies holding it (and crash-loops)."""
        return self.backlog(count, payload={"kind": "llm", "poison": True})

    def llm_outage(self, provider: str) -> None:
        """Every call to ``provider``'s models fails and its status page says ``major``."""
        self.llm.outage(provider)

    def llm_restore(self, provider: str | None = None) -> None:
        self.llm.restore(provider)

    def restore_all(self) -> None:
        """End every LLM and MCP outage (between drills); crashed/hung pods are the recoveries' business."""
        self.llm.restore()
        self.mcp.restore()

    def mcp_outage(self) -> None:
        """MCP ``/health`` fails and tool calls are refused until the mcp-server Deployment is restarted."""
        pods = self.cluster.pods(namespace=self.settings.namespace, selector=f"app={self.settings.mcp_deployment}")
        self.mcp.outage(current_pods=[pod_name(p) for p in pods])

    # --- views ---
    def ready_worker_pods(self) -> list[str]:
        """Names of worker pods that are Running and Ready in the cluster."""
        pods = self.cluster.pods(namespace=self.settings.namespace, selector=self.settings.worker_selector)
        return sorted(pod_name(p) for p in pods if pod_is_ready(p))

    def wait_for_workers(self, n: int, *, timeout_s: float = 10.0) -> list[str]:
        """Wait until ``n`` workers are running (consuming); returns their pod names."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = sorted(self.pool.running())
            if len(running) >= n:
                return running
            if time.monotonic() > deadline:
                raise SandboxError(f"only {len(running)} of {n} workers running after {timeout_s} s: {running}")
            time.sleep(0.02)  # poll

    def wait_for_holding(self, n: int, *, timeout_s: float = 10.0) -> str:
        """Wait until a running worker holds at least ``n`` unacknowledged entries; returns its pod (drills)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for pod, worker in self.pool.running().items():
                if worker.held >= n:
                    return pod
            if time.monotonic() > deadline:
                raise SandboxError(f"no worker held {n} entries within {timeout_s} s")
            time.sleep(0.005)  # poll

    def summary(self) -> dict[str, Any]:
        """What a human needs to use it: URLs, kubeconfig, stream names, workers."""
        s = self.settings
        return {
            "kubeconfig": s.kubeconfig,
            "urls": dict(self.urls),
            "stream": s.stream,
            "group": s.group,
            "dlq_stream": s.dlq_stream,
            "namespace": s.namespace,
            "workers": sorted(self.pool.running()),
        }

    def env(self) -> dict[str, str]:
        """``FD_*`` environment variables that point the recovery flows (and kubectl) at this sandbox."""
        s = self.settings
        return {
            "KUBECONFIG": str(s.kubeconfig),
            "FD_KUBECONFIG": str(s.kubeconfig),
            "FD_REDIS_URL": s.redis_url.get_secret_value(),
            "FD_STREAM": s.stream,
            "FD_GROUP": s.group,
            "FD_DLQ_STREAM": s.dlq_stream,
            "FD_DATABASE_URL": s.database_url.get_secret_value(),
            "FD_RUNS_TABLE": s.runs_table,
            "FD_STEPS_TABLE": s.steps_table,
            "FD_GATEWAY_URL": s.gateway_url,
            "FD_GATEWAY_API_KEY": self.gateway_api_key,
            "FD_MCP_URL": s.mcp_url,
            "FD_LLM_STATUS_URLS": json.dumps(s.llm_status_urls),
        }
