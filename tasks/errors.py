"""One error root and one retry policy for every task module.

Each system's errors (``KubeError``, ``QueueError``, ``RunsError``, ``GatewayError``, ``ProbeError``,
``AlertingError``) derive from ``RecoveryError``; ``temporary`` says whether a retry can fix it. Every task
retries through ``RETRY`` (Prefect retries, exponential back-off with jitter, temporary errors only), so no
module keeps its own retry function.
"""

from __future__ import annotations

from typing import Any

import redis
from prefect.cache_policies import NO_CACHE

from tasks.report import scrub
from tasks.settings import get_settings


class RecoveryError(Exception):
    """Root of every error a task raises on purpose; ``temporary`` errors are retried, others are not.

    Messages are scrubbed of credentials, so they may be shown in reports, logs and events.
    """

    temporary: bool = False

    def __init__(self, message: str, *, temporary: bool | None = None, status: int | None = None) -> None:
        super().__init__(scrub(message))
        if temporary is not None:
            self.temporary = temporary
        self.status = status


class Refused(RecoveryError):
    """The guard said no (kill switch, cooldown, budget): a reported outcome, never retried."""


def is_temporary(error: BaseException) -> bool:
    """Whether a retry may fix ``error``: a temporary ``RecoveryError`` or a lost Redis connection."""
    if isinstance(error, RecoveryError):
        return error.temporary
    return isinstance(error, redis.ConnectionError | redis.TimeoutError)


def retry_if_temporary(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when it failed for a temporary reason."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - classify whatever the task raised
        return is_temporary(e)
    return False


# Delays are part of each @task's definition, so they are read once, at import (FD_RETRY_DELAYS_S).
RETRY_DELAYS_S: list[float] = list(get_settings().retry_delays_s)

#: the one retry policy: ``@task(name=..., **RETRY)``
RETRY: dict[str, Any] = {
    "retries": len(RETRY_DELAYS_S),
    "retry_delay_seconds": RETRY_DELAYS_S or 0,
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_if_temporary,
    "cache_policy": NO_CACHE,
}
