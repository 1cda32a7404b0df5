"""The status-page and MCP probes as Prefect tasks: declared retries for temporary errors only (respx)."""

from __future__ import annotations

import httpx
import pytest
import respx

from tasks.errors import RETRY
from tasks.probes import check_mcp_health, fetch_status_page, provider_statuses
from tasks.settings import Settings

URL = "http://status.example.test/api/v2/status.json"
DOC = {"status": {"indicator": "major", "description": "Major System Outage"}}


@pytest.fixture
def http():
    """respx for the probed services; the Prefect test API (loopback) passes through."""
    with respx.mock(assert_all_called=False) as router:
        router.route(host="127.0.0.1").pass_through()
        yield router


def _settings(**kw) -> Settings:
    return Settings(llm_status_urls={"openai": URL}, http_timeout_s=1.0, **kw)


def test_status_page_503_then_200_is_retried_by_prefect(http):
    route = http.get(URL).mock(
        side_effect=[httpx.Response(503), httpx.ConnectError("boom"), httpx.Response(200, json=DOC)]
    )
    status = fetch_status_page(settings=_settings(), provider="openai", url=URL)
    assert status.indicator == "major" and route.call_count == 3


def test_status_page_404_is_not_retried_and_becomes_unknown(http):
    route = http.get(URL).respond(404)
    statuses = provider_statuses(settings=_settings(), providers=["openai", "anthropic"])
    assert route.call_count == 1
    assert statuses["openai"].indicator == "unknown" and "HTTP 404" in statuses["openai"].error
    assert statuses["anthropic"].indicator == "unknown" and "no status page" in statuses["anthropic"].error


def test_status_page_down_beyond_the_retries_becomes_unknown(http):
    route = http.get(URL).respond(502)
    statuses = provider_statuses(settings=_settings(), providers=["openai"])
    assert RETRY["retries"] >= 1 and route.call_count == 1 + RETRY["retries"]  # first try + the one retry policy
    assert statuses["openai"].indicator == "unknown" and "HTTP 502" in statuses["openai"].error


def test_mcp_health_task_reports_each_attempt(http):
    mcp = "http://mcp.example.test:3000/health"
    http.get(mcp).mock(side_effect=[httpx.Response(200), httpx.ReadTimeout("slow"), httpx.Response(200)])
    report = check_mcp_health(settings=Settings(mcp_url=mcp), attempts=3, interval_s=0)
    assert report.healthy and report.ok_count == 2
    assert [c.ok for c in report.checks] == [True, False, True]
