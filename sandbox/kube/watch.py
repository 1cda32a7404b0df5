"""Watches as the API server streams them: an initial snapshot or a resume point, then filtered live events.

One global resourceVersion; resuming from version N sends only events after N (no duplicates); a version older
than the compacted log gets an ERROR event with a 410 Expired Status; BOOKMARKs when allowed; a newline after
every event; the stream closes at ``timeoutSeconds``, on reset (the store's epoch changes) or on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable

from sandbox.kube.resources import Resource
from sandbox.kube.store import Store, StoreError, WatchEvent, status_body
from sandbox.kube.tables import table


def event_line(etype: str, obj: dict) -> bytes:
    """One watch event, newline-terminated (clients drop a last event without its newline)."""
    return json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode() + b"\n"


def translate(ev: WatchEvent, res: Resource, namespace: str | None,
              predicate: Callable[[dict], bool]) -> tuple[str, dict] | None:
    """What a filtered watch sees of a store event: old and new both match -> MODIFIED, only the new -> ADDED,
    only the old (the object left the selector) -> DELETED; neither -> nothing."""
    if ev.resource != res.key:
        return None
    if namespace is not None and ev.new["metadata"].get("namespace") != namespace:
        return None
    old_ok = ev.old is not None and predicate(ev.old)
    if ev.type == "DELETED":
        return ("DELETED", ev.new) if predicate(ev.new) or old_ok else None
    new_ok = predicate(ev.new)
    if new_ok and old_ok:
        return "MODIFIED", ev.new
    if new_ok:
        return "ADDED", ev.new
    if old_ok:
        return "DELETED", ev.new
    return None


def open_watch(
    store: Store,
    res: Resource,
    namespace: str | None,
    predicate: Callable[[dict], bool],
    *,
    since: str,
    send_initial: bool,
    bookmarks: bool,
    as_table: bool,
    timeout: float,
    bookmark_interval: float,
    stopping: threading.Event,
) -> AsyncIterator[bytes]:
    """Take the snapshot (or check the resume point) now, under the store lock, and return the byte stream.

    Raises ``StoreError`` 400 for a malformed resourceVersion (before any byte is sent)."""

    def obj_of(o: dict) -> dict:
        return table(res.key, [o], resource_version=o["metadata"]["resourceVersion"]) if as_table else o

    def bookmark(rv: int, *, initial_end: bool = False) -> bytes:
        meta: dict = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return event_line("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta})

    initial: list[bytes] = []
    with store.lock:
        epoch = store.epoch
        if since in ("", "0") or send_initial:
            initial = [event_line("ADDED", obj_of(o)) for o in store.list(res, namespace) if predicate(o)]
            cursor = store.rv
            if send_initial and bookmarks:
                initial.append(bookmark(cursor, initial_end=True))
        else:
            try:
                cursor = int(since)
            except ValueError as e:
                raise StoreError(400, "BadRequest", f"invalid resource version {since!r}") from e
            if cursor < store.compacted_rv:
                initial.append(event_line("ERROR", status_body(
                    410, "Expired", f"too old resource version: {cursor} ({store.rv})")))
                cursor = -1

    async def stream() -> AsyncIterator[bytes]:
        nonlocal cursor
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        store.add_waiter(loop, wake)
        try:
            for chunk in initial:
                yield chunk
            if cursor < 0:
                return
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + bookmark_interval
            while not stopping.is_set() and store.epoch == epoch:
                wake.clear()
                try:
                    events, current = store.events_after(cursor)
                except StoreError as e:  # the log moved past us while we were slow
                    yield event_line("ERROR", status_body(e.code, e.reason, e.message))
                    return
                out = [event_line(kind, obj_of(obj))
                       for kind, obj in filter(None, (translate(ev, res, namespace, predicate) for ev in events))]
                cursor = current
                if out:
                    yield b"".join(out)
                now = time.monotonic()
                if now >= deadline:
                    return
                if bookmarks and now >= next_bookmark:
                    yield bookmark(cursor)
                    next_bookmark = now + bookmark_interval
                wait = deadline - now
                if bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=min(wait, 0.5))
        finally:
            store.remove_waiter(loop, wake)

    return stream()
