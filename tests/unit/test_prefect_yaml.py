"""prefect.yaml is the single source of truth: every entry must point at a real flow with real parameters."""

import inspect

import pytest
from pydantic import TypeAdapter

from deployments.serve import PROJECT_ROOT, read_deployment_specs
from deployments.watch import EVENTS as WATCHER_EVENTS

SPECS = read_deployment_specs()
EXPECTED = {
    "queue-sweep", "dlq-replay", "diagnose-workers", "stuck-runs-sweep", "fail-run", "retry-step",
    "worker-crash-recovery", "worker-hang-recovery", "llm-provider-failover", "llm-provider-failback",
    "mcp-server-recovery", "scale-workers", "post-recovery-check", "worker-failure-triage", "incident-timeline",
}


def _flow(spec):
    """The deployed flow, imported for real: Prefect would otherwise fall back to a placeholder built from the
    file's syntax tree when the module fails to import, and this test would then report a confusing
    parameter/description mismatch instead of the import error itself."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(PROJECT_ROOT / spec["entrypoint"]), use_placeholder_flow=False)


def test_every_runbook_procedure_has_a_deployment():
    assert {s["name"] for s in SPECS} == EXPECTED


@pytest.mark.parametrize("spec", SPECS, ids=[s["name"] for s in SPECS])
def test_entry_points_at_a_flow_whose_parameters_exist(spec):
    flow = _flow(spec)
    assert flow.name == spec["name"], "deployment and flow share the name an SRE sees"
    assert spec.get("description") and spec.get("tags") and "ferrumdeck" in spec["tags"]
    accepted = set(inspect.signature(flow.fn).parameters)
    used = set(spec.get("parameters") or {})
    for trigger in spec.get("triggers", []):
        used |= set(trigger.get("parameters") or {})
    assert used <= accepted, f"unknown parameters {used - accepted}"
    if "dry_run" in accepted and (spec.get("schedules") or spec.get("triggers")):
        # scheduled and alert-started runs must act; manual ones keep the flow's safe default
        assert (spec.get("parameters") or {}).get("dry_run") is False or all(
            (t.get("parameters") or {}).get("dry_run") is False for t in spec.get("triggers", [])
        )


@pytest.mark.parametrize("spec", [s for s in SPECS if s.get("triggers")], ids=lambda s: s["name"])
def test_triggers_are_valid_prefect_triggers(spec):
    from prefect.events import DeploymentTriggerTypes

    for trigger in spec["triggers"]:
        parsed = TypeAdapter(DeploymentTriggerTypes).validate_python(dict(trigger, name="t"))
        # an alert (the bridge) or the direct watcher's events (tests/unit/test_watch.py checks those routes)
        assert "ferrumdeck.alert.firing" in parsed.expect or parsed.expect <= set(WATCHER_EVENTS)


def test_schedules_match_the_issue():
    by_name = {s["name"]: s for s in SPECS}
    assert by_name["queue-sweep"]["schedules"] == [{"interval": 60}]
    assert by_name["stuck-runs-sweep"]["schedules"] == [{"interval": 300}]
    assert by_name["llm-provider-failback"]["schedules"] == [{"interval": 300}]
    scheduled = {n for n, s in by_name.items() if s.get("schedules")}
    assert scheduled == {"queue-sweep", "stuck-runs-sweep", "llm-provider-failback"}


def test_alerts_route_to_their_flows():
    routes = {
        t["match"]["prefect.resource.id"]: s["name"] for s in SPECS for t in s.get("triggers", [])
        if "ferrumdeck.alert.firing" in t["expect"]
    }
    assert routes == {
        "ferrumdeck.alert.WorkerCrashLooping": "worker-crash-recovery",
        "ferrumdeck.alert.WorkerHung": "worker-hang-recovery",
        "ferrumdeck.alert.LLMProviderErrors": "llm-provider-failover",
        "ferrumdeck.alert.MCPServerDown": "mcp-server-recovery",
        "ferrumdeck.alert.QueueBacklog": "scale-workers",
        "ferrumdeck.alert.RunsStuck": "stuck-runs-sweep",
        "ferrumdeck.alert.*": "worker-failure-triage",
    }


@pytest.mark.parametrize("spec", SPECS, ids=[s["name"] for s in SPECS])
def test_the_ui_form_describes_every_parameter(spec):
    from prefect.utilities.callables import parameter_schema

    properties = parameter_schema(_flow(spec)).model_dump()["properties"]
    assert properties
    assert [name for name, p in properties.items() if not p.get("description")] == []


# ------------------------------------------------------------------ the form a person fills in (issue 13, item 5)



def _form(spec) -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(_flow(spec)).model_dump()["properties"]


@pytest.mark.parametrize("spec", SPECS, ids=[s["name"] for s in SPECS])
def test_every_form_field_has_a_human_title_and_numbers_a_unit(spec):
    for name, prop in _form(spec).items():
        assert prop["title"] != name and prop["title"][:1].isupper() and "_" not in prop["title"], (name, prop)
        if prop.get("type") in ("integer", "number"):
            assert prop["title"].rstrip().endswith(")"), f"{name}: the unit goes in the title, e.g. 'Timeout (s)'"


@pytest.mark.parametrize("spec", SPECS, ids=[s["name"] for s in SPECS])
def test_no_field_is_a_type_switch_and_each_setting_shows_its_effective_default(spec):
    from flows._ui import form_fields
    from tasks.settings import get_settings

    props = _form(spec)
    switches = [n for n, p in props.items() if "anyOf" in p or p.get("type") == "null"]
    assert switches == [], 'these render as an "int / None" switch ("Property is type None")'
    assert [n for n, p in props.items() if "default" in p and p["default"] is None] == []
    for name, field in form_fields(_flow(spec)).items():
        if field.setting is None:
            continue
        value = getattr(get_settings(), field.setting.name)
        assert props[name]["default"] == value
        assert f"Default: {field.setting.env} = " in props[name]["description"], name
        assert "(default setting)" not in props[name]["description"]


def test_the_registered_deployment_carries_that_form():
    """What `fd-recovery serve` registers (and the UI's custom-run form shows) is the flow's form."""
    from deployments.serve import build_runner_deployments

    [deployment] = build_runner_deployments(names=["worker-crash-recovery"])
    schema = deployment._parameter_openapi_schema.model_dump()
    timeout = schema["properties"]["replacement_timeout_s"]
    assert timeout["title"] == "Replacement timeout (s)" and timeout["type"] == "number"
    assert "Default: FD_REPLACEMENT_TIMEOUT_S = 180 s." in timeout["description"]
    assert schema["properties"]["pod"] == {**schema["properties"]["pod"], "type": "string", "default": ""}
    assert schema["required"] == []  # every field keeps a default: automations may omit any of them
