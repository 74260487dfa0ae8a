"""The FastAPI application: OpenAI-compatible endpoints over an :class:`Engine`.

Bodies are parsed by hand (not by FastAPI's signature binding) so that every
bad input is a 400 in OpenAI's error shape -- never FastAPI's 422 -- and the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kv3d_core import __version__
from kv3d_core.api import limits, openapi
from kv3d_core.api.drain import RETRY_AFTER_S, Drainer
from kv3d_core.api.errors import APIError, from_validation_error
from kv3d_core.api.prepare import PromptPreparer
from kv3d_core.api.schemas import ChatCompletionRequest, CompletionRequest
from kv3d_core.contracts.backend import SamplingParams
from kv3d_core.engine.engine import Engine, Prepared
from kv3d_core.engine.prompt import TemplateError
from kv3d_core.engine.scheduler import JobHandle, QueueFull
from kv3d_core.errors import TokenizerMissing

log = logging.getLogger("kv3d.api")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
DISCONNECT_POLL_S = 0.25


def _now() -> int:
    return int(time.time())


class _Run:
    """One submitted request seen from the event loop."""

    def __init__(self, handle: JobHandle, queue: asyncio.Queue) -> None:
        self.handle = handle
        self.queue = queue
        self.done = False
        self._checked = time.monotonic()

    def more_text(self) -> str:
        """Text of the plain token events already queued behind the current one (a client that
        reads slower than tokens come gets them in one chunk instead of one chunk each)."""
        parts = []
        while not self.queue.empty():
            ev = self.queue._queue[0]          # peek: only plain ("token", text) events are merged
            if len(ev) != 2 or ev[0] != "token":
                break
            parts.append(self.queue.get_nowait()[1])
        return "".join(parts)

    async def next_event(self, request: Request) -> tuple | None:
        """The next scheduler event; None when the client went away (the job is cancelled).
        The connection is checked every DISCONNECT_POLL_S whether or not events keep coming."""
        while True:
            now = time.monotonic()
            if now - self._checked >= DISCONNECT_POLL_S:
                self._checked = now
                if await request.is_disconnected():
                    self.handle.cancel()
                    return None
            if not self.queue.empty():           # the usual case while tokens flow: no timer, no task
                ev = self.queue.get_nowait()
            else:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
            if ev[0] in ("done", "error"):
                self.done = True
            return ev


def _error_from_event(ev: tuple) -> APIError:
    _, status, message, etype, code, *rest = ev
    headers = {"Retry-After": str(rest[0])} if rest else ({"Retry-After": "2"} if status == 503 else None)
    return APIError(status, message, etype=etype, code=code, headers=headers)


def tenant_keys(api_key: str | None, api_keys: dict[str, str] | None) -> dict[str, str]:
    """{tenant: key}: ``server.api_key`` is the tenant ``default``; ``server.api_keys`` names more."""
    out = dict(api_keys or {})
    if api_key:
        out["default"] = api_key
    return out


def create_app(engine: Engine, *, api_key: str | None = None, api_keys: dict[str, str] | None = None,
               max_body_mb: float = 16, default_max_tokens: int | None = None,
               cached_tokens: str = "block", cached_tokens_block: int = 32,
               close_engine_on_shutdown: bool = False, drain_s: float = 25, metrics_public: bool = False) -> FastAPI:
    """The app. Each API key is a tenant (``api_key`` the tenant ``default``, ``api_keys``
    {name: key} more): a tenant's requests reuse only its own cached KV. ``cached_tokens``
    says how usage reports reuse: ``block`` (rounded down to ``cached_tokens_block``),
    ``exact`` or ``off``. ``drain_s``: how long a SIGTERM lets requests in flight
    finish (:mod:`kv3d_core.api.drain`). ``/metrics`` needs a key (when keys are
    configured) unless ``metrics_public``."""
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
    metrics = engine.metrics
    max_body = int(max_body_mb * 1024 * 1024)

    # -- errors ---------------------------------------------------------------------------
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

    # Any other exception is answered (once, logged once) by _ObserveMiddleware: an
    # exception_handler(Exception) would log it, and Starlette re-raise it to uvicorn.

    # -- middleware: auth and request metrics (pure ASGI: BaseHTTPMiddleware wraps `receive`,
    #    and inside a streaming response that made is_disconnected() report a disconnect
    #    for a client that had only paused reading) ------------------------------------------
    keys = tenant_keys(api_key, api_keys)
    protected = _PROTECTED + ("/openapi.json",) + (() if metrics_public else ("/metrics",))
    app.add_middleware(_ObserveMiddleware, metrics=metrics, keys=keys, drainer=drainer, protected=protected)
    openapi.install(app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest},
                    engine.model_id, bool(keys), protected)

    async def _body(request: Request, model_cls):
        limits.check_media_type(request)
        raw = await limits.read_body(request, max_body)
        request.scope["kv3d.body_bytes"] = len(raw)
        data = limits.parse_json(raw)
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as exc:
            raise from_validation_error(exc) from exc
        if req.model != engine.model_id:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{engine.model_id}'.",
                           param="model", code="model_not_found", etype="invalid_request_error")
        return req

    def _sampling(req) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repeat_penalty=req.repeat_penalty or 1.0,
            ignore_eos=req.ignore_eos,
        )

    def _max_tokens(req, prepared: Prepared, default: int | None) -> int:
        ctx = engine.info.n_ctx_seq
        n = prepared.n_tokens
        limit = req.limit if req.limit is not None else default
        if limit is not None and req.limit is None:
            limit = min(limit, ctx - n)          # a server default never makes a request fail
        if n >= ctx or (limit is not None and n + limit > ctx):
            asked = f"{n + limit} tokens ({n} in the prompt, {limit} for the completion)" if limit else f"{n} tokens in the prompt"
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested {asked}. "
                                "Please reduce the length of the messages or completion.",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        return limit if limit is not None else ctx - n

    async def _start(request: Request, prepared: Prepared, req, default_max: int | None) -> tuple[_Run, int]:
        max_tokens = _max_tokens(req, prepared, default_max)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        outbox = _outbox_of(loop)

        def sink(ev: tuple) -> None:
            outbox.put(queue, ev)

        drainer.check_open()
        try:
            handle = engine.submit(prepared, _sampling(req), max_tokens, req.stops, sink)
        except QueueFull as exc:
            raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": str(exc.retry_after)}) from exc
        run = _Run(handle, queue)
        drainer.track(run)
        return run, max_tokens

    def _usage(u: dict) -> dict:
        cached = u["cached_tokens"]
        if cached_tokens == "block":             # a token-exact figure would tell how far a guess matched
            cached -= cached % cached_tokens_block
        elif cached_tokens == "off":
            cached = 0
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": cached}}

    async def _collect(request: Request, run: _Run) -> tuple[str, str, dict] | None:
        parts: list[str] = []
        while True:
            ev = await run.next_event(request)
            if ev is None:
                return None
            if ev[0] == "token":
                parts.append(ev[1])
            elif ev[0] == "done":
                return "".join(parts), ev[1], _usage(ev[2])
            else:
                raise _error_from_event(ev)

    async def _sse(request: Request, run: _Run, first: tuple, make_chunk, usage_chunk, include_usage: bool,
                   prelude: list[dict]) -> AsyncIterator[bytes]:
        try:
            for c in prelude:
                yield b"data: " + json.dumps(c).encode() + b"\n\n"
            ev: tuple | None = first
            text_chunk = _text_chunk_renderer(make_chunk)
            while ev is not None:
                if ev[0] == "token" and len(ev) == 2:
                    yield text_chunk(ev[1] + run.more_text())
                elif ev[0] == "token":
                    yield b"data: " + json.dumps(make_chunk(ev[1], None)).encode() + b"\n\n"
                elif ev[0] == "done":
                    yield b"data: " + json.dumps(make_chunk(None, ev[1])).encode() + b"\n\n"
                    if include_usage:
                        yield b"data: " + json.dumps(usage_chunk(_usage(ev[2]))).encode() + b"\n\n"
                    break
                else:  # an error after the stream started: report it in-band, as OpenAI does
                    yield b"data: " + json.dumps(_error_from_event(ev).body()).encode() + b"\n\n"
                    break
                ev = await run.next_event(request)
            if ev is not None:
                yield b"data: [DONE]\n\n"
        except Exception:   # the response has started: end the stream in-band, log once
            log.exception("stream failed")
            err = APIError(500, "internal server error", code="internal_error")
            yield b"data: " + json.dumps(err.body()).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            if not run.done:
                run.handle.cancel()

    async def _first_or_error(request: Request, run: _Run) -> tuple | None:
        ev = await run.next_event(request)
        if ev is not None and ev[0] == "error":
            raise _error_from_event(ev)
        return ev

    async def _serve(request: Request, req, prepared: Prepared, default_max: int | None, shape: "_Shape"):
        """Run a prepared prompt; answer with one JSON body or a Server-Sent Events stream."""
        run, _ = await _start(request, prepared, req, default_max)
        rid, created, model = f"{shape.id_prefix}-{uuid.uuid4().hex}", _now(), engine.model_id
        head = {"id": rid, "object": shape.object, "created": created, "model": model,
                "system_fingerprint": f"kv3d-{__version__}"}
        if not req.stream:
            result = await _collect(request, run)
            if result is None:
                return Response(status_code=499)       # the client went away; nobody reads this
            text, reason, usage = result
            return JSONResponse({**head, "choices": [shape.choice(text, reason)], "usage": usage})
        first = await _first_or_error(request, run)
        if first is None:
            return Response(status_code=499)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head["object"] = shape.chunk_object

        def chunk(text: str | None, reason: str | None) -> dict:
            c: dict[str, Any] = {**head, "choices": [shape.delta(text, reason)]}
            if include_usage:
                c["usage"] = None
            return c

        def usage_chunk(usage: dict) -> dict:
            return {**head, "choices": [], "usage": usage}

        prelude = [{**head, "choices": [shape.first_delta]}] if shape.first_delta else []
        if include_usage:
            for c in prelude:
                c["usage"] = None
        return StreamingResponse(_sse(request, run, first, chunk, usage_chunk, include_usage, prelude),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _tenant(request: Request) -> str | None:
        return request.scope.get("kv3d.tenant")

    # -- endpoints ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await _body(request, ChatCompletionRequest)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs", code="unsupported_parameter")
        messages = [m.canonical() for m in req.messages]
        size = request.scope["kv3d.body_bytes"]
        # every message but the assistant's (a template may drop parts of earlier replies) reaches
        # the prompt whole, up to the whitespace a template may trim
        await preparer.check_bound([m["content"].strip() for m in messages if m["role"] != "assistant"], size,
                                   "messages")
        try:
            prepared = await preparer.run(size, engine.prepare_chat, messages, req.tools, req.cache_salt,
                                          _tenant(request))
        except (TemplateError, TokenizerMissing) as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_messages") from exc
        return await _serve(request, req, prepared, default_max_tokens, _CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await _body(request, CompletionRequest)
        for name, bad in (("echo", req.echo), ("suffix", req.suffix is not None), ("logprobs", req.logprobs is not None)):
            if bad:
                raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
        p = req.prompt_value
        if isinstance(p, list) and any((not isinstance(t, int)) or t < 0 or t >= engine.info.n_vocab for t in p):
            raise APIError(400, f"'prompt' token ids must be within 0..{engine.info.n_vocab - 1}", param="prompt",
                           code="invalid_value")
        size = request.scope["kv3d.body_bytes"]
        if isinstance(p, str):
            await preparer.check_bound([p], size, "prompt")
        try:
            prepared = await preparer.run(size, engine.prepare_completion, p, req.cache_salt, _tenant(request))
        except TokenizerMissing as exc:
            raise APIError(400, str(exc), param="prompt", code="invalid_prompt") from exc
        if prepared.n_tokens == 0:
            raise APIError(400, "'prompt' produced no tokens", param="prompt", code="invalid_value")
        return await _serve(request, req, prepared, COMPLETIONS_DEFAULT_MAX_TOKENS, _COMPLETION)

    def _model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": _now(), "owned_by": "kv3d",
                "meta": {"n_ctx": engine.info.n_ctx_seq, "architecture": engine.info.architecture}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return _model_card()

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/debug/stats")
    async def debug_stats():
        """Cache tiers and scheduler state (read on the scheduler thread)."""
        return await asyncio.to_thread(engine.stats)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


_TEXT_MARK = "@@kv3d-text@@"


def _text_chunk_renderer(make_chunk: Callable[[str | None, str | None], dict]) -> Callable[[str], bytes]:
    """``make_chunk(text, None)`` as SSE bytes, the JSON rendered once around a marker: a
    stream's chunks differ only in their text, and a ``json.dumps`` of the whole chunk per
    token costs the event loop more than the token."""
    whole = json.dumps(make_chunk(_TEXT_MARK, None))
    mark = json.dumps(_TEXT_MARK)
    if whole.count(mark) != 1:
        return lambda text: b"data: " + json.dumps(make_chunk(text, None)).encode() + b"\n\n"
    head, tail = whole.split(mark)
    head_b, tail_b = b"data: " + head.encode(), tail.encode() + b"\n\n"
    return lambda text: head_b + json.dumps(text).encode() + tail_b


class _Outbox:
    """Scheduler events to one event loop, one wake-up per burst: a step emits a token for
    every running request, and a ``call_soon_threadsafe`` each (a self-pipe write and a loop
    iteration) would cost the event loop more than the tokens themselves."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, tuple]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, ev: tuple) -> None:
        with self._lock:
            self._items.append((queue, ev))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, ev in items:
            queue.put_nowait(ev)


_OUTBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Outbox]" = weakref.WeakKeyDictionary()


def _outbox_of(loop: asyncio.AbstractEventLoop) -> _Outbox:
    box = _OUTBOXES.get(loop)
    if box is None:
        box = _OUTBOXES[loop] = _Outbox(loop)
    return box


@dataclass(frozen=True)
class _Shape:
    """How one endpoint's responses look (OpenAI's chat vs legacy completions)."""

    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable[[str, str], dict]
    delta: Callable[[str | None, str | None], dict]
    first_delta: dict | None = None


_CHAT = _Shape(
    "chatcmpl", "chat.completion", "chat.completion.chunk",
    choice=lambda text, reason: {"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": reason},
    delta=lambda text, reason: {"index": 0, "delta": {"content": text} if text is not None else {},
                                "logprobs": None, "finish_reason": reason},
    first_delta={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
)
_COMPLETION = _Shape(
    "cmpl", "text_completion", "text_completion",
    choice=lambda text, reason: {"index": 0, "text": text, "logprobs": None, "finish_reason": reason},
    delta=lambda text, reason: {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason},
)

_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
_PROTECTED = ("/v1/", "/debug/")


class _ObserveMiddleware:
    """Bearer-key check for the ``protected`` paths (/v1/*, /debug/*, /openapi.json and,
    unless public, /metrics; the key names the request's tenant, kept in
    ``scope["kv3d.tenant"]``), admission while draining (:mod:`kv3d_core.api.drain`),
    per-endpoint request metrics, and the one place an unexpected exception is logged
    and answered (500, ``Connection: close``)."""

    def __init__(self, app, metrics, keys: dict[str, str], drainer: Drainer | None = None,
                 protected: tuple[str, ...] = _PROTECTED) -> None:
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
        endpoint = path if path in _ENDPOINTS else "other"
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
