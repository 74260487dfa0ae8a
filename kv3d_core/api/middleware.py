"""The one ASGI middleware: API keys (each names a tenant), admission while draining,
per-endpoint request metrics, and the last word on an unexpected exception.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one wraps ``receive``, and
inside a streaming response it made ``is_disconnected()`` report a disconnect for a client
that had only paused reading."""

from __future__ import annotations

import hmac
import logging
import time

from fastapi.responses import JSONResponse

from kv3d_core.api.drain import RETRY_AFTER_S, Drainer
from kv3d_core.api.errors import APIError

log = logging.getLogger("kv3d.api")


def tenant_keys(api_key: str | None, api_keys: dict[str, str] | None) -> dict[str, str]:
    """{tenant: key}: ``server.api_key`` is the tenant ``default``; ``server.api_keys`` names more."""
    out = dict(api_keys or {})
    if api_key:
        out["default"] = api_key
    return out


ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/v1/kv3d/analytics",
             "/dashboard"}
PROTECTED = ("/v1/", "/debug/")


class ObserveMiddleware:
    """Bearer-key check for the ``protected`` paths (/v1/*, /debug/*, /openapi.json and,
    unless public, /metrics; the key names the request's tenant, kept in
    ``scope["kv3d.tenant"]``), admission while draining (:mod:`kv3d_core.api.drain`),
    per-endpoint request metrics, and the one place an unexpected exception is logged
    and answered (500, ``Connection: close``)."""

    def __init__(self, app, metrics, keys: dict[str, str], drainer: Drainer | None = None,
                 protected: tuple[str, ...] = PROTECTED) -> None:
        self.app = app
        self.metrics = metrics
        self.keys = [(tenant, key.encode()) for tenant, key in keys.items()]
        self.drainer = drainer
        self.protected = protected

    def _tenant_of(self, token: bytes) -> str | None:
        found = None
        for tenant, key in self.keys:            # every key compared in constant time
            if hmac.compare_digest(token, key):
                found = tenant
        return found

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        drainer = self.drainer
        if drainer is not None and drainer.draining and path != "/metrics":
            self.metrics.http_requests.labels(endpoint, "503").inc()
            if path == "/health":
                response = JSONResponse({"status": "draining", "service": "kv3d-engine"}, status_code=503,
                                        headers={"Retry-After": str(RETRY_AFTER_S)})
            else:
                response = drainer.refusal().response()
            await response(scope, receive, send)
            return
        if self.keys and path.startswith(self.protected):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            tenant = self._tenant_of(token.strip().encode("latin-1")) if scheme.lower() == "bearer" else None
            if tenant is None:
                self.metrics.http_requests.labels(endpoint, "401").inc()
                msg = "Incorrect API key provided" if auth else "Missing API key: send 'Authorization: Bearer <key>'"
                await APIError(401, msg, code="invalid_api_key").response()(scope, receive, send)
                return
            scope["kv3d.tenant"] = tenant
        status = 500
        started = False
        t0 = time.monotonic()

        async def observed_send(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers") or [])
                if drainer is not None and drainer.draining and not any(k.lower() == b"connection" for k, _ in headers):
                    message = {**message, "headers": headers + [(b"connection", b"close")]}
            await send(message)

        if drainer is not None:
            drainer.enter()
        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            log.exception("unhandled error on %s", path)
            if not started:   # else the connection is closed by the server: nothing more can be sent
                await APIError(500, "internal server error", code="internal_error",
                               headers={"Connection": "close"}).response()(scope, receive, observed_send)
        finally:
            if drainer is not None:
                drainer.leave()
            self.metrics.http_requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.monotonic() - t0)
