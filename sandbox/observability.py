"""Real Prometheus, Alertmanager and the Debian redis and blackbox exporters around the sandbox, as subprocesses.

``Observability.start(...)`` starts, each on a free port of 127.0.0.1 with its generated configuration in a
state directory (a temporary one by default), and each waited for with a deadline:

- ``prometheus-redis-exporter`` pointed at the sandbox's Redis, its step stream checked
  (``--check-single-streams``: stream, group and consumer series, no SCAN of the keyspace);
- ``prometheus-blackbox-exporter`` with an ``http_2xx`` module, probing the MCP server's ``/health``;
- ``prometheus-alertmanager`` with the project's ``deployments/prometheus/alertmanager.yaml``, changing only
  the bridge URL, the token file and (in a short profile) the route timings;
- ``prometheus`` scraping the sandbox's ``/metrics`` (``sandbox.metrics``) and the exporters, with the
  project's rules for the chosen profile, sending alerts to that Alertmanager.

Profiles: ``PRODUCTION`` uses the rules file as it is. ``DEMO`` (scrape and evaluate every second, every
``for:`` at most 5 s, a hang after 2 s of silence, a backlog after 5 s behind, the LLM error rate over 10 s)
writes a copy of the rules with those values: the production values stay in the rules file, and
``Profile.describe()`` prints what was shortened. ``stop()`` ends every process it started (by process
group id) and removes the temporary directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx
import yaml

from sandbox.scratch import free_port

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "deployments" / "prometheus"
RULES = PROMETHEUS_DIR / "ferrumdeck-alerts.yaml"
ALERTMANAGER_CONFIG = PROMETHEUS_DIR / "alertmanager.yaml"

#: component -> (executables to look for, Debian package)
BINARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "prometheus": (("prometheus",), "prometheus"),
    "alertmanager": (("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager"),
    "redis_exporter": (("prometheus-redis-exporter", "redis_exporter"), "prometheus-redis-exporter"),
    "blackbox_exporter": (("prometheus-blackbox-exporter", "blackbox_exporter"), "prometheus-blackbox-exporter"),
}
BLACKBOX_MODULE = "http_2xx"
#: the rules' own selectors, replaced by the deployment's names when they differ
RULE_NAMESPACE, RULE_STREAM, RULE_GROUP = "ferrumdeck", "fd:queue:steps", "workers"
#: PromQL words that are not metric names
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}


class ObservabilityError(Exception):
    """A component is missing, did not start in time, or the rules cannot be adapted to a profile."""


def find_binary(component: str) -> str | None:
    names, _package = BINARIES[component]
    return next((path for name in names if (path := shutil.which(name))), None)


def missing_packages() -> list[str]:
    """Debian packages to install for the full loop (empty when everything is there)."""
    return [package for component, (_names, package) in BINARIES.items() if find_binary(component) is None]


# --- durations ---
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """A Prometheus duration (``1m30s``, ``500ms``) in seconds."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.strip():
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def duration(seconds: float) -> str:
    """Seconds as a Prometheus/Alertmanager duration (``500ms``, ``5s``, ``90s``)."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


# --- the profile ---
@dataclass(frozen=True)
class Profile:
    """Scrape/evaluation cadence and the rule values a profile shortens (None: the rules file's own value)."""

    name: str
    scrape_interval_s: float
    evaluation_interval_s: float
    rule_for_s: float | None = None  # every alert's for: at most this
    hang_idle_s: float | None = None  # WorkerHung: consumer idle over this (rules: 300 s)
    backlog_wait_s: float | None = None  # QueueBacklog: the group this far behind (rules: 120 s)
    llm_window: str | None = None  # LLMProviderErrors: rate window (rules: 5m)
    stuck_after_s: float = 1800.0  # sandbox metrics: a run `running` longer than this is stuck (runbook: 30 min)
    group_wait_s: float | None = None  # Alertmanager routes (None: alertmanager.yaml's)
    group_interval_s: float | None = None
    resend_delay_s: float = 60.0  # Prometheus re-sends a firing alert to Alertmanager this often

    def describe(self) -> str:
        """One line for a person: what this profile changes from production."""
        if self.name == "production":
            return (f"profile production: scrape every {duration(self.scrape_interval_s)}, evaluate every "
                    f"{duration(self.evaluation_interval_s)}, the rules file's for: and thresholds")
        parts = [f"scrape every {duration(self.scrape_interval_s)}",
                 f"evaluate every {duration(self.evaluation_interval_s)}"]
        if self.rule_for_s is not None:
            parts.append(f"for: at most {duration(self.rule_for_s)} (rules: 1m-5m)")
        if self.hang_idle_s is not None:
            parts.append(f"WorkerHung after {duration(self.hang_idle_s)} idle (rules: 300s)")
        if self.backlog_wait_s is not None:
            parts.append(f"QueueBacklog at {duration(self.backlog_wait_s)} behind (rules: 120s)")
        if self.llm_window is not None:
            parts.append(f"LLM error rate over {self.llm_window} (rules: 5m)")
        parts.append(f"runs stuck after {duration(self.stuck_after_s)} (runbook: 30m)")
        if self.group_wait_s is not None:
            parts.append(f"Alertmanager group_wait {duration(self.group_wait_s)}")
        return f"profile {self.name}: " + ", ".join(parts)


PRODUCTION = Profile("production", scrape_interval_s=30, evaluation_interval_s=30)
DEMO = Profile(
    "demo", scrape_interval_s=1, evaluation_interval_s=1, rule_for_s=5, hang_idle_s=2, backlog_wait_s=5,
    llm_window="10s", stuck_after_s=60, group_wait_s=0, group_interval_s=1, resend_delay_s=1,
)

#: alert -> (text in the production expression, the Profile field that replaces its number)
_THRESHOLDS = {"WorkerHung": ("> 300", "hang_idle_s"), "QueueBacklog": ("> 120", "backlog_wait_s")}


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, so the generated rules read like the original."""


_LiteralDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def profile_rules(text: str, profile: Profile, *, namespace: str = RULE_NAMESPACE, stream: str = RULE_STREAM,
                  group: str = RULE_GROUP) -> str:
    """The rules file for ``profile`` and this deployment's namespace/stream/group names (a new text)."""
    doc = yaml.safe_load(text)
    for rule in (r for g in doc["groups"] for r in g["rules"] if "alert" in r):
        name, expr = rule["alert"], rule["expr"]
        if profile.rule_for_s is not None and "for" in rule:
            rule["for"] = duration(min(parse_duration(str(rule["for"])), profile.rule_for_s))
        if name in _THRESHOLDS and getattr(profile, _THRESHOLDS[name][1]) is not None:
            old, attr = _THRESHOLDS[name]
            if expr.count(old) != 1:
                raise ObservabilityError(f"{name}: expected one {old!r} in its expression; update _THRESHOLDS")
            expr = expr.replace(old, f"> {getattr(profile, attr):g}")
        if name == "LLMProviderErrors" and profile.llm_window is not None:
            if "[5m]" not in expr:
                raise ObservabilityError("LLMProviderErrors: expected rate(...[5m]); update profile_rules")
            expr = expr.replace("[5m]", f"[{profile.llm_window}]")
        for label, rule_value, value in (("namespace", RULE_NAMESPACE, namespace), ("stream", RULE_STREAM, stream),
                                         ("group", RULE_GROUP, group)):
            expr = expr.replace(f'{label}="{rule_value}"', f'{label}="{value}"')
        rule["expr"] = expr
    header = (f"# Generated from {RULES.name} for {profile.describe()}.\n"
              f"# namespace={namespace} stream={stream} group={group}. Do not edit: edit {RULES.name}.\n")
    return header + yaml.dump(doc, Dumper=_LiteralDumper, sort_keys=False, width=200)


def rule_metric_names(text: str) -> set[str]:
    """Every metric name the rules' expressions select (label names, functions and keywords left out)."""
    names: set[str] = set()
    for group in yaml.safe_load(text)["groups"]:
        for rule in group["rules"]:
            expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', rule["expr"])  # strings
            expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
            expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping: `max by (x) (...)` -> `max (...)`
            expr = re.sub(r"\b(on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)  # matching lists
            for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
                word, call = match.group(1), match.group(2)
                if not call and word.lower() not in _PROMQL_WORDS:
                    names.add(word)
    return names


def alertmanager_config(text: str, profile: Profile, *, bridge_url: str | None, token_file: Path | None) -> dict:
    """The project's Alertmanager configuration, pointed at ``bridge_url`` (no webhook without one)."""
    config = yaml.safe_load(text)
    for route in config["route"].get("routes") or []:
        if profile.group_wait_s is not None:
            route["group_wait"] = duration(profile.group_wait_s)
        if profile.group_interval_s is not None:
            route["group_interval"] = duration(profile.group_interval_s)
    [bridge] = [r for r in config["receivers"] if r["name"] == "ferrumdeck-bridge"]
    if bridge_url is None:
        bridge.pop("webhook_configs", None)  # alerts stay visible in Alertmanager's API
    else:
        [webhook] = bridge["webhook_configs"]
        webhook["url"] = f"{bridge_url.rstrip('/')}/alertmanager"
        if token_file is None:
            webhook.pop("http_config", None)
        else:
            webhook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    return config


def prometheus_config(
    profile: Profile,
    *,
    rule_file: Path,
    alertmanager: str | None,
    sandbox_metrics: str | None,
    redis_exporter: str | None,
    blackbox_exporter: str | None,
    probe_urls: Sequence[str] = (),
) -> dict:
    """Prometheus' configuration: the sandbox's kube-state and FerrumDeck series, the exporters, the rules."""
    interval = duration(profile.scrape_interval_s)

    def job(name: str, target: str, **extra: Any) -> dict:
        return {"job_name": name, "static_configs": [{"targets": [target]}], **extra}

    jobs: list[dict] = []
    if sandbox_metrics:
        # honor_labels: the series carry their own namespace/pod, as kube-state-metrics' do
        jobs.append(job("kube-state-metrics", sandbox_metrics, metrics_path="/metrics/kube-state", honor_labels=True))
        jobs.append(job("ferrumdeck", sandbox_metrics, metrics_path="/metrics/ferrumdeck", honor_labels=True))
    if redis_exporter:
        jobs.append(job("redis", redis_exporter))
    if blackbox_exporter and probe_urls:
        jobs.append({
            "job_name": "blackbox-mcp", "metrics_path": "/probe", "params": {"module": [BLACKBOX_MODULE]},
            "static_configs": [{"targets": list(probe_urls)}],
            "relabel_configs": [
                {"source_labels": ["__address__"], "target_label": "__param_target"},
                {"source_labels": ["__param_target"], "target_label": "instance"},
                {"target_label": "__address__", "replacement": blackbox_exporter},
            ],
        })
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": duration(profile.evaluation_interval_s)},
        "rule_files": [str(rule_file)],
        "scrape_configs": jobs,
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [
            {"api_version": "v2", "timeout": "5s", "static_configs": [{"targets": [alertmanager]}]}]}
    return config


# --- processes ---

@dataclass
class Component:
    """One started binary: its own process group, output in a log file, ``url`` on 127.0.0.1."""

    name: str
    popen: subprocess.Popen
    port: int
    ready_path: str
    log_path: Path
    _log: TextIO = field(repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + self.ready_path, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to its process group, SIGKILL after ``timeout_s`` (idempotent)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        if not self._log.closed:
            self._log.close()


def _spawn(name: str, argv: list[str], *, port: int, ready_path: str, state: Path,
           env: dict[str, str] | None = None) -> Component:
    log_path = state / f"{name}.log"
    out = log_path.open("ab")
    popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=state,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
                             start_new_session=True)
    return Component(name=name, popen=popen, port=port, ready_path=ready_path, log_path=log_path, _log=out)


def _wait_ready(components: list[Component], *, timeout_s: float) -> list[Component]:
    """Wait until every component answers; returns those that exited because their port was taken."""
    deadline = time.monotonic() + timeout_s
    waiting, port_taken = list(components), []
    while waiting:
        for c in list(waiting):
            if not c.alive():
                waiting.remove(c)
                if "address already in use" in c.tail(50):
                    port_taken.append(c)
                    continue
                raise ObservabilityError(f"{c.name} exited ({c.popen.returncode}):\n{c.tail()}")
            if c.ready():
                waiting.remove(c)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(c.name for c in waiting)
            raise ObservabilityError(f"timed out after {timeout_s:g} s waiting for {names} to answer:\n"
                                     + "\n".join(c.tail(5) for c in waiting))
        if waiting:
            time.sleep(0.05)  # poll
    return port_taken


def _redis_exporter_argv(binary: str, *, port: int, redis_url: str, streams: Sequence[str]) -> tuple[list[str], dict]:
    """The exporter's arguments and environment (a password goes in the environment, not on the command line)."""
    parts = urlsplit(redis_url)
    db = int((parts.path or "/0").strip("/") or 0)
    scheme = "rediss" if parts.scheme == "rediss" else "redis"
    env = {}
    if parts.password:
        env["REDIS_PASSWORD"] = parts.password
    if parts.username:
        env["REDIS_USER"] = parts.username
    checked = ",".join(s if db == 0 else f"db{db}={s}" for s in streams)
    argv = [binary, f"--redis.addr={scheme}://{parts.hostname or '127.0.0.1'}:{parts.port or 6379}",
            f"--web.listen-address=127.0.0.1:{port}", "--redis-only-metrics", "--connection-timeout=1s"]
    if checked:
        argv.append(f"--check-single-streams={checked}")
    return argv, env


@dataclass
class Observability:
    """The running loop (see the module docstring): URLs, generated files, API helpers, ``stop()``."""

    profile: Profile
    state_dir: Path
    components: dict[str, Component] = field(default_factory=dict)
    rules_path: Path | None = None
    _own_dir: tempfile.TemporaryDirectory | None = None
    _stopped: bool = False

    @classmethod
    def start(
        cls,
        *,
        profile: Profile = DEMO,
        sandbox_metrics: str | None = None,
        redis_url: str | None = None,
        streams: Sequence[str] = (),
        probe_urls: Sequence[str] = (),
        bridge_url: str | None = None,
        bridge_token: str | None = None,
        namespace: str = RULE_NAMESPACE,
        stream: str = RULE_STREAM,
        group: str = RULE_GROUP,
        rules_text: str | None = None,
        state_dir: str | Path | None = None,
        timeout_s: float = 30.0,
        say: Callable[[str], None] = lambda _msg: None,
    ) -> Observability:
        """Start Alertmanager, the exporters that have something to watch, then Prometheus; every one answering.

        ``sandbox_metrics``: ``host:port`` of ``sandbox.metrics``; ``redis_url`` + ``streams``: the redis exporter;
        ``probe_urls``: the blackbox exporter's targets (job ``blackbox-mcp``); ``bridge_url``/``bridge_token``:
        where Alertmanager sends notifications. On any failure everything started is stopped before raising.
        """
        missing = [c for c in ("prometheus", "alertmanager") if find_binary(c) is None]
        missing += ["redis_exporter"] if redis_url and find_binary("redis_exporter") is None else []
        missing += ["blackbox_exporter"] if probe_urls and find_binary("blackbox_exporter") is None else []
        if missing:
            packages = " ".join(BINARIES[c][1] for c in missing)
            raise ObservabilityError(f"not installed: {packages} (Debian: apt-get install -y {packages})")
        own = None
        if state_dir is None:
            own = tempfile.TemporaryDirectory(prefix="fd-observability-")
            state_dir = own.name
        state = Path(state_dir).resolve()
        state.mkdir(parents=True, exist_ok=True)
        self = cls(profile=profile, state_dir=state, _own_dir=own)
        try:
            self._start(sandbox_metrics=sandbox_metrics, redis_url=redis_url, streams=streams, probe_urls=probe_urls,
                        bridge_url=bridge_url, bridge_token=bridge_token,
                        rules=profile_rules(rules_text or RULES.read_text(), profile, namespace=namespace,
                                            stream=stream, group=group),
                        timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise
        say(self.describe())
        return self

    def _start(self, *, sandbox_metrics: str | None, redis_url: str | None, streams: Sequence[str],
               probe_urls: Sequence[str], bridge_url: str | None, bridge_token: str | None, rules: str,
               timeout_s: float) -> None:
        state = self.state_dir
        token_file = None
        if bridge_url and bridge_token:
            token_file = state / "bridge-token"
            token_file.write_text(bridge_token)
            token_file.chmod(0o600)
        am_config = alertmanager_config(ALERTMANAGER_CONFIG.read_text(), self.profile, bridge_url=bridge_url,
                                        token_file=token_file)
        (state / "alertmanager.yaml").write_text(yaml.safe_dump(am_config, sort_keys=False))
        (state / "blackbox.yaml").write_text(yaml.safe_dump({"modules": {BLACKBOX_MODULE: {
            "prober": "http", "timeout": "5s", "http": {"preferred_ip_protocol": "ip4"}}}}))
        self.rules_path = state / "ferrumdeck-alerts.yaml"
        self.rules_path.write_text(rules)

        def build(name: str, port: int) -> Component:
            if name == "alertmanager":
                (state / "alertmanager-data").mkdir(exist_ok=True)
                argv = [find_binary("alertmanager"), f"--config.file={state / 'alertmanager.yaml'}",
                        f"--storage.path={state / 'alertmanager-data'}", f"--web.listen-address=127.0.0.1:{port}",
                        "--cluster.listen-address=", "--log.level=warn"]
                return _spawn(name, argv, port=port, ready_path="/-/ready", state=state)
            if name == "redis_exporter":
                argv, env = _redis_exporter_argv(find_binary("redis_exporter"), port=port, redis_url=redis_url or "",
                                                 streams=streams)
                return _spawn(name, argv, port=port, ready_path="/metrics", state=state, env=env)
            if name == "blackbox_exporter":
                argv = [find_binary("blackbox_exporter"), f"--config.file={state / 'blackbox.yaml'}",
                        f"--web.listen-address=127.0.0.1:{port}", "--timeout-offset=0.1", "--log.level=warn"]
                return _spawn(name, argv, port=port, ready_path="/-/healthy", state=state)
            assert name == "prometheus"
            config = prometheus_config(
                self.profile, rule_file=self.rules_path, alertmanager=self.components["alertmanager"].address,
                sandbox_metrics=sandbox_metrics,
                redis_exporter=self.components["redis_exporter"].address if "redis_exporter" in self.components else None,
                blackbox_exporter=(self.components["blackbox_exporter"].address
                                   if "blackbox_exporter" in self.components else None),
                probe_urls=probe_urls,
            )
            (state / "prometheus.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            (state / "prometheus-data").mkdir(exist_ok=True)
            argv = [find_binary("prometheus"), f"--config.file={state / 'prometheus.yaml'}",
                    f"--storage.tsdb.path={state / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1d", f"--rules.alert.resend-delay={duration(self.profile.resend_delay_s)}",
                    "--log.level=warn"]
            return _spawn(name, argv, port=port, ready_path="/-/ready", state=state)

        first = ["alertmanager"]
        first += ["redis_exporter"] if redis_url else []
        first += ["blackbox_exporter"] if probe_urls else []
        for phase in (first, ["prometheus"]):  # Prometheus' configuration needs the others' ports
            pending = phase
            for _attempt in range(3):  # a port taken between choosing it and binding it: choose again
                for name in pending:
                    self.components[name] = build(name, free_port())
                taken = _wait_ready([self.components[n] for n in pending], timeout_s=timeout_s)
                for c in taken:
                    c.stop()
                pending = [c.name for c in taken]
                if not pending:
                    break
            if pending:
                raise ObservabilityError(f"{', '.join(pending)}: no free port after 3 attempts")

    # --- URLs ---
    @property
    def prometheus_url(self) -> str:
        return self.components["prometheus"].url

    @property
    def alertmanager_url(self) -> str:
        return self.components["alertmanager"].url

    def url(self, component: str) -> str:
        return self.components[component].url

    def describe(self) -> str:
        urls = ", ".join(f"{name} {c.url}" for name, c in self.components.items())
        return f"{urls}; {self.profile.describe()}"

    # --- Prometheus / Alertmanager APIs ---
    def _get(self, url: str, **params: Any) -> Any:
        try:
            response = httpx.get(url, params=params, timeout=5)
            response.raise_for_status()
        except httpx.HTTPError as e:
            raise ObservabilityError(f"GET {url}: {type(e).__name__}: {e}") from e
        body = response.json()
        return body["data"] if isinstance(body, dict) and "data" in body else body

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector."""
        return self._get(f"{self.prometheus_url}/api/v1/query", query=expr)["result"]

    def alerts(self, *, state: str | None = "firing") -> list[dict]:
        """Prometheus' alerts (``firing``, ``pending``, or every one with ``state=None``)."""
        alerts = self._get(f"{self.prometheus_url}/api/v1/alerts")["alerts"]
        return [a for a in alerts if state is None or a["state"] == state]

    def alertmanager_alerts(self) -> list[dict]:
        """The alerts Alertmanager holds (active ones)."""
        return self._get(f"{self.alertmanager_url}/api/v2/alerts", active="true")

    def targets(self) -> list[dict]:
        return self._get(f"{self.prometheus_url}/api/v1/targets", state="active")["activeTargets"]

    def problems(self) -> list[str]:
        """What keeps the loop from working, in words (never raises): Prometheus not answering, targets down
        (with Prometheus' error), a redis exporter that cannot reach Redis, no Alertmanager or one Prometheus
        cannot reach (checked on its URL, and by Prometheus' own count of failed notifications)."""
        try:
            targets = self.targets()
            unreachable_redis = self.query("redis_up == 0")
            managers = self._get(f"{self.prometheus_url}/api/v1/alertmanagers").get("activeAlertmanagers", [])
        except ObservabilityError as e:
            return [f"Prometheus does not answer: {e}"]
        out = [f"{t['labels'].get('job')} target {t['scrapeUrl']} is {t['health']}: {t.get('lastError') or 'not scraped yet'}"
               for t in targets if t["health"] != "up"]
        out += [f"the redis exporter at {x['metric'].get('instance')} cannot reach Redis (redis_up 0)"
                for x in unreachable_redis]
        if not managers:
            out.append("Prometheus has no active Alertmanager")
        for manager in managers:
            base = manager["url"].split("/api/")[0]
            try:
                httpx.get(f"{base}/-/ready", timeout=2).raise_for_status()
            except httpx.HTTPError as e:
                out.append(f"Prometheus cannot reach Alertmanager {base}: {type(e).__name__}: {e}")
        failed = self._notification_errors()
        if failed:
            out.append(f"Prometheus failed {failed:g} times to send alerts to Alertmanager "
                       f"(prometheus_notifications_errors_total; its log: {self.components['prometheus'].log_path})")
        return out

    def _notification_errors(self) -> float:
        """Prometheus' own count of notifications it could not send (0 when it cannot be read)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = httpx.get(f"{self.prometheus_url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return 0.0
        return sum(sample.value for family in text_string_to_metric_families(text)
                   if family.name == "prometheus_notifications_errors" for sample in family.samples
                   if sample.name == "prometheus_notifications_errors_total")

    def wait_until_scraped(self, *, timeout_s: float = 30.0) -> list[dict]:
        """Wait until every target has been scraped and is up; returns the targets."""
        deadline = time.monotonic() + timeout_s
        while True:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            if time.monotonic() > deadline:
                raise ObservabilityError("targets not up: " + "; ".join(self.problems()))
            time.sleep(0.1)  # poll

    # --- stop ---
    def stop(self) -> None:
        """Stop Prometheus first (no alerts left in flight), then the rest; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for name in ("prometheus", "alertmanager", "redis_exporter", "blackbox_exporter"):
            if name in self.components:
                self.components[name].stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()

    def __enter__(self) -> Observability:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_for_services(
    services: Any,
    *,
    metrics: Any,
    bridge_url: str | None = None,
    bridge_token: str | None = None,
    profile: Profile = DEMO,
    state_dir: str | Path | None = None,
    say: Callable[[str], None] = lambda _msg: None,
) -> Observability:
    """The loop around a running ``SandboxServices``: its Redis stream, its MCP ``/health``, its metrics
    (``metrics``: the ``MetricsEndpoint`` of ``sandbox.metrics.serve_services_metrics``)."""
    s = services.settings
    return Observability.start(
        profile=profile, sandbox_metrics=metrics.address, redis_url=s.redis_url.get_secret_value(),
        streams=[s.stream], probe_urls=[s.mcp_url], bridge_url=bridge_url, bridge_token=bridge_token,
        namespace=s.namespace, stream=s.stream, group=s.group, state_dir=state_dir, say=say,
    )


def with_profile(profile: Profile, **changes: Any) -> Profile:
    """A copy of ``profile`` with ``changes`` (e.g. a faster one for tests)."""
    return dataclasses.replace(profile, **changes)
