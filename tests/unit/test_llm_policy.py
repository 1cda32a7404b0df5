"""The pure LLM failover/failback policy: evidence modes, fallback choice, failback timing."""

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.llm_policy import (
    FailureStats,
    ModelHealth,
    PolicyError,
    Thresholds,
    as_failure_stats,
    assess_model,
    decide_failback,
    decide_failover,
    judge_new_model,
    provider_of,
    validate_chain,
)
from tasks.probes import ProviderStatus

PRIMARY = "openai/gpt-4o"
BACKUP = "anthropic/claude-sonnet-4-20250514"
THIRD = "mistral/mistral-large"
CHAIN = [PRIMARY, BACKUP, THIRD]
NOW = datetime(2026, 11, 27, 21, 0, tzinfo=UTC)


def _status(**indicators: str) -> dict[str, ProviderStatus]:
    return {p: ProviderStatus(provider=p, indicator=i) for p, i in indicators.items()}


def _assess(model, failed=0, total=0, indicator=None, **th) -> ModelHealth:
    statuses = _status(**{provider_of(model): indicator}) if indicator else {}
    return assess_model(
        model=model,
        failures={model: FailureStats(failed=failed, total=total)},
        statuses=statuses,
        thresholds=Thresholds(**th),
    )


def test_provider_of_litellm_names():
    assert provider_of(PRIMARY) == "openai"
    assert provider_of(BACKUP) == "anthropic"
    assert provider_of("gpt-4o") == "gpt-4o"


def test_validate_chain():
    assert validate_chain(CHAIN) == CHAIN
    for bad in ([], [PRIMARY, PRIMARY], [PRIMARY, ""], [" openai/gpt-4o"]):
        with pytest.raises(PolicyError):
            validate_chain(bad)


def test_as_failure_stats_accepts_dicts_and_objects():
    out = as_failure_stats({"a/x": {"failed": 3, "total": 9}, "b/y": SimpleNamespace(failed=1, total=2)})
    assert out == {"a/x": FailureStats(failed=3, total=9), "b/y": FailureStats(failed=1, total=2)}


@pytest.mark.parametrize(
    ("failed", "total", "down"),
    [(5, 10, True), (10, 10, True), (4, 10, False), (9, 9, False), (0, 0, False), (30, 100, False)],
)
def test_failures_need_min_samples_and_the_error_rate(failed, total, down):
    h = _assess(PRIMARY, failed, total, min_samples=10, max_error_rate=0.5)
    assert h.failures_say_down is down and h.down is down
    assert h.error_rate == (failed / total if total else None)


@pytest.mark.parametrize(("indicator", "down"), [("none", False), ("minor", False), ("major", True), ("critical", True)])
def test_status_page_major_or_critical_is_down(indicator, down):
    h = _assess(PRIMARY, indicator=indicator)
    assert h.status_says_down is down and h.down is down and h.indicator == indicator


@pytest.mark.parametrize(
    ("evidence", "fail", "status", "down", "clean"),
    [
        ("any", True, False, True, False),
        ("any", False, True, True, False),
        ("any", False, False, False, True),
        ("both", True, False, False, False),  # not down, but not a clean fallback either
        ("both", True, True, True, False),
        ("failures", False, True, False, True),  # status pages ignored
        ("failures", True, False, True, False),
        ("status", True, False, False, True),  # failures ignored
        ("status", False, True, True, False),
    ],
)
def test_evidence_modes(evidence, fail, status, down, clean):
    h = _assess(
        PRIMARY,
        failed=10 if fail else 0,
        total=10,
        indicator="major" if status else "none",
        evidence=evidence,
    )
    assert (h.down, h.clean) == (down, clean)


def test_positive_health_needs_status_none_or_good_samples():
    assert _assess(PRIMARY, indicator="none").positively_healthy
    assert _assess(PRIMARY, failed=1, total=20).positively_healthy  # good traffic, no status page
    assert not _assess(PRIMARY).positively_healthy  # no evidence at all
    assert not _assess(PRIMARY, indicator="minor").positively_healthy
    assert not _assess(PRIMARY, failed=1, total=5).positively_healthy  # too few samples


def _health(**by_model: ModelHealth) -> dict[str, ModelHealth]:
    return {h.model: h for h in by_model.values()}


def test_failover_stays_while_current_is_not_down():
    d = decide_failover(current=PRIMARY, chain=CHAIN, health=_health(p=_assess(PRIMARY, 2, 20)))
    assert d.action == "stay" and d.target is None and "not down" in d.reason


def test_failover_picks_first_clean_fallback_in_chain_order():
    health = _health(
        p=_assess(PRIMARY, 20, 20),
        b=_assess(BACKUP, indicator="major"),
        t=_assess(THIRD, indicator="none"),
    )
    d = decide_failover(current=PRIMARY, chain=CHAIN, health=health)
    assert d.action == "failover" and d.target == THIRD
    assert "20/20" in d.reason and PRIMARY in d.reason


def test_failover_from_a_fallback_may_return_to_the_primary():
    health = _health(p=_assess(PRIMARY, indicator="none"), b=_assess(BACKUP, 15, 15))
    d = decide_failover(current=BACKUP, chain=[PRIMARY, BACKUP], health=health)
    assert (d.action, d.target) == ("failover", PRIMARY)


def test_failover_without_healthy_fallback_says_so():
    health = _health(p=_assess(PRIMARY, indicator="critical"), b=_assess(BACKUP, indicator="major"))
    d = decide_failover(current=PRIMARY, chain=[PRIMARY, BACKUP], health=health)
    assert d.action == "no-fallback" and d.target is None and "no other model" in d.reason


def test_failover_when_env_unset_does_nothing():
    d = decide_failover(current=None, chain=CHAIN, health={})
    assert d.action == "stay" and "not set" in d.reason


def test_failover_current_outside_the_chain_still_fails_over():
    health = _health(x=_assess("cohere/command", indicator="major"), p=_assess(PRIMARY, indicator="none"))
    d = decide_failover(current="cohere/command", chain=CHAIN, health=health)
    assert (d.action, d.target) == ("failover", PRIMARY)


def _failback(health: ModelHealth, since, *, current=BACKUP, minutes=30):
    return decide_failback(
        current=current, primary=PRIMARY, primary_health=health, healthy_since=since, now=NOW,
        healthy_for=timedelta(minutes=minutes),
    )


def test_failback_noop_on_primary():
    d = _failback(_assess(PRIMARY, indicator="none"), None, current=PRIMARY)
    assert d.action == "on-primary" and d.healthy_since is None


def test_failback_primary_unhealthy_forgets_since():
    d = _failback(_assess(PRIMARY, indicator="major"), NOW - timedelta(hours=1))
    assert d.action == "primary-unhealthy" and d.healthy_since is None


def test_failback_without_positive_evidence_forgets_since():
    d = _failback(_assess(PRIMARY), NOW - timedelta(hours=1))
    assert d.action == "no-evidence" and d.healthy_since is None


def test_failback_starts_the_clock_then_waits():
    first = _failback(_assess(PRIMARY, indicator="none"), None)
    assert first.action == "wait" and first.healthy_since == NOW
    later = _failback(_assess(PRIMARY, indicator="none"), NOW - timedelta(minutes=10))
    assert later.action == "wait" and later.healthy_since == NOW - timedelta(minutes=10)
    assert "10.0 min of 30.0 min" in later.reason


def test_failback_after_healthy_for_long_enough():
    d = _failback(_assess(PRIMARY, indicator="none"), NOW - timedelta(minutes=30))
    assert d.action == "failback" and d.healthy_since == NOW - timedelta(minutes=30)


def test_failback_future_since_is_treated_as_now():
    d = _failback(_assess(PRIMARY, indicator="none"), NOW + timedelta(hours=2))
    assert d.action == "wait" and d.healthy_since == NOW


def test_failback_zero_wait_fails_back_at_once():
    assert _failback(_assess(PRIMARY, indicator="none"), None, minutes=0).action == "failback"


@pytest.mark.parametrize(
    ("failed", "total", "ok", "says"),
    [
        (0, 5, True, "0/5 LLM steps of `anthropic/claude-sonnet-4-20250514` failed since the switch (0% < 50%)"),
        (2, 5, True, "2/5"),  # 40% < 50%
        (3, 6, False, "3/6 LLM steps of `anthropic/claude-sonnet-4-20250514` failed since the switch (50% >= 50%)"),
        (0, 4, False, "only 4 LLM steps"),  # too few to confirm, even all good
        (0, 0, False, "only 0 LLM steps"),  # no traffic: not verified
    ],
)
def test_new_model_needs_enough_steps_failing_below_the_threshold(failed, total, ok, says):
    verified, evidence = judge_new_model(model=BACKUP, stats=FailureStats(failed=failed, total=total), min_steps=5,
                                         max_error_rate=0.5)
    assert verified is ok and says in evidence


@given(failed=st.integers(0, 100), extra=st.integers(0, 100), min_steps=st.integers(1, 50), rate=st.floats(0.01, 1.0))
def test_new_model_verdict_invariants(failed, extra, min_steps, rate):
    total = failed + extra
    verified, _ = judge_new_model(model=BACKUP, stats=FailureStats(failed=failed, total=total), min_steps=min_steps,
                                  max_error_rate=rate)
    assert verified == (total >= min_steps and failed / total < rate)


@given(
    failed=st.integers(0, 200),
    extra=st.integers(0, 200),
    min_samples=st.integers(1, 100),
    rate=st.floats(0.01, 1.0),
    indicator=st.sampled_from(["none", "minor", "major", "critical", "unknown"]),
    evidence=st.sampled_from(["any", "both", "failures", "status"]),
)
def test_policy_invariants(failed, extra, min_samples, rate, indicator, evidence):
    total = failed + extra
    h = assess_model(
        model=PRIMARY,
        failures={PRIMARY: FailureStats(failed=failed, total=total)},
        statuses=_status(openai=indicator),
        thresholds=Thresholds(min_samples=min_samples, max_error_rate=rate, evidence=evidence),
    )
    assert not (h.down and h.clean)  # a down model is never a clean fallback
    assert not h.positively_healthy or h.clean
    if total < min_samples:
        assert not h.failures_say_down
    # a down current model never fails over to itself or to a model that is not clean
    other = _assess(BACKUP, indicator=indicator)
    d = decide_failover(current=PRIMARY, chain=[PRIMARY, BACKUP], health={PRIMARY: h, BACKUP: other})
    assert d.target != PRIMARY
    if d.action == "failover":
        assert h.down and other.clean
