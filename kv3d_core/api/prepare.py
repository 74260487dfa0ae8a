"""Turning a request's text into tokens without letting big prompts hold up small ones.

Two things, both before the scheduler sees the request:

- **A cheap bound.** No token stands for more text than the longest piece in the
  model's vocabulary (81 bytes for SmolLM2), and message content is tokenized with
  special-token parsing off, so it never becomes a control token. A prompt whose
  messages (system, user and tool ones: templates render them whole, but may drop parts
  of earlier assistant replies) or completions prompt hold more than
  ``n_ctx * longest_piece`` bytes therefore needs more tokens than the context holds: it
  is refused (400 ``context_length_exceeded``) in milliseconds instead of after seconds
  of tokenizing (a 15 MB prompt took 11 s).
- **Pools by size.** Rendering and tokenizing run on worker threads: bodies of at least
  :data:`BIG_BODY_BYTES` on a pool of their own (:data:`BIG_WORKERS` thread), the
  rest on another. A request of a few tokens never waits for a free thread behind
  large prompts (before, six 15 MB prompts held every thread of asyncio's shared pool
  and a 1-token request waited 9.9 s).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import Any, Callable, Iterable

from kv3d_core.api.errors import APIError
from kv3d_core.contracts.backend import ExecutionBackend

BIG_BODY_BYTES = 64 * 1024
BIG_WORKERS = 1
SMALL_WORKERS = 4


class PromptPreparer:
    def __init__(self, backend: ExecutionBackend) -> None:
        self.backend = backend
        self.n_ctx = backend.info.n_ctx_seq
        self._small = concurrent.futures.ThreadPoolExecutor(SMALL_WORKERS, thread_name_prefix="kv3d-prep")
        self._big = concurrent.futures.ThreadPoolExecutor(BIG_WORKERS, thread_name_prefix="kv3d-prep-big")
        self._piece_lock = threading.Lock()
        self._longest_piece: int | None = None

    async def run(self, body_bytes: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the pool for a body of ``body_bytes``."""
        pool = self._big if body_bytes >= BIG_BODY_BYTES else self._small
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def longest_piece(self) -> int:
        """Bytes of the longest token piece of the vocabulary (scanned once, ~0.2 s for 49 k
        tokens); at least 1."""
        with self._piece_lock:
            if self._longest_piece is None:
                n_vocab = self.backend.info.n_vocab
                self._longest_piece = max([len(self.backend.token_piece(t)) for t in range(n_vocab)] + [1])
            return self._longest_piece

    async def check_bound(self, texts: Iterable[str], body_bytes: int, param: str) -> None:
        """400 ``context_length_exceeded`` when ``texts`` (data that reaches the prompt
        whole) cannot fit the context whatever the tokenizer does."""
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        if n_bytes <= self.n_ctx:        # a token covers at least one byte: nothing to prove
            return
        longest = self.longest_piece() if self._longest_piece is not None else await self.run(
            body_bytes, self.longest_piece)
        at_least = -(-n_bytes // longest)
        if at_least > self.n_ctx:
            raise APIError(400, f"This model's maximum context length is {self.n_ctx} tokens. However, your "
                                f"{param} hold {n_bytes} bytes of text, which is at least {at_least} tokens. "
                                "Please reduce the length of the messages or prompt.",
                           param=param, code="context_length_exceeded")

    def close(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._big.shutdown(wait=False, cancel_futures=True)
