"""The whole demo stack, started and stopped as one: Prefect server, sandbox FerrumDeck, alert bridge, runner,
and the detection path in front of them.

``Stack.start(state_dir=..., detect=...)`` starts, each on a free port of 127.0.0.1 and each waited for with a
deadline: a real ``prefect server start`` subprocess (SQLite, its own ``PREFECT_HOME`` under the state
directory), the sandbox FerrumDeck in this process (cluster, workers, gateway, MCP, LLM status, steady load;
SQLite runs DB; Redis keys under a private prefix), the alert bridge (``BackgroundBridge``, Bearer token), and
``fd-recovery serve`` as a subprocess with the sandbox's ``FD_*`` environment, then waits until every
deployment and trigger of ``prefect.yaml`` is registered. ``stop()`` ends everything it started (process
groups of its own subprocesses, by id) and is safe to call twice, from ``finally`` after Ctrl-C.

Detection (``detect``, see ``DETECTIONS``):

- ``prometheus``: the sandbox's ``/metrics`` (``sandbox.metrics``) and the real Prometheus, Alertmanager, redis
  and blackbox exporters (``sandbox.observability``, ``DEMO`` profile: scrape 1 s, ``for:`` at most 5 s), whose
  Alertmanager notifies the bridge; the bridge's heartbeat comes from the real ``FerrumDeckHeartbeat`` alert;
- ``watch``: the direct watcher (``deployments.watch.watching``: Kubernetes watch + consumer-group poll every
  0.5 s) posting its ``ferrumdeck.pod.*`` events to the Prefect server;
- ``direct``: nothing in front; the drills post each alert to the bridge themselves.

The served flow runs persist their results (``PREFECT_RESULTS_PERSIST_BY_DEFAULT``, flows only: tasks keep
production's no persistence) under the state directory, so a drill can read a run's typed ``RecoveryResult``
(its ``outcome``) from another process.

The drill profile (``DRILL_SETTINGS``, ``DRILL_PARAMETERS``) shortens the waits that only make sense at
production scale (a hang must be idle 2 s instead of 2 min, samples 1 s apart, scale back after a drain),
so the drills finish in seconds; it is printed and documented, never hidden.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
from pydantic import SecretStr

from sandbox.scratch import free_port
from tasks.settings import Settings

log = logging.getLogger("sandbox.stack")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MARKER = ".fd-stack"

#: Settings the flows run with in the demo/drills (on top of the sandbox's), and why.
DRILL_SETTINGS: dict[str, Any] = {
    "alerting_check": "bridge",  # the post-recovery check reads the bridge's heartbeat
    "poison_min_deliveries": 3,  # the runbook's "DLQ after 3 failures" for poison entries too
    "hang_min_idle_ms": 2_000,  # production: 2 min; sandbox steps take milliseconds
    "replacement_timeout_s": 30.0,
    "rollout_timeout_s": 60.0,
    "mcp_check_attempts": 2,
    "mcp_check_interval_s": 0.5,
    "mcp_recovery_deadline_s": 30.0,
    "pod_deletions_per_hour": 30,  # a demo replaces several pods within minutes
    "min_healthy_workers": 1,
}

#: The detection paths a stack can run (``Stack.start(detect=...)``).
DETECTIONS = ("prometheus", "watch", "direct")
#: The watcher reports a hang after this much silence (the flows' own threshold, DRILL_SETTINGS, is lower, so a
#: hang the watcher reports is one the recovery confirms; under load a healthy worker can be silent for ~2 s).
WATCH_HANG_MIN_IDLE_MS = 3_000
WATCH_POLL_INTERVAL_S = 0.5

#: Deployment parameter defaults changed for the drills (trigger parameters still win over these).
DRILL_PARAMETERS: dict[str, dict[str, Any]] = {
    "worker-hang-recovery": {
        "samples": 3, "sample_interval_s": 1.0, "verify_samples": 2, "verify_interval_s": 1.0,
        # steady load below capacity: the other workers absorb it, so the lag does not grow; the hung
        # worker's held steps, its silence and CPU ~0 are the evidence
        "require_lag_growth": False,
    },
    "scale-workers": {"sample_interval_s": 1.0, "scale_back": True, "timeout_s": 300.0, "drain_target": 100},
}


class StackError(Exception):
    """A part of the stack did not start (or stop) in time."""


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``predicate`` until truthy; StackError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)  # poll


def api_call(method: str, url: str, *, attempts: int = 5, **kwargs: Any) -> httpx.Response:
    """One Prefect API request, retried on connection errors and 5xx (SQLite answers 503 when it is busy)."""
    for attempt in range(attempts):
        try:
            response = httpx.request(method, url, timeout=10, **kwargs)
        except httpx.HTTPError as e:
            if attempt == attempts - 1:
                raise StackError(f"{method} {url}: {type(e).__name__}: {e}") from e
        else:
            if response.status_code < 500 or attempt == attempts - 1:
                return response
        time.sleep(0.5 * 2**attempt)  # back-off before the retry
    raise AssertionError("unreachable")


def settings_env(settings: Settings) -> dict[str, str]:
    """Every field of ``settings`` as ``FD_*`` variables (secrets revealed: for a child process only)."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"FD_{name.upper()}"] = json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
    return env


@dataclass
class ChildProcess:
    """A subprocess in its own session (process group), output to a log file; stopped by its group id."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    _log: TextIO

    @classmethod
    def spawn(cls, name: str, argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path) -> ChildProcess:
        out = log_path.open("ab")
        popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name=name, popen=popen, log_path=log_path, _log=out)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout_s``."""
        if self.popen.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # leftovers of the group (flow-run subprocesses)
        self._log.close()


@dataclass
class Stack:
    """Everything of the demo, running (see the module docstring)."""

    state_dir: Path
    api_url: str = ""
    ui_url: str = ""
    flow_settings: Settings | None = None
    services: Any = None  # sandbox.services.SandboxServices
    bridge: Any = None  # deployments.bridge.BackgroundBridge
    bridge_token: str = ""
    deployments: dict[str, str] = field(default_factory=dict)  # name -> id
    timings: dict[str, float] = field(default_factory=dict)
    keep_keys: bool = False
    detect: str = "direct"
    metrics: Any = None  # sandbox.metrics.MetricsEndpoint (detect=prometheus)
    observability: Any = None  # sandbox.observability.Observability (detect=prometheus)
    watcher: Any = None  # deployments.watch.Watcher (detect=watch)
    watch_events: Any = None  # deployments.watch.PrefectEvents (detect=watch)
    _watching: contextlib.ExitStack | None = None
    _children: list[ChildProcess] = field(default_factory=list)
    _key_prefix: str = ""
    _stopped: bool = False

    # --- start ---
    @classmethod
    def start(
        cls,
        *,
        state_dir: str | Path = ".fd-demo",
        load_rate_per_s: float = 5.0,
        step_ms: float = 20.0,
        batch: int = 50,
        settings_overrides: dict[str, Any] | None = None,
        parameter_overrides: dict[str, dict[str, Any]] | None = None,
        say: Callable[[str], None] = lambda _msg: None,
        server_timeout_s: float = 90.0,
        serve_timeout_s: float = 120.0,
        prefect_database_url: str | None = None,
        detect: str = "direct",
    ) -> Stack:
        """Start every part; on any failure everything already started is stopped before raising.

        ``prefect_database_url`` (``postgresql+asyncpg://...``) runs the Prefect server on PostgreSQL as in
        production; by default it uses a SQLite file in the state directory. ``detect``: one of ``DETECTIONS``
        (the module docstring)."""
        if detect not in DETECTIONS:
            raise ValueError(f"detect must be one of {', '.join(DETECTIONS)}, not {detect!r}")
        state = Path(state_dir).resolve()
        if state.exists() and any(state.iterdir()):
            if not (state / MARKER).exists():
                raise StackError(f"{state} is not empty and not a stack's state directory: refusing to wipe it")
            shutil.rmtree(state)
        (state / "prefect").mkdir(parents=True)
        (state / MARKER).write_text("state of a ferrumdeck-recovery demo stack; recreated on every start\n")
        self = cls(state_dir=state, detect=detect)
        try:
            self._start(load_rate_per_s=load_rate_per_s, step_ms=step_ms, batch=batch,
                        settings_overrides={**DRILL_SETTINGS, **(settings_overrides or {})},
                        parameter_overrides={**DRILL_PARAMETERS, **(parameter_overrides or {})},
                        say=say, server_timeout_s=server_timeout_s, serve_timeout_s=serve_timeout_s,
                        prefect_database_url=prefect_database_url)
        except BaseException:
            self.stop()
            raise
        return self

    def _prefect_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FD_"))}
        env.update({
            "PREFECT_HOME": str(self.state_dir / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            # a recovery queued behind the previous run of its deployment is proposed again after 5 s, not 30
            # (the README recommends the same for production: a wave of crashes is recovered 5 s apart)
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
            "PYTHONUNBUFFERED": "1",
            # flow results are kept (tasks' are not, as in production), so a drill reads the typed outcome
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false",
            "PREFECT_LOCAL_STORAGE_PATH": str(self.state_dir / "prefect" / "storage"),
        })
        return env

    def _start(
        self,
        *,
        load_rate_per_s: float,
        step_ms: float,
        batch: int,
        settings_overrides: dict[str, Any],
        parameter_overrides: dict[str, dict[str, Any]],
        say: Callable[[str], None],
        server_timeout_s: float,
        serve_timeout_s: float,
        prefect_database_url: str | None,
    ) -> None:
        t0 = time.monotonic()
        port = free_port()
        self.ui_url = f"http://127.0.0.1:{port}"
        self.api_url = f"{self.ui_url}/api"
        env = self._prefect_env()
        sqlite = f"sqlite+aiosqlite:///{self.state_dir / 'prefect' / 'prefect.db'}"
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_database_url or sqlite
        backend = "PostgreSQL" if prefect_database_url else "SQLite"
        say(f"starting Prefect server ({backend}) on {self.ui_url} ...")
        server = ChildProcess.spawn(
            "prefect-server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--analytics-off"],
            env=env, log_path=self.state_dir / "prefect-server.log", cwd=PROJECT_ROOT,
        )
        self._children.append(server)

        # the sandbox starts while the server boots (its own threads, no Prefect calls)
        say("starting the sandbox FerrumDeck (cluster, workers, gateway, MCP, LLM status, load) ...")
        self._start_sandbox(load_rate_per_s=load_rate_per_s, step_ms=step_ms, batch=batch)
        self.timings["sandbox_s"] = round(time.monotonic() - t0, 2)

        def healthy() -> bool:
            if not server.alive():
                raise StackError(f"prefect server exited ({server.popen.returncode}):\n{server.tail()}")
            try:
                return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout_s=server_timeout_s, what="the Prefect server's /api/health", interval_s=0.25)
        self.timings["prefect_server_s"] = round(time.monotonic() - t0, 2)

        self._start_bridge()
        say(f"alert bridge on {self.bridge.url} (Bearer token)")
        assert self.services is not None
        self.flow_settings = self.services.settings.model_copy(update={
            **settings_overrides,
            "bridge_heartbeat_url": f"{self.bridge.url}/heartbeat",
        })
        if self.detect == "prometheus":
            self._start_observability(say=say)
            self.timings["observability_s"] = round(time.monotonic() - t0, 2)
        else:
            self.heartbeat()

        say("starting the runner (fd-recovery serve: every deployment of prefect.yaml, flow runs in-process) ...")
        serve_env = {**self._prefect_env(), **settings_env(self.flow_settings)}
        serve = ChildProcess.spawn(
            "fd-recovery-serve", [sys.executable, "-m", "deployments.cli", "serve"],
            env=serve_env, log_path=self.state_dir / "serve.log", cwd=PROJECT_ROOT,
        )
        self._children.append(serve)
        self._wait_for_deployments(serve, timeout_s=serve_timeout_s)
        self._apply_parameters(parameter_overrides)
        if self.detect == "watch":  # after the triggers exist: its first events must find them
            self._start_watcher(say=say)
        if self.detect == "prometheus":  # the heartbeat alert went Prometheus -> Alertmanager -> bridge
            wait_until(self.heartbeat_seen, timeout_s=60, interval_s=0.25,
                       what="the FerrumDeckHeartbeat alert from Prometheus through Alertmanager at the bridge")
        self.timings["ready_s"] = round(time.monotonic() - t0, 2)

    def _start_sandbox(self, *, load_rate_per_s: float, step_ms: float, batch: int) -> None:
        from sandbox.services import SandboxServices

        self._key_prefix = f"fd-demo:{uuid.uuid4().hex[:8]}"
        base = Settings().model_copy(update={
            "stream": f"{self._key_prefix}:queue:steps",
            "dlq_stream": f"{self._key_prefix}:queue:dlq",
            "state_prefix": f"{self._key_prefix}:recovery",
            "database_url": SecretStr(f"sqlite:///{self.state_dir / 'runs.db'}"),
            "runs_table": "runs",
            "steps_table": "steps",
        })
        self.services = SandboxServices.start(
            settings=base, state_dir=self.state_dir / "sandbox", step_ms=step_ms, batch=batch,
            load_rate_per_s=load_rate_per_s,
        )
        self.services.wait_for_workers(3, timeout_s=20)

    def _start_bridge(self) -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from deployments.bridge import BackgroundBridge, BridgeSettings, create_app

        self.bridge_token = secrets.token_urlsafe(24)
        settings = BridgeSettings(token=SecretStr(self.bridge_token), port=free_port(),
                                  prefect_api_url=self.api_url, dedupe_window_s=300)
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            app = create_app(settings)
        self.bridge = BackgroundBridge(app, port=settings.port).start()

    def _start_observability(self, *, say: Callable[[str], None]) -> None:
        """The sandbox's /metrics and the real Prometheus, Alertmanager and exporters (DEMO profile)."""
        from sandbox.metrics import serve_services_metrics
        from sandbox.observability import DEMO, start_for_services

        say("starting the detection loop (sandbox /metrics, Prometheus, Alertmanager, redis and blackbox exporters) ...")
        self.metrics = serve_services_metrics(self.services, stuck_after_s=DEMO.stuck_after_s)
        state = self.state_dir / "observability"
        n = 1
        while state.exists():  # a restarted loop starts from empty TSDB and Alertmanager data
            n += 1
            state = self.state_dir / f"observability-{n}"
        self.observability = start_for_services(
            self.services, metrics=self.metrics, bridge_url=self.bridge.url, bridge_token=self.bridge_token,
            profile=DEMO, state_dir=state, say=say)
        try:
            self.observability.wait_until_scraped(timeout_s=30)
        except Exception as e:  # noqa: BLE001 - say which target is down, in words
            raise StackError(f"the detection loop does not scrape: {e}") from e

    def _start_watcher(self, *, say: Callable[[str], None]) -> None:
        """The direct watcher in this process, posting its events to the stack's Prefect server."""
        from deployments.watch import WatchSettings, watching

        assert self.flow_settings is not None
        settings = self.flow_settings.model_copy(update={"hang_min_idle_ms": WATCH_HANG_MIN_IDLE_MS})
        options = WatchSettings(poll_interval_s=WATCH_POLL_INTERVAL_S, prefect_api_url=self.api_url)
        self._watching = contextlib.ExitStack()
        self.watcher, self.watch_events = self._watching.enter_context(watching(settings, options))
        wait_until(lambda: {"worker", "mcp"} <= self.watcher.state.synced, timeout_s=30, interval_s=0.1,
                   what="the watcher's first list of the worker and MCP pods")
        say(f"direct watcher: pods {settings.worker_selector} and MCP pods watched, consumer group polled every "
            f"{WATCH_POLL_INTERVAL_S:g} s (hung = idle >= {WATCH_HANG_MIN_IDLE_MS} ms holding entries) -> "
            f"{self.watch_events.url}")

    def set_detection(self, detect: str, *, say: Callable[[str], None] = lambda _msg: None) -> None:
        """Switch a running stack to another detection path (stops the current one's parts, starts the new)."""
        if detect not in DETECTIONS:
            raise ValueError(f"detect must be one of {', '.join(DETECTIONS)}, not {detect!r}")
        if detect == self.detect:
            return
        self._stop_watcher()
        self._stop_observability()
        self.detect = detect
        if detect == "prometheus":
            self._start_observability(say=say)
        elif detect == "watch":
            self._start_watcher(say=say)
        else:
            self.heartbeat()

    def detection(self) -> str:
        """One line for a person: the detection path in front of the recoveries."""
        if self.detect == "prometheus" and self.observability is not None:
            return f"detection: prometheus — {self.observability.describe()}"
        if self.detect == "watch":
            return (f"detection: watch — fd-recovery watch in process, poll {WATCH_POLL_INTERVAL_S:g} s, "
                    f"hang after {WATCH_HANG_MIN_IDLE_MS} ms idle")
        return "detection: direct — each drill posts its alert to the bridge as Alertmanager would"

    def _wait_for_deployments(self, serve: ChildProcess, *, timeout_s: float) -> None:
        from deployments.serve import read_deployment_specs

        specs = read_deployment_specs()
        names = {s["name"] for s in specs}
        triggers = sum(len(s.get("triggers") or []) for s in specs)

        def registered() -> bool:
            if not serve.alive():
                raise StackError(f"fd-recovery serve exited ({serve.popen.returncode}):\n{serve.tail()}")
            try:
                r_deps = httpx.post(f"{self.api_url}/deployments/filter", json={"limit": 200}, timeout=5)
                r_autos = httpx.post(f"{self.api_url}/automations/filter", json={"limit": 200}, timeout=5)
                if r_deps.status_code != 200 or r_autos.status_code != 200:
                    return False
                deps, autos = r_deps.json(), r_autos.json()
            except (httpx.HTTPError, ValueError):
                return False
            self.deployments = {d["name"]: d["id"] for d in deps}
            return names <= set(self.deployments) and len(autos) >= triggers

        wait_until(registered, timeout_s=timeout_s, what=f"{len(names)} deployments and {triggers} triggers",
                   interval_s=0.5)

    def _apply_parameters(self, overrides: dict[str, dict[str, Any]]) -> None:
        """Merge the drill profile into the deployments' parameter defaults (PATCH /deployments/{id})."""
        for name, params in overrides.items():
            dep_id = self.deployments.get(name)
            if dep_id is None:
                raise StackError(f"no deployment {name!r} to tune")
            current = api_call("GET", f"{self.api_url}/deployments/{dep_id}").json().get("parameters") or {}
            r = api_call("PATCH", f"{self.api_url}/deployments/{dep_id}", json={"parameters": {**current, **params}})
            if r.status_code >= 300:
                raise StackError(f"could not set the parameters of {name}: HTTP {r.status_code} {r.text[:200]}")

    # --- use ---
    def heartbeat(self) -> None:
        """Post the always-firing heartbeat alert to the bridge, as Alertmanager does (alerting works).

        With Prometheus in front, the real ``FerrumDeckHeartbeat`` rule does that: nothing is posted."""
        from sandbox.drills import post_alert

        if self.observability is not None:
            return
        post_alert(self, "FerrumDeckHeartbeat", labels={"severity": "none"})

    def heartbeat_seen(self) -> bool:
        """The bridge has recorded a heartbeat alert."""
        try:
            return bool(httpx.get(f"{self.bridge.url}/heartbeat", timeout=2).json().get("last_seen"))
        except (httpx.HTTPError, ValueError):
            return False

    def summary(self) -> dict[str, Any]:
        return {
            "prefect_ui": self.ui_url,
            "prefect_api": self.api_url,
            "bridge": self.bridge.url if self.bridge else None,
            "detect": self.detect,
            **({"observability": {n: c.url for n, c in self.observability.components.items()}}
               if self.observability is not None else {}),
            "state_dir": str(self.state_dir),
            "sandbox": self.services.summary() if self.services else None,
            "logs": {c.name: str(c.log_path) for c in self._children},
        }

    def write_env(self) -> Path:
        """``<state>/stack.env``: PREFECT_API_URL, KUBECONFIG and the FD_* settings, for exploring by hand."""
        import shlex

        assert self.flow_settings is not None
        env = {"PREFECT_API_URL": self.api_url, "KUBECONFIG": str(self.flow_settings.kubeconfig),
               "FD_BRIDGE_URL": self.bridge.url, "FD_BRIDGE_TOKEN": self.bridge_token,
               **settings_env(self.flow_settings)}
        path = self.state_dir / "stack.env"
        path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
        path.chmod(0o600)
        return path

    # --- stop ---
    def stop(self) -> None:
        """Stop the runner, the bridge, the sandbox and the Prefect server (in that order). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[str] = []
        self._drain_events()
        for child in reversed(self._children):
            if child.name == "fd-recovery-serve":
                child.stop(timeout_s=10)
        for step in (self._stop_watcher, self._stop_observability, self._stop_bridge, self._stop_sandbox):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - keep stopping the rest; report at the end
                errors.append(f"{step.__name__}: {type(e).__name__}: {e}")
        for child in reversed(self._children):
            child.stop(timeout_s=15)
        if errors:
            log.warning("stack stopped with errors: %s", "; ".join(errors))

    def _drain_events(self, timeout_s: float = 15.0) -> None:
        """Deliver the events this process's own flow runs (the drills' post-recovery checks) emitted, while the
        server still answers: an event left for a stopped server is retried at interpreter exit, for ever."""
        if not self.api_url:
            return
        try:
            from prefect.events.worker import EventsWorker

            EventsWorker.drain_all(timeout=timeout_s, at_exit=False)
        except Exception as e:  # noqa: BLE001 - stopping goes on
            log.warning("events of this process not delivered: %s: %s", type(e).__name__, e)

    def _stop_watcher(self) -> None:
        watching, self._watching, self.watcher, self.watch_events = self._watching, None, None, None
        if watching is not None:
            watching.close()

    def _stop_observability(self) -> None:
        observability, metrics, self.observability, self.metrics = self.observability, self.metrics, None, None
        try:
            if observability is not None:
                observability.stop()
        finally:
            if metrics is not None:
                metrics.stop()

    def _stop_bridge(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()

    def _stop_sandbox(self) -> None:
        if self.services is None:
            return
        self.services.stop()
        if self._key_prefix and not self.keep_keys:
            client = self.services.redis
            keys = list(client.scan_iter(match=f"{self._key_prefix}:*", count=1000))
            if keys:
                client.delete(*keys)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
