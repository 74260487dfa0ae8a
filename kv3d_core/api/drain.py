"""Graceful shutdown: stop admitting, let requests in flight finish, cut the rest cleanly.

On the first SIGTERM (or SIGINT) the server (:mod:`kv3d_core.api.server`) calls
:meth:`Drainer.begin`:

1. **draining**: new requests get 503 with ``Retry-After`` and ``Connection: close``;
   ``/health`` answers 503 ``{"status": "draining"}`` so a load balancer stops sending
   traffic. The listening socket stays open, so a client is told, not refused.
   Requests in flight go on; their responses carry ``Connection: close``.
2. When none is left, or after ``server.drain_s`` seconds (or at a second signal),
   **cut**: every request still running gets a ``shutting_down`` error -- a stream ends
   with an error event and ``data: [DONE]``, a non-streaming request gets a 503 in
   OpenAI's error shape -- and its job is cancelled.
3. Once the handlers have answered, the server exits through uvicorn's own shutdown;
   the app's lifespan then closes the engine, which persists idle sessions to a
   persistent tier.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, Callable

from kv3d_core.api.errors import APIError
from kv3d_core.engine.events import Failed, FailureKind

log = logging.getLogger("kv3d.api.drain")

RETRY_AFTER_S = 5
CUT_GRACE_S = 5.0           # after the cut: time for the handlers to send their last bytes
SHUTDOWN_EVENT = Failed(FailureKind.SHUTTING_DOWN, "the server is shutting down; retry on another server or later",
                        RETRY_AFTER_S)


class Drainer:
    """Admission and shutdown state shared by the middleware, the handlers and the server."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.draining = False
        self.cut = False
        self.in_flight = 0
        self._runs: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._changed: asyncio.Event | None = None
        self._cut_now: asyncio.Event | None = None

    # -- requests (event loop) --------------------------------------------------------
    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self._changed is not None:
            self._changed.set()

    def refusal(self) -> APIError:
        return APIError(503, "the server is shutting down; retry on another server or later",
                        code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})

    def check_open(self) -> None:
        """Raise the 503 once requests are being cut (a request still preparing its prompt
        must not start a job then)."""
        if self.cut:
            raise self.refusal()

    def track(self, run: Any) -> None:
        """A submitted request; ``run.done`` says it has ended, ``run.interrupt(event)`` ends it
        with an error event and cancels its jobs."""
        self._runs.add(run)

    # -- shutdown ---------------------------------------------------------------------
    def hurry(self) -> None:
        """A second signal: cut what is still running now."""
        if self._cut_now is not None:
            self._cut_now.set()

    async def begin(self, exit_server: Callable[[], None]) -> None:
        """Drain, cut, then ``exit_server()``. Runs on the event loop."""
        self.draining = True
        self._changed, self._cut_now = asyncio.Event(), asyncio.Event()
        t0 = time.monotonic()
        deadline = t0 + self.drain_s
        log.warning("draining: %d request(s) in flight, up to %g s (signal again to cut them now)",
                    self.in_flight, self.drain_s)
        while self.in_flight > 0 and not self._cut_now.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            await _first(self._changed.wait(), self._cut_now.wait(), timeout=left)
        self.cut = True
        if self.in_flight > 0:
            runs = [r for r in list(self._runs) if not r.done]
            log.warning("drain time over after %.1f s: ending %d request(s) with a shutting_down error",
                        time.monotonic() - t0, len(runs))
            for run in runs:
                run.interrupt(SHUTDOWN_EVENT)
            end = time.monotonic() + CUT_GRACE_S
            while self.in_flight > 0 and time.monotonic() < end:
                self._changed.clear()
                await _first(self._changed.wait(), timeout=end - time.monotonic())
        else:
            log.warning("drained in %.1f s: every request finished", time.monotonic() - t0)
        exit_server()


async def _first(*aws, timeout: float) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
