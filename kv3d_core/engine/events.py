"""What the scheduler tells a request's sink, as typed events.

Every request gets zero or more :class:`Token` events, then exactly one :class:`Done`
or :class:`Failed`. The scheduler knows nothing of HTTP: a failure says what went
wrong (:class:`FailureKind`) and, where waiting helps, when to retry; the API layer
maps it to a status code and OpenAI's error shape (``kv3d_core.api.events``).
Sinks are called on the scheduler thread and must not block.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Union

from kv3d_core.contracts.backend import TokenLogprob


class FailureKind(str, enum.Enum):
    """Why a request ended without a completion."""

    QUEUE_TIMEOUT = "queue_timeout"     # waited longer than scheduler.queue_timeout_s for a sequence
    KV_CACHE_FULL = "kv_cache_full"     # no KV cells for it, even after evicting and preempting
    SHUTTING_DOWN = "shutting_down"     # the server stopped (or is draining) while it waited or ran
    MODEL = "model"                     # llama_decode (or another backend call) failed
    INTERNAL = "internal"               # a bug in kv3d: logged with its traceback


@dataclass(frozen=True, slots=True)
class Token:
    """Text the request produced: ``text`` is what is safe to send now (stop strings held
    back); ``logprobs`` (when the request asked for them) covers the tokens it completes."""

    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True, slots=True)
class Done:
    """The request finished: ``reason`` is "stop" (end of generation or a stop string) or
    "length" (``max_tokens`` or the context); ``usage`` holds prompt_tokens,
    completion_tokens, total_tokens and cached_tokens (exact: the API rounds it)."""

    reason: str
    usage: dict


@dataclass(frozen=True, slots=True)
class Failed:
    """The request ended without a completion; ``retry_after`` (seconds) when trying
    again later can succeed."""

    kind: FailureKind
    message: str
    retry_after: int | None = None


Event = Union[Token, Done, Failed]
Sink = Callable[[Event], None]
