"""The gateway client against respx: retries, Retry-After, outcomes, auth errors, id validation, no key leaks."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import respx
from pydantic import SecretStr

from tasks import gateway
from tasks.gateway import (
    GatewayAuthError,
    GatewayError,
    GatewayTemporaryError,
    InvalidIdError,
    _retry_step,
    retry_after_seconds,
    retry_steps,
)
from tasks.settings import Settings

KEY = "sk-unit-very-secret-0123456789"
BASE = "http://gateway.test:8080"
PATH = "/v1/runs/run_1/steps/st_1/retry"


@pytest.fixture
def gw_settings() -> Settings:
    gateway.close_clients()
    s = Settings(
        gateway_url=BASE,
        gateway_api_key=KEY,
        gateway_max_attempts=4,
        gateway_backoff_s=0.5,
        gateway_retry_after_cap_s=5,
    )
    yield s
    gateway.close_clients()


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@respx.mock
def test_503_then_200_is_retried_with_backoff(gw_settings):
    route = respx.post(BASE + PATH).mock(side_effect=[httpx.Response(503), httpx.Response(202)])
    sleeps = Sleeps()
    out = _retry_step(settings=gw_settings, run_id="run_1", step_id="st_1", sleep=sleeps)
    assert out.outcome == "retried" and out.changed and out.attempts == 2 and out.status_code == 202
    assert route.call_count == 2 and sleeps == [0.5]
    assert route.calls[0].request.headers["authorization"] == f"Bearer {KEY}"


@respx.mock
def test_retry_after_is_honoured_and_capped(gw_settings):
    respx.post(BASE + PATH).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "2"}),
            httpx.Response(503, headers={"Retry-After": "120"}),
            httpx.Response(202),
        ]
    )
    sleeps = Sleeps()
    assert _retry_step(settings=gw_settings, run_id="run_1", step_id="st_1", sleep=sleeps).changed
    assert sleeps == [2.0, 5.0]  # the server's 2 s, then 120 s capped at gateway_retry_after_cap_s


def test_retry_after_http_date():
    now = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=7), usegmt=True), now=now) == 7
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=7), usegmt=True), now=now) == 0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


@respx.mock
def test_connection_errors_are_retried_then_a_clear_temporary_error(gw_settings):
    route = respx.post(BASE + PATH).mock(side_effect=httpx.ConnectError("refused"))
    sleeps = Sleeps()
    with pytest.raises(GatewayTemporaryError, match="no answer after 4 attempts") as info:
        _retry_step(settings=gw_settings, run_id="run_1", step_id="st_1", sleep=sleeps)
    assert route.call_count == 4 and sleeps == [0.5, 1.0, 2.0]
    assert KEY not in str(info.value) and KEY not in repr(info.value)


@respx.mock
def test_persistent_503_gives_up(gw_settings):
    respx.post(BASE + PATH).mock(return_value=httpx.Response(503))
    with pytest.raises(GatewayTemporaryError, match="HTTP 503 after 4 attempts"):
        _retry_step(settings=gw_settings, run_id="run_1", step_id="st_1", sleep=Sleeps())


@respx.mock
@pytest.mark.parametrize("code,outcome", [(404, "not_found"), (409, "already_queued")])
def test_404_and_409_are_outcomes_not_errors(gw_settings, code, outcome):
    route = respx.post(BASE + PATH).mock(return_value=httpx.Response(code, json={"error": "x"}))
    out = _retry_step(settings=gw_settings, run_id="run_1", step_id="st_1", sleep=Sleeps())
    assert out.outcome == outcome and not out.changed and route.call_count == 1


@respx.mock
@pytest.mark.parametrize("code", [401, 403])
def test_auth_failure_is_clear_and_never_shows_the_key(gw_settings, code, caplog):
    caplog.set_level(logging.DEBUG)
    route = respx.post(BASE + PATH).mock(return_value=httpx.Response(code, text=f"bad key Bearer {KEY}"))
    with pytest.raises(GatewayAuthError, match=f"rejected the API key \\(HTTP {code}\\)") as info:
        _retry_step(settings=gw_settings, run_id="run_1", step_id="st_1", sleep=Sleeps())
    assert route.call_count == 1  # not retried
    assert KEY not in str(info.value) and KEY not in repr(info.value) and KEY not in caplog.text
    assert KEY not in repr(gw_settings) and KEY not in str(gw_settings.model_dump())


@respx.mock
def test_other_errors_are_permanent_and_scrubbed(gw_settings):
    respx.post(BASE + PATH).mock(return_value=httpx.Response(500, text=f"boom Authorization: Bearer {KEY}"))
    with pytest.raises(GatewayError, match="HTTP 500") as info:
        _retry_step(settings=gw_settings, run_id="run_1", step_id="st_1", sleep=Sleeps())
    assert not isinstance(info.value, GatewayTemporaryError) and KEY not in str(info.value)


@respx.mock
@pytest.mark.parametrize(
    "run_id,step_id",
    [
        ("../admin", "st_1"),
        ("run_1", "../../etc"),
        ("run_1; DROP TABLE runs", "st_1"),
        ("run/1", "st_1"),
        ("run_1", ""),
        ("run_1", "a..b"),
        ("run_1", "st 1"),
        ("run_1", "st_1?x=1"),
        ("run_1", "%2e%2e"),
    ],
)
def test_hostile_ids_are_rejected_before_any_request(gw_settings, run_id, step_id):
    route = respx.post(url__startswith=BASE).mock(return_value=httpx.Response(202))
    with pytest.raises(InvalidIdError, match="invalid"):
        _retry_step(settings=gw_settings, run_id=run_id, step_id=step_id, sleep=Sleeps())
    assert route.call_count == 0


def test_missing_key_is_a_clear_error():
    s = Settings(gateway_url=BASE, gateway_api_key=None, gateway_api_key_secret=None)
    with pytest.raises(GatewayAuthError, match="FD_GATEWAY_API_KEY or FD_GATEWAY_API_KEY_SECRET"):
        _retry_step(settings=s, run_id="run_1", step_id="st_1")


@respx.mock
def test_batch_reports_per_step_errors_but_stops_on_auth(gw_settings, mocker):
    mocker.patch("tasks.guard.kill_switch_engaged", return_value=False)  # the guard's Prefect read: no server here
    respx.post(BASE + "/v1/runs/r1/steps/a/retry").mock(return_value=httpx.Response(202))
    respx.post(BASE + "/v1/runs/r1/steps/b/retry").mock(return_value=httpx.Response(500))
    respx.post(BASE + "/v1/runs/r2/steps/c/retry").mock(return_value=httpx.Response(404))
    out = retry_steps(settings=gw_settings, targets=[("r1", "a"), ("r1", "b"), ("r2", "c"), ("r2", "../x")], dry_run=False)
    assert [(o.step_id, o.outcome) for o in out.outcomes] == [("a", "retried"), ("c", "not_found")]
    assert set(out.errors) == {"r1/b", "r2/../x"}
    respx.post(BASE + "/v1/runs/r3/steps/d/retry").mock(return_value=httpx.Response(401))
    with pytest.raises(GatewayAuthError):
        retry_steps(settings=gw_settings, targets=[("r3", "d"), ("r1", "a")], dry_run=False)


def test_shared_client_has_timeouts_and_no_credentials(gw_settings):
    client = gateway.gateway_client(settings=gw_settings)
    assert client is gateway.gateway_client(settings=gw_settings)
    assert client.timeout.read == gw_settings.http_timeout_s
    assert "authorization" not in {k.lower() for k in client.headers}


def test_explicit_key_argument_wins(gw_settings):
    with respx.mock:
        route = respx.post(BASE + PATH).mock(return_value=httpx.Response(202))
        _retry_step(settings=gw_settings, run_id="run_1", step_id="st_1", api_key=SecretStr("other"))
    assert route.calls[0].request.headers["authorization"] == "Bearer other"


def test_batch_says_whether_anything_changed():
    """409 (already queued) and 404 change nothing: a batch of those is an unchanged action, not a done one."""
    from tasks.gateway import RetryBatch, RetryOutcome

    def answer(step: str, outcome: str) -> RetryOutcome:
        return RetryOutcome(run_id="r", step_id=step, outcome=outcome, status_code=202, attempts=1)

    nothing = RetryBatch(outcomes=[answer("a", "already_queued"), answer("b", "not_found")], errors={"r/c": "HTTP 500"})
    assert not nothing.changed and nothing.retried == []
    assert nothing.summary() == "already_queued 1, not_found 1, error 1"
    some = RetryBatch(outcomes=[answer("a", "already_queued"), answer("b", "retried")], errors={})
    assert some.changed and some.retried == ["b"]


def test_dry_run_calls_nothing(gw_settings):
    with respx.mock:
        route = respx.post(url__startswith=BASE).mock(return_value=httpx.Response(202))
        out = retry_steps(settings=gw_settings, targets=[("r1", "a")], dry_run=True)
    assert route.call_count == 0 and out.outcomes == [] and not out.changed


def test_kill_switch_refuses_before_any_request(gw_settings, mocker):
    from tasks.errors import Refused

    mocker.patch("tasks.guard.kill_switch_engaged", return_value=True)
    with respx.mock:
        route = respx.post(url__startswith=BASE).mock(return_value=httpx.Response(202))
        with pytest.raises(Refused, match="kill switch"):
            retry_steps(settings=gw_settings, targets=[("r1", "a")], dry_run=False)
    assert route.call_count == 0
