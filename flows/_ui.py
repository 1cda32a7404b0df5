"""Make the Prefect UI form show what each flow parameter means.

Prefect 3 builds a deployment's parameter form from the flow's signature but takes parameter descriptions only
from the docstring's ``Args:`` section, dropping ``Field(description=...)`` inside ``Annotated``. Flows here
declare each parameter once, as ``Annotated[T, Field(..., description=...)]``; ``describe_parameters`` appends
the matching ``Args:`` section to the docstring so both the form and validation come from that one place.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

from pydantic.fields import FieldInfo

F = TypeVar("F", bound=Callable[..., Any])


def annotated_descriptions(fn: Callable[..., Any]) -> dict[str, str]:
    """Parameter name -> the description of its ``Annotated[..., Field(description=...)]``."""
    hints = get_type_hints(fn, include_extras=True)
    found: dict[str, str] = {}
    for name in inspect.signature(fn).parameters:
        hint = hints.get(name)
        if get_origin(hint) is not Annotated:
            continue
        for meta in get_args(hint)[1:]:
            if isinstance(meta, FieldInfo) and meta.description:
                found[name] = meta.description
    return found


def describe_parameters(fn: F) -> F:
    """Append an ``Args:`` section built from the Annotated descriptions (apply under ``@flow``)."""
    doc = inspect.getdoc(fn) or ""
    if "\nArgs:" in doc or doc.startswith("Args:"):
        raise ValueError(f"{fn.__name__}: describe the parameters in Field(description=...), not in Args:")
    lines = [f"    {name}: {text}" for name, text in annotated_descriptions(fn).items()]
    if lines:
        fn.__doc__ = doc + "\n\nArgs:\n" + textwrap.indent("\n".join(lines), "")
    return fn
