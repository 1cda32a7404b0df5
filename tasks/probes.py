"""HTTP probes: the MCP server's health endpoint and the LLM providers' Statuspage JSON.

One shared ``httpx.Client`` per timeout (connection pooling, explicit timeouts on every call). A health check
never raises for a sick server — a refused connection or a 503 *is* the observation; a status page that
cannot be read after the task's retries (only temporary errors are retried) is reported as ``unknown``.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Literal

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.errors import RETRY, RecoveryError
from tasks.settings import Settings

Indicator = Literal["none", "minor", "major", "critical", "maintenance", "unknown"]
_INDICATORS: frozenset[str] = frozenset({"none", "minor", "major", "critical", "maintenance"})
_USER_AGENT = "ferrumdeck-recovery/probes"


class ProbeError(RecoveryError):
    """A probe could not get a usable answer (bad document, 4xx)."""


class ProbeTemporaryError(ProbeError):
    """A probe failed in a way worth retrying: connection error, timeout, 429 or 5xx."""

    temporary = True


# --- the shared client ---------------------------------------------------------------------------------------

_lock = threading.Lock()
_clients: dict[float, httpx.Client] = {}


def http_client(settings: Settings) -> httpx.Client:
    """A shared, pooled client whose every call times out after ``settings.http_timeout_s``."""
    timeout = float(settings.http_timeout_s)
    with _lock:
        client = _clients.get(timeout)
        if client is None or client.is_closed:
            client = httpx.Client(
                timeout=httpx.Timeout(timeout), follow_redirects=False, headers={"User-Agent": _USER_AGENT}
            )
            _clients[timeout] = client
        return client


def reset_http_clients() -> None:
    """Close every cached client (tests, and after a fork)."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


def _is_temporary_status(code: int) -> bool:
    return code == 429 or code >= 500


# --- MCP health ----------------------------------------------------------------------------------------------


class HealthCheck(BaseModel):
    """One GET of a health endpoint: HTTP status (None when no answer), latency, error text."""

    attempt: int
    ok: bool
    status_code: int | None = None
    latency_ms: float
    error: str | None = None


class HealthReport(BaseModel):
    """The result of several health checks of one endpoint, and the verdict."""

    url: str
    checks: list[HealthCheck]
    healthy: bool
    ok_count: int
    median_latency_ms: float | None = None

    def summary(self) -> str:
        """One line for reports: ``2/3 checks ok, median 12 ms``."""
        lat = f", median {self.median_latency_ms:.0f} ms" if self.median_latency_ms is not None else ""
        return f"{self.ok_count}/{len(self.checks)} checks ok{lat}"


def health_check_once(*, client: httpx.Client, url: str, attempt: int = 1) -> HealthCheck:
    """GET ``url`` once: any 2xx is healthy; errors, timeouts and other statuses are unhealthy (never raises)."""
    started = time.perf_counter()
    try:
        response = client.get(url)
    except httpx.HTTPError as e:
        elapsed = (time.perf_counter() - started) * 1000
        return HealthCheck(
            attempt=attempt, ok=False, latency_ms=elapsed, error=f"{type(e).__name__}: {e}"[:200]
        )
    elapsed = (time.perf_counter() - started) * 1000
    ok = 200 <= response.status_code < 300
    return HealthCheck(
        attempt=attempt,
        ok=ok,
        status_code=response.status_code,
        latency_ms=elapsed,
        error=None if ok else f"HTTP {response.status_code}: {response.text[:120]}",
    )


def judge_health(*, url: str, checks: list[HealthCheck]) -> HealthReport:
    """Pure verdict: healthy when a strict majority of the checks succeeded (one blip is not an outage)."""
    ok = [c for c in checks if c.ok]
    median = statistics.median(c.latency_ms for c in ok) if ok else None
    return HealthReport(
        url=url, checks=checks, healthy=len(ok) * 2 > len(checks), ok_count=len(ok), median_latency_ms=median
    )


def probe_health(*, settings: Settings, url: str, attempts: int, interval_s: float) -> HealthReport:
    """Check ``url`` ``attempts`` times, ``interval_s`` apart, and judge the result."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    client = http_client(settings)
    checks: list[HealthCheck] = []
    for n in range(1, attempts + 1):
        if n > 1 and interval_s > 0:
            time.sleep(interval_s)  # poll: spacing between health checks
        checks.append(health_check_once(client=client, url=url, attempt=n))
    return judge_health(url=url, checks=checks)


@task(name="check-mcp-health", cache_policy=NO_CACHE)
def check_mcp_health(*, settings: Settings, attempts: int, interval_s: float) -> HealthReport:
    """Health-check the MCP server (``settings.mcp_url``) several times; unhealthy is a result, not an error."""
    return probe_health(settings=settings, url=settings.mcp_url, attempts=attempts, interval_s=interval_s)


class HealthWait(BaseModel):
    """Waiting for an endpoint to answer healthy: did it, after how long, the last check."""

    healthy: bool
    seconds: float
    checks: int
    last: HealthCheck | None = None


@task(name="wait-mcp-healthy", cache_policy=NO_CACHE)
def wait_mcp_healthy(*, settings: Settings, deadline_s: float, interval_s: float) -> HealthWait:
    """Re-check the MCP server until one check succeeds or ``deadline_s`` passes."""
    client = http_client(settings)
    started = time.monotonic()
    n = 0
    last: HealthCheck | None = None
    while True:
        n += 1
        last = health_check_once(client=client, url=settings.mcp_url, attempt=n)
        elapsed = time.monotonic() - started
        if last.ok:
            return HealthWait(healthy=True, seconds=elapsed, checks=n, last=last)
        if elapsed + interval_s > deadline_s:
            return HealthWait(healthy=False, seconds=elapsed, checks=n, last=last)
        time.sleep(max(interval_s, 0.01))  # poll


# --- provider status pages -----------------------------------------------------------------------------------


class ProviderStatus(BaseModel):
    """A provider's Statuspage indicator (``unknown`` when the page could not be read)."""

    provider: str
    url: str | None = None
    indicator: Indicator = "unknown"
    description: str = ""
    error: str | None = None


def parse_status_document(*, provider: str, url: str, document: object) -> ProviderStatus:
    """Read ``status.indicator``/``description`` from a Statuspage ``/api/v2/status.json`` document."""
    status = document.get("status") if isinstance(document, dict) else None
    indicator = status.get("indicator") if isinstance(status, dict) else None
    if indicator not in _INDICATORS:
        raise ProbeError(f"{url}: not a Statuspage status document (status.indicator={indicator!r})")
    return ProviderStatus(
        provider=provider, url=url, indicator=indicator, description=str(status.get("description", ""))[:200]
    )


def read_status_page(*, client: httpx.Client, provider: str, url: str) -> ProviderStatus:
    """GET a provider's status page; raise ``ProbeTemporaryError`` for what a retry may fix."""
    try:
        response = client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as e:
        raise ProbeTemporaryError(f"{provider} status page {url}: {type(e).__name__}: {e}"[:300]) from e
    if _is_temporary_status(response.status_code):
        raise ProbeTemporaryError(f"{provider} status page {url}: HTTP {response.status_code}")
    if response.status_code != 200:
        raise ProbeError(f"{provider} status page {url}: HTTP {response.status_code}")
    try:
        document = response.json()
    except ValueError as e:
        raise ProbeError(f"{provider} status page {url}: body is not JSON") from e
    return parse_status_document(provider=provider, url=url, document=document)


@task(
    name="fetch-status-page",
    task_run_name="fetch-status-page {provider}",
    **RETRY,
)
def fetch_status_page(*, settings: Settings, provider: str, url: str) -> ProviderStatus:
    """One provider's Statuspage indicator; temporary failures are retried by Prefect."""
    return read_status_page(client=http_client(settings), provider=provider, url=url)


def provider_statuses(*, settings: Settings, providers: list[str]) -> dict[str, ProviderStatus]:
    """The status of each provider that has a configured status URL; unreadable pages become ``unknown``."""
    result: dict[str, ProviderStatus] = {}
    for provider in dict.fromkeys(providers):
        url = settings.llm_status_urls.get(provider)
        if not url:
            result[provider] = ProviderStatus(provider=provider, error="no status page configured")
            continue
        try:
            result[provider] = fetch_status_page(settings=settings, provider=provider, url=url)
        except ProbeError as e:
            result[provider] = ProviderStatus(provider=provider, url=url, error=str(e))
    return result
