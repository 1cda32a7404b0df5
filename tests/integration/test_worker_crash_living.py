"""The living sandbox: real worker threads following the cluster's pods, a poison step crashing whoever takes it.

First crash: the poison was delivered once, so it is requeued with the rest (it may be a coincidence). It
crashes a second worker; that recovery sees it delivered twice and dead-letters it, failing its run. Every
other step is processed exactly once more and completes; the replacements consume; the check passes.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from flows.post_recovery_check import post_recovery_check
from flows.worker_crash import CONSUMER_EMPTY, REPLACEMENT_READING, REPLACEMENT_READY, worker_crash_recovery
from sandbox.services import SandboxServices
from tasks import runs
from tasks.connections import db_engine
from tasks.outcome import Outcome
from tasks.settings import use_settings
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import deletions, run_status, worker_pods

pytestmark = pytest.mark.timeout(150)
env = fx.env  # the per-test settings fixture


def crashed(cluster, s, *, besides: set[str]) -> str | None:
    """A worker pod that is not Ready (its worker died) and not already handled."""
    ready = set(worker_pods(cluster, s))
    pods = set(worker_pods(cluster, s, ready_only=False))
    return next(iter(sorted(pods - ready - besides)), None)


def statuses(s) -> dict[str, int]:
    t = runs.tables(s).runs
    with db_engine(s).connect() as conn:
        rows = conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)).all()
    return dict(rows)


def test_poison_crashes_two_workers_and_the_second_recovery_dead_letters_it(env, cluster, pg_database_url):
    fd = SandboxServices.start(settings=env, cluster=cluster, database_url=pg_database_url, step_ms=2, batch=5)
    try:
        s = fd.settings
        fd.wait_for_workers(3)
        with use_settings(s):
            fd.backlog(20)
            (poison,) = fd.poison(count=1)
            fd.start_load(rate_per_s=40)
            first = fx.wait_for(lambda: crashed(cluster, s, besides=set()), what="a worker to take the poison")
            r1 = worker_crash_recovery(dry_run=False, verify_consuming_s=10, return_state=True).result()
            assert [t.pod for t in r1.targets] == [first] and r1.targets[0].dead_lettered == 0
            assert r1.outcome is Outcome.RECOVERED and r1.targets[0].replacement
            assert {c.name for c in r1.checks if c.ok} == {CONSUMER_EMPTY, REPLACEMENT_READY, REPLACEMENT_READING}
            second = fx.wait_for(lambda: crashed(cluster, s, besides={first}), what="the poison's second victim")
            r2 = worker_crash_recovery(dry_run=False, verify_consuming_s=10, return_state=True).result()
            out = r2.targets[0]
            assert r2.outcome is Outcome.RECOVERED
            assert out.pod == second and len(out.poison) == 1 and "poison entry suspected" in out.root_cause
            fd.load.stop()
            fx.wait_for(lambda: set(statuses(s)) <= {"completed", "failed"}, timeout=30, what="every run finished")
        dlq = fd.redis.xrange(s.dlq_stream)
        assert [f["step_id"] for _, f in dlq] == [poison.step_id] and dlq[0][1]["deliveries"] == "2"
        assert run_status(s, [poison.run_id]) == {poison.run_id: ("failed", "WORKER_TIMEOUT")}
        assert statuses(s).get("failed") == 1  # only the poison's run: nothing lost, nothing failed twice
        assert sorted(deletions(cluster)) == sorted([first, second])
        assert fd.redis.xpending(s.stream, s.group)["pending"] == 0
        with use_settings(s):
            check = post_recovery_check()
        assert [i.ok for i in check.items[:3]] == [True, True, True]
    finally:
        fd.stop()
