"""LLM provider stubs: a fake "call" per model, outages on demand, and each provider's Statuspage JSON.

The workers call ``LLMProviders.complete(model=...)`` in-process (a few microseconds; a real call's latency is the
worker's configurable step time). During an outage of a provider (the model's prefix: ``openai/gpt-4o`` ->
``openai``) every call to its models raises ``ProviderError``, and ``GET /<provider>/api/v2/status.json`` says
``indicator: major`` — the same document shape as Atlassian Statuspage, which the failover flow reads.
``POST /<provider>/v1/chat/completions`` offers the same call over HTTP (503 during an outage).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class ProviderError(Exception):
    """An LLM provider refused a call (outage): carries the model and provider for the step's error JSON."""

    def __init__(self, *, model: str, provider: str, message: str) -> None:
        super().__init__(message)
        self.model = model
        self.provider = provider
        self.message = message

    def error_json(self) -> dict[str, str]:
        """The error the worker writes on the failed step."""
        return {"code": "LLM_PROVIDER_ERROR", "model": self.model, "provider": self.provider, "message": self.message}


class Completion(BaseModel):
    """The answer of a fake LLM call."""

    model: str
    provider: str
    text: str


def provider_of(model: str) -> str:
    """The provider of a LiteLLM model name: the part before the first ``/`` (``openai/gpt-4o`` -> ``openai``)."""
    return model.split("/", 1)[0] if "/" in model else model


_STATUS_TEXT = {"none": "All Systems Operational", "major": "Major System Outage"}


class LLMProviders:
    """The state of every fake provider: which are down, and how many calls each model answered or refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, datetime] = {}
        self.calls: dict[str, int] = {}
        self.failures: dict[str, int] = {}

    # --- faults ---
    def outage(self, provider: str) -> None:
        """Take ``provider`` down: its models' calls fail and its status page says ``major``."""
        with self._lock:
            self._down.setdefault(provider, datetime.now(UTC))

    def restore(self, provider: str | None = None) -> None:
        """End the outage of ``provider`` (or of every provider)."""
        with self._lock:
            if provider is None:
                self._down.clear()
            else:
                self._down.pop(provider, None)

    def is_down(self, provider: str) -> bool:
        with self._lock:
            return provider in self._down

    # --- the call ---
    def complete(self, *, model: str, prompt: str = "") -> Completion:
        """Answer a prompt as ``model`` would, or raise ``ProviderError`` while its provider is down."""
        provider = provider_of(model)
        with self._lock:
            down = provider in self._down
            counter = self.failures if down else self.calls
            counter[model] = counter.get(model, 0) + 1
        if down:
            raise ProviderError(
                model=model, provider=provider, message=f"{provider} API error: 503 Service Unavailable"
            )
        return Completion(model=model, provider=provider, text=f"ok ({len(prompt)} chars)")

    # --- Statuspage ---
    def status_document(self, provider: str) -> dict:
        """The Statuspage ``/api/v2/status.json`` document of ``provider``."""
        with self._lock:
            since = self._down.get(provider)
        indicator = "major" if since else "none"
        return {
            "page": {
                "id": f"sandbox-{provider}",
                "name": provider,
                "url": f"https://status.{provider}.example",
                "time_zone": "Etc/UTC",
                "updated_at": (since or datetime.now(UTC)).isoformat(),
            },
            "status": {"indicator": indicator, "description": _STATUS_TEXT[indicator]},
        }

    def app(self) -> Starlette:
        """The providers' HTTP face: Statuspage JSON and an OpenAI-like completion endpoint."""

        async def status(request: Request) -> JSONResponse:
            return JSONResponse(self.status_document(request.path_params["provider"]))

        async def chat(request: Request) -> JSONResponse:
            provider = request.path_params["provider"]
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": {"message": "body must be JSON"}}, status_code=400)
            model = str(body.get("model", "")) if isinstance(body, dict) else ""
            if not model:
                return JSONResponse({"error": {"message": "model is required"}}, status_code=400)
            full = model if "/" in model else f"{provider}/{model}"
            try:
                result = self.complete(model=full, prompt=str(body.get("messages", "")))
            except ProviderError as e:
                return JSONResponse({"error": {"message": e.message, "type": "provider_error"}}, status_code=503)
            return JSONResponse({"model": result.model, "choices": [{"message": {"content": result.text}}]})

        return Starlette(
            routes=[
                Route("/{provider}/api/v2/status.json", status, methods=["GET"]),
                Route("/{provider}/v1/chat/completions", chat, methods=["POST"]),
            ]
        )
