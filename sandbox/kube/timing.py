"""How fast simulated time runs in the sandbox cluster."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """How fast simulated time runs (seconds). Defaults are fast, for tests; ``Timing.demo()`` is slower."""

    start_delay: float = 0.1  # Pending (ContainerCreating) -> Running
    ready_delay: float = 0.1  # Running -> Ready
    grace: float = 0.1  # Terminating -> gone (a request with gracePeriodSeconds=0 removes at once)
    backoff_base: float = 0.5  # first crash-loop back-off (Kubernetes: 10 s), doubling ...
    backoff_max: float = 5.0  # ... up to this (Kubernetes: 300 s)
    bookmark_interval: float = 1.0  # BOOKMARK events on watches that allow them
    api_timeout: float = 2.0  # a "timeout" fault holds the request this long, then answers 504
    watch_timeout: float = 1800.0  # a watch without timeoutSeconds closes after this
    event_ttl: float = 3600.0  # events are dropped this long after they were last seen (kube-apiserver: 1 h)
    event_prune_interval: float = 10.0  # how often expired events are looked for

    @classmethod
    def demo(cls) -> Timing:
        return cls(start_delay=1.5, ready_delay=2.0, grace=2.0, backoff_base=10.0, backoff_max=60.0,
                   bookmark_interval=10.0, api_timeout=10.0)
