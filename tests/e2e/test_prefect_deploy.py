"""`prefect deploy --all` and `fd-recovery serve` both register every deployment of prefect.yaml, with its
schedules, concurrency limit and alert triggers, against a real Prefect API."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from deployments.serve import PROJECT_ROOT, build_runner_deployments, read_deployment_specs

SPECS = {s["name"]: s for s in read_deployment_specs()}


async def _registered() -> tuple[dict, list]:
    async with get_client() as client:
        deployments = {d.name: d for d in await client.read_deployments()}
        automations = await client.read_automations()
    return deployments, automations


def _prefect_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_CLI_PROMPT="false")
    prefect = Path(sys.executable).with_name("prefect")
    return subprocess.run(
        [str(prefect), "--no-prompt", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _assert_matches_prefect_yaml(deployments: dict, automations: list) -> None:
    assert set(SPECS) <= set(deployments)
    for name, spec in SPECS.items():
        d = deployments[name]
        assert d.description and "ferrumdeck" in d.tags
        assert len(d.schedules) == len(spec.get("schedules", [])), name
        if spec.get("concurrency_limit"):
            assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1, name
        for key, value in (spec.get("parameters") or {}).items():
            assert d.parameters[key] == value
    triggers = sum(len(s.get("triggers", [])) for s in SPECS.values())
    ours = [a for a in automations if "ferrumdeck." in str(a.trigger)]
    assert len(ours) == triggers


async def _remove(deployments: dict, automations: list) -> None:
    """Leave the session's Prefect server as found: the triggers would start runs for later tests' events."""
    async with get_client() as client:
        for automation in automations:
            if "ferrumdeck." in str(automation.trigger):
                await client.delete_automation(automation.id)
        for name in SPECS:
            if name in deployments:
                await client.delete_deployment(deployments[name].id)


def test_prefect_deploy_all_creates_every_deployment_and_trigger():
    pool = _prefect_cli("work-pool", "create", "ferrumdeck-recovery", "--type", "process", "--overwrite")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    result = _prefect_cli("deploy", "--all")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    deployments, automations = asyncio.run(_registered())
    try:
        _assert_matches_prefect_yaml(deployments, automations)
        crash = deployments["worker-crash-recovery"]
        assert crash.work_pool_name == "ferrumdeck-recovery"
    finally:
        asyncio.run(_remove(deployments, automations))


@pytest.mark.parametrize("name", ["worker-crash-recovery", "queue-sweep"])
def test_serve_builds_the_same_deployment_from_prefect_yaml(name):
    [deployment] = build_runner_deployments(names=[name])
    spec = SPECS[name]
    assert deployment.name == name and deployment.description == spec["description"].strip()
    assert len(deployment.schedules or []) == len(spec.get("schedules", []))
    assert len(deployment.triggers) == len(spec.get("triggers", []))
    assert deployment.concurrency_limit == 1 or deployment.concurrency_limit.limit == 1
    deployment_id = deployment.apply()
    assert deployment_id
