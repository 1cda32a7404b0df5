"""Every setting of ferrumdeck-recovery, read from the environment with the prefix ``FD_``.

One class so the README's settings table and the code cannot drift apart. Explicit arguments win:
tasks take a ``Settings`` object, and tests build their own with isolated names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where FerrumDeck's parts live and how the recoveries may act on them (env prefix ``FD_``)."""

    model_config = SettingsConfigDict(env_prefix="FD_", extra="ignore", frozen=True)

    # --- step queue (Redis Streams) ---
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), description="Redis holding the step stream (may hold a password)."
    )
    stream: str = Field("fd:queue:steps", min_length=1, description="Stream the workers read steps from.")
    group: str = Field("workers", min_length=1, description="Consumer group of the workers.")
    dlq_stream: str = Field("fd:queue:dlq", min_length=1, description="Dead-letter stream.")
    dlq_max_age_days: float = Field(
        30.0, ge=0, description="`queue-sweep` trims DLQ entries dead-lettered longer ago than this (0 = keep all)."
    )
    dlq_max_length: int = Field(
        0, ge=0, description="`queue-sweep` trims the oldest DLQ entries beyond this many (0 = no length limit)."
    )
    dlq_trim_per_run: int = Field(
        10_000, ge=1, le=1_000_000, description="At most this many DLQ entries trimmed per `queue-sweep` run."
    )

    # --- runs database ---
    database_url: SecretStr = Field(
        SecretStr("sqlite:///fd-runs.db"),
        description="SQLAlchemy URL of FerrumDeck's runs database (PostgreSQL in production).",
    )
    runs_table: str = Field("runs", description="Table of runs.")
    steps_table: str = Field("steps", description="Table of steps.")
    runs_batch_size: int = Field(
        10000, ge=1, le=30000, description="Rows per page when finding stuck runs and per UPDATE when failing them."
    )

    # --- Kubernetes ---
    kube_context: str | None = Field(None, description="kubeconfig context; default: current or in-cluster.")
    kubeconfig: str | None = Field(
        None, description="kubeconfig path; default: `KUBECONFIG`, then in-cluster, then ~/.kube/config."
    )
    kube_timeout_s: float = Field(10.0, gt=0, description="Timeout of every Kubernetes API call, in seconds.")
    retry_delays_s: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0, 16.0],
        description="Back-off between retries of any task that failed for a temporary reason (Kubernetes 429/5xx, "
        "connection loss, database busy), one retry per entry, with 20% jitter. Read when tasks.errors is imported.",
    )
    hung_cpu_millicores: float = Field(
        5.0, ge=0, description="A Running+Ready worker using less CPU than this is a hang suspect."
    )
    namespace: str = Field("ferrumdeck", description="Namespace of FerrumDeck.")
    worker_deployment: str = Field("worker", description="Deployment running the workers.")
    worker_container: str = Field("worker", description="Container of the worker pods.")
    worker_selector: str = Field("app=worker", description="Label selector of the worker pods.")
    mcp_deployment: str = Field("mcp-server", description="Deployment running the MCP server.")
    consumer_name_template: str = Field(
        "{pod}", description="Redis consumer name of a worker pod; `{pod}` is the pod's name (identity)."
    )

    # --- HTTP services ---
    gateway_url: str = Field("http://gateway:8080", description="FerrumDeck gateway base URL.")
    gateway_api_key: SecretStr | None = Field(None, description="Gateway API key (Bearer).")
    gateway_api_key_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the gateway API key (used if no key is set)."
    )
    gateway_max_attempts: int = Field(
        4, ge=1, le=10, description="Attempts of one gateway call (retries on 429/502/503/504, connection errors)."
    )
    gateway_backoff_s: float = Field(0.5, ge=0, description="First back-off between gateway attempts (doubles).")
    gateway_retry_after_cap_s: float = Field(
        30.0, ge=0, description="Longest `Retry-After` the gateway client honours, in seconds."
    )
    mcp_url: str = Field("http://mcp-server:3000/health", description="MCP server health endpoint.")
    http_timeout_s: float = Field(5.0, gt=0, description="Timeout of every HTTP call, in seconds.")
    llm_fallback_models: list[str] = Field(
        default_factory=lambda: ["openai/gpt-4o", "anthropic/claude-sonnet-4-20250514"],
        description="LLM models in order of preference; the first is the primary.",
    )
    llm_status_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Provider (model prefix, e.g. `openai`) -> Statuspage JSON URL (`/api/v2/status.json`).",
    )
    alertmanager_url: str | None = Field(None, description="Alertmanager base URL for the post-recovery check.")

    # --- LLM failover / failback, MCP recovery, scaling ---
    llm_model_env: str = Field("LITELLM_MODEL", min_length=1, description="Env var of the worker holding the model.")
    llm_failure_window_minutes: int = Field(
        15, ge=1, le=1440, description="Window of recent LLM step results the failover judges a model on."
    )
    llm_failover_min_samples: int = Field(
        10, ge=1, description="Fewest finished LLM steps of a model in the window before its error rate counts."
    )
    llm_failover_error_rate: float = Field(
        0.5, gt=0, le=1, description="Error rate (failed/total LLM steps) at or above which a model is down."
    )
    llm_failover_evidence: str = Field(
        "any",
        pattern="^(any|both|failures|status)$",
        description="What proves the current model down: `any` (failures or status page), `both`, `failures`, `status`.",
    )
    llm_healthy_for_minutes: int = Field(
        30, ge=0, le=1440, description="Failback waits until the primary model has been healthy this long."
    )
    llm_active_model_variable: str = Field(
        "ferrumdeck_active_llm_model", min_length=1, description="Prefect Variable recording the active LLM model."
    )
    llm_healthy_since_variable: str = Field(
        "ferrumdeck_llm_primary_healthy_since",
        min_length=1,
        description="Prefect Variable where failback remembers since when the primary model looks healthy.",
    )
    mcp_check_attempts: int = Field(3, ge=1, le=20, description="Health checks of the MCP server per observation.")
    mcp_check_interval_s: float = Field(1.0, ge=0, le=60, description="Seconds between MCP health checks.")
    mcp_recovery_deadline_s: float = Field(
        120.0, gt=0, le=3600, description="How long to re-check MCP health after a restart before giving up."
    )
    rollout_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="How long the recoveries wait for a Deployment rollout to finish."
    )
    scale_up_replicas: int = Field(10, ge=1, description="Default worker count `scale-workers` scales to (runbook: 10).")

    # --- worker crash / hang recovery, post-recovery check, triage ---
    poison_min_deliveries: int = Field(
        2, ge=2, le=100, description="A crashed consumer's entry delivered this often is a poison suspect (dead-lettered)."
    )
    hang_min_idle_ms: int = Field(
        120_000, ge=0, description="A hang suspect's consumer has not read for this long while holding entries (ms)."
    )
    replacement_timeout_s: float = Field(
        180.0, gt=0, le=3600, description="How long crash/hang recovery waits for a replacement worker to be Ready."
    )
    alerting_check: str = Field(
        "bridge",
        pattern="^(bridge|alertmanager|none)$",
        description="How the post-recovery check confirms alerting: the bridge's heartbeat, Alertmanager's API, or not.",
    )
    bridge_heartbeat_url: str = Field(
        "http://fd-alert-bridge:9095/heartbeat", description="The alert bridge's `GET /heartbeat` (last Watchdog seen)."
    )
    heartbeat_max_age_s: int = Field(
        900, ge=1, description="The bridge's last heartbeat alert must be younger than this to tick 'alerting works'."
    )
    post_check_max_queue_depth: int = Field(
        100, ge=0, description="Queue lag (undelivered steps) at or below which the queue counts as back to normal."
    )
    post_check_consumer_idle_ms: int = Field(
        60_000, ge=0, description="A Ready worker whose consumer read within this (ms) counts as consuming."
    )
    triage_backlog_threshold: int = Field(
        1_000, ge=0, description="Triage plans `scale-workers` when the lag exceeds this and every worker is healthy."
    )

    # --- safety ---
    state_prefix: str = Field(
        "fd:recovery", min_length=1, description="Redis key prefix for the automation's own state (cooldowns)."
    )
    kill_switch_variable: str = Field(
        "ferrumdeck_recovery_paused", description="Prefect Variable; when true every mutating step refuses."
    )
    min_healthy_workers: int = Field(1, ge=0, description="Never take Ready workers below this by our own action.")
    max_replicas: int = Field(20, ge=1, description="Never scale the workers above this.")
    pod_deletions_per_hour: int = Field(3, ge=0, description="Budget of pod deletions/evictions per hour.")
    failovers_per_15_min: int = Field(1, ge=0, description="Budget of LLM failovers per 15 minutes.")
    budget_prefix: str = Field(
        "fd-budget", min_length=1, description="Name prefix of the budgets' Prefect global concurrency limits."
    )
    budget_wait_s: float = Field(
        30.0, gt=0, description="How long a guarded action may wait for a free budget slot on a slow Prefect API."
    )
    target_cooldown_s: int = Field(300, ge=0, description="A target (pod, deployment) is acted on once per this.")

    # --- approval of large blast radii (a person approves the plan in the Prefect UI; tasks/approval.py) ---
    approval_pod_deletions: int = Field(
        5, ge=0, description="A run that would delete/evict more worker pods than this waits for a person's approval."
    )
    approval_dlq_replays: int = Field(
        500, ge=0, description="A `dlq-replay` run that would replay more entries than this waits for approval."
    )
    approval_failed_runs: int = Field(
        50, ge=0, description="A run that would fail more FerrumDeck runs than this waits for a person's approval."
    )
    approval_llm_switch: bool = Field(
        False, description="Every switch of the workers' LLM model (failover, failback) waits for approval."
    )
    approval_timeout_s: float = Field(
        3600.0, gt=0, le=7 * 86_400, description="How long a run waits for approval; no answer = rejected (no change)."
    )
    approval_poll_s: float = Field(
        5.0, gt=0, le=60, description="How often a run waiting for approval checks for the answer, in seconds."
    )

    # --- notifications (Prefect automations + notification blocks; `fd-recovery notifications apply`) ---
    notify_slack_webhook_url: SecretStr | None = Field(
        None, description="Slack incoming webhook URL; set: a Prefect `Slack Webhook` block gets the notifications."
    )
    notify_webhook_url: SecretStr | None = Field(
        None, description="Generic webhook URL; set: a Prefect `Custom Webhook` block POSTs the notifications as JSON."
    )
    notify_webhook_token: SecretStr | None = Field(
        None, description="Bearer token the generic webhook sends (stored as a secret of its block)."
    )
    notify_outcomes: list[str] = Field(
        default_factory=lambda: ["not_verified", "partial", "failed", "refused"],
        description="Recovery outcomes that notify a person (a crashed flow run always does).",
    )
    notify_ui_url: str | None = Field(
        None, description="Prefect UI base URL the messages link runs to; default: Prefect's UI URL (from PREFECT_API_URL)."
    )
    notify_name_prefix: str = Field(
        "ferrumdeck-recovery", pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Name prefix of the notification blocks and automations `notifications apply` manages.",
    )

    # --- `fd-recovery serve` surviving its own failures (deployments/inprocess_runner.py, tasks/events.py) ---
    runner_claim_lease_s: float = Field(
        30.0, ge=3, le=600,
        description="A serve replica's claim on a flow run lapses this long after its last renewal (renewed every "
        "third): a replica that died is noticed this long after.",
    )
    runner_zombie_scan_s: float = Field(
        10.0, gt=0, le=300,
        description="How often each serve replica looks for Pending/Running runs whose replica died (claim lapsed); "
        "such a run is Crashed within runner_claim_lease_s + this.",
    )
    runner_rerun_zombies: bool = Field(
        True,
        description="Start a new run (same deployment and parameters) for a run Crashed because its replica died "
        "or stopped; not for scheduled runs (their next slot re-runs them).",
    )
    runner_max_reruns: int = Field(
        2, ge=0, le=10, description="A run already re-run this many times in a row is only Crashed, not re-run again."
    )
    runner_grace_s: float = Field(
        45.0, ge=0, le=3600,
        description="On SIGTERM, running flows get this long to finish (keep it below the pod's "
        "terminationGracePeriodSeconds); the rest are Crashed and re-run by another replica.",
    )
    events_outbox_max: int = Field(
        10_000, ge=0, le=1_000_000,
        description="Recovery events kept in Redis while the Prefect API is unreachable (oldest dropped beyond); "
        "0 = no outbox, Prefect's in-memory buffer only.",
    )
    events_max_age_s: float = Field(
        3600.0, gt=0, description="A recovery event not delivered within this long is dropped (logged), not sent late."
    )

    @field_validator("stream", "group", "dlq_stream")
    @classmethod
    def _no_whitespace(cls, value: str) -> str:
        if value != value.strip() or not value.strip():
            raise ValueError("must be a non-empty name without surrounding whitespace")
        return value

    @field_validator("notify_outcomes")
    @classmethod
    def _known_outcomes(cls, value: list[str]) -> list[str]:
        from tasks.outcome import Outcome

        unknown = [v for v in value if v not in {o.value for o in Outcome}]
        if unknown:
            raise ValueError(f"unknown outcomes {', '.join(unknown)}: use {', '.join(o.value for o in Outcome)}")
        return value

    def consumer_for_pod(self, pod: str) -> str:
        """The Redis consumer name of a worker pod (identity by default)."""
        return self.consumer_name_template.format(pod=pod)


_override: Settings | None = None


@lru_cache(maxsize=1)
def _from_env() -> Settings:
    return Settings()


def get_settings() -> Settings:
    """The settings flows use: the environment's, unless ``use_settings`` put others in force (tests, demo)."""
    return _override if _override is not None else _from_env()


@contextmanager
def use_settings(settings: Settings) -> Iterator[Settings]:
    """Put ``settings`` in force for every flow run in this process until the block ends."""
    global _override
    previous, _override = _override, settings
    try:
        yield settings
    finally:
        _override = previous
