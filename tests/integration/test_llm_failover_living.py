"""The LLM outage end to end in the living sandbox: workers fail real steps, the flow fails over, work resumes.

Nothing is seeded by hand: the sandbox workers (threads bound to the cluster's worker pods) take steps from the
real stream, call their pod's ``LITELLM_MODEL`` (the provider stub), and record every step in PostgreSQL. An
outage of ``openai`` makes their LLM steps fail; ``llm-provider-failover`` reads those rows and the status page,
switches the Deployment to the backup, and verifies it by the steps the rolled-out pods' workers complete with
the backup (a steady load keeps steps coming, as in production).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from flows.llm_failover import llm_provider_failover
from tasks import kube
from tasks.connections import db_engine
from tasks.guard import ensure_budget, llm_failover_budget
from tasks.outcome import Outcome
from tasks.runs import drop_schema, llm_failures_by_model, tables
from tasks.settings import use_settings
from tests.polling import wait_for

PRIMARY = "openai/gpt-4o"
BACKUP = "anthropic/claude-sonnet-4-20250514"


@pytest.fixture
def living(kube_settings, cluster, pg_database_url):
    from sandbox.services import SandboxServices

    tag = uuid.uuid4().hex[:8]
    base = kube_settings.model_copy(
        update={
            "runs_table": f"runs_lv_{tag}",
            "steps_table": f"steps_lv_{tag}",
            "database_url": SecretStr(pg_database_url),
            "llm_fallback_models": [PRIMARY, BACKUP],
            "llm_active_model_variable": f"fd_active_model_{tag}",
            "llm_failover_min_samples": 10,
            "rollout_timeout_s": 30.0,
        }
    )
    ensure_budget(llm_failover_budget(base))  # this test's own budget (its settings' budget prefix)
    svc = SandboxServices.start(settings=base, cluster=cluster, step_ms=2.0, batch=10)
    try:
        svc.wait_for_workers(3, timeout_s=15)
        with use_settings(svc.settings):
            yield svc
    finally:
        svc.stop()
        drop_schema(settings=svc.settings)


def completed_with(settings, model: str, since: datetime) -> int:
    steps = tables(settings).steps
    stmt = sa.select(sa.func.count()).where(
        steps.c.model == model, steps.c.status == "completed", steps.c.started_at >= since
    )
    with db_engine(settings).connect() as conn:
        return conn.execute(stmt).scalar_one()


@contextmanager
def steady_load(services, *, every_s: float = 0.2, n: int = 5) -> Iterator[None]:
    """A few new steps every ``every_s`` seconds while the block runs (the traffic that verifies a switch)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s):  # poll: the load's pace
            services.backlog(n)

    thread = threading.Thread(target=run, name="steady-load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def test_outage_failover_and_work_resumes_on_the_backup(living, cluster):
    s = living.settings
    start = datetime.now(UTC) - timedelta(seconds=1)
    living.llm_outage("openai")
    living.backlog(40)
    wait_for(
        lambda: llm_failures_by_model(settings=s, since=start).get(PRIMARY, {}).get("failed", 0) >= 20,
        timeout=20,
        what="the workers to fail 20 LLM steps on openai",
    )

    with steady_load(living):
        result = llm_provider_failover(dry_run=False, verify_within_s=20)

    assert result.outcome is Outcome.RECOVERED, result.cause()
    assert (result.decision, result.target, result.switched) == ("failover", BACKUP, True)
    assert result.steps_after.total >= 5 and result.steps_after.failed == 0  # the switched workers' own steps
    assert kube.get_deployment_env.fn(settings=s, deployment="worker", container="worker", name="LITELLM_MODEL") == BACKUP
    switched = datetime.now(UTC)
    living.wait_for_workers(3, timeout_s=15)
    living.backlog(30)
    wait_for(lambda: completed_with(s, BACKUP, switched) >= 30, timeout=20, what="30 steps completed on the backup")
    failed_after = llm_failures_by_model(settings=s, since=switched + timedelta(seconds=1)).get(PRIMARY)
    assert not failed_after or failed_after["failed"] == 0  # nothing runs on the dead provider any more
