"""The stuck-runs flows' UI forms: every parameter described and bounded, dry run by default (no server)."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema

from flows.stuck_runs import fail_run, retry_step, stuck_runs_sweep


@pytest.mark.parametrize("flow_obj", [stuck_runs_sweep, fail_run, retry_step])
def test_every_parameter_is_described_and_dry_run_is_the_default(flow_obj):
    props = parameter_schema(flow_obj.fn).model_dump()["properties"]
    assert all(p.get("description") for p in props.values()), props
    assert props["dry_run"]["default"] is True
    assert flow_obj.description and flow_obj.name in {"stuck-runs-sweep", "fail-run", "retry-step"}


def test_sweep_parameters_are_bounded():
    props = parameter_schema(stuck_runs_sweep.fn).model_dump()["properties"]
    assert (props["older_than_minutes"]["minimum"], props["older_than_minutes"]["default"]) == (1, 30)
    assert props["max_runs"]["minimum"] == 1 and props["max_runs"]["maximum"] == 10000
    assert props["action"]["enum"] == ["auto", "fail", "retry"]
    assert props["min_idle_ms"]["default"] == 300_000


@pytest.mark.parametrize("flow_obj,field", [(fail_run, "run_id"), (retry_step, "run_id"), (retry_step, "step_id")])
def test_ids_must_be_plain_path_segments(flow_obj, field):
    props = parameter_schema(flow_obj.fn).model_dump()["properties"]
    assert props[field]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
