"""Server-Sent Events: a request's choices streamed as OpenAI's chunks."""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable

from fastapi import Request

from kv3d_core.api.errors import APIError
from kv3d_core.api.run import RequestRun, error_of
from kv3d_core.engine.events import Done, Event, Failed, Token

log = logging.getLogger("kv3d.api")

_TEXT_MARK = "@@kv3d-text@@"


def text_chunk_renderer(make_chunk: Callable[[str], dict]) -> Callable[[str], bytes]:
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


def _data(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def stream(request: Request, run: RequestRun, first: tuple[int, Event], choices: list, head: dict,
                 include_usage: bool, total_usage: Callable[[dict[int, dict]], dict]) -> AsyncIterator[bytes]:
    """The SSE body of ``run``, from its ``first`` event: each choice's chunks, an error
    in-band if one fails after the stream started (as OpenAI does), the usage chunk when
    asked for (``total_usage`` of every choice's usage), then ``[DONE]``."""
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(choice_entries: list[dict]) -> bytes:
        return _data({**head, "choices": choice_entries, **extra})

    usages: dict[int, dict] = {}
    try:
        for c in choices:
            f = c.first()
            if f is not None:
                yield chunk([f])
        got: tuple[int, Event] | None = first
        fast: dict[int, Callable[[str], bytes]] = {}     # per plain choice: its text chunks' renderer
        while got is not None:
            i, ev = got
            kind = type(ev)
            if kind is Token and ev.logprobs is None and choices[i].plain:
                text = ev.text + run.more_text(i)
                choices[i].record(text)
                if text:
                    render = fast.get(i)
                    if render is None:
                        render = fast[i] = text_chunk_renderer(
                            lambda t, c=choices[i]: {**head, "choices": [c.text_entry(t)], **extra})
                    yield render(text)
            elif kind is Token:
                for entry in choices[i].feed(ev.text, ev.logprobs):
                    yield chunk([entry])
            elif kind is Done:
                usages[i] = ev.usage
                for entry in choices[i].end(ev.reason):
                    yield chunk([entry])
            else:
                assert kind is Failed
                yield _data(error_of(ev).body())
                break
            if run.done:
                if include_usage:
                    yield _data({**head, "choices": [], "usage": total_usage(usages)})
                break
            got = await run.next_event(request)
        if got is not None:
            yield b"data: [DONE]\n\n"
    except Exception:   # the response has started: end the stream in-band, log once
        log.exception("stream failed")
        err = APIError(500, "internal server error", code="internal_error")
        yield _data(err.body()) + b"data: [DONE]\n\n"
    finally:
        if not run.done:
            run.cancel()
