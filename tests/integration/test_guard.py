"""The guard against a real Prefect API and real Redis: kill switch, dry run, cooldown, budget."""

import uuid

from prefect.variables import Variable

from tasks.guard import Budget, check


def test_kill_switch_refuses_everything(settings):
    Variable.set(settings.kill_switch_variable, True, overwrite=True)
    try:
        v = check(action="delete-pod", target="w-1", dry_run=False, settings=settings)
        assert not v.allowed and "kill switch" in v.reason
    finally:
        Variable.unset(settings.kill_switch_variable)
    assert check(action="delete-pod", target="w-1", dry_run=False, settings=settings, cooldown_s=0).allowed


def test_dry_run_spends_nothing(settings, redis):
    v = check(action="delete-pod", target="w-2", dry_run=True, settings=settings)
    assert v.dry_run and not v.allowed
    assert list(redis.scan_iter(match=f"{settings.state_prefix}:*")) == []


def test_cooldown_acts_once_per_target(settings):
    first = check(action="delete-pod", target="w-3", dry_run=False, settings=settings, cooldown_s=60)
    again = check(action="delete-pod", target="w-3", dry_run=False, settings=settings, cooldown_s=60)
    other = check(action="delete-pod", target="w-4", dry_run=False, settings=settings, cooldown_s=60)
    assert first.allowed and not again.allowed and "cooldown" in again.reason and other.allowed


def test_budget_allows_three_then_refuses_the_fourth(settings):
    budget = Budget(name=f"fd-test-budget-{uuid.uuid4().hex[:8]}", limit=3, per_seconds=3600)
    verdicts = [
        check(action="delete-pod", target=f"w-{i}", dry_run=False, settings=settings, budget=budget, cooldown_s=60)
        for i in range(4)
    ]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert "budget" in verdicts[3].reason
    # the refused target's cooldown was released, so it can act once the budget refills
    assert check(action="delete-pod", target="w-3", dry_run=False, settings=settings, cooldown_s=60).allowed


def test_budget_follows_a_changed_setting(settings):
    name = f"fd-test-budget-{uuid.uuid4().hex[:8]}"
    one = Budget(name=name, limit=1, per_seconds=3600)
    assert check(action="scale", target="a", dry_run=False, settings=settings, budget=one, cooldown_s=0).allowed
    assert not check(action="scale", target="b", dry_run=False, settings=settings, budget=one, cooldown_s=0).allowed
    two = Budget(name=name, limit=2, per_seconds=3600)  # the operator raised FD_..._PER_HOUR
    assert check(action="scale", target="b", dry_run=False, settings=settings, budget=two, cooldown_s=0).allowed
