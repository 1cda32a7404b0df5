"""Hostile traffic at the alert bridge: a seeded generator of malformed, oversized, deeply nested, wrongly encoded,
unauthenticated and flooding requests, straight into the bridge's ASGI app (and, smaller, over real sockets).

``FD_FUZZ_REQUESTS`` requests (default 5 000, ~10 s on an idle machine; the issue's figure is 50 000:
``FD_FUZZ_REQUESTS=50000 .venv/bin/python -m pytest tests/unit/test_bridge_fuzz.py -s``), ``FD_FUZZ_SEED`` to
replay a run; ``FD_FUZZ_WIRE_REQUESTS`` (default 500) of them again over real sockets, 48 clients at once, where
an unanswered request is a dropped connection. Invariants, per request:

- never a 5xx, never an exception out of the app (an unanswered request: a dropped connection);
- input known to be bad (a lone UTF-16 surrogate or NUL anywhere, not JSON, over the size limit, no valid
  credentials, wrong method or path) gets a 4xx with an ``error`` message and reaches Prefect not at all;
- a valid body (also with odd but valid text: control characters, BOM, bidi overrides, emoji) gets 200;
- a 200 posted exactly the events it reports, each one valid for Prefect's own server-side event model, UTF-8
  encodable and under Prefect's event size limit (a larger event is silently dropped by Prefect);
- memory stays bounded (RSS growth after warm-up, the dedupe store's size).

The Prefect API is a stub transport (``httpx.MockTransport``) that validates and counts every POST. Raw
malformed HTTP (garbage, lying lengths, bad chunking, a client hanging up mid-body) must be answered, and uvicorn
must log no application error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import random
import re
import socket
import string
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from deployments.alerts import HEARTBEAT_ALERTS, ROUTED_ALERTS, MemoryDeduper, unsendable_text
from deployments.bridge import MIB, BackgroundBridge, BridgeSettings, PrefectTarget, create_app
from tests.polling import wait_for

REQUESTS = int(os.environ.get("FD_FUZZ_REQUESTS", "5000"))
SEED = int(os.environ.get("FD_FUZZ_SEED", "20261127"))
WIRE_REQUESTS = int(os.environ.get("FD_FUZZ_WIRE_REQUESTS", "500"))
TOKEN = "fuzz-bridge-token-0123456789abcdef"
AUTH = [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-type", b"application/json")]
EVENTS_URL = "http://prefect.fuzz/api/events"
MAX_BODY = MIB  # the production default: "huge" cases are real size
PREFECT_MAX_EVENT_BYTES = 1_500_000  # PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES: larger events are dropped
RSS_GROWTH_LIMIT = 96 * MIB
DEDUPE_MAX_KEYS = 20_000
MOST_ALERTS = 1500  # alerts in the largest generated group

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\udc00\ud800", "a\ud83db"]  # lone or reversed halves
ODD_BUT_VALID = [
    "\x01", "\x1b[31mred\x1b[0m", "\x7f", "\x85", "\u2028", "\u202e", "\ufeff", "\u200d", "\U0001f525", "é",
    "中文", "e\u0301", "\r\n", "\t", "\\", '"', "</script>", "%00", "\\u0000", "${jndi:x}", "{{ event.id }}",
]


@dataclass
class Case:
    """One request and what must come of it: ``accept`` (200), ``reject`` (4xx, nothing emitted), ``no-emit``
    (not a webhook: anything but 200 and 5xx, e.g. Starlette's 307 to the path without its trailing slash) or
    ``any`` (no 5xx; a 200 posts what it reports)."""

    kind: str
    expect: str
    body: bytes | list[bytes] = b""
    method: str = "POST"
    path: str = "/alertmanager"
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: list(AUTH))


class Hostile:
    """A seeded generator of requests; every body starts from a valid Alertmanager or Grafana body."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0

    # --- valid material ---
    def word(self, lo: int = 3, hi: int = 12) -> str:
        return "".join(self.rng.choices(string.ascii_lowercase + string.digits, k=self.rng.randint(lo, hi)))

    def alert(self) -> dict[str, Any]:
        self.n += 1
        rng = self.rng
        name = rng.choice([*sorted(ROUTED_ALERTS), *sorted(HEARTBEAT_ALERTS), "DiskFull", "Fuzz" + self.word()])
        labels = {"alertname": name, "team": "ferrumdeck", "severity": rng.choice(["critical", "warning"]),
                  "pod": f"worker-{self.word(8, 10)}-{self.word(5, 5)}", "fuzz_case": str(self.n)}
        for _ in range(rng.randint(0, 4)):
            labels[self.word()] = self.word()
        alert = {
            "status": rng.choice(["firing", "resolved"]),
            "labels": labels,
            "annotations": {"summary": f"{name} {self.word()}", "runbook_url": "https://rb/x"},
            "startsAt": "2026-11-27T20:58:00.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
        }
        if rng.random() < 0.8:
            alert["fingerprint"] = f"{rng.getrandbits(64):016x}"
        return alert

    def group(self, n_alerts: int | None = None) -> tuple[str, dict[str, Any]]:
        n = n_alerts if n_alerts is not None else self.rng.choice([1, 1, 1, 2, 3, 5])
        body: dict[str, Any] = {
            "receiver": "ferrumdeck-bridge", "status": "firing", "alerts": [self.alert() for _ in range(n)],
            "groupLabels": {"alertname": "x"}, "commonLabels": {"team": "ferrumdeck"}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "groupKey": '{}:{alertname="x"}', "truncatedAlerts": 0,
        }
        if self.rng.random() < 0.7:
            body["version"] = "4"
            return "/alertmanager", body
        body.update(version="1", orgId=1, title="[FIRING:1] x", state="alerting", message="m")
        return "/grafana", body

    # --- helpers ---
    def slots(self, body: Any) -> list[tuple[tuple, bool]]:
        """Every (path, is_key) of a string value or object key in a JSON document."""
        out: list[tuple[tuple, bool]] = []
        stack: list[tuple[tuple, Any]] = [((), body)]
        while stack:
            path, node = stack.pop()
            if isinstance(node, dict):
                for k, v in node.items():
                    out.append(((*path, k), True))
                    stack.append(((*path, k), v))
            elif isinstance(node, list):
                stack.extend(((*path, i), v) for i, v in enumerate(node))
            elif isinstance(node, str):
                out.append((path, False))
        return out

    def splice(self, text: str, piece: str) -> str:
        at = self.rng.randint(0, len(text))
        return text[:at] + piece + text[at:]

    def put(self, body: Any, path: tuple, is_key: bool, new: str) -> None:
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        if is_key:
            parent[new] = parent.pop(path[-1])
        else:
            parent[path[-1]] = new

    def encode(self, body: Any) -> bytes:
        return json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as the escape "\ud800"

    # --- the cases ---
    def valid(self) -> Case:
        path, body = self.group()
        return Case("valid", "accept", self.encode(body), path=path)

    def poisoned(self) -> Case:
        """A lone surrogate or NUL in any key or string of the body (the 41 500s of the issue)."""
        path, body = self.group()
        where, is_key = self.rng.choice(self.slots(body))
        old = where[-1] if is_key else self._get(body, where)
        self.put(body, where, is_key, self.splice(str(old), self.rng.choice([*SURROGATES, "\x00"])))
        if self.rng.random() < 0.2:  # the same surrogate as raw (CESU-8) bytes: not UTF-8 at all
            return Case("poisoned-raw", "reject", json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                        path=path)
        return Case("poisoned", "reject", self.encode(body), path=path)

    def odd_text(self) -> Case:
        """Control characters, BOM, bidi overrides, emoji, long text in labels and annotations: still valid."""
        path, body = self.group()
        for _ in range(self.rng.randint(1, 4)):
            alert = self.rng.choice(body["alerts"])
            bag = alert[self.rng.choice(["labels", "annotations"])]
            key = self.rng.choice([k for k in bag if k != "alertname"] or ["extra"])
            piece = self.rng.choice(ODD_BUT_VALID) * self.rng.choice([1, 1, 3, 1000])
            if self.rng.random() < 0.3 and key in bag:
                bag[self.splice(key, piece)] = bag.pop(key)
            else:
                bag[key] = self.splice(bag.get(key, ""), piece)
        if self.rng.random() < 0.2:  # an escaped surrogate *pair* is one valid character
            return Case("odd-text", "accept", self.encode(body)[:-1] + b', "pair": "\\ud83d\\ude00"}', path=path)
        return Case("odd-text", "accept", self.encode(body), path=path)

    def mutated(self) -> Case:
        """One node replaced by a random JSON value, deleted, or an extra key added."""
        path, body = self.group()
        nodes = [p for p, _ in self.slots(body)] + [("alerts",), ("alerts", 0), ("alerts", 0, "labels")]
        where = self.rng.choice(nodes)
        parent = body
        try:
            for step in where[:-1]:
                parent = parent[step]
            action = self.rng.choice(["replace", "delete", "extra"])
            if action == "replace":
                parent[where[-1]] = self.json_value()
            elif action == "delete":
                del parent[where[-1]]
            elif isinstance(parent, dict):
                parent[self.word()] = self.json_value()
        except (KeyError, IndexError, TypeError):
            pass
        return Case("mutated", "any", self.encode(body), path=path)

    def json_value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth > 3 or r < 0.5:
            return self.rng.choice([None, True, False, 0, -1, 2**63, 1.5, "", "x", self.word(), [], {},
                                    float("inf"), float("nan"), 10**30])
        if r < 0.75:
            return [self.json_value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self.word(): self.json_value(depth + 1) for _ in range(self.rng.randint(0, 4))}

    def deep(self) -> Case:
        """Nesting from 10 to 500 000 levels: the whole body, an extra field, a label, an alert."""
        n = self.rng.choice([10, 100, 500, 900, 990, 1000, 1100, 5000, 100_000, 400_000])
        opener, closer = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        nest = opener * n + (b"1" if opener == b'{"a":' else b"") + closer * n
        where = self.rng.choice(["body", "extra", "label", "alert"])
        if where == "body":
            return Case(f"deep-{where}", "reject", nest)
        path, body = self.group(1)
        marker = "__NEST__"
        if where == "extra":
            body["nested"] = marker
        elif where == "label":
            body["alerts"][0]["labels"]["pod"] = marker
        else:
            body["alerts"].append(marker)
        raw = self.encode(body).replace(f'"{marker}"'.encode(), nest)
        return Case(f"deep-{where}", "reject" if len(raw) > MAX_BODY or where != "extra" else "any", raw, path=path)

    def many(self) -> Case:
        """Up to thousands of alerts in one group, just under the size limit."""
        path, body = self.group(self.rng.choice([50, 300, MOST_ALERTS]))
        raw = self.encode(body)
        return Case("many-alerts", "accept" if len(raw) <= MAX_BODY else "reject", raw, path=path)

    def huge(self) -> Case:
        """One alert with a huge annotation: under the limit, just over it, or streamed in chunks over it."""
        path, body = self.group(1)
        size = self.rng.choice([MAX_BODY - 2000, MAX_BODY + 1, 3 * MAX_BODY])
        body["alerts"][0]["annotations"]["description"] = ""
        raw = self.encode(body)
        body["alerts"][0]["annotations"]["description"] = "x" * max(0, size - len(raw))
        raw = self.encode(body)
        if size > MAX_BODY and self.rng.random() < 0.5:
            chunks = [raw[i:i + 65536] for i in range(0, len(raw), 65536)]
            return Case("huge-streamed", "reject", chunks, path=path)  # no Content-Length: counted as it arrives
        return Case("huge", "accept" if len(raw) <= MAX_BODY else "reject", raw, path=path)

    def not_json(self) -> Case:
        path, body = self.group()
        raw = self.encode(body)
        choice = self.rng.randrange(8)
        if choice == 0:
            out = self.rng.randbytes(self.rng.randint(0, 600))
        elif choice == 1:
            out = raw[: self.rng.randint(0, len(raw) - 1)]  # truncated
        elif choice == 2:
            out = b"1" * self.rng.choice([4301, 100_000])  # past Python's int digit limit
        elif choice == 3:
            out = raw.replace(b'"version"', b"version", 1)
        elif choice == 4:
            out = b"\xff\xfe" + raw  # a BOM that lies
        elif choice == 5:
            out = raw + b"}" * self.rng.randint(1, 3)
        elif choice == 6:
            out = b""
        else:
            out = raw.replace(b":", b"=", 1)
        return Case("not-json", "reject", out, path=path)

    def odd_json(self) -> Case:
        """Valid JSON a strict parser might refuse: NaN, duplicate keys, UTF-16/32 encodings, a UTF-8 BOM."""
        path, body = self.group()
        choice = self.rng.randrange(5)
        raw = self.encode(body)
        if choice == 0:
            raw = raw[:-1] + b', "x": NaN, "y": -Infinity}'
        elif choice == 1:
            raw = raw[:-1] + b', "receiver": "dup", "receiver": "dup2"}'
        elif choice == 2:
            raw = json.dumps(body).encode(self.rng.choice(["utf-16", "utf-32", "utf-16-le"]))
        elif choice == 3:
            raw = b"\xef\xbb\xbf" + raw
        else:
            raw = b" \n\t" + raw + b"\n "
        return Case("odd-json", "any", raw, path=path)

    def unauthenticated(self) -> Case:
        path, body = self.group()
        token = self.rng.choice([
            None, b"", b"Bearer", b"Bearer " + TOKEN.encode()[:-1], b"Bearer " + TOKEN.encode() + b"x",
            TOKEN.encode(), b"Basic !!!", b"Basic " + base64.b64encode(b"user:" + TOKEN.encode()),
            b"Bearer " + b"A" * 8000, b"Bearer " + bytes(self.rng.randint(128, 255) for _ in range(40)),
            b"Digest x", b"Bearer \x00" + TOKEN.encode(),
        ])
        headers = [(b"content-type", b"application/json")] + ([(b"authorization", token)] if token is not None else [])
        return Case("unauthenticated", "reject", self.encode(body), path=path, headers=headers)

    def wrong_route(self) -> Case:
        method = self.rng.choice(["GET", "PUT", "DELETE", "PATCH", "POST", "OPTIONS"])
        path = self.rng.choice(["/", "/alertmanager/", "/ALERTMANAGER", "/alertmanager/..%2Fgrafana", "/x" * 200,
                                "/%00", "/%ff%fe", "/healthz/x", "/api/events", "/alertmanager%2F"])
        if method != "POST" and self.rng.random() < 0.5:
            path = self.rng.choice(["/alertmanager", "/grafana"])
        return Case("wrong-route", "no-emit", self.encode(self.group()[1]), method=method, path=path)

    def headers_odd(self) -> Case:
        path, body = self.group()
        headers = list(AUTH)
        headers[1] = (b"content-type", self.rng.choice([b"text/plain", b"application/x-www-form-urlencoded",
                                                        b"application/json; charset=latin-1", b"\xff\xfe"]))
        headers.append((b"content-encoding", self.rng.choice([b"gzip", b"br", b"identity"])))
        return Case("odd-headers", "any", self.encode(body), path=path, headers=headers)

    KINDS = [  # (weight, generator)
        (14, "valid"), (16, "poisoned"), (12, "odd_text"), (14, "mutated"), (6, "deep"), (1, "many"),
        (1, "huge"), (8, "not_json"), (6, "odd_json"), (8, "unauthenticated"), (6, "wrong_route"),
        (4, "headers_odd"),
    ]

    def case(self) -> Case:
        weights, names = zip(*self.KINDS, strict=True)
        return getattr(self, self.rng.choices(names, weights=weights)[0])()

    def flood(self, n: int) -> list[Case]:
        """``n`` deliveries of one notification at once (Alertmanager retries, several replicas of it)."""
        path, body = self.group(1)
        body["alerts"][0].update(status="firing", fingerprint=f"{self.rng.getrandbits(64):016x}")
        body["alerts"][0]["labels"]["alertname"] = "WorkerCrashLooping"
        raw = self.encode(body)
        return [Case("flood", "accept", raw, path=path) for _ in range(n)]

    @staticmethod
    def _get(body: Any, path: tuple) -> Any:
        for step in path:
            body = body[step]
        return body


class ValidatingPrefect:
    """POST /api/events as Prefect's server takes it: every event must pass Prefect's own event model."""

    def __init__(self) -> None:
        from prefect.server.events.schemas.events import Event

        self.model = Event
        self.count = 0
        self.recent: deque[dict] = deque(maxlen=200)  # the last events only: memory is being measured
        self.invalid: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and str(request.url) == EVENTS_URL
        events = json.loads(request.content)
        for event in events:
            size = len(json.dumps(event, ensure_ascii=False).encode())
            if size > PREFECT_MAX_EVENT_BYTES:
                self.invalid.append(f"event of {size} bytes: Prefect would drop it")
            try:
                self.model.model_validate(event)
            except ValueError as e:
                self.invalid.append(str(e)[:300])
        self.count += len(events)
        self.recent.extend(events)
        return httpx.Response(204)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    server_errors: int = 0
    dropped: int = 0
    events: int = 0

    def fail(self, case: Case, why: str) -> None:
        if len(self.failures) < 25:
            body = case.body if isinstance(case.body, bytes) else b"".join(case.body)
            self.failures.append(f"{case.kind} {case.method} {case.path}: {why} | body[:160]={body[:160]!r}")


def make_app(prefect: ValidatingPrefect, *, deduper: MemoryDeduper):
    return create_app(
        BridgeSettings(token=TOKEN, max_body_bytes=MAX_BODY, dedupe_window_s=300),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(prefect)),
        target=PrefectTarget(events_url=EVENTS_URL),
        deduper=deduper,
    )


async def send(http: httpx.AsyncClient, case: Case) -> httpx.Response:
    if isinstance(case.body, list):
        chunks = case.body

        async def stream() -> Any:
            for chunk in chunks:
                yield chunk

        content: Any = stream()
    else:
        content = case.body
    return await http.request(case.method, case.path, content=content, headers=case.headers)


def judge(case: Case, response: httpx.Response | None, error: BaseException | None, new_events: int | None,
          tally: Tally) -> None:
    """Check one answer against the invariants; ``new_events`` None when several ran at once (flood)."""
    tally.by_kind[case.kind] += 1
    if response is None:
        tally.dropped += 1
        tally.fail(case, f"no answer: {type(error).__name__}: {error}")
        return
    status = response.status_code
    tally.statuses[status] += 1
    if status >= 500:
        tally.server_errors += 1
        tally.fail(case, f"{status} {response.text[:200]}")
        return
    if case.expect == "accept" and status != 200:
        tally.fail(case, f"valid input refused: {status} {response.text[:300]}")
    if case.expect == "reject" and not 400 <= status < 500:
        tally.fail(case, f"bad input accepted: {status} {response.text[:200]}")
    if case.expect == "no-emit" and status == 200:
        tally.fail(case, "a wrong method or path was taken as a webhook")
    if status != 200:
        if case.method == "POST" and case.path in ("/alertmanager", "/grafana") and not response.json().get("error"):
            tally.fail(case, f"{status} without an error message")
        if new_events:
            tally.fail(case, f"rejected ({status}) yet {new_events} events reached Prefect")
    elif new_events is not None and new_events != response.json()["events"]:
        tally.fail(case, f"reported {response.json()['events']} events, posted {new_events}")


async def fuzz(n: int, seed: int) -> tuple[Tally, ValidatingPrefect, MemoryDeduper, dict[str, int]]:
    prefect = ValidatingPrefect()
    deduper = MemoryDeduper(window_s=300, max_keys=DEDUPE_MAX_KEYS)
    app = make_app(prefect, deduper=deduper)
    gen = Hostile(seed)
    tally = Tally()
    memory: dict[str, int] = {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge", timeout=30) as http:
        done = 0
        while done < n:
            if done >= n // 10 and "warm" not in memory:
                gc.collect()
                memory["warm"] = rss_bytes()
            if gen.rng.random() < 0.003:  # a flood: 32 deliveries of one notification at once
                cases = gen.flood(32)
                before = prefect.count
                answers = await asyncio.gather(*(send(http, c) for c in cases), return_exceptions=True)
                for case, answer in zip(cases, answers, strict=True):
                    ok = isinstance(answer, httpx.Response)
                    judge(case, answer if ok else None, None if ok else answer, None, tally)
                fresh = prefect.count - before
                if fresh != 1:
                    tally.fail(cases[0], f"a flood of 32 identical notifications made {fresh} events, not 1")
                done += len(cases)
                continue
            case = gen.case()
            before = prefect.count
            try:
                response, error = await send(http, case), None
            except Exception as e:  # the app raised: in production the connection would be dropped
                response, error = None, e
            judge(case, response, error, prefect.count - before, tally)
            done += 1
    gc.collect()
    memory["end"] = rss_bytes()
    tally.events = prefect.count
    return tally, prefect, deduper, memory


def test_hostile_requests_never_5xx_never_emit_when_rejected_and_memory_stays_bounded():
    started = time.monotonic()
    tally, prefect, deduper, memory = asyncio.run(fuzz(REQUESTS, SEED))
    elapsed = time.monotonic() - started
    growth = memory["end"] - memory["warm"]
    print(f"\nfuzz: {sum(tally.by_kind.values())} requests in {elapsed:.1f} s (seed {SEED}); "
          f"statuses {dict(sorted(tally.statuses.items()))}; kinds {dict(sorted(tally.by_kind.items()))}; "
          f"5xx {tally.server_errors}; unanswered {tally.dropped}; events {tally.events} "
          f"(invalid for Prefect {len(prefect.invalid)}); dedupe keys {len(deduper)}; "
          f"RSS {memory['warm'] / MIB:.0f} -> {memory['end'] / MIB:.0f} MiB")
    assert tally.server_errors == 0 and tally.dropped == 0, "\n".join(tally.failures)
    assert tally.failures == [], "\n".join(tally.failures)
    assert prefect.invalid == [], prefect.invalid[:5]
    assert tally.statuses[200] and tally.statuses[422] and tally.statuses[401] and tally.statuses[413]
    assert tally.events > 0
    assert len(deduper) <= DEDUPE_MAX_KEYS + MOST_ALERTS  # pruned to its limit before each request's keys
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / MIB:.0f} MiB after warm-up"


@pytest.mark.parametrize("poison", SURROGATES + ["\x00"])
@pytest.mark.parametrize("where", ["label", "label-key", "annotation", "alertname", "groupLabels", "extra-field"])
def test_text_that_cannot_be_forwarded_is_a_422_that_names_where_and_emits_nothing(poison, where):
    """The issue's 500: a label holding a lone surrogate made the forwarded event unencodable."""
    prefect = ValidatingPrefect()
    app = make_app(prefect, deduper=MemoryDeduper(window_s=300))
    gen = Hostile(1)
    path, body = gen.group(1)
    alert = body["alerts"][0]
    if where == "label":
        alert["labels"]["pod"] = f"worker-{poison}"
        loc = "alerts.0.labels.pod"
    elif where == "label-key":
        alert["labels"][f"k{poison}"] = "v"
        loc = "alerts.0.labels.k"
    elif where == "annotation":
        alert["annotations"]["summary"] = poison
        loc = "alerts.0.annotations.summary"
    elif where == "alertname":
        alert["labels"]["alertname"] = f"WorkerCrashLooping{poison}"
        loc = "alerts.0.labels.alertname"
    elif where == "groupLabels":
        body["groupLabels"]["x"] = poison
        loc = "groupLabels.x"
    else:
        body["extra"] = {"deep": [poison]}
        loc = "extra.deep.0"

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as http:
            return await http.post(path, content=json.dumps(body).encode(), headers=dict(
                (k.decode(), v.decode()) for k, v in AUTH))

    r = asyncio.run(go())
    assert r.status_code == 422, r.text
    [detail] = r.json()["details"]
    assert loc in detail["msg"] and "surrogate" in detail["msg"]
    assert r.content.decode("utf-8")  # the answer itself is valid UTF-8
    assert prefect.count == 0
    # the same body without the poison goes through
    clean = json.loads(json.dumps(body).replace(json.dumps(poison)[1:-1], ""))
    body.clear()
    body.update(clean)
    again = asyncio.run(go())
    assert again.status_code == 200, again.text


# --- over real sockets: uvicorn in front, so a dropped connection is a dropped connection ---------------------

def raw_exchange(port: int, payload: bytes, *, read: bool = True) -> bytes:
    """Send bytes as they are on a fresh TCP connection; return the first answer (b"" if closed unanswered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        if not read:
            return b""
        chunks = []
        with contextlib.suppress(TimeoutError):
            while (chunk := s.recv(65536)) and b"\r\n\r\n" not in b"".join(chunks) + chunk:
                chunks.append(chunk)
            chunks.append(chunk)
        return b"".join(chunks)


class Errors(logging.Handler):
    """Keeps uvicorn's ERROR records ("Exception in ASGI application": an unhandled error, a 500 or a drop)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage() + (f" {record.exc_info[1]!r}" if record.exc_info else ""))


@dataclass
class Served:
    bridge: BackgroundBridge
    prefect: ValidatingPrefect
    errors: Errors


@pytest.fixture(scope="module")
def _served() -> Iterator[Served]:
    prefect = ValidatingPrefect()
    errors = Errors()
    with BackgroundBridge(make_app(prefect, deduper=MemoryDeduper(window_s=300))) as bridge:
        logging.getLogger("uvicorn.error").addHandler(errors)  # after start: uvicorn's logging config resets handlers
        try:
            yield Served(bridge, prefect, errors)
        finally:
            logging.getLogger("uvicorn.error").removeHandler(errors)


@pytest.fixture
def served(_served: Served) -> Served:
    """The bridge on a real socket; uvicorn's ERROR records of this test only."""
    _served.errors.records.clear()
    return _served


def webhook_requests(bridge: BackgroundBridge) -> int | None:
    """Requests to /alertmanager the bridge has finished, by its own metrics (None: it has no metrics)."""
    r = httpx.get(f"{bridge.url}/metrics", timeout=5)
    if r.status_code != 200:
        return None
    lines = [x for x in r.text.splitlines() if x.startswith("ferrumdeck_bridge_requests_total{") and
             'endpoint="/alertmanager"' in x]
    return sum(int(float(x.rsplit(" ", 1)[1])) for x in lines)


def no_5xx_counted(bridge: BackgroundBridge) -> None:
    """The bridge's own request metrics (when it has them) count no 5xx either."""
    r = httpx.get(f"{bridge.url}/metrics", timeout=5)
    if r.status_code == 200:
        assert not re.search(r'status="5\d\d"', r.text), [x for x in r.text.splitlines() if 'status="5' in x]


def test_a_concurrent_flood_over_sockets_drops_no_connection_and_never_5xx(served):
    bridge, prefect = served.bridge, served.prefect
    gen = Hostile(SEED + 1)
    cases = [gen.case() for _ in range(WIRE_REQUESTS)] + gen.flood(64)
    # what an HTTP client cannot even send (NUL in a header) was covered in-process; raw bytes are tested below
    cases = [c for c in cases if not any(b"\x00" in v for _, v in c.headers)]
    gen.rng.shuffle(cases)
    tally = Tally()

    async def go() -> None:
        limits = httpx.Limits(max_connections=48, max_keepalive_connections=48)
        async with httpx.AsyncClient(base_url=bridge.url, timeout=30, limits=limits) as http:
            queue = list(reversed(cases))

            async def client() -> None:  # 48 clients at once, each sending one request after another
                while queue:
                    case = queue.pop()
                    try:
                        response, error = await send(http, case), None
                    except httpx.HTTPError as e:
                        response, error = None, e
                    judge(case, response, error, None, tally)

            await asyncio.gather(*(client() for _ in range(48)))

    asyncio.run(go())
    print(f"\nwire: {len(cases)} requests, statuses {dict(sorted(tally.statuses.items()))}, "
          f"unanswered {tally.dropped}, events {prefect.count}")
    assert tally.server_errors == 0 and tally.dropped == 0, "\n".join(tally.failures)
    assert tally.failures == [], "\n".join(tally.failures)
    assert prefect.invalid == []
    assert httpx.get(f"{bridge.url}/healthz", timeout=5).status_code == 200
    assert served.errors.records == []
    no_5xx_counted(bridge)


def http_request(body: bytes, *, path: str = "/alertmanager", auth: bool = True, length: int | None = None,
                 extra: bytes = b"") -> bytes:
    """A raw HTTP/1.1 POST; ``length`` overrides the Content-Length it declares."""
    head = f"POST {path} HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\nContent-Type: application/json\r\n".encode()
    if auth:
        head += f"Authorization: Bearer {TOKEN}\r\n".encode()
    head += f"Content-Length: {len(body) if length is None else length}\r\n".encode() + extra
    return head + b"\r\n" + body


RAW = {
    "garbage request line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", b"400"),
    "header too large": (b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n", b"4"),
    "content-length shorter than the body": (http_request(b'{"alerts": []}', length=5), b"400"),
    "non-numeric content-length": (b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", b"400"),
    "declared over the limit": (http_request(b"{", length=999_999_999), b"413"),
    "bad chunked encoding": (b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"zz\r\n{}\r\n0\r\n\r\n", b"400"),
    "surrogate, no auth": (http_request(b'{"alerts": [{"labels": {"pod": "\\ud800"}}]}', auth=False), b"401"),
    "surrogate": (http_request(b'{"version": "4", "alerts": [{"status": "firing", "labels": {"alertname": "A", '
                               b'"pod": "\\ud800"}}]}'), b"422"),
    # json.loads decodes bytes with "surrogatepass": raw CESU-8 becomes the same lone surrogate
    "raw CESU-8 surrogate": (http_request(b'{"alerts": [{"labels": {"pod": "\xed\xa0\x80"}}]}'), b"422"),
}


@pytest.mark.parametrize("name", list(RAW))
def test_malformed_http_is_answered_not_dropped(served, name):
    bridge, prefect = served.bridge, served.prefect
    payload, answer = RAW[name]
    before = prefect.count
    reply = raw_exchange(bridge.port, payload)
    assert reply.startswith(b"HTTP/1.1 " + answer), f"{name}: {reply[:200]!r}"
    assert prefect.count == before
    assert httpx.get(f"{bridge.url}/healthz", timeout=5).status_code == 200
    no_5xx_counted(bridge)
    if name != "bad chunked encoding":  # uvicorn answers that 400 itself, then logs the app's own answer failing
        assert served.errors.records == []


def test_a_client_that_hangs_up_mid_body_leaves_the_bridge_serving(served):
    bridge, prefect = served.bridge, served.prefect
    before, counted = prefect.count, webhook_requests(bridge)
    for _ in range(20):
        raw_exchange(bridge.port, b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Length: 100000\r\n\r\n{\"alerts\": [", read=False)
    assert httpx.get(f"{bridge.url}/healthz", timeout=5).status_code == 200
    assert prefect.count == before
    wait_for(lambda: webhook_requests(bridge) in (None, counted + 20), timeout=10, what="the 20 hang-ups handled")
    assert served.errors.records == []  # was "Exception in ASGI application: ClientDisconnect", counted as a 500
    no_5xx_counted(bridge)


def test_a_valid_body_with_odd_text_is_forwarded_intact(served):
    """The other side of the coin: strange but valid text is not refused, and arrives unchanged."""
    bridge, prefect = served.bridge, served.prefect
    gen = Hostile(7)
    path, body = gen.group(1)
    body["alerts"][0]["status"] = "firing"
    text = "".join(ODD_BUT_VALID)
    body["alerts"][0]["annotations"]["description"] = text
    body["alerts"][0]["labels"]["note"] = "\x01\u202e\U0001f525"
    r = httpx.post(f"{bridge.url}{path}", content=json.dumps(body).encode(), timeout=10,
                   headers={k.decode(): v.decode() for k, v in AUTH})
    assert r.status_code == 200, r.text
    mine = [e for e in prefect.recent if e["payload"]["labels"].get("fuzz_case") == body["alerts"][0]["labels"]["fuzz_case"]
            and e["payload"]["annotations"].get("description") == text]
    if body["alerts"][0]["labels"]["alertname"] in HEARTBEAT_ALERTS:
        assert mine == [] and r.json()["heartbeats"] == 1
    else:
        assert len(mine) == 1 and mine[0]["payload"]["labels"]["note"] == "\x01\u202e\U0001f525"


def test_unsendable_text_names_the_place_and_walks_any_depth_without_recursion():
    deep: list = []
    node = deep
    for _ in range(100_000):  # far deeper than the interpreter's recursion limit
        node.append([])
        node = node[0]
    node.append("x\ud800")
    assert unsendable_text({"a": deep}) == "a" + ".0" * 100_001
    assert unsendable_text({"k\x00": "v"}) == "k\\x00"
    assert unsendable_text({"ok": ["é", "\U0001f525", "\x01\u202e", "\\ud800"], "n": [1, None, 2.5]}) is None
