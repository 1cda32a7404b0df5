"""Shared test harness: one Prefect test server per session, real Redis and PostgreSQL, isolated per test.

Isolation: every test gets its own Redis key names (a unique prefix, removed afterwards) and the session
gets its own PostgreSQL database (dropped afterwards), so suites of several developers can run at once.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Kubernetes task retries back off for milliseconds in tests (read when tasks.kube is imported).
os.environ.setdefault("FD_RETRY_DELAYS_S", "[0.05, 0.1, 0.2]")

import pytest
import redis as redis_lib

from tasks.connections import reset_connections
from tasks.settings import Settings

REDIS_URL = os.environ.get("FD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("FD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API (SQLite) for the whole session: starting one costs ~7 s. Flow-run heartbeats
    off, as ``fd-recovery serve`` runs its flows (``deployments.inprocess_runner.NO_HEARTBEATS``)."""
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from deployments.inprocess_runner import NO_HEARTBEATS

    with prefect_test_harness(server_startup_timeout=60), temporary_settings(updates=NO_HEARTBEATS):
        yield


@pytest.fixture
def key_prefix() -> str:
    """A unique Redis key prefix for this test."""
    return f"fdtest:{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(key_prefix: str) -> Iterator[Settings]:
    """Settings whose Redis keys are private to this test; every key under the prefix is deleted afterwards."""
    s = Settings(
        redis_url=REDIS_URL,
        stream=f"{key_prefix}:steps",
        group="workers",
        dlq_stream=f"{key_prefix}:dlq",
        state_prefix=f"{key_prefix}:state",
        kill_switch_variable=f"paused_{key_prefix.split(':')[1]}",
        budget_prefix=f"fd-test-{key_prefix.split(':')[1]}",
    )
    yield s
    client = redis_lib.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{key_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def active_settings(settings: Settings) -> Iterator[Settings]:
    """``settings`` put in force for flows run by this test (flows call ``get_settings()``)."""
    from tasks.settings import use_settings

    with use_settings(settings):
        yield settings


@pytest.fixture
def redis(settings: Settings) -> redis_lib.Redis:
    """The real Redis, through the project's own client factory."""
    from tasks.connections import redis_client

    return redis_client(settings)


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session (dropped at the end, our pooled connections closed first)."""
    from sandbox.scratch import scratch_database

    with scratch_database(prefix="fd_test", admin_url=PG_ADMIN_URL) as url:
        yield url
        reset_connections()


@pytest.fixture(scope="session")
def sandbox_cluster():
    """One sandbox Kubernetes API server for the whole session (namespace ferrumdeck seeded; fast timing)."""
    from sandbox.kube import SandboxCluster

    cluster = SandboxCluster.start(port=0)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(sandbox_cluster):
    """The session's sandbox cluster, reset to its seeded state (no faults, empty request log) for this test.

    Pod listeners added during the test are removed afterwards.
    """
    sandbox_cluster.reset()
    listeners = list(sandbox_cluster.controller.listeners)
    yield sandbox_cluster
    sandbox_cluster.controller.listeners[:] = listeners


@pytest.fixture
def kube_settings(settings: Settings, cluster, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``settings`` pointing at the sandbox cluster: explicit kubeconfig path (also in ``KUBECONFIG``), namespace ferrumdeck."""
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig)
    return settings.model_copy(update={"kubeconfig": cluster.kubeconfig, "namespace": "ferrumdeck"})


@pytest.fixture(scope="session")
def kube_request_log() -> list:
    """The sandbox API requests our own Kubernetes code made this session (replayed against RBAC by test_rbac)."""
    return []


@pytest.fixture
def record_kube_requests(cluster, kube_request_log: list) -> Iterator[None]:
    """Add this test's sandbox requests to ``kube_request_log`` when it ends (kubectl's are not ours)."""
    yield
    kube_request_log.extend(r for r in cluster.requests if not (r.user_agent or "").startswith("kubectl"))
