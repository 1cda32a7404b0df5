"""The README's scale-out advice, run for real: two Prefect API servers (``prefect server start``, each with its
background services) on one PostgreSQL database of their own, with the ``prefect-redis`` messaging broker,
cache, causal ordering, lease storage and Docket on a private ``redis-server``. The bridge posts the alert to
server A; ``fd-recovery serve`` registers ``worker-crash-recovery`` (with its triggers) through server B and
polls B; both servers' trigger services read the same Redis events stream as one consumer group.

Asserted: the trigger fired once (one automation action executed, one flow run, created by the automation,
none appearing later) and the recovery ran once (one Running in the run's state history, the crashed pod
deleted once and replaced, its entries requeued once) — and that both servers were really in play (each
one's trigger consumer in the Redis group, the run visible through both).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlparse

import httpx
import prefect_redis  # noqa: F401 - the broker the servers load (the test extra installs it): fail loudly if absent
import pytest
import redis as redis_lib

from deployments.bridge import BackgroundBridge, BridgeSettings, create_app
from deployments.serve import PROJECT_ROOT
from sandbox.scratch import free_port
from sandbox.stack import ChildProcess, settings_env
from tests.e2e.conftest import scratch_postgres
from tests.e2e.test_work_pool import (
    DEPLOYMENT,
    PrefectServer,
    assert_recovered_once,
    flow_runs,
    history,
    post_alert,
    report,
    wait_for_final_run,
)
from tests.e2e.test_work_pool import TOKEN as BRIDGE_TOKEN
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import ReplacementConsumer, worker_pods
from tests.integration.test_worker_crash import crash_scene
from tests.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]
env = fx.env  # per-test settings: Redis keys, sandbox cluster, runs tables in PostgreSQL

QUIET_S = 8.0  # after the run ended, how long no second run may appear


def redis_broker_env(redis_url: str) -> dict[str, str]:
    """Prefect's documented multi-server settings ("How to scale self-hosted Prefect"), on ``redis_url``."""
    url = urlparse(redis_url)
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": url.hostname or "127.0.0.1",
        "PREFECT_REDIS_MESSAGING_PORT": str(url.port or 6379),
        "PREFECT_REDIS_MESSAGING_DB": "0",
        "PREFECT_SERVER_DOCKET_URL": f"{redis_url}/1",
    }


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory) -> Iterator[str]:
    """A redis-server of its own on a free port (no persistence) for Prefect's messaging: its URL."""
    server = shutil.which("redis-server")
    assert server is not None, "redis-server not installed (make test installs it: deployments/ensure-services.sh)"
    port, workdir = free_port(), tmp_path_factory.mktemp("redis")
    proc = ChildProcess.spawn("redis", [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                        "--appendonly", "no", "--dir", str(workdir)],
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, log_path=workdir / "redis.log",
                              cwd=PROJECT_ROOT)
    client = redis_lib.Redis(host="127.0.0.1", port=port)

    def up() -> bool:
        assert proc.alive(), proc.tail()
        try:
            return bool(client.ping())
        except redis_lib.ConnectionError:
            return False

    try:
        wait_for(up, timeout=20, what="the private redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        client.close()
        proc.stop()


@pytest.fixture(scope="module")
def prefect_pg_url() -> Iterator[str]:
    """A PostgreSQL database of the two servers' own (asyncpg URL), dropped afterwards."""
    with scratch_postgres() as url:
        yield url


@pytest.fixture(scope="module")
def servers(prefect_pg_url, private_redis, tmp_path_factory) -> Iterator[tuple[PrefectServer, PrefectServer]]:
    """Server A migrates the database on start; server B starts on the migrated database."""
    broker = redis_broker_env(private_redis)
    a = PrefectServer(name="prefect-a", home=tmp_path_factory.mktemp("prefect-a"), database_url=prefect_pg_url,
                      extra_env=broker)
    try:
        b = PrefectServer(name="prefect-b", home=tmp_path_factory.mktemp("prefect-b"), database_url=prefect_pg_url,
                          extra_env={**broker, "PREFECT_API_DATABASE_MIGRATE_ON_START": "false"})
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


def executed_actions(server: PrefectServer, automation_ids: list[str]) -> list[dict]:
    """``prefect.automation.action.executed`` events of these automations (stored in the shared database)."""
    body = {"filter": {"event": {"name": ["prefect.automation.action.executed"]},
                       "resource": {"id": [f"prefect.automation.{i}" for i in automation_ids]}}, "limit": 50}
    r = httpx.post(f"{server.api_url}/events/filter", json=body, timeout=10)
    r.raise_for_status()
    return r.json()["events"]


def test_two_servers_on_postgres_and_redis_fire_the_trigger_once_and_recover_once(
        env, cluster, redis, servers, private_redis, tmp_path):
    s = env
    a_server, b_server = servers
    serve = ChildProcess.spawn(
        "fd-recovery-serve", [sys.executable, "-m", "deployments.cli", "serve", "--only", DEPLOYMENT],
        env={**b_server.env, **settings_env(s)}, log_path=tmp_path / "serve.log", cwd=PROJECT_ROOT)
    try:
        def registered() -> list[str] | None:  # the deployment and its 2 triggers, seen through server A
            assert serve.alive(), serve.tail(40)
            with a_server.client() as client:
                try:
                    deployment = client.read_deployment_by_name(f"{DEPLOYMENT}/{DEPLOYMENT}")
                except Exception:  # noqa: BLE001 - not there yet
                    return None
                ids = [str(x.id) for x in client.read_automations() if str(deployment.id) in str(x.actions)]
            return ids if len(ids) == 2 else None

        automation_ids = wait_for(registered, timeout=180, interval=0.5, what="serve to register the deployment")
        crashed_pod, healthy_pod, crashed, busy = crash_scene(cluster, redis, s)
        app = create_app(BridgeSettings(token=BRIDGE_TOKEN, prefect_api_url=a_server.api_url))
        with BackgroundBridge(app) as bridge, \
                ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
            posted = datetime.now(UTC)
            post_alert(bridge.url, crashed_pod)
            run = wait_for_final_run(b_server, DEPLOYMENT, processes=[serve, a_server.proc, b_server.proc])
        quiet_until = time.monotonic() + QUIET_S
        while time.monotonic() < quiet_until:  # poll: a late second run (the other server's trigger) shows up here
            assert len(flow_runs(a_server, DEPLOYMENT)) == 1
            time.sleep(0.5)  # poll
        actions = wait_for(lambda: executed_actions(a_server, automation_ids), timeout=30, interval=0.5,
                           what="the automation's executed action to be stored")
    finally:
        serve.stop()

    if run.start_time:
        print(f"\nalert -> flow run Running: {(run.start_time - posted).total_seconds():.1f} s; "
              f"run took {run.total_run_time.total_seconds():.1f} s")
    assert run.state.is_completed(), f"{run.state}\n{serve.tail(60)}"
    assert run.parameters == {"pod": crashed_pod, "dry_run": False}
    assert run.created_by is not None and run.created_by.type == "AUTOMATION"
    assert [r.id for r in flow_runs(a_server, DEPLOYMENT)] == [run.id] == [r.id for r in flow_runs(b_server, DEPLOYMENT)]
    assert len(actions) == 1  # the trigger fired once
    assert history(b_server, run.id).count("RUNNING") == 1  # and the recovery ran once
    assert "Outcome: recovered" in report(a_server, run.id)
    assert_recovered_once(cluster, redis, s, crashed_pod=crashed_pod, healthy_pod=healthy_pod, crashed=crashed,
                          busy=busy)
    # both servers were in play: each one's reactive-triggers consumer reads the one Redis events stream
    broker = redis_lib.Redis.from_url(private_redis, decode_responses=True)
    try:
        groups = {g["name"]: g for g in broker.xinfo_groups("events")}
        consumers = broker.xinfo_consumers("events", "reactive-triggers")
    finally:
        broker.close()
    assert "reactive-triggers" in groups and len(consumers) == 2, consumers
