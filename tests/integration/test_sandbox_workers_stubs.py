"""The sandbox's provider and MCP stubs and pod readers, on their own (no cluster, no Redis): fast edge cases."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from sandbox.llm import LLMProviders, ProviderError, provider_of
from sandbox.mcp import MCPServer
from sandbox.pods import container_env, matches, parse_selector, pod_is_crashing, pod_is_ready
from sandbox.workers import WorkerPool


def pod(name: str, *, app: str = "mcp-server", ready: bool = True, terminating: bool = False) -> dict:
    meta: dict = {"name": name, "labels": {"app": app}}
    if terminating:
        meta["deletionTimestamp"] = "2026-11-27T20:00:00Z"
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "worker", "env": [{"name": "LITELLM_MODEL", "value": "openai/gpt-4o"}]}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_statuspage_document_follows_the_outage() -> None:
    llm = LLMProviders()
    http = TestClient(llm.app())
    assert http.get("/openai/api/v2/status.json").json()["status"] == {
        "indicator": "none", "description": "All Systems Operational"
    }
    llm.outage("openai")
    body = http.get("/openai/api/v2/status.json").json()
    assert body["status"]["indicator"] == "major" and body["page"]["name"] == "openai"
    assert http.get("/anthropic/api/v2/status.json").json()["status"]["indicator"] == "none"
    with pytest.raises(ProviderError) as err:
        llm.complete(model="openai/gpt-4o")
    assert err.value.error_json()["code"] == "LLM_PROVIDER_ERROR" and err.value.provider == "openai"
    assert llm.complete(model="anthropic/claude-sonnet-4-20250514").provider == "anthropic"
    r = http.post("/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
    assert r.status_code == 503 and r.json()["error"]["type"] == "provider_error"
    llm.restore("openai")
    assert http.post("/openai/v1/chat/completions", json={"model": "gpt-4o"}).status_code == 200
    assert http.post("/openai/v1/chat/completions", content=b"{not json").status_code == 400
    assert llm.failures == {"openai/gpt-4o": 2} and provider_of("gpt-4o") == "gpt-4o"


def test_mcp_outage_heals_only_when_a_new_pod_is_ready() -> None:
    mcp = MCPServer()
    http = TestClient(mcp.app())
    assert http.get("/health").status_code == 200
    assert http.post("/tools/call", json={"name": "search"}).json()["isError"] is False
    assert http.post("/tools/call", json={"arguments": {}}).status_code == 400

    mcp.outage(current_pods=["mcp-server-a"])
    assert http.get("/health").status_code == 503
    refused = http.post("/tools/call", json={"name": "search"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "ECONNREFUSED"

    mcp.on_pod_event("MODIFIED", pod("mcp-server-a"))  # the old pod again: no restart
    mcp.on_pod_event("ADDED", pod("mcp-server-b", ready=False))  # new, not Ready yet
    mcp.on_pod_event("MODIFIED", pod("worker-x", app="worker"))  # another deployment's pod
    mcp.on_pod_event("DELETED", pod("mcp-server-c"))
    assert http.get("/health").status_code == 503
    mcp.on_pod_event("MODIFIED", pod("mcp-server-b"))  # the restarted pod is Ready
    assert http.get("/health").status_code == 200 and mcp.restarts_seen == 1


def test_pod_readers() -> None:
    assert pod_is_ready(pod("a")) and not pod_is_ready(pod("a", ready=False))
    assert not pod_is_ready(pod("a", terminating=True))
    assert container_env(pod("a"), container="worker", name="LITELLM_MODEL") == "openai/gpt-4o"
    assert container_env(pod("a"), container="other", name="LITELLM_MODEL") is None
    assert parse_selector("app=worker, tier==x") == {"app": "worker", "tier": "x"}
    assert matches(pod("a", app="worker"), parse_selector("app=worker"))
    for bad in ("app!=worker", "app", "=x"):
        with pytest.raises(ValueError):
            parse_selector(bad)
    crashing = pod("a", ready=False)
    crashing["status"]["containerStatuses"] = [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]
    assert pod_is_crashing(crashing) and not pod_is_crashing(pod("a"))


class FakeWorker:
    """Stands in for a worker thread: records start/kill."""

    def __init__(self, pod: str, model: str) -> None:
        self.pod, self.model, self.alive, self.state = pod, model, False, "new"

    def start(self) -> FakeWorker:
        self.alive, self.state = True, "running"
        return self

    def kill(self) -> None:
        self.alive, self.state = False, "killed"

    def join(self, timeout: float | None = None) -> bool:
        return True


def test_pool_follows_pod_events() -> None:
    made: list[FakeWorker] = []

    def factory(pod_name: str, model: str) -> FakeWorker:
        made.append(FakeWorker(pod_name, model))
        return made[-1]

    pool = WorkerPool(factory=factory, selector="app=worker")
    pool.on_pod_event("ADDED", pod("w-1", app="worker", ready=False))  # Pending: nothing yet
    pool.on_pod_event("ADDED", pod("m-1", app="mcp-server"))  # not a worker pod
    assert made == []
    pool.on_pod_event("MODIFIED", pod("w-1", app="worker"))
    pool.on_pod_event("MODIFIED", pod("w-1", app="worker"))  # same pod again: one worker
    assert [(w.pod, w.model, w.alive) for w in made] == [("w-1", "openai/gpt-4o", True)]

    pool.on_pod_event("MODIFIED", pod("w-1", app="worker", terminating=True))  # Terminating: killed at once
    assert not made[0].alive
    pool.on_pod_event("MODIFIED", pod("w-1", app="worker"))  # a gone pod's name never runs again
    assert len(made) == 1

    pool.sync([pod("w-2", app="worker"), pod("w-3", app="worker")])
    crashing = pod("w-2", app="worker", ready=False)
    crashing["status"]["containerStatuses"] = [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]
    pool.on_pod_event("MODIFIED", crashing)
    pool.on_pod_event("MODIFIED", pod("w-2", app="worker"))  # a crashed pod's worker never restarts
    assert sorted(pool.running()) == ["w-3"] and pool.crashed() == {"w-2"}
    pool.stop()
    pool.on_pod_event("ADDED", pod("w-4", app="worker"))  # stopped: ignores events
    assert [w.pod for w in made] == ["w-1", "w-2", "w-3"] and not any(w.alive for w in made)
