"""describe_parameters: Annotated Field descriptions become the docstring's Args: (what Prefect's form reads)."""

from typing import Annotated

import pytest
from prefect.utilities.callables import parameter_schema
from pydantic import Field

from flows._ui import annotated_descriptions, describe_parameters


def test_descriptions_reach_the_parameter_schema_and_bounds_stay():
    @describe_parameters
    def f(n: Annotated[int, Field(ge=1, le=5, description="How many.")] = 2, plain: bool = False) -> None:
        """Do it."""

    props = parameter_schema(f).model_dump()["properties"]
    assert props["n"]["description"] == "How many." and props["n"]["maximum"] == 5
    assert "description" not in props["plain"] or not props["plain"]["description"]
    assert annotated_descriptions(f) == {"n": "How many."}


def test_a_hand_written_args_section_is_refused():
    def g(n: Annotated[int, Field(description="x")] = 1) -> None:
        """Do it.

        Args:
            n: twice described
        """

    with pytest.raises(ValueError, match="Field"):
        describe_parameters(g)
