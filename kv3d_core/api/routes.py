"""The endpoints: OpenAI's chat and legacy completions, the model list, and the
operational ones (/health, /metrics, /debug/stats). Feature work lives beside them:
``structured`` (JSON schemas as grammars), ``tools`` (tool formats, forced calls,
parsing), ``choices`` and ``logprobs`` (response shapes), ``service`` (what both
completion endpoints share)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kv3d_core.api.analytics import Analytics, finite
from kv3d_core.api.choices import ChatChoice, CompletionChoice
from kv3d_core.api.errors import APIError
from kv3d_core.api.prepare import PromptPreparer
from kv3d_core.api.schemas import ChatCompletionRequest, CompletionRequest
from kv3d_core.api.service import CompletionService
from kv3d_core.api.structured import GrammarBuilder, SchemaError, response_format_rule
from kv3d_core.api.tools import ToolError, ToolSupport
from kv3d_core.engine.prompt import TemplateError
from kv3d_core.errors import TokenizerMissing

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint


def _tenant(request: Request) -> str | None:
    return request.scope.get("kv3d.tenant")


class ChatCompletions:
    """``POST /v1/chat/completions``: template, tools and response format, then the run."""

    def __init__(self, service: CompletionService, preparer: PromptPreparer) -> None:
        self.service = service
        self.preparer = preparer
        self.engine = service.engine
        self.tools = ToolSupport(self.engine.prompter, self.engine.info.chat_template)

    async def __call__(self, request: Request) -> Response:
        svc, preparer = self.service, self.preparer
        req: ChatCompletionRequest = await svc.body(request, ChatCompletionRequest)
        svc.check_bias(req)
        mode = req.tool_mode
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        messages = [m.canonical() for m in req.messages]

        def prepare() -> tuple[list[dict], list[dict] | None, str | None]:
            msgs, template_tools = self.tools.prepare(messages, tools, mode, req.parallel_tool_calls)
            return msgs, template_tools, self.grammar(req, tools, mode)

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
        grammar = await svc.checked_grammar(grammar, "tools" if req.tools_forced else "response_format")
        try:
            prepared = await preparer.run(size, self.engine.prepare_chat, messages, template_tools, req.cache_salt,
                                          _tenant(request))
        except (TemplateError, TokenizerMissing) as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_messages") from exc
        top = (req.top_logprobs or 0) if req.logprobs else None
        parse = tools is not None and mode != "none"
        piece = self.engine.backend.token_piece
        choices = [ChatChoice(i, piece, parser=self.tools.parser(tools, req.parallel_tool_calls, mode) if parse else None,
                              logprobs=bool(req.logprobs)) for i in range(req.n)]
        return await svc.serve(request, req, [prepared], svc.settings.default_max_tokens, choices, chat=True,
                               grammar=grammar, logprobs=top)

    def grammar(self, req: ChatCompletionRequest, tools: list[dict] | None, mode: str | None) -> str | None:
        """The grammar of a chat reply: forced tool calls, a response format, or either."""
        builder = GrammarBuilder()
        answer = response_format_rule(builder, req.response_format)
        if tools and req.tools_forced:
            return builder.grammar(self.tools.calls_rule(builder, tools, mode, req.parallel_tool_calls))
        if answer is None:
            return None
        if tools and mode == "auto":         # a reply in the format, or tool calls
            calls = self.tools.calls_rule(builder, tools, "required", req.parallel_tool_calls)
            return builder.grammar(f"{calls} | {answer}")
        return builder.grammar(answer)


class Completions:
    """``POST /v1/completions``: prompts as text or token ids, ``echo``, then the run."""

    def __init__(self, service: CompletionService, preparer: PromptPreparer) -> None:
        self.service = service
        self.preparer = preparer
        self.engine = service.engine

    async def __call__(self, request: Request) -> Response:
        svc = self.service
        req: CompletionRequest = await svc.body(request, CompletionRequest)
        svc.check_bias(req)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "'echo' together with 'logprobs' (log-probabilities of the prompt) is not supported "
                                "by this server", param="echo", code="unsupported_parameter")
        prompts = req.prompts
        prepared = await self.prepare(request, prompts, req.cache_salt)
        piece = self.engine.backend.token_piece
        choices = []
        for k, p in enumerate(prompts):
            echo = ""
            if req.echo:
                echo = p if isinstance(p, str) else b"".join(piece(t) for t in p).decode("utf-8", "replace")
            choices += [CompletionChoice(k * req.n + j, piece, echo=echo, logprobs=req.logprobs is not None)
                        for j in range(req.n)]
        return await svc.serve(request, req, prepared, COMPLETIONS_DEFAULT_MAX_TOKENS, choices, chat=False,
                               logprobs=req.logprobs)

    async def prepare(self, request: Request, prompts: list, cache_salt: str | None) -> list:
        n_vocab = self.engine.info.n_vocab
        for k, p in enumerate(prompts):
            if isinstance(p, list) and any((not isinstance(t, int)) or t < 0 or t >= n_vocab for t in p):
                raise APIError(400, f"'prompt' token ids must be within 0..{n_vocab - 1}",
                               param="prompt" if len(prompts) == 1 else f"prompt.{k}", code="invalid_value")
        size = request.scope["kv3d.body_bytes"]
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                await self.preparer.check_bound([p], size, "prompt" if len(prompts) == 1 else f"prompt.{k}")
        prepared = []
        for p in prompts:
            try:
                pp = await self.preparer.run(size, self.engine.prepare_completion, p, cache_salt, _tenant(request))
            except TokenizerMissing as exc:
                raise APIError(400, str(exc), param="prompt", code="invalid_prompt") from exc
            if pp.n_tokens == 0:
                raise APIError(400, "'prompt' produced no tokens", param="prompt", code="invalid_value")
            prepared.append(pp)
        return prepared


def router(service: CompletionService, preparer: PromptPreparer, analytics: Analytics) -> APIRouter:
    """Every endpoint of the app (the dashboard's page: ``api/dashboard.py``)."""
    engine = service.engine
    r = APIRouter()
    chat, legacy = ChatCompletions(service, preparer), Completions(service, preparer)

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat(request)

    @r.post("/v1/completions")
    async def completions(request: Request):
        return await legacy(request)

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": int(time.time()), "owned_by": "kv3d",
                "meta": {"n_ctx": engine.info.n_ctx_seq, "architecture": engine.info.architecture}}

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @r.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @r.get("/health")
    async def health():
        """200 while the replica serves (``ok``, or ``degraded``: part of the cache path is off,
        requests still succeed); 503 on ``error`` (the scheduler thread stopped: nothing can be
        served), so a router or orchestrator that reads only the status code takes it out."""
        out = engine.health()
        return JSONResponse(out, status_code=503 if out.get("status") == "error" else 200)

    @r.get("/debug/stats")
    async def debug_stats():
        """Cache tiers and scheduler state (read on the scheduler thread)."""
        return await asyncio.to_thread(engine.stats)

    @r.get("/v1/kv3d/analytics")
    async def workload_analytics(request: Request):
        """The dashboard's figures (docs/ANALYTICS.md); a tenant sees only its own families."""
        return JSONResponse(finite(await analytics.handle(request)))

    @r.get("/metrics")
    async def prometheus():
        return Response(engine.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return r
