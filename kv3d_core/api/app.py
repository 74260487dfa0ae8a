"""The FastAPI application: OpenAI-compatible endpoints over an :class:`Engine`.

Wiring only; the parts live in their own modules: ``routes`` (the endpoints),
``service`` (what both completion endpoints share), ``run`` and ``sse`` (a request's
events on the event loop, and its stream), ``middleware`` (keys, draining, request
metrics), ``errors`` (OpenAI's error shape), ``drain`` (SIGTERM), ``cors``, ``openapi``.
A request runs as one scheduler job per prompt; ``n`` > 1 choices fork from it after
one prefill.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kv3d_core import __version__
from kv3d_core.api import dashboard, openapi
from kv3d_core.api.analytics import Analytics, AnalyticsSettings
from kv3d_core.api.cors import Cors
from kv3d_core.api.drain import Drainer
from kv3d_core.api.errors import APIError, from_validation_error
from kv3d_core.api.middleware import PROTECTED, ObserveMiddleware, tenant_keys
from kv3d_core.api.prepare import PromptPreparer
from kv3d_core.api.routes import router
from kv3d_core.api.schemas import ChatCompletionRequest, CompletionRequest
from kv3d_core.api.service import CompletionService, ServiceSettings
from kv3d_core.engine.engine import Engine

__all__ = ["create_app"]


def create_app(engine: Engine, *, api_key: str | None = None, api_keys: dict[str, str] | None = None,
               max_body_mb: float = 16, default_max_tokens: int | None = None,
               cached_tokens: str = "block", cached_tokens_block: int = 32,
               cors_origins: list[str] | None = None,
               close_engine_on_shutdown: bool = False, drain_s: float = 25, metrics_public: bool = False,
               analytics: dict | None = None) -> FastAPI:
    """The app. Each API key is a tenant (``api_key`` the tenant ``default``, ``api_keys``
    {name: key} more): a tenant's requests reuse only its own cached KV. ``cached_tokens``
    says how usage reports reuse: ``block`` (rounded down to ``cached_tokens_block``),
    ``exact`` or ``off``. ``cors_origins``: origins browsers may call from (``["*"]``: any);
    their preflight requests are answered before the API key is checked. ``drain_s``: how
    long a SIGTERM lets requests in flight finish (:mod:`kv3d_core.api.drain`).
    ``/metrics`` needs a key (when keys are configured) unless ``metrics_public``.
    ``analytics``: the ``analytics`` settings of ``/v1/kv3d/analytics`` and ``/dashboard``."""
    drainer = Drainer(drain_s)
    preparer = PromptPreparer(engine.backend)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        asyncio.get_running_loop().run_in_executor(None, preparer.longest_piece)   # the cheap bound's one scan
        yield
        preparer.close()
        if close_engine_on_shutdown:
            # Inside the server's graceful shutdown, after the drain (api/drain.py); uvicorn.run()
            # would re-raise SIGTERM/SIGINT after returning, so persisting caches happens here.
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="kv3d", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.drainer = drainer
    _install_error_handlers(app)
    keys = tenant_keys(api_key, api_keys)
    protected = PROTECTED + ("/openapi.json",) + (() if metrics_public else ("/metrics",))
    app.add_middleware(ObserveMiddleware, metrics=engine.metrics, keys=keys, drainer=drainer, protected=protected)
    if cors_origins:
        # added last, so outermost: a preflight never reaches the key check, and every answer
        # (a 401 included) carries the CORS headers a browser needs to read it
        app.add_middleware(Cors, origins=list(cors_origins))
    openapi.install(app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest},
                    engine.model_id, bool(keys), protected)
    settings = ServiceSettings(max_body_mb=max_body_mb, default_max_tokens=default_max_tokens,
                               cached_tokens=cached_tokens, cached_tokens_block=cached_tokens_block)
    app.include_router(router(CompletionService(engine, drainer, settings), preparer,
                              Analytics(engine, AnalyticsSettings(**(analytics or {})))))
    app.include_router(dashboard.router())
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape. Any other exception is answered (once, logged once)
    by the middleware: an exception_handler(Exception) would log it, and Starlette
    re-raise it to uvicorn."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: "Unknown endpoint", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None,
                        headers=getattr(exc, "headers", None)).response()   # 405 keeps its Allow header
