"""Label and field selectors as the API server parses them (equality, set-based, existence)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_SET_RE = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s*\((.*)\)\s*$")


class SelectorError(ValueError):
    """A selector string the API server would reject with 400."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse ``app=worker,tier in (a,b),!legacy`` into requirements (empty selector matches everything)."""
    if not text:
        return []
    reqs: list[Requirement] = []
    for part in _split_top_level(text):
        match = _SET_RE.match(part)
        if match:
            values = tuple(v.strip() for v in match.group(3).split(",") if v.strip())
            reqs.append(Requirement(match.group(1), match.group(2), values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            reqs.append(Requirement(key.strip(), "!=", (value.strip(),)))
        elif "==" in part:
            key, value = part.split("==", 1)
            reqs.append(Requirement(key.strip(), "=", (value.strip(),)))
        elif "=" in part:
            key, value = part.split("=", 1)
            reqs.append(Requirement(key.strip(), "=", (value.strip(),)))
        elif part.startswith("!"):
            reqs.append(Requirement(part[1:].strip(), "!exists"))
        else:
            reqs.append(Requirement(part, "exists"))
    for req in reqs:
        if not req.key or any(c in req.key for c in " ()!=<>"):
            raise SelectorError(f"invalid label key {req.key!r} in selector {text!r}")
    return reqs


def labels_match(reqs: list[Requirement], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in reqs)


def selector_from_match_labels(selector: dict | None) -> list[Requirement]:
    """A ``LabelSelector`` object (matchLabels + matchExpressions) as requirements."""
    selector = selector or {}
    reqs = [Requirement(k, "=", (str(v),)) for k, v in (selector.get("matchLabels") or {}).items()]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}
    for expr in selector.get("matchExpressions") or []:
        reqs.append(Requirement(expr["key"], ops[expr["operator"]], tuple(expr.get("values") or ())))
    return reqs


def selector_string(selector: dict | None) -> str:
    """``matchLabels`` rendered as ``k=v,...`` (what Scale.status.selector and kubectl show)."""
    parts = [f"{k}={v}" for k, v in sorted(((selector or {}).get("matchLabels") or {}).items())]
    for expr in (selector or {}).get("matchExpressions") or []:
        op = expr["operator"]
        if op in ("In", "NotIn"):
            parts.append(f"{expr['key']} {op.lower()} ({','.join(expr.get('values') or [])})")
        elif op == "Exists":
            parts.append(expr["key"])
        else:
            parts.append(f"!{expr['key']}")
    return ",".join(parts)


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    op: str  # "=" or "!="
    value: str


def parse_field_selector(text: str | None, *, allowed: set[str]) -> list[FieldRequirement]:
    """Parse ``metadata.name=x,status.phase!=Running``; fields outside ``allowed`` are a 400, as upstream."""
    if not text:
        return []
    reqs = []
    for part in _split_top_level(text):
        if "!=" in part:
            path, value = part.split("!=", 1)
            op = "!="
        elif "==" in part:
            path, value = part.split("==", 1)
            op = "="
        elif "=" in part:
            path, value = part.split("=", 1)
            op = "="
        else:
            raise SelectorError(f"invalid field selector: {part!r}")
        path = path.strip()
        if path not in allowed:
            raise SelectorError(f'field label not supported: {path}')
        reqs.append(FieldRequirement(path, op, value.strip()))
    return reqs


def field_value(obj: dict, path: str) -> str:
    cur: object = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def fields_match(reqs: list[FieldRequirement], obj: dict) -> bool:
    for r in reqs:
        value = field_value(obj, r.path)
        if (r.op == "=") != (value == r.value):
            return False
    return True


def make_filter(label_text: str | None, field_text: str | None, *, allowed: set[str]) -> Callable[[dict], bool]:
    """One predicate for a watch or list: both selectors must match."""
    labels = parse_label_selector(label_text)
    fields = parse_field_selector(field_text, allowed=allowed)

    def predicate(obj: dict) -> bool:
        return labels_match(labels, obj.get("metadata", {}).get("labels")) and fields_match(fields, obj)

    return predicate
