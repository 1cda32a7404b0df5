"""HTTP probes without servers: respx answers, the pure health verdict, Statuspage parsing, retry condition."""

import httpx
import pytest
import respx

from tasks.probes import (
    HealthCheck,
    ProbeError,
    ProbeTemporaryError,
    health_check_once,
    http_client,
    judge_health,
    parse_status_document,
    probe_health,
    read_status_page,
)
from tasks.settings import Settings

MCP = "http://mcp.test:3000/health"
STATUS = "http://status.test/openai/api/v2/status.json"


@pytest.fixture
def client():
    with httpx.Client(timeout=1.0) as c:
        yield c


def _doc(indicator: str) -> dict:
    return {"page": {"id": "x"}, "status": {"indicator": indicator, "description": f"{indicator} things"}}


@respx.mock
def test_health_check_ok_measures_latency(client):
    respx.get(MCP).respond(200, json={"status": "ok"})
    check = health_check_once(client=client, url=MCP)
    assert check.ok and check.status_code == 200 and check.latency_ms >= 0 and check.error is None


@respx.mock
@pytest.mark.parametrize("code", [500, 503, 404, 301])
def test_health_check_non_2xx_is_unhealthy_not_an_exception(client, code):
    respx.get(MCP).respond(code, text="upstream tools unreachable")
    check = health_check_once(client=client, url=MCP, attempt=2)
    assert not check.ok and check.status_code == code and check.attempt == 2
    assert f"HTTP {code}" in check.error


@respx.mock
@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
def test_health_check_connection_errors_are_observations(client, exc):
    respx.get(MCP).mock(side_effect=exc)
    check = health_check_once(client=client, url=MCP)
    assert not check.ok and check.status_code is None and type(exc).__name__ in check.error


def _checks(*oks: bool) -> list[HealthCheck]:
    return [HealthCheck(attempt=i + 1, ok=ok, latency_ms=10.0 * (i + 1)) for i, ok in enumerate(oks)]


@pytest.mark.parametrize(
    ("oks", "healthy"),
    [
        ((True, True, True), True),
        ((True, False, True), True),  # one blip is not an outage
        ((False, True, False), False),
        ((True, False), False),  # a tie is not healthy
        ((False,), False),
        ((True,), True),
    ],
)
def test_judge_health_needs_a_strict_majority(oks, healthy):
    report = judge_health(url=MCP, checks=_checks(*oks))
    assert report.healthy is healthy
    assert report.ok_count == sum(oks)
    assert report.summary().startswith(f"{sum(oks)}/{len(oks)} checks ok")


def test_judge_health_median_latency_of_successful_checks_only():
    report = judge_health(url=MCP, checks=_checks(True, False, True))
    assert report.median_latency_ms == 20.0  # (10 + 30) / 2; the failed 20 ms check is ignored
    assert judge_health(url=MCP, checks=_checks(False)).median_latency_ms is None


@respx.mock
def test_probe_health_counts_every_attempt():
    route = respx.get(MCP).mock(
        side_effect=[httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(200)]
    )
    report = probe_health(settings=Settings(http_timeout_s=1.0), url=MCP, attempts=3, interval_s=0)
    assert route.call_count == 3
    assert [c.ok for c in report.checks] == [False, False, True] and not report.healthy


def test_probe_health_rejects_zero_attempts():
    with pytest.raises(ValueError, match="at least 1"):
        probe_health(settings=Settings(), url=MCP, attempts=0, interval_s=0)


def test_http_client_is_shared_and_has_the_configured_timeout():
    a = http_client(Settings(http_timeout_s=2.5))
    assert a is http_client(Settings(http_timeout_s=2.5))
    assert a.timeout.read == 2.5 and a.timeout.connect == 2.5
    assert http_client(Settings(http_timeout_s=3.5)) is not a


@pytest.mark.parametrize("indicator", ["none", "minor", "major", "critical", "maintenance"])
def test_parse_status_document_reads_the_indicator(indicator):
    status = parse_status_document(provider="openai", url=STATUS, document=_doc(indicator))
    assert status.indicator == indicator and status.provider == "openai" and status.description


@pytest.mark.parametrize("document", [{}, {"status": {}}, {"status": {"indicator": "purple"}}, [], "x", None])
def test_parse_status_document_rejects_other_documents(document):
    with pytest.raises(ProbeError, match="not a Statuspage"):
        parse_status_document(provider="openai", url=STATUS, document=document)


@respx.mock
def test_read_status_page_ok(client):
    route = respx.get(STATUS).respond(200, json=_doc("major"))
    assert read_status_page(client=client, provider="openai", url=STATUS).indicator == "major"
    assert route.calls.last.request.headers["accept"] == "application/json"


@respx.mock
@pytest.mark.parametrize("code", [429, 500, 502, 503, 504])
def test_read_status_page_temporary_statuses(client, code):
    respx.get(STATUS).respond(code)
    with pytest.raises(ProbeTemporaryError, match=f"HTTP {code}"):
        read_status_page(client=client, provider="openai", url=STATUS)


@respx.mock
@pytest.mark.parametrize("code", [400, 401, 403, 404])
def test_read_status_page_permanent_statuses_are_not_temporary(client, code):
    respx.get(STATUS).respond(code)
    with pytest.raises(ProbeError) as info:
        read_status_page(client=client, provider="openai", url=STATUS)
    assert not isinstance(info.value, ProbeTemporaryError)


@respx.mock
def test_read_status_page_connection_error_is_temporary_and_chained(client):
    respx.get(STATUS).mock(side_effect=httpx.ConnectTimeout("timed out"))
    with pytest.raises(ProbeTemporaryError) as info:
        read_status_page(client=client, provider="openai", url=STATUS)
    assert isinstance(info.value.__cause__, httpx.ConnectTimeout)


@respx.mock
def test_read_status_page_not_json(client):
    respx.get(STATUS).respond(200, text="<html>status</html>")
    with pytest.raises(ProbeError, match="not JSON"):
        read_status_page(client=client, provider="openai", url=STATUS)
from tasks.errors import retry_if_temporary as retry_temporary  # noqa: E402


class _State:
    def __init__(self, exc: Exception | None):
        self.exc = exc

    def result(self):
        if self.exc is not None:
            raise self.exc
        return "ok"


@pytest.mark.parametrize(
    ("exc", "retry"),
    [(ProbeTemporaryError("503"), True), (ProbeError("404"), False), (ValueError("bug"), False), (None, False)],
)
def test_retry_condition_only_for_temporary_errors(exc, retry):
    assert retry_temporary(None, None, _State(exc)) is retry
