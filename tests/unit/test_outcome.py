"""The outcome follows from what was verified, never from what was attempted; the one renderer shows it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.errors import RecoveryError, Refused
from tasks.outcome import Action, ActionStatus, Check, Outcome, RecoveryResult, Table, decide_outcome
from tasks.report import render

S = ActionStatus


def acts(*statuses: ActionStatus) -> list[Action]:
    return [Action(kind="k", target=f"t{i}", status=s) for i, s in enumerate(statuses)]


def checks(*oks: bool, target: str = "") -> list[Check]:
    return [Check(name=f"c{i}", ok=ok, target=target) for i, ok in enumerate(oks)]


@pytest.mark.parametrize(
    ("actions", "verified", "expected"),
    [
        (acts(), [], Outcome.NOTHING_TO_DO),
        (acts(), checks(True), Outcome.NOTHING_TO_DO),
        (acts(), checks(False), Outcome.NOT_VERIFIED),  # a read-only check that fails
        (acts(S.DRY_RUN), [], Outcome.DRY_RUN),
        (acts(S.REFUSED), [], Outcome.REFUSED),
        (acts(S.REFUSED, S.DRY_RUN), [], Outcome.REFUSED),
        (acts(S.DONE), [], Outcome.NOT_VERIFIED),  # acted, verified nothing: never green
        (acts(S.DONE), checks(True, True), Outcome.RECOVERED),
        (acts(S.UNCHANGED), checks(True), Outcome.NOTHING_TO_DO),  # already as wanted
        (acts(S.UNCHANGED), [], Outcome.NOTHING_TO_DO),
        (acts(S.UNCHANGED, S.DONE), checks(True), Outcome.RECOVERED),
        (acts(S.DONE), checks(True, False), Outcome.NOT_VERIFIED),  # one target, one check failing
        (acts(S.DONE), checks(False), Outcome.NOT_VERIFIED),
        (acts(S.DONE, S.REFUSED), checks(True), Outcome.PARTIAL),
        (acts(S.DONE, S.FAILED), checks(True), Outcome.FAILED),
        (acts(S.DONE), checks(True, target="a") + checks(False, target="b"), Outcome.PARTIAL),
        (acts(S.DONE), checks(True, target="a") + checks(True, target="b"), Outcome.RECOVERED),
    ],
)
def test_outcome_table(actions, verified, expected):
    assert decide_outcome(actions=actions, checks=verified) is expected


def test_an_error_is_failed_whatever_was_verified():
    assert decide_outcome(actions=acts(S.DONE), checks=checks(True), error="boom") is Outcome.FAILED
    assert decide_outcome(actions=[], checks=[], blocked="no fallback model") is Outcome.NOT_VERIFIED


@given(
    statuses=st.lists(st.sampled_from(list(ActionStatus)), max_size=6),
    oks=st.lists(st.tuples(st.booleans(), st.sampled_from(["", "a", "b"])), max_size=6),
)
def test_green_only_when_everything_acted_on_was_verified(statuses, oks):
    verified = [Check(name="c", ok=ok, target=t) for ok, t in oks]
    outcome = decide_outcome(actions=acts(*statuses), checks=verified)
    if outcome is Outcome.RECOVERED:
        assert verified and all(c.ok for c in verified)
        assert not {S.FAILED, S.REFUSED} & set(statuses)
    if S.FAILED in statuses:
        assert outcome is Outcome.FAILED
    assert outcome.failing == (outcome in {Outcome.PARTIAL, Outcome.NOT_VERIFIED, Outcome.FAILED})


def test_perform_records_what_happened():
    r = RecoveryResult(flow="f", title="T")

    class Changed:
        changed = False

    assert r.perform("a", "x", lambda: 3, dry_run=False, count=lambda v: v) == 3
    r.perform("b", "y", Changed, dry_run=False)
    r.perform("c", "z", lambda: None, dry_run=True)
    assert r.perform("d", "w", lambda: (_ for _ in ()).throw(Refused("kill switch on")), dry_run=False) is None
    assert r.perform("e", "v", lambda: (_ for _ in ()).throw(RecoveryError("HTTP 503")), dry_run=False) is None
    assert [(a.kind, a.status, a.count) for a in r.actions] == [
        ("a", S.DONE, 3), ("b", S.UNCHANGED, None), ("c", S.DRY_RUN, None), ("d", S.REFUSED, None),
        ("e", S.FAILED, None)]
    assert r.outcome is Outcome.FAILED and "HTTP 503" in r.cause()
    with pytest.raises(ValueError):  # a bug is not an outcome: it propagates (recording() reports it)
        r.perform("f", "u", lambda: int("x"), dry_run=False)


def test_render_shows_the_outcome_its_cause_and_tables_not_reprs():
    r = RecoveryResult(flow="f", title="Crash recovery: w-1")
    r.note("observed", Table(caption="Pods", rows=[{"pod": "w-1", "ready": False}]))
    r.act("delete-pod", "w-1", S.DONE)
    r.check("replacement Ready", False, "no pod Ready after 180 s", target="w-1")
    md = render(r)
    assert md.startswith("# Crash recovery: w-1\n")
    assert "**Outcome: not_verified** — not verified: replacement Ready (no pod Ready after 180 s)" in md
    assert "| delete-pod | w-1 | done |" in md and "| replacement Ready | ❌ | no pod Ready after 180 s |" in md
    assert "[" not in md.split("## Observed")[1].split("## Done")[0]  # no Python list reprs


def test_render_scrubs_credentials():
    r = RecoveryResult(flow="f", title="t", error="cannot connect to redis://user:s3cret@host:6379/0")
    assert "s3cret" not in render(r)
