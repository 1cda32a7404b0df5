"""The typed result every flow returns, and the rule that turns what was verified into its outcome.

A flow records what it observed and decided (tables and notes), each action it took (``Action``, with a
typed status) and each check it verified (``Check``, ok or not, per target). ``RecoveryResult.outcome`` is
computed from those alone: an action that failed makes it ``failed``; anything done must be verified by at
least one check (no check, or no target with all its checks holding, is ``not_verified``; some targets
verified and some not — or refused — is ``partial``). Nothing parses a report
to learn an outcome: triage, metrics and notifications read this model.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, Field, computed_field

T = TypeVar("T")


class Outcome(StrEnum):
    """How a run ended, from what it verified."""

    RECOVERED = "recovered"  # acted, and every check passed
    NOTHING_TO_DO = "nothing_to_do"  # nothing needed doing (and the checks, if any, passed)
    DRY_RUN = "dry_run"  # would have acted; changed nothing
    REFUSED = "refused"  # the guard said no (kill switch, cooldown, budget, safety rule)
    PARTIAL = "partial"  # acted; some checks passed, some did not (or some targets were refused)
    NOT_VERIFIED = "not_verified"  # acted (or needed to), verification failed
    FAILED = "failed"  # an action or the run itself failed

    @property
    def failing(self) -> bool:
        """Outcomes that end the Prefect flow run Failed (after its report is published)."""
        return self in (Outcome.PARTIAL, Outcome.NOT_VERIFIED, Outcome.FAILED)


class ActionStatus(StrEnum):
    """What became of one action."""

    DONE = "done"  # it changed the system
    UNCHANGED = "unchanged"  # idempotent no-op: the system already was as wanted (needs no verification)
    DRY_RUN = "dry_run"  # previewed only
    REFUSED = "refused"  # the guard said no
    FAILED = "failed"  # it raised or the system said no


class Action(BaseModel):
    """One thing a flow did (or would do) to one target, with a count for bulk moves."""

    kind: str
    target: str
    status: ActionStatus
    count: int | None = None
    detail: str = ""


class Check(BaseModel):
    """One verification: what was checked (of which target, when a run has several), whether it held, and
    the evidence. A target is verified when all of its checks hold."""

    name: str
    ok: bool
    detail: str = ""
    target: str = ""


class Table(BaseModel):
    """A captioned table of rows for the report (rendered by ``tasks.report``)."""

    caption: str = ""
    rows: list[dict[str, Any]] = Field(default_factory=list)


Block = Table | str


class RecoveryResult(BaseModel):
    """What one flow run observed, decided, did and verified; its outcome follows from those.

    Flows subclass it for their own typed fields; the report is rendered from it by ``tasks.report``.
    """

    flow: str
    title: str
    dry_run: bool = False
    observed: list[Block] = Field(default_factory=list)
    decided: list[Block] = Field(default_factory=list)
    actions: list[Action] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    error: str | None = None
    #: set by a flow that had something to do but could not do it for a reason no action records
    blocked: str | None = None

    def act(self, kind: str, target: str, status: ActionStatus, *, count: int | None = None, detail: str = "") -> Action:
        """Record one action and return it."""
        action = Action(kind=kind, target=target, status=status, count=count, detail=detail)
        self.actions.append(action)
        return action

    def perform(
        self,
        kind: str,
        target: str,
        call: Callable[[], T],
        *,
        dry_run: bool,
        count: Callable[[T], int | None] | None = None,
        detail: Callable[[T], str] | None = None,
    ) -> T | None:
        """Run one guarded action and record it: done / unchanged (``changed`` False) / dry run; a ``Refused``
        is recorded as refused and a ``RecoveryError`` as failed (the flow goes on to verify and report)."""
        from tasks.errors import RecoveryError, Refused

        try:
            value = call()
        except Refused as e:
            self.act(kind, target, ActionStatus.REFUSED, detail=str(e))
            return None
        except RecoveryError as e:
            self.act(kind, target, ActionStatus.FAILED, detail=str(e))
            return None
        if dry_run:
            status = ActionStatus.DRY_RUN
        else:
            status = ActionStatus.UNCHANGED if getattr(value, "changed", True) is False else ActionStatus.DONE
        self.act(kind, target, status, count=count(value) if count else None, detail=detail(value) if detail else "")
        return value

    def check(self, name: str, ok: bool, detail: str = "", *, target: str = "") -> bool:
        """Record one verification (of ``target``, if the run has several) and return whether it held."""
        self.checks.append(Check(name=name, ok=bool(ok), detail=detail, target=target))
        return bool(ok)

    def note(self, section: str, block: Block) -> None:
        """Add a note or table to ``observed`` or ``decided``."""
        getattr(self, section).append(block)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def outcome(self) -> Outcome:
        return decide_outcome(actions=self.actions, checks=self.checks, error=self.error, blocked=self.blocked)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def cause(self) -> str:
        """One line saying why the run ended as it did (for logs, the Failed state's message, notifications)."""
        if self.error:
            return self.error
        failed = [a for a in self.actions if a.status == ActionStatus.FAILED]
        if failed:
            return f"{failed[0].kind} {failed[0].target} failed: {failed[0].detail}"
        if self.failed_checks:
            c = self.failed_checks[0]
            return f"not verified: {c.name}" + (f" ({c.detail})" if c.detail else "")
        refused = [a for a in self.actions if a.status == ActionStatus.REFUSED]
        if refused:
            return f"refused: {refused[0].detail or refused[0].kind}"
        if self.blocked:
            return self.blocked
        return str(self.outcome)


def decide_outcome(
    *, actions: list[Action], checks: list[Check], error: str | None = None, blocked: str | None = None
) -> Outcome:
    """Pure: the outcome from what was done and verified (see the module docstring)."""
    statuses = {a.status for a in actions}
    if error or ActionStatus.FAILED in statuses:
        return Outcome.FAILED
    checks_ok = all(c.ok for c in checks)
    if ActionStatus.DONE in statuses:  # only a change must be verified; an idempotent no-op changed nothing
        verified = {c.target: True for c in checks}
        for c in checks:
            verified[c.target] = verified[c.target] and c.ok
        if not any(verified.values()):
            return Outcome.NOT_VERIFIED
        if not all(verified.values()) or ActionStatus.REFUSED in statuses:
            return Outcome.PARTIAL
        return Outcome.RECOVERED
    if ActionStatus.REFUSED in statuses:
        return Outcome.REFUSED
    if ActionStatus.DRY_RUN in statuses:
        return Outcome.DRY_RUN
    if blocked or not checks_ok:
        return Outcome.NOT_VERIFIED
    return Outcome.NOTHING_TO_DO
