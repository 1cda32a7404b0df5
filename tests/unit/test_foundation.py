"""Pure pieces of the foundation: settings, report rendering, secret scrubbing, guard rules."""

import pytest
from pydantic import ValidationError

from tasks.guard import Budget, is_truthy, may_remove_worker
from tasks.outcome import RecoveryResult, Table
from tasks.report import artifact_key, markdown_table, render, scrub
from tasks.settings import Settings


def test_settings_defaults_match_the_runbook(monkeypatch):
    for var in ("FD_STREAM", "FD_GROUP", "FD_DLQ_STREAM", "FD_REDIS_URL", "FD_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert (s.stream, s.group, s.dlq_stream) == ("fd:queue:steps", "workers", "fd:queue:dlq")
    assert s.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert s.namespace == "ferrumdeck"
    assert s.consumer_for_pod("worker-7d9f-abc12") == "worker-7d9f-abc12"


def test_settings_read_env_and_reject_blank_names(monkeypatch):
    monkeypatch.setenv("FD_STREAM", "other:steps")
    assert Settings().stream == "other:steps"
    with pytest.raises(ValidationError):
        Settings(stream=" ")


def test_secrets_are_not_in_settings_repr():
    s = Settings(redis_url="redis://:hunter2@db:6379/0", gateway_api_key="sk-live-123")
    assert "hunter2" not in repr(s) and "sk-live-123" not in repr(s)


def test_scrub_removes_url_credentials_and_bearer_tokens():
    text = "redis://:hunter2@host:6379/0 and postgresql://u:p@h/db, header Bearer abc.def-123"
    out = scrub(text)
    assert "hunter2" not in out and "u:p" not in out and "abc.def-123" not in out
    assert "redis://***@host:6379/0" in out


def test_report_has_four_sections_and_escapes_cells():
    r = RecoveryResult(flow="queue-sweep", title="queue-sweep")
    r.note("observed", "3 pending")
    r.note("decided", Table(rows=[{"id": "1-0", "why": "a|b"}]))
    md = render(r)
    for section in ("## Observed", "## Decided", "## Done", "## Verified"):
        assert section in md
    assert "a\\|b" in md and "_nothing_" in md


def test_markdown_table_limits_rows():
    md = markdown_table([{"n": i} for i in range(60)], limit=10)
    assert "and 50 more" in md and md.count("\n| ") == 10


def test_artifact_key_is_valid():
    assert artifact_key("Queue Sweep: fd:queue:steps") == "queue-sweep-fd-queue-steps"


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("true", True), ("off", False), (None, False), (0, False)])
def test_kill_switch_values(value, expected):
    assert is_truthy(value) is expected


def test_min_healthy_workers_rule():
    assert may_remove_worker(ready_workers=3, min_healthy_workers=2)
    assert not may_remove_worker(ready_workers=2, min_healthy_workers=2)


def test_budget_decay_spreads_the_limit_over_the_window():
    assert Budget(name="b", limit=3, per_seconds=3600).slot_decay_per_second == pytest.approx(3 / 3600)


def test_readme_lists_every_setting():
    from pathlib import Path

    from deployments.bridge import BridgeSettings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"FD_{name.upper()}" for name in Settings.model_fields if f"FD_{name.upper()}" not in readme]
    missing += [f"FD_BRIDGE_{n.upper()}" for n in BridgeSettings.model_fields if f"FD_BRIDGE_{n.upper()}" not in readme]
    assert missing == []
