"""What both completion endpoints share: reading and checking a body, the sampling of
each choice, the completion limit, submitting one job per prompt (``n`` choices forked
from it after one prefill), and answering with one JSON body or an SSE stream.

Bodies are parsed by hand (not by FastAPI's signature binding) so that every bad input
is a 400 in OpenAI's error shape -- never FastAPI's 422 -- and the server keeps serving."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from kv3d_core import __version__
from kv3d_core.api import limits, sse
from kv3d_core.api.drain import Drainer
from kv3d_core.api.errors import APIError, from_validation_error
from kv3d_core.api.run import RequestRun, error_of, outbox_of
from kv3d_core.api.schemas import ChatCompletionRequest
from kv3d_core.contracts.backend import SamplingParams
from kv3d_core.engine.engine import Engine, Prepared
from kv3d_core.engine.events import Done, Failed, Token
from kv3d_core.engine.scheduler import JobHandle, QueueFull

GRAMMAR_MEMO = 256      # grammars whose verdict from llama.cpp is remembered


@dataclass
class ServiceSettings:
    max_body_mb: float = 16
    default_max_tokens: int | None = None     # chat requests without a limit; None = the rest of the context
    cached_tokens: str = "block"              # how usage reports reuse: block | exact | off
    cached_tokens_block: int = 32


class CompletionService:
    def __init__(self, engine: Engine, drainer: Drainer, settings: ServiceSettings) -> None:
        self.engine = engine
        self.drainer = drainer
        self.settings = settings
        self.max_body = int(settings.max_body_mb * 1024 * 1024)
        self._grammar_checked: dict[str, str | None] = {}

    # -- the request -----------------------------------------------------------------------
    async def body(self, request: Request, model_cls):
        """The request's body as ``model_cls``, or the 400/404/413/415 saying why not."""
        limits.check_media_type(request)
        raw = await limits.read_body(request, self.max_body)
        request.scope["kv3d.body_bytes"] = len(raw)
        data = limits.parse_json(raw)
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as exc:
            raise from_validation_error(exc) from exc
        if req.model != self.engine.model_id:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.engine.model_id}'.",
                           param="model", code="model_not_found", etype="invalid_request_error")
        return req

    def check_bias(self, req) -> None:
        n_vocab = self.engine.info.n_vocab
        for tok, _ in req.bias_pairs:
            if tok >= n_vocab:
                raise APIError(400, f"'logit_bias' token {tok} is outside the vocabulary (0..{n_vocab - 1})",
                               param="logit_bias", code="invalid_value")

    async def checked_grammar(self, grammar: str | None, param: str) -> str | None:
        """``grammar`` once llama.cpp accepts it (checked once per grammar, off the loop)."""
        if grammar is None:
            return None
        memo = self._grammar_checked
        if grammar not in memo:
            why = await asyncio.to_thread(self.engine.backend.check_grammar, grammar)
            if len(memo) > GRAMMAR_MEMO:
                memo.clear()
            memo[grammar] = why
        why = memo[grammar]
        if why is not None:
            raise APIError(400, f"'{param}' cannot be enforced: llama.cpp refused the grammar made from it ({why})",
                           param=param, code="invalid_value")
        return grammar

    @staticmethod
    def sampling(req, choice: int = 0, grammar: str | None = None) -> SamplingParams:
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

    def max_tokens(self, req, prepared: Prepared, default: int | None) -> int:
        """The completion limit of one prompt; 400 ``context_length_exceeded`` past the context."""
        ctx = self.engine.info.n_ctx_seq
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

    # -- usage -------------------------------------------------------------------------------
    def usage(self, u: dict) -> dict:
        cached = u["cached_tokens"]
        mode = self.settings.cached_tokens
        if mode == "block":             # a token-exact figure would tell how far a guess matched
            cached -= cached % self.settings.cached_tokens_block
        elif mode == "off":
            cached = 0
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": cached}}

    def total_usage(self, usages: dict[int, dict], n: int) -> dict:
        """As OpenAI counts: each prompt once (its first choice's figures), every choice's
        completion tokens."""
        prompt = sum(u["prompt_tokens"] for i, u in usages.items() if i % n == 0)
        cached = sum(u["cached_tokens"] for i, u in usages.items() if i % n == 0)
        completion = sum(u["completion_tokens"] for u in usages.values())
        return self.usage({"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion, "cached_tokens": cached})

    # -- running it --------------------------------------------------------------------------
    def start(self, prepared: list[Prepared], req, default_max: int | None, grammar: str | None,
              logprobs: int | None) -> RequestRun:
        """Submit one job per prompt, its ``n`` choices forked from it after one prefill."""
        limits_ = [self.max_tokens(req, p, default_max) for p in prepared]
        queue: asyncio.Queue = asyncio.Queue()
        outbox = outbox_of(asyncio.get_running_loop())

        def sink_of(i: int):
            def sink(ev) -> None:
                outbox.put(queue, (i, ev))
            return sink

        self.drainer.check_open()
        handles: list[JobHandle] = []
        n = req.n
        try:
            for k, (p, limit) in enumerate(zip(prepared, limits_)):
                forks = [(self.sampling(req, j, grammar), sink_of(k * n + j)) for j in range(1, n)]
                handles.append(self.engine.submit(p, self.sampling(req, 0, grammar), limit, req.stops, sink_of(k * n),
                                                  logprobs=logprobs, forks=forks))
        except QueueFull as exc:
            for h in handles:
                h.cancel()
            raise APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": str(exc.retry_after)}) from exc
        run = RequestRun(handles, queue, len(prepared) * n)
        self.drainer.track(run)
        return run

    async def collect(self, request: Request, run: RequestRun, choices: list) -> list[dict] | None:
        """Every choice, whole; None when the client went away."""
        reasons: dict[int, str] = {}
        while not run.done:
            got = await run.next_event(request)
            if got is None:
                return None
            i, ev = got
            if type(ev) is Token:
                choices[i].feed(ev.text, ev.logprobs)
            elif type(ev) is Done:
                reasons[i] = ev.reason
                run.usages[i] = ev.usage
                choices[i].end(ev.reason)
            else:
                assert type(ev) is Failed
                raise error_of(ev)
        return [c.whole(reasons[c.index]) for c in choices]

    async def serve(self, request: Request, req, prepared: list[Prepared], default_max: int | None, choices: list,
                    *, chat: bool, grammar: str | None = None, logprobs: int | None = None) -> Response:
        """Run prepared prompts; answer with one JSON body or a Server-Sent Events stream."""
        if grammar is not None and req.ignore_eos:
            raise APIError(400, "'ignore_eos' cannot be combined with 'response_format' or a forced 'tool_choice': "
                                "once their grammar is complete, only end-of-generation tokens may follow",
                           param="ignore_eos", code="unsupported_parameter")
        run = self.start(prepared, req, default_max, grammar, logprobs)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.engine.model_id, "system_fingerprint": f"kv3d-{__version__}"}
        if not req.stream:
            result = await self.collect(request, run, choices)
            if result is None:
                return Response(status_code=499)       # the client went away; nobody reads this
            return JSONResponse({**head, "choices": result, "usage": self.total_usage(run.usages, req.n)})
        first = await run.first(request)
        if first is None:
            return Response(status_code=499)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if chat:
            head["object"] = "chat.completion.chunk"
        body = sse.stream(request, run, first, choices, head, include_usage,
                          lambda usages: self.total_usage(usages, req.n))
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
