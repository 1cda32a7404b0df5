"""The alerting check (bridge heartbeat / Alertmanager API) through respx, and the checklist's human items."""

from datetime import UTC, datetime, timedelta

import httpx
import pytest
import respx

from flows.post_recovery_check import (
    PREVENTION,
    ROOT_CAUSE,
    HumanChecklist,
    alerting_item,
    human_items,
    person_rows,
)
from tasks.alerting import AlertingError, AlertingStatus, check_alerting, heartbeat_age_s, judge_heartbeat
from tasks.correlate import ChecklistItem
from tasks.settings import Settings

NOW = datetime(2026, 11, 27, 21, 0, tzinfo=UTC)


def test_heartbeat_age_reads_the_bridge_shape_and_common_variants():
    assert heartbeat_age_s({"last_seen": None, "age_s": None}, now=NOW) is None
    assert heartbeat_age_s({"last_seen": "2026-11-27T20:59:00+00:00", "age_s": 60.0}, now=NOW) == 60.0
    assert heartbeat_age_s({"last_seen": "2026-11-27T20:58:00Z"}, now=NOW) == 120.0
    assert heartbeat_age_s({"heartbeat": {"at": (NOW - timedelta(seconds=5)).isoformat()}}, now=NOW) == 5.0
    assert heartbeat_age_s(["not", "a", "dict"], now=NOW) is None


def test_judge_heartbeat_ticks_only_a_recent_one():
    assert judge_heartbeat(payload={"age_s": 30}, now=NOW, max_age_s=300).ok is True
    stale = judge_heartbeat(payload={"age_s": 3000}, now=NOW, max_age_s=300)
    assert stale.ok is False and "older than" in stale.evidence
    never = judge_heartbeat(payload={"last_seen": None, "age_s": None}, now=NOW, max_age_s=300)
    assert never.ok is False and "no heartbeat" in never.evidence


@respx.mock
def test_check_alerting_bridge_and_alertmanager_modes():
    s = Settings(bridge_heartbeat_url="http://bridge.test/heartbeat", alertmanager_url="http://user:pw@am.test:9093")
    respx.get("http://bridge.test/heartbeat").mock(return_value=httpx.Response(200, json={"age_s": 12.5}))
    ok = check_alerting.fn(settings=s, now=NOW)
    assert ok.ok is True and ok.mode == "bridge"
    respx.get("http://user:pw@am.test:9093/api/v2/status").mock(
        return_value=httpx.Response(200, json={"versionInfo": {"version": "0.25.0"}}))
    respx.get("http://user:pw@am.test:9093/api/v2/alerts").mock(
        return_value=httpx.Response(200, json=[{"labels": {"alertname": "Watchdog"}}]))
    am = check_alerting.fn(settings=s, mode="alertmanager", now=NOW)
    assert am.ok is True and "0.25.0" in am.evidence and "heartbeat alert active" in am.evidence
    assert "pw" not in am.evidence
    assert check_alerting.fn(settings=s, mode="none").ok is None


@respx.mock
def test_check_alerting_failures_are_clear():
    s = Settings(bridge_heartbeat_url="http://bridge.test/heartbeat")
    respx.get("http://bridge.test/heartbeat").mock(return_value=httpx.Response(503))
    with pytest.raises(AlertingError, match="503"):
        check_alerting.fn(settings=s, now=NOW)
    respx.get("http://bridge.test/heartbeat").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(AlertingError, match="cannot reach"):
        check_alerting.fn(settings=s, now=NOW)
    assert check_alerting.fn(settings=Settings(), mode="alertmanager").ok is False  # no URL configured


def test_human_items_open_unless_confirmed():
    assert [i.ok for i in human_items(None, asked=False)] == [None, None]
    assert "timed out" in human_items(None, asked=True)[0].evidence
    answer = HumanChecklist(root_cause_documented=True, root_cause_link="INC-42", preventive_measures_identified=False)
    items = human_items(answer, asked=True)
    assert items[0].ok is True and "INC-42" in items[0].evidence and items[1].ok is None


def test_the_person_table_lists_the_human_items_and_open_checks_only():
    items = [
        ChecklistItem(item="A", ok=True, evidence="e1"),
        ChecklistItem(item="B", ok=False, evidence="e2"),
        ChecklistItem(item="C", ok=None, evidence="alerting check disabled"),
        ChecklistItem(item=ROOT_CAUSE, ok=True, evidence="confirmed by the operator (INC-1)"),
        ChecklistItem(item=PREVENTION, ok=None, evidence="not yet"),
    ]
    rows = person_rows(items)
    assert [(r["item"], r["status"]) for r in rows] == [("C", "open"), (ROOT_CAUSE, "confirmed"), (PREVENTION, "open")]
    assert all("**" not in str(v) for r in rows for v in r.values())


def test_an_unreachable_alerting_endpoint_is_a_failing_item_not_a_crash(mocker):
    ask = mocker.patch("flows.post_recovery_check.check_alerting",
                       side_effect=AlertingError("cannot reach http://bridge.test/heartbeat: ConnectError"))
    item = alerting_item(settings=Settings(), mode="bridge")
    assert item.item == "Alerting confirmed working" and item.ok is False and "cannot reach" in item.evidence
    ask.return_value, ask.side_effect = AlertingStatus(mode="none", ok=None, evidence="disabled"), None
    assert alerting_item(settings=Settings(), mode="none").ok is None
