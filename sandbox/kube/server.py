"""The ASGI app: the Kubernetes REST API over the store, as kubectl 1.32 and the official client use it."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from sandbox.kube import resources as R
from sandbox.kube.controllers import Controller
from sandbox.kube.kubelet import is_pod_ready
from sandbox.kube.patch import APPLY, PatchError, apply_patch
from sandbox.kube.resources import Resource
from sandbox.kube.selectors import (
    SelectorError,
    labels_match,
    make_filter,
    selector_from_match_labels,
    selector_string,
)
from sandbox.kube.store import Store, StoreError, not_found, now_iso, status_body
from sandbox.kube.tables import parse_time, table
from sandbox.kube.watch import open_watch

log = logging.getLogger(__name__)

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-sandbox",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


@dataclass
class RecordedRequest:
    """One request as the server saw it (what RBAC would check: verb, group, resource, subresource)."""

    verb: str
    method: str
    path: str
    query: dict[str, str]
    api_group: str | None = None
    api_version: str | None = None
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    content_type: str = ""
    body: Any = None
    status: int = 0
    user_agent: str = ""


@dataclass
class FaultRule:
    status: int | str
    remaining: int
    path_contains: str | None = None
    retry_after: int | None = None


@dataclass
class Route:
    """A parsed API path."""

    group: str
    version: str
    namespace: str | None
    plural: str
    name: str | None = None
    subresource: str | None = None
    resource: Resource | None = None


def parse_api_path(path: str) -> Route | None:
    parts = [p for p in path.split("/") if p]
    if not parts:
        return None
    if parts[0] == "api" and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    route = Route(group, version, namespace, rest[0])
    if len(rest) > 1:
        route.name = rest[1]
    if len(rest) > 2:
        route.subresource = rest[2]
    if len(rest) > 3:
        return None
    route.resource = R.lookup(group, version, route.plural)
    return route


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def status_response(code: int, reason: str, message: str, details: dict | None = None,
                    headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_body(code, reason, message, details), status_code=code, headers=headers)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


@dataclass
class ApiState:
    """What the app shares with ``SandboxCluster``: the store, the controller, the log and the faults."""

    store: Store
    controller: Controller
    requests: list[RecordedRequest] = field(default_factory=list)
    faults: list[FaultRule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    server_address: str = "127.0.0.1:0"


def _verb(method: str, route: Route | None, query: dict[str, str]) -> str:
    if method == "GET":
        if route is None or route.name or route.subresource:
            return "get"
        return "watch" if truthy(query.get("watch")) else "list"
    if method == "DELETE":
        return "delete" if route and route.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "HEAD": "get", "OPTIONS": "options"}.get(
        method, method.lower()
    )


class KubeApp:
    """ASGI entry point: record, inject faults, route."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.store = state.store
        self.ctl = state.controller

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        query = dict(parse_qsl(request.url.query, keep_blank_values=True))
        route = parse_api_path(path)
        body_bytes = await request.body()
        body: Any = None
        if body_bytes:
            try:
                body = json.loads(body_bytes)
            except ValueError:
                body = None
        rec = RecordedRequest(
            verb=_verb(request.method, route, query),
            method=request.method,
            path=path,
            query=query,
            content_type=request.headers.get("content-type", ""),
            body=body,
            user_agent=request.headers.get("user-agent", ""),
        )
        if route is not None:
            rec.api_group, rec.api_version = route.group, route.version
            rec.resource, rec.subresource = route.plural, route.subresource
            rec.namespace, rec.name = route.namespace, route.name
            if route.plural == "namespaces" and route.namespace is None and route.name:
                rec.namespace = route.name
        with self.state.lock:
            self.state.requests.append(rec)
        response = await self._fault(path)
        if response is None:
            try:
                if body_bytes and body is None and request.method in ("POST", "PUT", "PATCH"):
                    raise ApiError(400, "BadRequest", "the body of the request was not valid JSON")
                response = await self.dispatch(request, route, query, body)
            except ApiError as e:
                response = status_response(e.code, e.reason, e.message, e.details)
            except StoreError as e:
                response = status_response(e.code, e.reason, e.message, e.details)
            except SelectorError as e:
                response = status_response(400, "BadRequest", str(e))
            except PatchError as e:
                response = status_response(422, "Invalid", str(e))
            except ValueError as e:  # a malformed query value (tailLines=abc) or body field
                response = status_response(400, "BadRequest", f"invalid request: {e}")
            except Exception as e:  # a sandbox bug: still answer like an API server, and say so in the log
                log.exception("sandbox API server failed on %s %s", request.method, path)
                response = status_response(500, "InternalError", f"Internal error occurred: {type(e).__name__}: {e}")
        rec.status = response.status_code
        return response

    async def _fault(self, path: str) -> Response | None:
        with self.state.lock:
            rule = next(
                (f for f in self.state.faults
                 if f.remaining > 0 and (f.path_contains is None or f.path_contains in path)),
                None,
            )
            if rule is None:
                return None
            rule.remaining -= 1
            if rule.remaining <= 0:
                self.state.faults.remove(rule)
        if rule.status == "timeout":
            deadline = time.monotonic() + self.ctl.timing.api_timeout
            while time.monotonic() < deadline and not self.state.stopping.is_set():
                await asyncio.sleep(0.05)  # poll
            return status_response(504, "Timeout", "the server was unable to return a response in the time allotted")
        code = int(rule.status)
        if code == 429:
            if rule.retry_after is None:
                return status_response(429, "TooManyRequests", "the server has received too many requests and has asked us to try again later")
            return status_response(429, "TooManyRequests", "the server has received too many requests and has asked us to try again later",
                                   {"retryAfterSeconds": rule.retry_after}, headers={"Retry-After": str(rule.retry_after)})
        if code == 500:
            return status_response(500, "InternalError", "Internal error occurred: injected fault (sandbox)")
        if code == 503:
            return status_response(503, "ServiceUnavailable", "the server is currently unable to handle the request")
        if code == 409:
            return status_response(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again")
        return status_response(code, "InternalError", f"injected fault {code} (sandbox)")

    # --- routing ---
    async def dispatch(self, request: Request, route: Route | None, query: dict, body: Any) -> Response:
        path = request.url.path.rstrip("/") or "/"
        method = request.method
        if route is None:
            return self._non_resource(path)
        res = route.resource
        if res is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res.namespaced is False and route.namespace is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res.group == "metrics.k8s.io":
            return self._metrics(res, route, query)
        sub = route.subresource
        if sub is not None and sub not in res.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub == "log":
            return self._logs(route, query)
        if sub == "eviction":
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            return self._evict(route, body, query)
        if sub == "scale":
            return self._scale(request, route, body, query)
        if route.name is None:
            if method == "GET":
                if truthy(query.get("watch")):
                    return self._watch(request, res, route.namespace, query)
                return self._list(request, res, route.namespace, query)
            if method == "POST":
                return self._create(res, route.namespace, body, query)
            if method == "DELETE":
                return self._delete_collection(res, route.namespace, query, body)
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if method == "GET":
            if truthy(query.get("watch")):
                query = {**query, "fieldSelector": f"metadata.name={route.name}"}
                return self._watch(request, res, route.namespace, query)
            return self._get(request, res, route.namespace, route.name, query)
        if method == "PUT":
            return self._update(res, route, body, query)
        if method == "PATCH":
            return self._patch(request, res, route, body, query)
        if method == "DELETE":
            return self._delete(res, route.namespace, route.name, query, body)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _non_resource(self, path: str) -> Response:
        if path == "/version":
            return JSONResponse(VERSION)
        if path == "/api":
            return JSONResponse({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.state.server_address}],
            })
        if path == "/apis":
            return JSONResponse(R.group_list())
        if path == "/api/v1":
            return JSONResponse(R.resource_list("v1"))
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "apis":
            for group in R.group_list()["groups"]:
                if group["name"] == parts[1]:
                    return JSONResponse({"kind": "APIGroup", "apiVersion": "v1", **group})
        if len(parts) == 3 and parts[0] == "apis" and f"{parts[1]}/{parts[2]}" in R.GROUP_VERSIONS:
            return JSONResponse(R.resource_list(f"{parts[1]}/{parts[2]}"))
        if path in ("/healthz", "/livez", "/readyz"):
            return PlainTextResponse("ok")
        return status_response(404, "NotFound", "the server could not find the requested resource")

    # --- helpers ---
    def _namespace_exists(self, namespace: str | None) -> None:
        if namespace and self.store.get(R.NAMESPACES, None, namespace) is None:
            raise not_found(R.NAMESPACES, namespace)

    def _require(self, res: Resource, namespace: str | None, name: str) -> dict:
        obj = self.store.get(res, namespace, name)
        if obj is None:
            raise not_found(res, name)
        return obj

    @staticmethod
    def _wants_table(request: Request) -> bool:
        return "as=table" in request.headers.get("accept", "").replace(" ", "").lower()

    def _filter(self, res: Resource, query: dict):
        return make_filter(query.get("labelSelector"), query.get("fieldSelector"), allowed=set(res.fields))

    def _get(self, request: Request, res: Resource, namespace: str | None, name: str, query: dict) -> Response:
        obj = self._require(res, namespace, name)
        if self._wants_table(request):
            return JSONResponse(table(res.key, [obj], resource_version=obj["metadata"]["resourceVersion"],
                                      include_object=query.get("includeObject", "Metadata")))
        return JSONResponse(obj)

    def _list(self, request: Request, res: Resource, namespace: str | None, query: dict) -> Response:
        predicate = self._filter(res, query)
        with self.store.lock:
            items = [o for o in self.store.list(res, namespace) if predicate(o)]
            rv = str(self.store.rv)
        limit = int(query.get("limit") or 0)
        cont = query.get("continue") or ""
        start = int(cont) if cont.isdigit() else 0
        meta: dict = {"resourceVersion": rv}
        if limit and start + limit < len(items):
            meta["continue"] = str(start + limit)
            meta["remainingItemCount"] = len(items) - start - limit
            items = items[start : start + limit]
        else:
            items = items[start:]
        if self._wants_table(request):
            t = table(res.key, items, resource_version=rv, include_object=query.get("includeObject", "Metadata"))
            t["metadata"].update(meta)
            return JSONResponse(t)
        return JSONResponse({"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta, "items": items})

    def _watch(self, request: Request, res: Resource, namespace: str | None, query: dict) -> Response:
        stream = open_watch(
            self.store, res, namespace, self._filter(res, query),
            since=query.get("resourceVersion") or "",
            send_initial=truthy(query.get("sendInitialEvents")),
            bookmarks=truthy(query.get("allowWatchBookmarks")),
            as_table=self._wants_table(request),
            timeout=float(query.get("timeoutSeconds") or self.ctl.timing.watch_timeout),
            bookmark_interval=self.ctl.timing.bookmark_interval,
            stopping=self.state.stopping,
        )
        return StreamingResponse(stream, media_type="application/json")

    def _dry_run(self, query: dict) -> bool:
        return bool(query.get("dryRun"))

    def _prepare_new(self, res: Resource, namespace: str | None, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
            self._namespace_exists(meta["namespace"])
        for key in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp"):
            meta.pop(key, None)
        if res in (R.DEPLOYMENTS, R.REPLICASETS):
            default_workload(res, obj)
            meta["generation"] = 1
            obj["status"] = {}
        if res is R.PDBS:
            meta["generation"] = 1
        if res is R.EVENTS:
            obj.setdefault("count", 1)
            obj.setdefault("firstTimestamp", now_iso())
            obj.setdefault("lastTimestamp", obj["firstTimestamp"])
        return obj

    def _create(self, res: Resource, namespace: str | None, body: Any, query: dict) -> Response:
        obj = self._prepare_new(res, namespace, body)
        if res is R.PODS:
            obj.setdefault("spec", {}).setdefault("nodeName", "sandbox-node-1")
            obj["status"] = {"phase": "Pending", "conditions": [], "containerStatuses": [
                {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
                 "started": False, "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}}
                for c in obj["spec"].get("containers") or []
            ]}
        if self._dry_run(query):
            obj["metadata"].setdefault("name", (obj["metadata"].get("generateName") or "") + "dryrun")
            obj["kind"], obj["apiVersion"] = res.kind, res.api_version
            return JSONResponse(obj, status_code=201)
        with self.ctl.mutex:
            created = self.store.create(res, obj)
            if res is R.PODS:
                ns, name, uid = created["metadata"]["namespace"], created["metadata"]["name"], created["metadata"]["uid"]
                self.ctl.after(self.ctl.timing.start_delay, lambda: self.ctl.start_containers(ns, name, uid))
        return JSONResponse(created, status_code=201)

    def _update(self, res: Resource, route: Route, body: Any, query: dict) -> Response:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request must be a JSON object")
        name = route.name
        current = self._require(res, route.namespace, name)
        if (body.get("metadata") or {}).get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        new = self._merge_write(res, current, copy.deepcopy(body), status_only=route.subresource == "status")
        expect = (body.get("metadata") or {}).get("resourceVersion")
        if self._dry_run(query):
            return JSONResponse(new)
        with self.ctl.mutex:
            stored = self.store.replace(res, new, expect_rv=expect or None)
        return JSONResponse(stored)

    def _patch(self, request: Request, res: Resource, route: Route, body: Any, query: dict) -> Response:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() == APPLY:
            raise ApiError(415, "UnsupportedMediaType", "server-side apply is not supported by the sandbox")
        if body is None:
            raise ApiError(400, "BadRequest", "empty patch")
        with self.ctl.mutex, self.store.lock:
            current = self._require(res, route.namespace, route.name)
            patched = apply_patch(copy.deepcopy(current), body, ctype)
            if patched.get("metadata", {}).get("name", route.name) != route.name:
                raise ApiError(422, "Invalid", "metadata.name: Invalid value: field is immutable")
            expect = (patched.get("metadata") or {}).get("resourceVersion")
            if expect == current["metadata"]["resourceVersion"]:
                expect = None
            new = self._merge_write(res, current, patched, status_only=route.subresource == "status")
            if self._dry_run(query):
                return JSONResponse(new)
            stored = self.store.replace(res, new, expect_rv=expect)
        return JSONResponse(stored)

    def _merge_write(self, res: Resource, current: dict, new: dict, *, status_only: bool) -> dict:
        """What a write may change: status only through /status; metadata system fields kept; generation."""
        if status_only:
            result = copy.deepcopy(current)
            result["status"] = new.get("status", current.get("status"))
            return result
        meta = new.setdefault("metadata", {})
        for key in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "generateName", "ownerReferences"):
            if key in current["metadata"] and key != "ownerReferences":
                meta[key] = current["metadata"][key]
        if "ownerReferences" not in meta and "ownerReferences" in current["metadata"]:
            pass  # removing ownerReferences (orphaning) is allowed
        if res is not R.EVENTS and "status" in current:
            new["status"] = copy.deepcopy(current["status"])
        if res in (R.DEPLOYMENTS, R.REPLICASETS):
            default_workload(res, new)
            if new.get("spec") != current.get("spec"):
                meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
            else:
                meta["generation"] = current["metadata"].get("generation", 1)
        if res is R.PODS:
            self._check_pod_update(current, new)
        return new

    @staticmethod
    def _check_pod_update(current: dict, new: dict) -> None:
        old_spec, new_spec = current.get("spec") or {}, new.get("spec") or {}
        mutable = ("containers", "initContainers", "activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")
        for key in set(old_spec) | set(new_spec):
            if key in mutable:
                continue
            if old_spec.get(key) != new_spec.get(key):
                raise ApiError(422, "Invalid", f'Pod "{current["metadata"]["name"]}" is invalid: spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`')
        for a, b in zip(old_spec.get("containers") or [], new_spec.get("containers") or [], strict=False):
            if {k: v for k, v in a.items() if k != "image"} != {k: v for k, v in b.items() if k != "image"}:
                raise ApiError(422, "Invalid", f'Pod "{current["metadata"]["name"]}" is invalid: spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`')

    def _delete_options(self, query: dict, body: Any) -> dict:
        opts = dict(body) if isinstance(body, dict) else {}
        if "gracePeriodSeconds" in query:
            opts["gracePeriodSeconds"] = int(query["gracePeriodSeconds"])
        if "propagationPolicy" in query:
            opts["propagationPolicy"] = query["propagationPolicy"]
        if query.get("dryRun"):
            opts["dryRun"] = [query["dryRun"]]
        return opts

    def _delete(self, res: Resource, namespace: str | None, name: str, query: dict, body: Any) -> Response:
        opts = self._delete_options(query, body)
        with self.ctl.mutex, self.store.lock:
            current = self._require(res, namespace, name)
            pre = opts.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != current["metadata"]["uid"]:
                raise ApiError(409, "Conflict", f'Precondition failed: UID in precondition: {pre["uid"]}, UID in object meta: {current["metadata"]["uid"]}')
            if pre.get("resourceVersion") and pre["resourceVersion"] != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "Precondition failed: resourceVersion mismatch")
            if opts.get("dryRun"):
                return JSONResponse(current)
            if res is R.PODS:
                grace = opts.get("gracePeriodSeconds")
                result = self.ctl.terminate_pod(namespace or "", name, None if grace is None else int(grace))
                return JSONResponse(result or current)
            self.store.remove(res, namespace, name)
        details = {"name": name, "group": res.group, "kind": res.plural, "uid": current["metadata"]["uid"]}
        if res in (R.DEPLOYMENTS, R.REPLICASETS, R.NAMESPACES):
            return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                 "details": details})
        return JSONResponse(current)

    def _delete_collection(self, res: Resource, namespace: str | None, query: dict, body: Any) -> Response:
        predicate = self._filter(res, query)
        deleted = []
        for obj in [o for o in self.store.list(res, namespace) if predicate(o)]:
            self._delete(res, obj["metadata"].get("namespace"), obj["metadata"]["name"], query, body)
            deleted.append(obj)
        return JSONResponse({"kind": f"{res.kind}List", "apiVersion": res.api_version,
                             "metadata": {"resourceVersion": str(self.store.rv)}, "items": deleted})

    # --- subresources ---
    def _logs(self, route: Route, query: dict) -> Response:
        pod = self._require(R.PODS, route.namespace, route.name)
        containers = [c["name"] for c in pod["spec"].get("containers") or []]
        container = query.get("container")
        if not container:
            if len(containers) != 1:
                raise ApiError(400, "BadRequest", f"a container name must be specified for pod {route.name}, choose one of: [{' '.join(containers)}]")
            container = containers[0]
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {route.name}")
        sim = self.ctl.sims.get(pod["metadata"]["uid"])
        previous = truthy(query.get("previous"))
        status = next((cs for cs in (pod.get("status") or {}).get("containerStatuses") or []
                       if cs.get("name") == container), {})
        if previous:
            if not (status.get("lastState") or {}).get("terminated") or sim is None or container not in sim.previous:
                raise ApiError(400, "BadRequest", f'previous terminated container "{container}" in pod "{route.name}" not found')
            lines = sim.previous[container]
        else:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting and not (status.get("lastState") or {}).get("terminated"):
                raise ApiError(400, "BadRequest", f'container "{container}" in pod "{route.name}" is waiting to start: {waiting.get("reason", "ContainerCreating")}')
            if (pod.get("status") or {}).get("phase") == "Pending" and not waiting:
                raise ApiError(400, "BadRequest", f'container "{container}" in pod "{route.name}" is waiting to start: ContainerCreating')
            if sim is None:
                lines = []
            elif waiting.get("reason") == "CrashLoopBackOff":
                lines = sim.previous.get(container, [])
            else:
                lines = sim.logs.get(container, [])
        source = lines
        lines = list(source)
        seen = len(lines)  # a follow streams what is appended after this snapshot
        if query.get("sinceSeconds"):
            cutoff = time.time() - int(query["sinceSeconds"])
            lines = [entry for entry in lines if _stamp_seconds(entry[0]) >= cutoff]
        if query.get("tailLines"):
            n = int(query["tailLines"])
            lines = lines[-n:] if n > 0 else []
        stamps = truthy(query.get("timestamps"))
        text = "".join(f"{ts} {line}\n" if stamps else f"{line}\n" for ts, line in lines)
        if query.get("limitBytes"):
            text = text[: int(query["limitBytes"])]
        if truthy(query.get("follow")) and not previous and sim is not None:
            current = sim.logs.setdefault(container, [])
            start = seen if source is current else 0  # a crash-looping container's new instance starts empty
            return StreamingResponse(self._follow(pod, container, text, stamps, current, start),
                                     media_type="text/plain")
        return PlainTextResponse(text, media_type="text/plain")

    async def _follow(self, pod: dict, container: str, text: str, stamps: bool, lines: list, sent: int):
        """``logs -f``: what is there, then lines appended after ``sent``, until the pod's container stops."""
        uid = pod["metadata"]["uid"]
        sim = self.ctl.sims[uid]
        yield text.encode()
        while not self.state.stopping.is_set():
            current = self.store.get(R.PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
            if current is None or current["metadata"]["uid"] != uid or sim.logs.get(container) is not lines:
                return
            if len(lines) > sent:
                chunk, sent = lines[sent:], len(lines)
                yield "".join(f"{ts} {line}\n" if stamps else f"{line}\n" for ts, line in chunk).encode()
            await asyncio.sleep(0.05)  # poll

    def _evict(self, route: Route, body: Any, query: dict) -> Response:
        with self.ctl.mutex, self.store.lock:
            pod = self._require(R.PODS, route.namespace, route.name)
            if isinstance(body, dict) and (body.get("metadata") or {}).get("name", route.name) != route.name:
                raise ApiError(400, "BadRequest", "name in URL does not match name in Eviction object")
            if not pod["metadata"].get("deletionTimestamp"):
                for pdb in self.store.list(R.PDBS, route.namespace):
                    selector = (pdb.get("spec") or {}).get("selector")
                    if not selector or not labels_match(selector_from_match_labels(selector), pod["metadata"].get("labels")):
                        continue
                    healthy, desired, _ = self.ctl.pdb_health(pdb)
                    allowed = healthy - desired > 0 if is_pod_ready(pod) else healthy >= desired
                    if not allowed:
                        raise ApiError(
                            429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.",
                            {"causes": [{"reason": "DisruptionBudget",
                                         "message": f"The disruption budget {pdb['metadata']['name']} needs {desired} healthy pods and has {healthy} currently"}]},
                        )
            opts = (body or {}).get("deleteOptions") or {} if isinstance(body, dict) else {}
            if query.get("dryRun") or opts.get("dryRun"):
                return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}, status_code=201)
            grace = opts.get("gracePeriodSeconds")
            self.ctl.terminate_pod(route.namespace or "", route.name, None if grace is None else int(grace))
            self.ctl.record_event(pod, "Normal", "Evicted", "Evicted by the eviction API", component="kubelet")
        return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201},
                            status_code=201)

    def _scale(self, request: Request, route: Route, body: Any, query: dict) -> Response:
        res = route.resource
        assert res is not None
        method = request.method
        with self.ctl.mutex, self.store.lock:
            obj = self._require(res, route.namespace, route.name)
            scale = _scale_of(obj)
            if method == "GET":
                return JSONResponse(scale)
            if method == "PUT":
                new_scale = body
            elif method == "PATCH":
                new_scale = apply_patch(copy.deepcopy(scale), body, request.headers.get("content-type", ""))
            else:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            if not isinstance(new_scale, dict):
                raise ApiError(400, "BadRequest", "the body must be a Scale object")
            replicas = (new_scale.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise ApiError(422, "Invalid", f"Scale.autoscaling \"{route.name}\" is invalid: spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0")
            expect = (new_scale.get("metadata") or {}).get("resourceVersion")
            if method == "PATCH" and expect == obj["metadata"]["resourceVersion"]:
                expect = None
            if expect and expect != obj["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural}.{res.group} "{route.name}": the object has been modified; please apply your changes to the latest version and try again')
            new = copy.deepcopy(obj)
            new["spec"]["replicas"] = replicas
            if self._dry_run(query):
                return JSONResponse(_scale_of(new))
            if new["spec"] != obj["spec"]:
                new["metadata"]["generation"] = int(obj["metadata"].get("generation", 1)) + 1
            stored = self.store.replace(res, new)
        return JSONResponse(_scale_of(stored))

    def _metrics(self, res: Resource, route: Route, query: dict) -> Response:
        if res is R.NODE_METRICS:
            pods = [p for p in self.store.list(R.PODS) if (p.get("status") or {}).get("phase") == "Running"]
            cpu = sum(self._sim_cpu(p) for p in pods) + 150
            item = {"kind": "NodeMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
                    "metadata": {"name": "sandbox-node-1", "creationTimestamp": now_iso()},
                    "timestamp": now_iso(), "window": "20s",
                    "usage": {"cpu": f"{cpu * 1_000_000}n", "memory": f"{(512 + 64 * len(pods)) * 1024}Ki"}}
            if route.name:
                if route.name != "sandbox-node-1":
                    raise not_found(res, route.name)
                return JSONResponse(item)
            return JSONResponse({"kind": "NodeMetricsList", "apiVersion": "metrics.k8s.io/v1beta1",
                                 "metadata": {}, "items": [item]})
        predicate = make_filter(query.get("labelSelector"), query.get("fieldSelector"), allowed=set(R.COMMON_FIELDS))
        pods = [
            p for p in self.store.list(R.PODS, route.namespace)
            if (p.get("status") or {}).get("phase") == "Running" and predicate(p)
        ]
        items = [self._pod_metrics(p) for p in pods]
        if route.name:
            for item in items:
                if item["metadata"]["name"] == route.name:
                    return JSONResponse(item)
            raise ApiError(404, "NotFound", f'podmetrics.metrics.k8s.io "{route.namespace}/{route.name}" not found')
        return JSONResponse({"kind": "PodMetricsList", "apiVersion": "metrics.k8s.io/v1beta1", "metadata": {},
                             "items": items})

    def _sim_cpu(self, pod: dict) -> int:
        sim = self.ctl.sims.get(pod["metadata"]["uid"])
        return sim.cpu_m if sim else 250

    def _pod_metrics(self, pod: dict) -> dict:
        sim = self.ctl.sims.get(pod["metadata"]["uid"])
        cpu = sim.cpu_m if sim else 250
        mem = sim.memory_mi if sim else 64
        containers = [c["name"] for c in pod["spec"].get("containers") or []]
        return {
            "kind": "PodMetrics",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {"name": pod["metadata"]["name"], "namespace": pod["metadata"]["namespace"],
                         "creationTimestamp": now_iso(), "labels": pod["metadata"].get("labels", {})},
            "timestamp": now_iso(),
            "window": "15s",
            "containers": [
                {"name": c, "usage": {"cpu": f"{cpu * 1_000_000 // len(containers)}n",
                                      "memory": f"{mem * 1024 // len(containers)}Ki"}}
                for c in containers
            ],
        }


def _stamp_seconds(stamp: str) -> float:
    when = parse_time(stamp)
    return when.timestamp() if when else 0.0


def _scale_of(obj: dict) -> dict:
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                     if k in obj["metadata"]},
        "spec": {"replicas": int(obj["spec"].get("replicas", 1))},
        "status": {"replicas": int((obj.get("status") or {}).get("replicas", 0)),
                   "selector": selector_string(obj["spec"].get("selector"))},
    }


def default_workload(res: Resource, obj: dict) -> None:
    """API defaulting of Deployments and ReplicaSets (what a real server fills in)."""
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    if not isinstance(spec.get("selector"), dict) or not spec["selector"]:
        raise ApiError(422, "Invalid", f'{res.kind}.apps "{obj["metadata"].get("name", "")}" is invalid: spec.selector: Required value')
    template = spec.setdefault("template", {})
    tmeta = template.setdefault("metadata", {})
    tmeta.setdefault("creationTimestamp", None)
    tspec = template.setdefault("spec", {})
    if not tspec.get("containers"):
        raise ApiError(422, "Invalid", f'{res.kind}.apps "{obj["metadata"].get("name", "")}" is invalid: spec.template.spec.containers: Required value')
    tspec.setdefault("restartPolicy", "Always")
    tspec.setdefault("terminationGracePeriodSeconds", 30)
    tspec.setdefault("dnsPolicy", "ClusterFirst")
    tspec.setdefault("securityContext", {})
    tspec.setdefault("schedulerName", "default-scheduler")
    for c in tspec["containers"]:
        c.setdefault("resources", {})
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("imagePullPolicy", "IfNotPresent")
    if res is R.DEPLOYMENTS:
        strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
        if strategy.get("type", "RollingUpdate") == "RollingUpdate":
            strategy["type"] = "RollingUpdate"
            strategy.setdefault("rollingUpdate", {}).setdefault("maxUnavailable", "25%")
            strategy["rollingUpdate"].setdefault("maxSurge", "25%")
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
