"""No function in ``tasks/`` can change a system without the guard: a static walk of the source.

A function "writes" when it calls a mutating client method (Redis stream writes, Lua scripts that move
entries, Kubernetes deletes/patches/evictions, SQL UPDATE/INSERT/DELETE, the gateway's POST). A writer must be
``@guarded``, or private and reached only from guarded (or private) functions. A public unguarded writer —
one a flow written tomorrow could call and forget the guard — fails this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

TASKS = Path(__file__).resolve().parents[2] / "tasks"

MUTATING_METHODS = {
    "xadd", "xack", "xclaim", "xautoclaim", "xdel", "xtrim", "xgroup_delconsumer", "xgroup_destroy",
    "delete_namespaced_pod", "create_namespaced_pod_eviction", "patch_namespaced_deployment",
    "patch_namespaced_deployment_scale", "replace_namespaced_deployment", "post",
}
MUTATING_NAMES = {"ACT_PENDING", "REPLAY_DLQ", "DELETE_EMPTY_CONSUMERS", "TRIM_DLQ"}  # Lua scripts that move entries
SQL_WRITES = {"update", "insert", "delete"}  # sa.update(...) etc.

# Writers that are not recovery actions, and why.
ALLOWED = {
    ("guard", "check"): "the guard's own state (cooldown keys), not a system under repair",
    ("guard", "_release_cooldown"): "the guard's own state",
    ("runs", "create_schema"): "schema setup for the demo and tests",
    ("runs", "drop_schema"): "schema teardown for tests",
    ("runs", "fail_stuck_runs_statement"): "builds (never runs) fail_stuck_runs' statement, for EXPLAIN",
    ("events", "emit_reliably"): "our own event outbox (Redis under FD_STATE_PREFIX) and the Prefect API",
}


def _is_guarded(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        call = d.func if isinstance(d, ast.Call) else d
        if isinstance(call, ast.Name) and call.id == "guarded":
            return True
    return False


def _writes(fn: ast.AST) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr = node.func.attr
            if attr in MUTATING_METHODS:
                return True
            if attr in SQL_WRITES and isinstance(node.func.value, ast.Name) and node.func.value.id == "sa":
                return True
        if isinstance(node, ast.Attribute) and node.attr in MUTATING_NAMES:
            return True
    return False


def unguarded_public_writers() -> list[str]:
    """Public functions of tasks/ that write, directly or through private writers, without being guarded."""
    functions: dict[tuple[str, str], ast.FunctionDef] = {}
    for path in sorted(TASKS.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                functions[(path.stem, node.name)] = node
    candidates = {key: fn for key, fn in functions.items() if not _is_guarded(fn) and key not in ALLOWED}
    writers = {key for key, fn in candidates.items() if _writes(fn)}
    changed = True
    while changed:  # calling a private writer (of any module) makes an unguarded function a writer
        changed = False
        private = {name for _, name in writers if name.startswith("_")}
        for key, fn in candidates.items():
            if key in writers:
                continue
            used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
            used |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
            if used & private:
                writers.add(key)
                changed = True
    return sorted(f"{m}.{name}" for m, name in writers if not name.startswith("_"))


def test_every_writer_in_tasks_is_guarded():
    assert unguarded_public_writers() == []


def test_the_walk_sees_an_unguarded_writer(tmp_path, monkeypatch):
    (tmp_path / "bad.py").write_text(
        "def _move(client):\n    client.xack('s', 'g', '1')\n\n"
        "def move_entries(client):\n    _move(client)\n\n"
        "@guarded('ok')\ndef fine(*, settings, dry_run):\n    settings.client.xadd('s', {})\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["TASKS"]), "TASKS", tmp_path)
    assert unguarded_public_writers() == ["bad.move_entries"]
