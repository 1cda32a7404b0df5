"""Fuzzing the bridge with 2 100 generated requests: malformed, oversized, wrongly typed, unauthenticated.

Invariants: never a 5xx; a request without valid credentials always gets 401; a rejected request (any non-200)
makes no POST to Prefect; an accepted one posts exactly the events it reports.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from deployments.bridge import BridgeSettings, PrefectTarget, create_app
from tests.unit.test_alerts import am_alert, am_body
from tests.unit.test_alerts_bridge import EVENTS_URL, TOKEN, StubPrefect

MAX_BODY = 4096  # small, so oversized bodies are cheap to generate

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)

VALID = {"Authorization": f"Bearer {TOKEN}"}
auth_headers = st.one_of(
    st.just(VALID),
    st.just({}),
    st.builds(lambda t: {"Authorization": f"Bearer {t}"}, header_text),
    st.builds(lambda t: {"Authorization": f"Basic {t}"}, header_text),
    st.builds(lambda t: {"Authorization": t}, header_text),
    st.just({"Authorization": f"bearer  {TOKEN}  "}),  # valid: scheme is case-insensitive
)


def _paths(body: dict) -> list[tuple]:
    """Every (key, ...) path into a JSON body, to mutate one place at a time."""
    out: list[tuple] = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                out.append((*path, k))
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                out.append((*path, i))
                walk(v, (*path, i))

    walk(body, ())
    return out


@st.composite
def mutated_bodies(draw) -> bytes:
    """A valid Alertmanager body with one field replaced by a random value, deleted, or an extra added."""
    pods = draw(st.lists(st.sampled_from(["p1", "p2", "p3"]), min_size=1, max_size=3))
    body = am_body(*[am_alert(draw(st.sampled_from(["WorkerHung", "Watchdog", "X"])), pod=p) for p in pods])
    body = copy.deepcopy(body)
    paths = _paths(body)
    path = draw(st.sampled_from(paths))
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    action = draw(st.sampled_from(["replace", "delete", "extra"]))
    if action == "replace":
        parent[path[-1]] = draw(json_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=10))] = draw(json_values)
    return json.dumps(body).encode()


@st.composite
def oversized_bodies(draw) -> bytes:
    body = am_body(am_alert(pod="p1"))
    body["alerts"][0]["annotations"]["description"] = "x" * draw(st.integers(MAX_BODY, 3 * MAX_BODY))
    return json.dumps(body).encode()


bodies = st.one_of(
    st.binary(max_size=600),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_bodies(),
    oversized_bodies(),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
)


@pytest.fixture(scope="module")
def stub() -> StubPrefect:
    return StubPrefect()


@pytest.fixture(scope="module")
def client(stub: StubPrefect) -> Iterator[Callable[..., httpx.Response]]:
    """Requests straight into the ASGI app on one event loop (~1 ms each; TestClient costs ~5 ms)."""
    app = create_app(
        BridgeSettings(token=TOKEN, max_body_bytes=MAX_BODY, dedupe_window_s=0),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(stub)),
        target=PrefectTarget(events_url=EVENTS_URL),
    )
    loop = asyncio.new_event_loop()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bridge")

    def request(method: str, path: str, **kw) -> httpx.Response:
        return loop.run_until_complete(http.request(method, path, **kw))

    yield request
    loop.run_until_complete(http.aclose())
    loop.close()


FUZZ = settings(
    max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(headers=auth_headers, path=st.sampled_from(["/alertmanager", "/grafana"]), body=bodies)
def test_fuzzed_requests_never_5xx_and_rejected_ones_emit_nothing(client, stub, headers, path, body):
    before = len(stub.events)
    r = client("POST", path, content=body, headers=headers | {"Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    event(f"status {r.status_code}")
    scheme, *rest = headers.get("Authorization", "").split() or [""]
    authenticated = scheme.lower() == "bearer" and rest == [TOKEN]
    if not authenticated:
        assert r.status_code == 401
    if r.status_code != 200:
        assert len(stub.events) == before, "a rejected request reached Prefect"
        assert r.json()["error"]
    else:
        assert len(stub.events) - before == r.json()["events"]


@settings(FUZZ, max_examples=600)
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
    path=st.one_of(st.sampled_from(["/", "/alertmanager/", "/healthz", "/heartbeat", "/x"]), header_text),
    headers=auth_headers,
)
def test_fuzzed_methods_and_paths_never_5xx_or_emit(client, stub, method, path, headers):
    before = len(stub.events)
    r = client(method, "/" + path.lstrip("/"), headers=headers, content=b"{}")
    assert r.status_code < 500
    assert len(stub.events) == before
