"""Drives a workload against one OpenAI-compatible server with the official
``openai`` client (async), ``concurrency`` requests in flight, streaming.

Per request it measures the time to the first streamed content (TTFT) and to
the last byte, and reads ``usage`` from the final chunk when the server sends
it (``stream_options={"include_usage": True}``): a request is a prefix *hit*
when ``usage.prompt_tokens_details.cached_tokens > 0``. Servers that send no
usage in streams (llama-cpp-python's) get ``hit=None`` and their completion
tokens counted as streamed content chunks (one per token there).

Requests are dispatched in plan order; a follow-up waits for its session's
previous turn (whose reply it resends) before it is sent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from kv3d_tools.bench.workload import PlannedRequest, Workload


@dataclass
class RequestResult:
    index: int
    session: int
    turn: int
    family: int | None
    reusable: bool
    start_s: float = 0.0                # since the run began
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    cached_tokens: int | None = None
    hit: bool | None = None
    chunks: int = 0
    reply: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class DriveResult:
    results: list[RequestResult]
    wall_s: float
    usage_reported: bool
    messages: dict[int, list[dict]] = field(default_factory=dict)   # request index -> messages sent

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]


async def _one(client, model: str, req: PlannedRequest, messages: list[dict], res: RequestResult, *,
               max_tokens: int, temperature: float, seed: int, usage_in_stream: bool, t0: float,
               sampling: dict | None = None, headers: dict | None = None) -> None:
    extra: dict = {"stream_options": {"include_usage": True}} if usage_in_stream else {}
    if sampling:
        extra["extra_body"] = dict(sampling)
    if headers:
        extra["extra_headers"] = dict(headers)
    start = time.perf_counter()
    res.start_s = start - t0
    parts: list[str] = []
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
        seed=seed + req.index, stream=True, **extra)
    async for chunk in stream:
        if chunk.usage is not None:
            u = chunk.usage
            res.prompt_tokens = u.prompt_tokens
            res.completion_tokens = u.completion_tokens
            details = getattr(u, "prompt_tokens_details", None)
            res.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
            res.hit = res.cached_tokens > 0
        for choice in chunk.choices:
            text = choice.delta.content if choice.delta is not None else None
            if text:
                if res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - start
                parts.append(text)
                res.chunks += 1
            if choice.finish_reason is not None:
                res.finish_reason = choice.finish_reason
    res.latency_s = time.perf_counter() - start
    if res.finish_reason is None:
        raise RuntimeError("the stream ended without a finish_reason (the server cut it short)")
    if res.ttft_s is None:           # an empty reply: the first byte of the answer is its end
        res.ttft_s = res.latency_s
    res.reply = "".join(parts)
    if res.prompt_tokens is None:    # no usage in the stream
        res.completion_tokens = res.chunks


async def _one_tokens(client, model: str, req: PlannedRequest, prompt: list[int], res: RequestResult, *,
                      max_tokens: int, temperature: float, seed: int, t0: float, sampling: dict | None,
                      headers: dict | None = None) -> None:
    """A token-id prompt on ``/v1/completions`` (models without a real tokenizer). TTFT is the
    first streamed chunk of the completion; usage comes in the last chunk."""
    start = time.perf_counter()
    res.start_s = start - t0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed + req.index,
        stream=True, stream_options={"include_usage": True}, extra_body=dict(sampling or {}),
        extra_headers=dict(headers or {}))
    async for chunk in stream:
        if chunk.usage is not None:
            u = chunk.usage
            res.prompt_tokens, res.completion_tokens = u.prompt_tokens, u.completion_tokens
            details = getattr(u, "prompt_tokens_details", None)
            res.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
            res.hit = res.cached_tokens > 0
        for choice in chunk.choices:
            if res.ttft_s is None:
                res.ttft_s = time.perf_counter() - start
            res.chunks += 1
            if choice.finish_reason is not None:
                res.finish_reason = choice.finish_reason
    res.latency_s = time.perf_counter() - start
    if res.finish_reason is None:
        raise RuntimeError("the stream ended without a finish_reason (the server cut it short)")
    if res.ttft_s is None:
        res.ttft_s = res.latency_s


async def _drive(base_url: str, model: str, workload: Workload, *, concurrency: int, max_tokens: int,
                 temperature: float, seed: int, usage_in_stream: bool, api_key: str, timeout_s: float,
                 progress_desc: str | None, sampling: dict | None = None,
                 token_ids_vocab: int | None = None, session_header: str | None = None) -> DriveResult:
    import openai
    from tqdm import tqdm

    import httpx

    # a connection per request: llama-server (cpp-httplib) closes a keep-alive connection after a few
    # requests, and a request sent on it as it closes fails; no keep-alive treats every server alike
    client = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0,
                                timeout=timeout_s,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0),
                                                              timeout=timeout_s))
    reqs = workload.requests
    results = [RequestResult(r.index, r.session, r.turn, r.family, r.reusable) for r in reqs]
    done = [asyncio.Event() for _ in reqs]
    replies: dict[int, str] = {}
    sent: dict[int, list[dict]] = {}
    queue: asyncio.Queue[PlannedRequest] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    bar = tqdm(total=len(reqs), desc=progress_desc, unit="req", disable=progress_desc is None, leave=True)
    t0 = time.perf_counter()

    async def worker() -> None:
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            res = results[req.index]
            # a routing key per conversation: the same header on every turn of a session
            headers = {session_header: f"bench-{seed}-session-{req.session}"} if session_header else None
            try:
                if req.parent is not None:
                    await done[req.parent].wait()
                    if not results[req.parent].ok:
                        raise RuntimeError(f"its previous turn (request {req.parent}) failed")
                if token_ids_vocab:
                    await _one_tokens(client, model, req, workload.token_prompt(req, token_ids_vocab), res,
                                      max_tokens=max_tokens, temperature=temperature, seed=seed, t0=t0,
                                      sampling=sampling, headers=headers)
                else:
                    messages = workload.messages(req, replies)
                    sent[req.index] = messages
                    await _one(client, model, req, messages, res, max_tokens=max_tokens, temperature=temperature,
                               seed=seed, usage_in_stream=usage_in_stream, t0=t0, sampling=sampling,
                               headers=headers)
                    replies[req.index] = res.reply
            except Exception as exc:  # recorded per request; the run goes on
                res.error = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                done[req.index].set()
                bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        bar.close()
        await client.close()
    wall = time.perf_counter() - t0
    return DriveResult(results, wall, usage_in_stream, sent)


def drive(base_url: str, model: str, workload: Workload, *, concurrency: int, max_tokens: int,
          temperature: float = 0.7, seed: int = 0, usage_in_stream: bool = True, api_key: str = "unused",
          timeout_s: float = 600.0, progress_desc: str | None = None, sampling: dict | None = None,
          token_ids_vocab: int | None = None, session_header: str | None = None) -> DriveResult:
    """Run every request of ``workload`` against ``base_url``; blocking. ``sampling`` (e.g.
    ``{"top_k": 0, "top_p": 1.0, "min_p": 0.0}``) goes into every request's body, so servers
    whose default samplers differ sample alike. ``token_ids_vocab`` sends token-id prompts on
    ``/v1/completions`` instead of chat messages (:meth:`Workload.token_prompt`). ``session_header``
    (e.g. ``"X-Session-Id"``) sends that header with every request, its value the request's
    session (``bench-<seed>-session-<n>``): a router's routing key per conversation."""
    return asyncio.run(_drive(base_url, model, workload, concurrency=concurrency, max_tokens=max_tokens,
                              temperature=temperature, seed=seed, usage_in_stream=usage_in_stream,
                              api_key=api_key, timeout_s=timeout_s, progress_desc=progress_desc,
                              sampling=sampling, token_ids_vocab=token_ids_vocab,
                              session_header=session_header))
