"""flows/_ui.py: what Prefect's form generator makes of a flow's parameters, names Prefect made up vs typed ones,
and the one-line run log of each decision, action and check (no server)."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import pytest
from prefect import flow
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema
from prefect.utilities.names import generate_slug
from pydantic import Field

from flows import _ui
from flows._ui import (
    LoggedResult,
    Setting,
    annotated_descriptions,
    describe_parameters,
    form_fields,
    generated_name,
    humanize,
    keep_typed_name,
    unit_of,
)
from tasks.outcome import ActionStatus, Table
from tasks.settings import Settings


def _example():
    @describe_parameters
    def f(
        pod: Annotated[str | None, Field(max_length=10, title="Crashed pod", description="Which pod.")] = None,
        n: Annotated[int, Field(ge=1, le=5, description="How many.")] = 2,
        replacement_timeout_s: Annotated[float | None, Field(gt=0, le=3600, description="Wait this long."),
                                         Setting("replacement_timeout_s")] = None,
        mode: Annotated[Literal["bridge", "alertmanager", "none"] | None, Field(description="How."),
                        Setting("alerting_check")] = None,
        ids: Annotated[list[str] | None, Field(description="Which ids.")] = None,
        plain: bool = False,
        overrides: Annotated[dict[str, int] | None, Field(description="Per name.")] = None,
    ) -> None:
        """Do it."""

    return f


def test_titles_units_descriptions_and_bounds_reach_the_parameter_schema():
    props = parameter_schema(_example()).model_dump()["properties"]
    assert [p["title"] for p in props.values()] == [
        "Crashed pod", "N", "Replacement timeout (s)", "Mode", "Ids", "Plain", "Overrides"]
    assert props["n"]["description"] == "How many." and (props["n"]["minimum"], props["n"]["maximum"]) == (1, 5)
    assert props["replacement_timeout_s"]["exclusiveMinimum"] == 0 and props["replacement_timeout_s"]["maximum"] == 3600
    assert props["pod"]["maxLength"] == 10
    assert annotated_descriptions(_example()) == {
        "pod": "Which pod.", "n": "How many.", "replacement_timeout_s": "Wait this long.", "mode": "How.",
        "ids": "Which ids.", "overrides": "Per name."}


def test_a_setting_backed_parameter_shows_the_effective_setting_and_is_a_plain_field():
    props = parameter_schema(_example()).model_dump()["properties"]
    timeout = props["replacement_timeout_s"]
    assert timeout["description"] == "Wait this long. Default: FD_REPLACEMENT_TIMEOUT_S = 180 s."
    assert timeout["type"] == "number" and timeout["default"] == 180.0 and "anyOf" not in timeout
    assert props["mode"]["enum"] == ["bridge", "alertmanager", "none"] and props["mode"]["default"] == "bridge"
    assert props["mode"]["description"].endswith("Default: FD_ALERTING_CHECK = bridge.")
    # optional text and lists: a plain empty field, never the "int / None" switch ('Property is type "None"')
    assert (props["pod"]["type"], props["pod"]["default"]) == ("string", "")
    assert (props["ids"]["type"], props["ids"]["default"]) == ("array", [])
    assert (props["overrides"]["type"], props["overrides"]["default"]) == ("object", {})
    assert not [n for n, p in props.items() if "anyOf" in p or p.get("type") == "null" or p.get("default") is None]
    assert form_fields(_example())["replacement_timeout_s"].setting == Setting("replacement_timeout_s")


def test_the_shown_default_is_the_setting_in_force_where_the_flow_is_loaded(monkeypatch):
    monkeypatch.setattr(_ui, "_effective", lambda s: 42.0 if s.name == "replacement_timeout_s" else "none")
    props = parameter_schema(_example()).model_dump()["properties"]
    assert props["replacement_timeout_s"]["default"] == 42.0
    assert props["replacement_timeout_s"]["description"].endswith("FD_REPLACEMENT_TIMEOUT_S = 42 s.")


def test_none_still_means_the_setting_at_run_time_and_bounds_still_hold():
    f = flow(_example())
    assert f.validate_parameters({}) == {"pod": None, "n": 2, "replacement_timeout_s": None, "mode": None,
                                         "ids": None, "plain": False, "overrides": None}
    assert f.validate_parameters({"replacement_timeout_s": None, "pod": ""})["replacement_timeout_s"] is None
    assert f.validate_parameters({"replacement_timeout_s": 5})["replacement_timeout_s"] == 5.0
    for bad in ({"replacement_timeout_s": 0}, {"replacement_timeout_s": 4000}, {"pod": "x" * 11}, {"mode": "smoke"}):
        with pytest.raises(ParameterTypeError, match="invalid parameters"):
            f.validate_parameters(bad)
    assert _ui.setting(None, Settings(replacement_timeout_s=7), "replacement_timeout_s") == 7
    assert _ui.setting(0.5, Settings(replacement_timeout_s=7), "replacement_timeout_s") == 0.5


def test_a_setting_backed_parameter_must_default_to_none_and_args_are_refused():
    def g(t: Annotated[float | None, Field(description="x"), Setting("replacement_timeout_s")] = 3.0) -> None:
        """Do it."""

    with pytest.raises(ValueError, match="default must be None"):
        describe_parameters(g)

    def h(n: Annotated[int, Field(description="x")] = 1) -> None:
        """Do it.

        Args:
            n: twice described
        """

    with pytest.raises(ValueError, match="Field"):
        describe_parameters(h)


@pytest.mark.parametrize("name,title", [
    ("replacement_timeout_s", "Replacement timeout (s)"), ("hang_min_idle_ms", "Hang min idle (ms)"),
    ("window_minutes", "Window (min)"), ("dry_run", "Dry run"), ("pod", "Pod")])
def test_humanized_titles_carry_the_unit_of_the_name(name, title):
    assert humanize(name) == title


def test_units_are_read_from_titles():
    assert [unit_of(t) for t in ("Timeout (s)", "Max entries (entries)", "Error rate (0-1)", "Dry run")] == [
        "s", "entries", "", ""]


@pytest.mark.parametrize("name", [generate_slug(2) for _ in range(30)] + [
    "omicron912-neural-shift", "rho586-minhiriath", "gamma-canis-majoris-nebula", "alpha-centauri", ""])
def test_names_prefect_makes_up_are_recognised(name):
    assert generated_name(name)


@pytest.mark.parametrize("name", ["Crash drill 3", "recover worker-a (Alice)", "incident-4711", "CrashDrill",
                                  "drill: crash", "recover-worker-7"])
def test_names_a_person_typed_are_not(name):
    assert not generated_name(name)


def test_a_typed_run_name_is_kept_and_a_generated_one_follows_the_template(monkeypatch):
    from prefect.runtime import flow_run

    monkeypatch.setattr(flow_run, "get_parameters", lambda: {"pod": "worker-a", "dry_run": True})
    named = keep_typed_name("recover {pod} dry_run={dry_run}")
    monkeypatch.setattr(flow_run, "get_name", lambda: "Crash drill 3")
    assert named() == "Crash drill 3"
    monkeypatch.setattr(flow_run, "get_name", lambda: "alpha42-lyrae")
    assert named() == "recover worker-a dry_run=True"
    assert keep_typed_name(lambda: "from a callable")() == "from a callable"


def test_each_decision_action_and_check_is_one_readable_log_line(caplog):
    result = LoggedResult(flow="f", title="t")
    with caplog.at_level(logging.INFO, logger="flows"):
        result.note("observed", "not logged: observations are in the report")
        result.note("decided", "replace worker-a:\n   crash-looping")
        result.note("decided", Table(caption="Crashed workers", rows=[{"pod": "a"}, {"pod": "b"}]))
        result.act("delete-pod", "worker-a", ActionStatus.DONE, count=1, detail="deleted")
        result.act("delete-pod", "worker-b", ActionStatus.REFUSED, detail="budget exhausted")
        result.check("Ready replacement", True, "worker-c Ready", target="worker-a")
        result.check("redis url", False, "redis://user:secret@host:6379 down")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("INFO", "decided: replace worker-a: crash-looping"),
        ("INFO", "decided: Crashed workers (2 rows)"),
        ("INFO", "delete-pod worker-a: done (1) — deleted"),
        ("WARNING", "delete-pod worker-b: refused — budget exhausted"),
        ("INFO", "verified ✅ Ready replacement [worker-a]: worker-c Ready"),
        ("WARNING", "verified ❌ redis url: redis://***@host:6379 down"),
    ]
    assert [a.status for a in result.actions] == [ActionStatus.DONE, ActionStatus.REFUSED]
