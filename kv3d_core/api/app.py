"""The FastAPI application: OpenAI-compatible endpoints over an :class:`Engine`.

Bodies are parsed by hand (not by FastAPI's signature binding) so that every
bad input is a 400 in OpenAI's error shape -- never FastAPI's 422 -- and the
server keeps serving. The features live in their own modules: ``schemas``
(strict request models), ``structured`` (JSON schemas as grammars), ``tools``
(tool formats, forced calls, parsing), ``logprobs`` and ``choices`` (response
shapes). A request runs as one scheduler job per prompt; ``n`` > 1 choices fork
from it after one prefill.
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
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kv3d_core import __version__
from kv3d_core.api import limits, openapi
from kv3d_core.api.choices import ChatChoice, CompletionChoice
from kv3d_core.api.cors import Cors
from kv3d_core.api.drain import RETRY_AFTER_S, Drainer
from kv3d_core.api.errors import APIError, from_validation_error
from kv3d_core.api.prepare import PromptPreparer
from kv3d_core.api.schemas import ChatCompletionRequest, CompletionRequest
from kv3d_core.api.structured import GrammarBuilder, SchemaError, response_format_rule
from kv3d_core.api.tools import ToolError, ToolSupport
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
    """One submitted request seen from the event loop: a job per prompt, ``n_choices``
    choices in all, their events tagged with the choice index."""

    def __init__(self, handles: list[JobHandle], queue: asyncio.Queue, n_choices: int) -> None:
        self.handles = handles
        self.queue = queue
        self.open = n_choices
        self.done = False
        self.usages: dict[int, dict] = {}      # choice index -> its usage, as choices finish
        self._checked = time.monotonic()

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    def interrupt(self, ev: tuple) -> None:
        """End the request with ``ev`` (an error event), its jobs cancelled: at shutdown."""
        self.queue.put_nowait((0, ev))
        self.cancel()

    def more_text(self, i: int) -> str:
        """Text of choice ``i``'s plain token events already queued behind the current one (a
        client that reads slower than tokens come gets them in one chunk instead of one each)."""
        parts = []
        while not self.queue.empty():
            j, ev = self.queue._queue[0]     # peek: only plain ("token", text) events are merged
            if j != i or len(ev) != 2 or ev[0] != "token":
                break
            parts.append(self.queue.get_nowait()[1][1])
        return "".join(parts)

    async def next_event(self, request: Request) -> tuple[int, tuple] | None:
        """The next scheduler event as (choice index, event); None when the client went
        away (the jobs are cancelled). The connection is checked every DISCONNECT_POLL_S
        whether or not events keep coming."""
        while True:
            now = time.monotonic()
            if now - self._checked >= DISCONNECT_POLL_S:
                self._checked = now
                if await request.is_disconnected():
                    self.cancel()
                    return None
            if not self.queue.empty():           # the usual case while tokens flow: no timer, no task
                i, ev = self.queue.get_nowait()
            else:
                try:
                    i, ev = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
            if ev[0] == "error":
                self.done = True
                self.cancel()                   # one choice failed: the response fails
            elif ev[0] == "done":
                self.open -= 1
                self.done = self.open == 0
            return i, ev


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
               cors_origins: list[str] | None = None,
               close_engine_on_shutdown: bool = False, drain_s: float = 25, metrics_public: bool = False) -> FastAPI:
    """The app. Each API key is a tenant (``api_key`` the tenant ``default``, ``api_keys``
    {name: key} more): a tenant's requests reuse only its own cached KV. ``cached_tokens``
    says how usage reports reuse: ``block`` (rounded down to ``cached_tokens_block``),
    ``exact`` or ``off``. ``cors_origins``: origins browsers may call from (``["*"]``: any);
    their preflight requests are answered before the API key is checked. ``drain_s``: how
    long a SIGTERM lets requests in flight finish (:mod:`kv3d_core.api.drain`).
    ``/metrics`` needs a key (when keys are configured) unless ``metrics_public``."""
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
    if cors_origins:
        # added last, so outermost: a preflight never reaches the key check, and every answer
        # (a 401 included) carries the CORS headers a browser needs to read it
        app.add_middleware(Cors, origins=list(cors_origins))
    openapi.install(app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest},
                    engine.model_id, bool(keys), protected)
    tool_support = ToolSupport(engine.prompter, engine.info.chat_template)
    grammar_checked: dict[str, str | None] = {}

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

    def _sampling(req, choice: int = 0, grammar: str | None = None) -> SamplingParams:
        """The sampling of choice ``choice``: each choice its own seed (``seed + choice``)."""
        seed = None if req.seed is None else (req.seed + choice) & 0xFFFFFFFFFFFFFFFF
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repeat_penalty=req.repeat_penalty or 1.0,
            logit_bias=req.bias_pairs,
            grammar=grammar,
            ignore_eos=req.ignore_eos,
        )

    def _check_bias(req) -> None:
        for tok, _ in req.bias_pairs:
            if tok >= engine.info.n_vocab:
                raise APIError(400, f"'logit_bias' token {tok} is outside the vocabulary (0..{engine.info.n_vocab - 1})",
                               param="logit_bias", code="invalid_value")

    async def _checked_grammar(grammar: str | None, param: str) -> str | None:
        """``grammar`` once llama.cpp accepts it (checked once per grammar, off the loop)."""
        if grammar is None:
            return None
        if grammar not in grammar_checked:
            why = await asyncio.to_thread(engine.backend.check_grammar, grammar)
            if len(grammar_checked) > 256:
                grammar_checked.clear()
            grammar_checked[grammar] = why
        why = grammar_checked[grammar]
        if why is not None:
            raise APIError(400, f"'{param}' cannot be enforced: llama.cpp refused the grammar made from it ({why})",
                           param=param, code="invalid_value")
        return grammar

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

    async def _start(request: Request, prepared: list[Prepared], req, default_max: int | None,
                     grammar: str | None, logprobs: int | None) -> _Run:
        """Submit one job per prompt, its ``n`` choices forked from it after one prefill."""
        limits = [_max_tokens(req, p, default_max) for p in prepared]
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        outbox = _outbox_of(loop)

        def sink_of(i: int):
            def sink(ev: tuple) -> None:
                outbox.put(queue, (i, ev))
            return sink

        drainer.check_open()
        handles: list[JobHandle] = []
        n = req.n
        try:
            for k, (p, limit) in enumerate(zip(prepared, limits)):
                forks = [(_sampling(req, j, grammar), sink_of(k * n + j)) for j in range(1, n)]
                handles.append(engine.submit(p, _sampling(req, 0, grammar), limit, req.stops, sink_of(k * n),
                                             logprobs=logprobs, forks=forks))
        except QueueFull as exc:
            for h in handles:
                h.cancel()
            raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": str(exc.retry_after)}) from exc
        run = _Run(handles, queue, len(prepared) * n)
        drainer.track(run)
        return run

    def _usage(u: dict) -> dict:
        cached = u["cached_tokens"]
        if cached_tokens == "block":             # a token-exact figure would tell how far a guess matched
            cached -= cached % cached_tokens_block
        elif cached_tokens == "off":
            cached = 0
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": cached}}

    def _total_usage(usages: dict[int, dict], n: int) -> dict:
        """As OpenAI counts: each prompt once (its first choice's figures), every choice's
        completion tokens."""
        prompt = sum(u["prompt_tokens"] for i, u in usages.items() if i % n == 0)
        cached = sum(u["cached_tokens"] for i, u in usages.items() if i % n == 0)
        completion = sum(u["completion_tokens"] for u in usages.values())
        return _usage({"prompt_tokens": prompt, "completion_tokens": completion,
                       "total_tokens": prompt + completion, "cached_tokens": cached})

    async def _collect(request: Request, run: _Run, choices: list) -> list[dict] | None:
        """Every choice, whole; None when the client went away."""
        reasons: dict[int, str] = {}
        while not run.done:
            got = await run.next_event(request)
            if got is None:
                return None
            i, ev = got
            if ev[0] == "token":
                choices[i].feed(ev[1], ev[2] if len(ev) > 2 else None)
            elif ev[0] == "done":
                reasons[i] = ev[1]
                run.usages[i] = ev[2]
                choices[i].end(ev[1])
            else:
                raise _error_from_event(ev)
        return [c.whole(reasons[c.index]) for c in choices]

    async def _sse(request: Request, run: _Run, first: tuple[int, tuple], choices: list, head: dict,
                   include_usage: bool, n: int) -> AsyncIterator[bytes]:
        def data(choice_entries: list[dict]) -> bytes:
            c: dict[str, Any] = {**head, "choices": choice_entries}
            if include_usage:
                c["usage"] = None
            return b"data: " + json.dumps(c).encode() + b"\n\n"

        usages: dict[int, dict] = {}
        try:
            for c in choices:
                f = c.first()
                if f is not None:
                    yield data([f])
            got: tuple[int, tuple] | None = first
            fast: dict[int, Callable[[str], bytes]] = {}     # per plain choice: its text chunks' renderer
            while got is not None:
                i, ev = got
                if ev[0] == "token" and len(ev) == 2 and choices[i].plain:
                    text = ev[1] + run.more_text(i)
                    choices[i].record(text)
                    if text:
                        render = fast.get(i)
                        if render is None:
                            render = fast[i] = _text_chunk_renderer(
                                lambda t, c=choices[i]: {**head, "choices": [c.text_entry(t)],
                                                         **({"usage": None} if include_usage else {})})
                        yield render(text)
                elif ev[0] == "token":
                    for entry in choices[i].feed(ev[1], ev[2] if len(ev) > 2 else None):
                        yield data([entry])
                elif ev[0] == "done":
                    usages[i] = ev[2]
                    for entry in choices[i].end(ev[1]):
                        yield data([entry])
                else:  # an error after the stream started: report it in-band, as OpenAI does
                    yield b"data: " + json.dumps(_error_from_event(ev).body()).encode() + b"\n\n"
                    break
                if run.done:
                    if include_usage:
                        yield b"data: " + json.dumps({**head, "choices": [], "usage": _total_usage(usages, n)}).encode() \
                            + b"\n\n"
                    break
                got = await run.next_event(request)
            if got is not None:
                yield b"data: [DONE]\n\n"
        except Exception:   # the response has started: end the stream in-band, log once
            log.exception("stream failed")
            err = APIError(500, "internal server error", code="internal_error")
            yield b"data: " + json.dumps(err.body()).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            if not run.done:
                run.cancel()

    async def _first_or_error(request: Request, run: _Run) -> tuple[int, tuple] | None:
        got = await run.next_event(request)
        if got is not None and got[1][0] == "error":
            raise _error_from_event(got[1])
        return got

    async def _serve(request: Request, req, prepared: list[Prepared], default_max: int | None, choices: list,
                     *, chat: bool, grammar: str | None = None, logprobs: int | None = None):
        """Run prepared prompts; answer with one JSON body or a Server-Sent Events stream."""
        if grammar is not None and req.ignore_eos:
            raise APIError(400, "'ignore_eos' cannot be combined with 'response_format' or a forced 'tool_choice': "
                                "once their grammar is complete, only end-of-generation tokens may follow",
                           param="ignore_eos", code="unsupported_parameter")
        run = await _start(request, prepared, req, default_max, grammar, logprobs)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": _now(),
                "model": engine.model_id, "system_fingerprint": f"kv3d-{__version__}"}
        if not req.stream:
            result = await _collect(request, run, choices)
            if result is None:
                return Response(status_code=499)       # the client went away; nobody reads this
            return JSONResponse({**head, "choices": result, "usage": _total_usage(run.usages, req.n)})
        first = await _first_or_error(request, run)
        if first is None:
            return Response(status_code=499)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if chat:
            head["object"] = "chat.completion.chunk"
        return StreamingResponse(_sse(request, run, first, choices, head, include_usage, req.n),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _tenant(request: Request) -> str | None:
        return request.scope.get("kv3d.tenant")

    # -- endpoints ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await _body(request, ChatCompletionRequest)
        _check_bias(req)
        mode = req.tool_mode
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        messages = [m.canonical() for m in req.messages]
        def prepare() -> tuple[list[dict], list[dict] | None, str | None]:
            msgs, template_tools = tool_support.prepare(messages, tools, mode, req.parallel_tool_calls)
            return msgs, template_tools, _chat_grammar(req, tools, mode)

        size = request.scope["kv3d.body_bytes"]
        # every message but the assistant's (a template may drop parts of earlier replies) reaches
        # the prompt whole, up to the whitespace a template may trim
        await preparer.check_bound([(m.get("content") or "").strip() for m in messages if m["role"] != "assistant"],
                                   size, "messages")
        try:
            messages, template_tools, grammar = await preparer.run(size, prepare)   # templates and schemas: off the loop
        except ToolError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from exc
        except SchemaError as exc:
            raise APIError(400, f"'{exc.path}': {exc.detail}", param=exc.path, code="unsupported_schema") from exc
        except TemplateError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_messages") from exc
        grammar = await _checked_grammar(grammar, "tools" if mode in ("required",) or (mode or "").startswith("function:")
                                         else "response_format")
        try:
            prepared = await preparer.run(size, engine.prepare_chat, messages, template_tools, req.cache_salt,
                                          _tenant(request))
        except (TemplateError, TokenizerMissing) as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_messages") from exc
        top = (req.top_logprobs or 0) if req.logprobs else None
        parse = tools is not None and mode != "none"
        piece = engine.backend.token_piece
        choices = [ChatChoice(i, piece, parser=tool_support.parser(tools, req.parallel_tool_calls, mode) if parse else None,
                              logprobs=bool(req.logprobs)) for i in range(req.n)]
        return await _serve(request, req, [prepared], default_max_tokens, choices, chat=True, grammar=grammar,
                            logprobs=top)

    def _chat_grammar(req: ChatCompletionRequest, tools: list[dict] | None, mode: str | None) -> str | None:
        """The grammar of a chat reply: forced tool calls, a response format, or either."""
        builder = GrammarBuilder()
        answer = response_format_rule(builder, req.response_format)
        if tools and (mode == "required" or (mode or "").startswith("function:")):
            return builder.grammar(tool_support.calls_rule(builder, tools, mode, req.parallel_tool_calls))
        if answer is None:
            return None
        if tools and mode == "auto":         # a reply in the format, or tool calls
            calls = tool_support.calls_rule(builder, tools, "required", req.parallel_tool_calls)
            return builder.grammar(f"{calls} | {answer}")
        return builder.grammar(answer)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await _body(request, CompletionRequest)
        _check_bias(req)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "'echo' together with 'logprobs' (log-probabilities of the prompt) is not supported "
                                "by this server", param="echo", code="unsupported_parameter")
        prompts = req.prompts
        for k, p in enumerate(prompts):
            if isinstance(p, list) and any((not isinstance(t, int)) or t < 0 or t >= engine.info.n_vocab for t in p):
                raise APIError(400, f"'prompt' token ids must be within 0..{engine.info.n_vocab - 1}",
                               param="prompt" if len(prompts) == 1 else f"prompt.{k}", code="invalid_value")
        size = request.scope["kv3d.body_bytes"]
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                await preparer.check_bound([p], size, "prompt" if len(prompts) == 1 else f"prompt.{k}")
        prepared = []
        for p in prompts:
            try:
                pp = await preparer.run(size, engine.prepare_completion, p, req.cache_salt, _tenant(request))
            except TokenizerMissing as exc:
                raise APIError(400, str(exc), param="prompt", code="invalid_prompt") from exc
            if pp.n_tokens == 0:
                raise APIError(400, "'prompt' produced no tokens", param="prompt", code="invalid_value")
            prepared.append(pp)
        piece = engine.backend.token_piece
        choices = []
        for k, p in enumerate(prompts):
            echo = ""
            if req.echo:
                echo = p if isinstance(p, str) else b"".join(piece(t) for t in p).decode("utf-8", "replace")
            choices += [CompletionChoice(k * req.n + j, piece, echo=echo, logprobs=req.logprobs is not None)
                        for j in range(req.n)]
        return await _serve(request, req, prepared, COMPLETIONS_DEFAULT_MAX_TOKENS, choices, chat=False,
                            logprobs=req.logprobs)

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


def _text_chunk_renderer(make_chunk: Callable[[str], dict]) -> Callable[[str], bytes]:
    """``make_chunk(text)`` as SSE bytes, the JSON rendered once around a marker: a stream's
    chunks differ only in their text, and a ``json.dumps`` of the whole chunk per token
    costs the event loop more than the token."""
    whole = json.dumps(make_chunk(_TEXT_MARK))
    mark = json.dumps(_TEXT_MARK)
    if whole.count(mark) != 1:
        return lambda text: b"data: " + json.dumps(make_chunk(text)).encode() + b"\n\n"
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
