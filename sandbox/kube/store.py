"""The object store: every object, one global resourceVersion, and a bounded log of watch events.

Stored objects are never mutated in place: every write stores a fresh copy, so the event log can hold
references and readers serialise them without copying.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import random
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sandbox.kube.resources import Resource


def now_iso() -> str:
    """RFC 3339 timestamp in UTC, seconds precision (what the API server writes)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_iso_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class StoreError(Exception):
    """A write the API server would refuse: ``code`` and ``reason`` map to a ``Status``."""

    def __init__(self, code: int, reason: str, message: str, *, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A failure `kind: Status` as the API server returns it (errors, and watch ERROR events)."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


@dataclass(frozen=True)
class WatchEvent:
    rv: int
    resource: str  # Resource.key
    type: str  # ADDED | MODIFIED | DELETED
    old: dict | None
    new: dict  # for DELETED: the last state, carrying the deletion's resourceVersion


class Store:
    """Thread-safe in-memory objects keyed by resource, namespace and name."""

    def __init__(self, *, log_size: int = 10_000) -> None:
        self.lock = threading.RLock()
        self.rv = 1
        self._objects: dict[str, dict[tuple[str, str], dict]] = {}
        self._log: deque[WatchEvent] = deque()
        self._log_rvs: deque[int] = deque()
        self._log_size = log_size
        self.compacted_rv = 0  # watches from a version below this get 410 Expired
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._subscribers: list[Callable[[WatchEvent], None]] = []
        self.epoch = 0

    # --- reads ---
    def get(self, res: Resource, namespace: str | None, name: str) -> dict | None:
        with self.lock:
            return self._objects.get(res.key, {}).get((namespace or "", name))

    def list(self, res: Resource, namespace: str | None = None) -> list[dict]:
        """Objects of a resource (all namespaces when ``namespace`` is None), sorted by namespace and name."""
        with self.lock:
            items = self._objects.get(res.key, {})
            keys = sorted(k for k in items if namespace is None or k[0] == namespace)
            return [items[k] for k in keys]

    def events_after(self, rv: int) -> tuple[list[WatchEvent], int]:
        """Events with resourceVersion > ``rv`` and the current version; raises 410 when ``rv`` is compacted."""
        with self.lock:
            if rv < self.compacted_rv:
                raise StoreError(410, "Expired", f"too old resource version: {rv} ({self.rv})")
            idx = bisect.bisect_right(self._log_rvs, rv)
            return [self._log[i] for i in range(idx, len(self._log))], self.rv

    # --- writes ---
    def create(self, res: Resource, obj: dict) -> dict:
        with self.lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise StoreError(422, "Invalid", f"{res.kind} is invalid: metadata.name: Required value")
                for _ in range(20):
                    candidate = meta["generateName"] + random_suffix()
                    if self.get(res, meta.get("namespace"), candidate) is None:
                        meta["name"] = candidate
                        break
            if not res.namespaced:
                meta.pop("namespace", None)
            key = (meta.get("namespace", "") if res.namespaced else "", meta["name"])
            if key in self._objects.get(res.key, {}):
                raise StoreError(
                    409, "AlreadyExists", f'{res.plural}{"." + res.group if res.group else ""} "{meta["name"]}" already exists',
                    details={"name": meta["name"], "kind": res.plural},
                )
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_iso())
            obj["kind"] = res.kind
            obj["apiVersion"] = res.api_version
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            self._objects.setdefault(res.key, {})[key] = obj
            self._record(WatchEvent(self.rv, res.key, "ADDED", None, obj))
            return obj

    def replace(self, res: Resource, obj: dict, *, expect_rv: str | None = None) -> dict:
        """Store a new version of an existing object (a copy), unless nothing changed."""
        with self.lock:
            meta = obj["metadata"]
            key = (meta.get("namespace", "") if res.namespaced else "", meta["name"])
            old = self._objects.get(res.key, {}).get(key)
            if old is None:
                raise not_found(res, meta["name"])
            if expect_rv and expect_rv != old["metadata"]["resourceVersion"]:
                raise StoreError(
                    409, "Conflict",
                    f'Operation cannot be fulfilled on {res.plural}{"." + res.group if res.group else ""} '
                    f'"{meta["name"]}": the object has been modified; please apply your changes to the latest '
                    "version and try again",
                    details={"name": meta["name"], "kind": res.plural},
                )
            new = copy.deepcopy(obj)
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            new["metadata"]["uid"] = old["metadata"]["uid"]
            new["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            new["kind"], new["apiVersion"] = res.kind, res.api_version
            if new == old:
                return old
            self.rv += 1
            new["metadata"]["resourceVersion"] = str(self.rv)
            self._objects[res.key][key] = new
            self._record(WatchEvent(self.rv, res.key, "MODIFIED", old, new))
            return new

    def mutate(self, res: Resource, namespace: str | None, name: str, fn: Callable[[dict], None]) -> dict | None:
        """Apply ``fn`` to a copy of the object and store it if it changed; None when the object is gone."""
        with self.lock:
            current = self.get(res, namespace, name)
            if current is None:
                return None
            obj = copy.deepcopy(current)
            fn(obj)
            return self.replace(res, obj)

    def remove(self, res: Resource, namespace: str | None, name: str) -> dict | None:
        """Delete the object now (a DELETED event); None when it did not exist."""
        with self.lock:
            key = ((namespace or "") if res.namespaced else "", name)
            old = self._objects.get(res.key, {}).pop(key, None)
            if old is None:
                return None
            self.rv += 1
            last = copy.deepcopy(old)
            last["metadata"]["resourceVersion"] = str(self.rv)
            self._record(WatchEvent(self.rv, res.key, "DELETED", old, last))
            return last

    def clear(self) -> None:
        """Drop every object and the whole event log: older versions become 410 Expired, watches end."""
        with self.lock:
            self._objects.clear()
            self._log.clear()
            self._log_rvs.clear()
            self.rv += 1
            self.compacted_rv = self.rv
            self.epoch += 1
        self.wake_watchers()

    def compact(self) -> None:
        """Forget the event log up to now (a watch from any older version gets 410)."""
        with self.lock:
            self._log.clear()
            self._log_rvs.clear()
            self.compacted_rv = self.rv

    # --- notifications ---
    def subscribe(self, fn: Callable[[WatchEvent], None]) -> None:
        """Call ``fn`` (under the store lock, so keep it short) for every event."""
        self._subscribers.append(fn)

    def add_waiter(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        with self.lock:
            self._waiters.add((loop, event))

    def remove_waiter(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        with self.lock:
            self._waiters.discard((loop, event))

    def wake_watchers(self) -> None:
        with self.lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                self.remove_waiter(loop, event)

    def _record(self, event: WatchEvent) -> None:
        self._log.append(event)
        self._log_rvs.append(event.rv)
        while len(self._log) > self._log_size:
            dropped = self._log.popleft()
            self._log_rvs.popleft()
            self.compacted_rv = dropped.rv
        for fn in self._subscribers:
            fn(event)
        self.wake_watchers()


_SAFE = "bcdfghjklmnpqrstvwxz2456789"


def random_suffix(n: int = 5) -> str:
    """The 5 characters Kubernetes appends to generated names (its 'safe' alphabet)."""
    return "".join(random.choice(_SAFE) for _ in range(n))


def safe_encode(text: str) -> str:
    """``rand.SafeEncodeString``: map each character onto the vowel-free alphabet."""
    return "".join(_SAFE[ord(c) % len(_SAFE)] for c in text)


def fnv32a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def not_found(res: Resource, name: str) -> StoreError:
    plural = f"{res.plural}.{res.group}" if res.group else res.plural
    return StoreError(404, "NotFound", f'{plural} "{name}" not found', details={"name": name, "kind": res.plural})
