"""The three patch flavours of the API server: strategic merge, JSON merge (RFC 7386) and JSON patch (RFC 6902)."""

from __future__ import annotations

import copy
from typing import Any

# patchMergeKey of the list fields FerrumDeck's objects use (from the Kubernetes API types)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "readinessGates": "conditionType",
    "containerStatuses": "name",
    "topologySpreadConstraints": "topologyKey",
}
PRIMITIVE_MERGE = {"finalizers"}


class PatchError(ValueError):
    """A patch the server cannot apply (422/400 for the client)."""


def _strip(value: Any) -> Any:
    """A patch value with every ``$``-directive removed (what gets stored)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip(v) for v in value if not (isinstance(v, dict) and set(v) == {"$patch"})]
    return value


def strategic_merge(original: Any, patch: Any) -> Any:
    """Apply a strategic merge patch: lists with a merge key merge by it, ``$patch: delete`` removes,
    ``$setElementOrder`` orders, ``null`` deletes a key. Returns None if the whole map is deleted."""
    if not isinstance(patch, dict):
        return _strip(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace":
        return _strip({k: v for k, v in patch.items() if k != "$patch"})
    result = copy.deepcopy(original) if isinstance(original, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
            continue
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            merge_key = MERGE_KEYS.get(key)
            if merge_key and all(isinstance(v, dict) for v in value):
                result[key] = _merge_list(result.get(key) or [], value, merge_key)
            elif key in PRIMITIVE_MERGE:
                current = list(result.get(key) or [])
                result[key] = current + [v for v in value if v not in current]
            else:
                result[key] = _strip(value)
        else:
            result[key] = value
    for key, order in patch.items():
        if key.startswith("$setElementOrder/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = _order(result[field], order, MERGE_KEYS.get(field))
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(original: list, patch: list, merge_key: str) -> list:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" and set(item) == {"$patch"} for item in patch):
        return _strip([item for item in patch if not (isinstance(item, dict) and item.get("$patch") == "replace")])
    result = copy.deepcopy(original)
    for item in patch:
        if merge_key not in item:
            raise PatchError(f"map: {item} does not contain declared merge key: {merge_key}")
        idx = next((i for i, cur in enumerate(result) if isinstance(cur, dict) and cur.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            result = [cur for cur in result if not (isinstance(cur, dict) and cur.get(merge_key) == item[merge_key])]
        elif idx is None:
            result.append(_strip(item))
        else:
            merged = strategic_merge(result[idx], item)
            if merged is None:
                result.pop(idx)
            else:
                result[idx] = merged
    return result


def _order(items: list, order: list, merge_key: str | None) -> list:
    if merge_key:
        wanted = [o.get(merge_key) for o in order if isinstance(o, dict)]
        key_of = (lambda item: item.get(merge_key) if isinstance(item, dict) else None)  # noqa: E731
    else:
        wanted = list(order)
        key_of = (lambda item: item)  # noqa: E731
    rank = {k: i for i, k in enumerate(wanted)}
    indexed = list(enumerate(items))
    indexed.sort(key=lambda pair: (rank.get(key_of(pair[1]), len(rank) + pair[0]), pair[0]))
    return [item for _, item in indexed]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    cur = doc
    for part in parts[:-1]:
        if isinstance(cur, list):
            cur = cur[int(part)]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise PatchError(f"doc is missing path: /{'/'.join(parts)}")
    return cur, parts[-1]


def _get(doc: Any, parts: list[str]) -> Any:
    cur = doc
    for part in parts:
        try:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise PatchError(f"doc is missing path: /{'/'.join(parts)}") from e
    return cur


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return copy.deepcopy(value)
    parent, last = _parent(doc, parts)
    if isinstance(parent, list):
        if last == "-":
            parent.append(copy.deepcopy(value))
        else:
            idx = int(last)
            if idx > len(parent):
                raise PatchError(f"index {idx} out of range")
            parent.insert(idx, copy.deepcopy(value))
    elif isinstance(parent, dict):
        parent[last] = copy.deepcopy(value)
    else:
        raise PatchError("cannot add to a scalar")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    parent, last = _parent(doc, parts)
    try:
        if isinstance(parent, list):
            parent.pop(int(last))
        else:
            del parent[last]
    except (KeyError, IndexError, ValueError) as e:
        raise PatchError(f"unable to remove nonexistent key: /{'/'.join(parts)}") from e
    return doc


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation: {op}")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "add":
            doc = _add(doc, parts, op.get("value"))
        elif kind == "remove":
            doc = _remove(doc, parts)
        elif kind == "replace":
            _get(doc, parts)
            if not parts:
                doc = copy.deepcopy(op.get("value"))
            else:
                parent, last = _parent(doc, parts)
                if isinstance(parent, list):
                    parent[int(last)] = copy.deepcopy(op.get("value"))
                else:
                    parent[last] = copy.deepcopy(op.get("value"))
        elif kind in ("move", "copy"):
            src = _pointer(op["from"])
            value = copy.deepcopy(_get(doc, src))
            if kind == "move":
                doc = _remove(doc, src)
            doc = _add(doc, parts, value)
        elif kind == "test":
            if _get(doc, parts) != op.get("value"):
                raise PatchError(f"testing value /{'/'.join(parts)} failed")
        else:
            raise PatchError(f"unexpected JSON patch operation {kind!r}")
    return doc


STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
JSON = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"


def apply_patch(obj: dict, patch: Any, content_type: str) -> dict:
    """Dispatch on the request's Content-Type, like the API server."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == STRATEGIC:
        if not isinstance(patch, dict):
            raise PatchError("a strategic merge patch must be a JSON object")
        result = strategic_merge(obj, patch)
    elif ctype == MERGE:
        result = merge_patch(obj, patch)
    elif ctype == JSON:
        result = json_patch(obj, patch)
    else:
        raise PatchError(f"unsupported patch type {ctype!r}")
    if not isinstance(result, dict):
        raise PatchError("the patched object is not a JSON object")
    return result
