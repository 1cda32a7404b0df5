"""The larger-installation path, run for real: a ``process`` work pool, ``prefect deploy`` of ``prefect.yaml``'s
``worker-crash-recovery`` (its trigger included) and ``prefect worker start`` as a subprocess, against a Prefect
server of its own. A worker pod crash-loops in the sandbox cluster holding pending steps; one Alertmanager
alert posted to the bridge becomes the event whose trigger creates the flow run; the worker runs it in a
process of its own, with the ``FD_*`` settings of the sandbox cluster, the test's Redis keys and runs tables.
Only this deployment is deployed (``prefect deploy --all`` is ``test_prefect_deploy.py``'s): the scheduled
sweeps would otherwise run on the same worker against the same keys meanwhile.

Asserted: one flow run, created by the automation, run by the worker of the pool, Completed, and the system
state: the crashed pod deleted once and replaced, its entries requeued (the poison dead-lettered), its
consumer removed, the healthy worker's entries untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
)

from deployments.bridge import BackgroundBridge, BridgeSettings, create_app
from deployments.serve import PREFECT_YAML, PROJECT_ROOT
from sandbox.scratch import free_port
from sandbox.stack import ChildProcess, settings_env
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import ReplacementConsumer, deletions, queue_state, worker_pods
from tests.integration.test_worker_crash import crash_scene
from tests.polling import wait_for
from tests.unit.test_alerts import am_alert, am_body

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]
env = fx.env  # per-test settings: Redis keys, sandbox cluster, runs tables in PostgreSQL

POOL = "ferrumdeck-recovery"  # prefect.yaml's work pool
DEPLOYMENT = "worker-crash-recovery"
TOKEN = "e2e-pool-bridge-token-0123456789"
RUN_TIMEOUT_S = 240


class PrefectServer:
    """A real ``prefect server start`` subprocess on a free port, with its own ``PREFECT_HOME`` (SQLite there
    unless ``database_url``) and any ``extra_env`` (the Redis broker); ``stop()`` ends its process group.
    ``env`` is what a child process (the CLI, a worker, ``serve``) needs to talk to it."""

    def __init__(self, *, name: str, home: Path, database_url: str | None = None,
                 extra_env: dict[str, str] | None = None, timeout_s: float = 120.0) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.name, self.home, self.port = name, home, free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FD_"))}
        self.env.update({
            "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING", "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
        })
        server_env = {**self.env, **(extra_env or {}), "PREFECT_API_DATABASE_CONNECTION_URL":
                      database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
        self.proc = ChildProcess.spawn(
            name, [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                   "--analytics-off"], env=server_env, log_path=home / "server.log", cwd=PROJECT_ROOT)
        try:
            wait_for(self._healthy, timeout=timeout_s, interval=0.25, what=f"{name} /api/health")
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        assert self.proc.alive(), f"{self.name} exited:\n{self.proc.tail(40)}"
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """``prefect <args>`` against this server, from the project root."""
        prefect = Path(sys.executable).with_name("prefect")
        return subprocess.run([str(prefect), "--no-prompt", *args], cwd=PROJECT_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)

    def client(self) -> SyncPrefectClient:
        """A sync Prefect client of this server (``with server.client() as c:``)."""
        return SyncPrefectClient(self.api_url)

    def stop(self) -> None:
        self.proc.stop()


def prefect_yaml_for_this_checkout(directory: Path) -> Path:
    """``prefect.yaml`` unchanged but for its pull step: the image's /opt/ferrumdeck-recovery is this checkout."""
    text = PREFECT_YAML.read_text()
    assert text.count("directory: /opt/ferrumdeck-recovery") == 1
    path = directory / "prefect.yaml"
    path.write_text(text.replace("directory: /opt/ferrumdeck-recovery", f"directory: {PROJECT_ROOT}"))
    return path


def deploy(server: PrefectServer, directory: Path, *names: str) -> None:
    """``prefect work-pool create --type process`` and ``prefect deploy`` of the named deployments."""
    pool = server.cli("work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert pool.returncode == 0, pool.stdout[-2000:] + pool.stderr[-2000:]
    args = [arg for name in names for arg in ("--name", name)]
    result = server.cli("deploy", "--prefect-file", str(prefect_yaml_for_this_checkout(directory)), *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def worker_env(server: PrefectServer, settings) -> dict[str, str]:
    """What the worker (and each flow-run process it starts) runs with: the server, the FD_* settings."""
    return {**server.env, **settings_env(settings), "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5"}


def flow_runs(server: PrefectServer, deployment: str) -> list:
    with server.client() as client:
        [d] = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[d.id])))


def wait_for_final_run(server: PrefectServer, deployment: str, *, processes: list[ChildProcess]):
    """The deployment's first flow run once it is in a final state (fails early if a process died)."""
    def final():
        for p in processes:
            assert p.alive(), f"{p.name} exited:\n{p.tail(40)}"
        runs = flow_runs(server, deployment)
        return runs[0] if runs and runs[0].state and runs[0].state.is_final() else None

    return wait_for(final, timeout=RUN_TIMEOUT_S, interval=0.5, what=f"a final {deployment} run")


def history(server: PrefectServer, run_id) -> list[str]:
    with server.client() as client:
        return [s.type.value for s in sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp)]


def report(server: PrefectServer, run_id) -> str:
    with server.client() as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[DEPLOYMENT]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return artifact.data


def post_alert(bridge_url: str, pod: str) -> None:
    """What Alertmanager sends for WorkerCrashLooping on ``pod``."""
    r = httpx.post(f"{bridge_url}/alertmanager", json=am_body(am_alert("WorkerCrashLooping", pod=pod)), timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["events"] == 1, r.text


def assert_recovered_once(cluster, redis, s, *, crashed_pod: str, healthy_pod: str, crashed: list, busy: list) -> None:
    """The system state after one crash recovery of ``crashed_pod`` (see the module docstring)."""
    assert deletions(cluster) == [crashed_pod]  # deleted once
    now = worker_pods(cluster, s)
    assert crashed_pod not in now and healthy_pod in now and len(now) == 3  # replaced
    qs = queue_state(redis, s)
    assert crashed_pod not in qs["consumers"]
    assert sorted(p for p in qs["pending"] if p[1] == s.consumer_for_pod(healthy_pod)) == sorted(
        (f["entry_id"], healthy_pod, 1) for f in busy)
    requeued = sorted(f["job_id"] for _, f in qs["stream"] if f.get("attempts"))
    assert requeued == sorted(f["job_id"] for i, f in enumerate(crashed) if i != 2)  # each requeued once
    assert all(f["attempts"] == "1" for _, f in qs["stream"] if f.get("attempts"))
    assert [f["job_id"] for _, f in qs["dlq"]] == [crashed[2]["job_id"]]  # the poison


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[PrefectServer]:
    s = PrefectServer(name="prefect-pool-server", home=tmp_path_factory.mktemp("pool-server"))
    yield s
    s.stop()


def test_a_process_worker_runs_the_alert_triggered_crash_recovery(env, cluster, redis, server, tmp_path):
    s = env
    deploy(server, tmp_path, DEPLOYMENT)
    with server.client() as client:
        deployment = client.read_deployment_by_name(f"{DEPLOYMENT}/{DEPLOYMENT}")
        automations = [a for a in client.read_automations() if str(deployment.id) in str(a.actions)]
    assert deployment.work_pool_name == POOL and deployment.work_queue_name == "recoveries"
    assert len(automations) == 2  # the alert's trigger and the watcher's

    worker = ChildProcess.spawn(
        "prefect-worker", [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL,
                           "--type", "process", "--limit", "2", "--name", f"e2e-{uuid.uuid4().hex[:6]}"],
        env=worker_env(server, s), log_path=tmp_path / "worker.log", cwd=PROJECT_ROOT)
    try:
        with server.client() as client:
            wait_for(lambda: client.read_workers_for_work_pool(POOL), timeout=60, interval=0.5,
                     what="the worker to poll the pool")
        a, b, crashed, busy = crash_scene(cluster, redis, s)
        app = create_app(BridgeSettings(token=TOKEN, prefect_api_url=server.api_url))
        with BackgroundBridge(app) as bridge, \
                ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
            posted = datetime.now(UTC)
            post_alert(bridge.url, a)
            run = wait_for_final_run(server, DEPLOYMENT, processes=[worker, server.proc])
    finally:
        worker.stop()

    if run.start_time:
        print(f"\nalert -> flow run Running: {(run.start_time - posted).total_seconds():.1f} s; "
              f"run took {run.total_run_time.total_seconds():.1f} s")
    assert run.state.is_completed(), f"{run.state}\n{worker.tail(60)}"
    assert run.parameters == {"pod": a, "dry_run": False}  # templated from the alert's labels by the trigger
    assert run.created_by is not None and run.created_by.type == "AUTOMATION"
    assert run.work_pool_name == POOL and run.infrastructure_pid  # the worker's process ran it
    assert history(server, run.id).count("RUNNING") == 1
    assert [r.id for r in flow_runs(server, DEPLOYMENT)] == [run.id]
    assert "Outcome: recovered" in report(server, run.id)
    assert_recovered_once(cluster, redis, s, crashed_pod=a, healthy_pod=b, crashed=crashed, busy=busy)
