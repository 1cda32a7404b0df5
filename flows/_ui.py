"""Make the Prefect UI explain each flow: form fields with human titles and units, setting-backed parameters
showing their effective default, a run name typed in the form kept, one readable log line per decision,
action and check.

The form. Prefect builds a deployment's parameter form (its ``parameter_openapi_schema``) from the flow's
signature, but titles every field with the raw parameter name, takes descriptions only from the docstring's
``Args:`` section (dropping ``Field(description=...)`` inside ``Annotated``) and renders ``T | None`` as a
two-way type switch whose ``None`` side reads 'Property is type "None"'. Flows here declare each parameter
once, as ``Annotated[T, Field(title=..., description=...)]`` (plus ``Setting(name)`` when ``None`` means "the
setting"), and ``describe_parameters`` (applied under ``@flow``) rewrites the function's annotations so that
Prefect's own schema generator yields:

- ``title``: the Field's title (else the name humanized, ``_s`` -> "(s)", ``_ms`` -> "(ms)", ``_minutes`` ->
  "(min)"); every number's title carries its unit in parentheses;
- ``description``: the Field's description (through a generated ``Args:`` section, which Prefect reads), plus
  for a ``Setting``-backed one "Default: FD_REPLACEMENT_TIMEOUT_S = 180 s." with the setting's value where the
  flow was loaded (for ``fd-recovery serve``: the process that runs it);
- a plain type for ``T | None`` (``None`` is still accepted: it stays in the validated type, hidden from the
  schema only), with the effective setting as the field's pre-filled value, or an empty text / list for an
  optional text or list. Clearing a number sends nothing: the run then uses the setting in force when it starts.
  Runs started by schedules, automations or the API are unaffected: their parameters default to ``None`` and
  the flow reads the setting at run time.

"(Optional)" stays on fields with a default: the Prefect UI marks every field not in the schema's ``required``
list so, and listing them there would make the API refuse every run (an automation's too) that omits them.

The run name. Prefect renames every run of a flow that has a ``flow_run_name`` when it starts, including one a
person named in the "Run Name" box of the form. ``keep_typed_name`` wraps a template so the run keeps a name
a person typed: a name Prefect made up (the server's ``adjective-animal`` slug, the UI's pre-filled
``<greek letter><digits>-<star name>``) is replaced by the template, any other name is kept.
"""

from __future__ import annotations

import inspect
import logging
import re
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin, get_type_hints

from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

from tasks.outcome import Action, ActionStatus, Block, Check, RecoveryResult, Table

F = TypeVar("F", bound=Callable[..., Any])

_UNIT_SUFFIXES = (("_minutes", "min"), ("_ms", "ms"), ("_s", "s"))
_NUMBERS = (int, float)


@dataclass(frozen=True)
class Setting:
    """Marks a parameter whose ``None`` means "the setting ``name``" (``tasks.settings.Settings``)."""

    name: str

    @property
    def env(self) -> str:
        return f"FD_{self.name.upper()}"


def humanize(name: str) -> str:
    """``replacement_timeout_s`` -> ``Replacement timeout (s)``."""
    unit = ""
    for suffix, text in _UNIT_SUFFIXES:
        if name.endswith(suffix):
            name, unit = name[: -len(suffix)], f" ({text})"
            break
    words = name.replace("_", " ").strip()
    return (words[:1].upper() + words[1:] + unit) if words else name


def unit_of(title: str) -> str:
    """The unit in a title's trailing parentheses, when it reads as one after a number ("s", "entries")."""
    found = re.search(r"\(([^()]+)\)\s*$", title)
    unit = found.group(1).strip() if found else ""
    return unit if re.fullmatch(r"[A-Za-z][A-Za-z ]*", unit) else ""


def _effective(setting: Setting) -> Any:
    """The setting's value where the flow is loaded; its declared default if the environment cannot be read."""
    from tasks.settings import Settings, get_settings

    try:
        return getattr(get_settings(), setting.name)
    except Exception:  # noqa: BLE001 - a bad environment fails the run later, with its own message, not the import
        field = Settings.model_fields[setting.name]
        return field.get_default(call_default_factory=True)


def _shown(value: Any, unit: str) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = ", ".join(map(str, value)) or "none"
    else:
        text = str(value)
    return f"{text} {unit}" if unit and not isinstance(value, bool | str) else text


def _split(hint: Any) -> tuple[Any, list[Any]]:
    if get_origin(hint) is Annotated:
        base, *metadata = get_args(hint)
        return base, metadata
    return hint, []


def _without_none(base: Any) -> Any | None:
    """``T`` for ``T | None`` (``Optional[T]``), else None."""
    if get_origin(base) in (Union, types.UnionType):
        args = [a for a in get_args(base) if a is not type(None)]
        if len(args) < len(get_args(base)):
            return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 - built from a tuple
    return None


def _plain_empty(base: Any) -> Any:
    """What an empty form field of this type submits: "" for text, [] for a list, {} for a mapping (None for
    anything else: numbers, dates and choices need a ``Setting`` to say what empty means)."""
    if base is str:
        return ""
    if get_origin(base) in (list, tuple, set) or base in (list, tuple, set):
        return []
    if get_origin(base) is dict or base is dict:
        return {}
    return None


@dataclass
class FormField:
    """What the form shows for one parameter."""

    name: str
    title: str
    description: str
    setting: Setting | None = None
    default: Any = None


def _field_info(metadata: list[Any]) -> FieldInfo:
    infos = [m for m in metadata if isinstance(m, FieldInfo)]
    return FieldInfo.merge_field_infos(*infos) if infos else FieldInfo()


def _rewrite(name: str, hint: Any, default: Any) -> tuple[Any, FormField]:
    """The annotation Prefect's schema generator should see for one parameter, and what the form shows."""
    base, metadata = _split(hint)
    info = _field_info(metadata)
    setting = next((m for m in metadata if isinstance(m, Setting)), None)
    others = [m for m in metadata if not isinstance(m, FieldInfo | Setting)]
    title = info.title or humanize(name)
    description = (info.description or "").strip()
    inner = _without_none(base)
    extra: dict[str, Any] = {"title": title}
    form = FormField(name=name, title=title, description=description, setting=setting)
    if setting is not None:
        value = _effective(setting)
        form.default = value
        form.description = (f"{description} " if description else "") + \
            f"Default: {setting.env} = {_shown(value, unit_of(title))}."
        if value is not None:
            extra["default"] = value
    elif inner is not None and default is None:
        empty = _plain_empty(inner)
        if empty is None:  # an optional number, date or choice without a setting: Prefect's own two-way field
            return Annotated[(base, *_constraints(info), *others, _described(info, extra))], form  # type: ignore[valid-type]
        extra["default"] = form.default = empty
    if inner is None or (setting is None and default is not None):
        new = Annotated[(base, *_constraints(info), *others, _described(info, extra))]  # type: ignore[valid-type]
        return new, form
    # T | None: constraints move onto T, None stays valid but leaves the schema (no type switch in the form)
    constrained = Annotated[(inner, *_constraints(info))] if _constraints(info) else inner  # type: ignore[valid-type]
    new = Annotated[(constrained | SkipJsonSchema[None], *others, _described(info, extra))]  # type: ignore[valid-type]
    return new, form


def _constraints(info: FieldInfo) -> list[Any]:
    return list(info.metadata)


def _described(info: FieldInfo, extra: dict[str, Any]) -> FieldInfo:
    """A Field with ``info``'s non-constraint attributes and the form's title/default in its schema."""
    kept = {k: getattr(info, k) for k in ("alias", "examples") if getattr(info, k, None) is not None}
    return Field(description=info.description, json_schema_extra=extra, **kept)


def form_fields(fn: Callable[..., Any]) -> dict[str, FormField]:
    """What ``describe_parameters`` put in the form of ``fn`` (or a flow): parameter name -> field."""
    fn = getattr(fn, "fn", fn)
    return dict(getattr(fn, "__form_fields__", {}))


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
    """Give ``fn``'s form human titles, units, effective defaults and plain optional fields (apply under
    ``@flow``); descriptions go into a generated ``Args:`` section, which Prefect reads."""
    doc = inspect.getdoc(fn) or ""
    if "\nArgs:" in doc or doc.startswith("Args:"):
        raise ValueError(f"{fn.__name__}: describe the parameters in Field(description=...), not in Args:")
    hints = get_type_hints(fn, include_extras=True)
    annotations = dict(hints)
    fields: dict[str, FormField] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name not in hints:
            continue
        default = None if param.default is inspect.Parameter.empty else param.default
        annotations[name], fields[name] = _rewrite(name, hints[name], default)
        if fields[name].setting is not None and param.default is not None:
            raise ValueError(f"{fn.__name__}: {name} reads a setting, so its default must be None")
    fn.__annotations__ = annotations
    fn.__form_fields__ = fields  # type: ignore[attr-defined]
    lines = [f"    {f.name}: {f.description}" for f in fields.values() if f.description]
    if lines:
        fn.__doc__ = doc + "\n\nArgs:\n" + textwrap.indent("\n".join(lines), "")
    return fn


def setting(value: Any, settings: Any, name: str) -> Any:
    """A parameter's value, or the setting ``name`` when it was left empty (``None``)."""
    return getattr(settings, name) if value is None else value


# ------------------------------------------------------------------------------------------------ run names

_GREEK = ("alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|omicron|pi|rho|sigma|tau|"
          "upsilon|phi|chi|psi|omega")
#: names Prefect makes up: the server's coolname slug ("adjective-animal") and the UI's pre-filled
#: "<greek letter><digits>-<star>[-<suffix>]" (what the form's Run Name box holds until a person types)
_GENERATED = re.compile(rf"^(?:[a-z]+-[a-z]+|(?:{_GREEK})[0-9]*(?:-[a-z0-9]+)+)$")


def generated_name(name: str | None) -> bool:
    """Whether a flow run name is one Prefect generated (not one a person typed)."""
    return not name or bool(_GENERATED.match(name))


def keep_typed_name(template: str | Callable[[], str]) -> Callable[[], str]:
    """A ``flow_run_name`` that names the run from ``template`` (a ``str.format`` template over the parameters,
    or a callable) unless a person typed the run's name: then the typed name stays."""

    def run_name() -> str:
        from prefect.runtime import flow_run

        current = flow_run.get_name()
        if not generated_name(current):
            return current
        if callable(template):
            return template()
        return template.format(**flow_run.get_parameters())

    run_name.__name__ = getattr(template, "__name__", "run_name")
    return run_name


# ------------------------------------------------------------------------------------------------ run logs


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (unit tests): the module logger
        return logging.getLogger("flows")


def _clip(text: str, limit: int = 300) -> str:
    from tasks.report import scrub

    text = scrub(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def action_line(a: Action) -> str:
    """One readable line for an action: ``delete-pod worker-a: done — deleted``."""
    count = f" ({a.count})" if a.count is not None else ""
    return _clip(f"{a.kind} {a.target}: {a.status.value}{count}" + (f" — {a.detail}" if a.detail else ""))


def check_line(c: Check) -> str:
    """One readable line for a check: ``verified ✅ Ready replacement [worker-a]: worker-b Ready``."""
    mark = "✅" if c.ok else "❌"
    return _clip(f"verified {mark} {c.name}" + (f" [{c.target}]" if c.target else "") +
                 (f": {c.detail}" if c.detail else ""))


def decision_line(block: Block) -> str:
    """One readable line for a decision: its text, or a table's caption and size."""
    if isinstance(block, Table):
        return _clip(f"decided: {block.caption or 'table'} ({len(block.rows)} rows)")
    return _clip(f"decided: {block}")


class LoggedResult(RecoveryResult):
    """A ``RecoveryResult`` that also writes one readable line to the run's log for each decision, action and
    check as it is recorded (the report shows them together at the end; the log shows them as they happen)."""

    def act(self, kind: str, target: str, status: ActionStatus, *, count: int | None = None,
            detail: str = "") -> Action:
        action = super().act(kind, target, status, count=count, detail=detail)
        level = logging.WARNING if status in (ActionStatus.FAILED, ActionStatus.REFUSED) else logging.INFO
        _logger().log(level, "%s", action_line(action))
        return action

    def check(self, name: str, ok: bool, detail: str = "", *, target: str = "") -> bool:
        held = super().check(name, ok, detail, target=target)
        _logger().log(logging.INFO if held else logging.WARNING, "%s", check_line(self.checks[-1]))
        return held

    def note(self, section: str, block: Block) -> None:
        super().note(section, block)
        if section == "decided":
            _logger().info("%s", decision_line(block))


__all__ = ["FormField", "LoggedResult", "Setting", "annotated_descriptions", "describe_parameters",
           "form_fields", "generated_name", "humanize", "keep_typed_name", "setting"]
