"""The guard no mutating task can skip: dry run, kill switch, per-target cooldown, blast-radius budget.

Every function that changes a system is declared with ``@guarded(...)`` (under its ``@task``): it takes a
required ``dry_run`` keyword, and unless it is a dry run the decorator asks the guard before the body runs —
kill switch, then the target's cooldown and the budget when declared. A refusal raises ``Refused`` (a reported
outcome, never retried) and nothing changes. A body that raises, or returns ``changed`` False, took no effect:
its cooldown and budget slot are given back, so a failed action never blocks the next attempt. ``GUARDED``
lists every such function, so a test can walk them all.

Budgets are Prefect global concurrency limits used as rate limits (slot decay), created on first use and
acquired with ``strict=True`` so a missing limit can never silently allow everything.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel

from tasks.connections import redis_client
from tasks.errors import Refused
from tasks.settings import Settings

log = logging.getLogger(__name__)


class Verdict(BaseModel):
    """Whether a mutating step may act, and why (shown in reports)."""

    allowed: bool
    reason: str
    dry_run: bool = False

    @property
    def refused(self) -> bool:
        return not self.allowed


@dataclass(frozen=True)
class Budget:
    """A blast-radius budget: at most ``limit`` actions per ``per_seconds`` (a decaying Prefect limit)."""

    name: str
    limit: int
    per_seconds: float

    @property
    def slot_decay_per_second(self) -> float:
        return self.limit / self.per_seconds if self.limit else 0.0


def pod_deletion_budget(settings: Settings) -> Budget:
    return Budget(
        name=f"{settings.budget_prefix}-pod-deletions", limit=settings.pod_deletions_per_hour, per_seconds=3600
    )


def llm_failover_budget(settings: Settings) -> Budget:
    return Budget(name=f"{settings.budget_prefix}-llm-failover", limit=settings.failovers_per_15_min, per_seconds=900)


def is_truthy(value: object) -> bool:
    """Interpret a Prefect Variable's value as a switch (true, "true", "1", "yes", "on")."""
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes", "on", "paused"}
    return bool(value)


def kill_switch_engaged(*, settings: Settings) -> bool:
    """True when the kill-switch Prefect Variable is set: every mutating step must refuse."""
    from prefect.variables import Variable

    return is_truthy(Variable.get(settings.kill_switch_variable, default=False))


def may_remove_worker(*, ready_workers: int, min_healthy_workers: int) -> bool:
    """Pure rule: removing one Ready worker must leave at least ``min_healthy_workers`` Ready."""
    return ready_workers - 1 >= min_healthy_workers


def _cooldown_key(settings: Settings, action: str, target: str) -> str:
    return f"{settings.state_prefix}:cooldown:{action}:{target}"


def ensure_budget(budget: Budget) -> None:
    """Create the budget's global concurrency limit if it does not exist yet (idempotent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(budget.name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=budget.name, limit=budget.limit, slot_decay_per_second=budget.slot_decay_per_second
                )
            )


def budget_has_room(budget: Budget) -> bool:
    """Whether the budget's limit has a free slot now (slot decay applied); creates or updates the limit to match."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(budget.name)
        except ObjectNotFound:
            ensure_budget(budget)
            return budget.limit > 0
        if limit.limit != budget.limit or limit.slot_decay_per_second != budget.slot_decay_per_second:
            # the operator changed the budget's setting: the limit follows it
            client.update_global_concurrency_limit(
                budget.name,
                GlobalConcurrencyLimitUpdate(limit=budget.limit, slot_decay_per_second=budget.slot_decay_per_second),
            )
            limit.limit = budget.limit
    elapsed = max((datetime.now(UTC) - limit.updated).total_seconds(), 0.0) if limit.updated else 0.0
    active = max(0.0, limit.active_slots - math.floor((limit.slot_decay_per_second or 0.0) * elapsed))
    return active + 1 <= limit.limit


def _spend(budget: Budget, *, wait_s: float) -> bool:
    """Take one slot of the budget, or return False if it is exhausted.

    An exhausted budget is refused at once (read first); otherwise the slot is acquired strictly, waiting up to
    ``wait_s`` so a slow Prefect API is not mistaken for an exhausted budget.
    """
    from prefect.concurrency.sync import rate_limit

    if budget.limit <= 0 or not budget_has_room(budget):
        return False
    try:
        rate_limit(budget.name, occupy=1, timeout_seconds=wait_s, strict=True)
    except TimeoutError:
        return False
    return True


def check(
    *,
    action: str,
    target: str,
    dry_run: bool,
    settings: Settings,
    budget: Budget | None = None,
    cooldown_s: int | None = None,
) -> Verdict:
    """Ask whether ``action`` on ``target`` may happen now; on yes, the cooldown and budget are spent.

    Order: kill switch, dry run, cooldown (so repeated alerts do not spend budget), budget.
    """
    what = f"{action} {target}"
    if kill_switch_engaged(settings=settings):
        return Verdict(allowed=False, reason=f"refused: kill switch `{settings.kill_switch_variable}` is on")
    if dry_run:
        return Verdict(allowed=False, dry_run=True, reason=f"dry run: would {what}")
    cooldown = settings.target_cooldown_s if cooldown_s is None else cooldown_s
    key = _cooldown_key(settings, action, target)
    client = redis_client(settings)
    if cooldown > 0 and not client.set(key, "1", nx=True, ex=cooldown):
        ttl = client.ttl(key)
        return Verdict(allowed=False, reason=f"refused: {what} already done recently (cooldown, {ttl}s left)")
    if budget is not None and not _spend(budget, wait_s=settings.budget_wait_s):
        if cooldown > 0:
            client.delete(key)
        return Verdict(
            allowed=False,
            reason=f"refused: budget `{budget.name}` exhausted ({budget.limit} per {budget.per_seconds:g}s)",
        )
    return Verdict(allowed=True, reason=f"allowed: {what}")


# ------------------------------------------------------------------------------ the decorator

F = TypeVar("F", bound=Callable[..., Any])

#: every guarded function by action name (filled at import by ``@guarded``)
GUARDED: dict[str, Callable[..., Any]] = {}


def _release_cooldown(*, settings: Settings, action: str, target: str) -> None:
    redis_client(settings).delete(_cooldown_key(settings, action, target))


def _refund(budget: Budget) -> None:
    """Give one slot back to a budget (an action that failed or changed nothing took no effect)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.release_concurrency_slots(names=[budget.name], slots=1, occupancy_seconds=0.001)


def _give_back(*, settings: Settings, action: str, target: str, cooldown: bool, budget: Budget | None) -> None:
    """Undo what ``authorize`` spent for an action that took no effect (best effort: never hides the cause)."""
    try:
        if cooldown and settings.target_cooldown_s > 0:
            _release_cooldown(settings=settings, action=action, target=target)
        if budget is not None and budget.limit > 0:
            _refund(budget)
    except Exception as e:  # noqa: BLE001 - the action's own outcome matters more than the refund
        log.warning("could not give back the cooldown/budget of %s %s: %s", action, target, e)


def authorize(
    *, action: str, target: str, settings: Settings, budget: Budget | None = None, cooldown_s: int | None = None
) -> None:
    """Ask the guard for one real action; raise ``Refused`` with the reason when it says no.

    Order: kill switch, cooldown (so repeated alerts do not spend budget), budget. On yes the cooldown and one
    budget slot are taken.
    """
    verdict = check(action=action, target=target, dry_run=False, settings=settings, budget=budget,
                    cooldown_s=cooldown_s)
    if verdict.refused:
        raise Refused(verdict.reason.removeprefix("refused: "))


def guarded(
    action: str,
    *,
    target: Callable[[Mapping[str, Any]], str] | None = None,
    budget: Callable[[Settings], Budget] | None = None,
    cooldown: bool = False,
) -> Callable[[F], F]:
    """Declare ``fn`` as changing a system (see the module docstring).

    ``target`` names what it acts on from its keyword arguments (for the cooldown and the report); ``budget``
    picks the blast-radius budget it spends; ``cooldown`` makes it act on one target at most once per
    ``FD_TARGET_COOLDOWN_S``. The function must take keyword-only ``settings`` and ``dry_run`` (no default).
    """

    def decorate(fn: F) -> F:
        params = inspect.signature(fn).parameters
        for name in ("settings", "dry_run"):
            p = params.get(name)
            if p is None or p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is not inspect.Parameter.empty:
                raise TypeError(f"@guarded {fn.__name__}: needs a keyword-only `{name}` without a default")

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            if "dry_run" not in kwargs or "settings" not in kwargs:
                raise TypeError(f"{fn.__name__}() changes a system: pass settings= and dry_run= explicitly")
            if kwargs["dry_run"]:
                return fn(**kwargs)
            settings: Settings = kwargs["settings"]
            what = target(kwargs) if target else "-"
            spends = budget(settings) if budget else None
            authorize(action=action, target=what, settings=settings, budget=spends,
                      cooldown_s=None if cooldown else 0)
            try:
                value = fn(**kwargs)
            except BaseException:
                _give_back(settings=settings, action=action, target=what, cooldown=cooldown, budget=spends)
                raise
            if getattr(value, "changed", True) is False:  # a no-op took no effect
                _give_back(settings=settings, action=action, target=what, cooldown=cooldown, budget=spends)
            return value

        wrapper.guard_action = action  # type: ignore[attr-defined]
        GUARDED[action] = wrapper
        return wrapper  # type: ignore[return-value]

    return decorate
