"""A submitted request seen from the event loop: the scheduler's typed events
(:mod:`kv3d_core.engine.events`) reach it through an :class:`Outbox`, one loop wake-up
per burst; :class:`RequestRun` hands them out per choice, watches the client's
connection, and :func:`error_of` maps a failure to its HTTP answer."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref

from fastapi import Request

from kv3d_core.api.errors import APIError
from kv3d_core.engine.events import Done, Event, Failed, FailureKind, Token
from kv3d_core.engine.scheduler import JobHandle

DISCONNECT_POLL_S = 0.25
DEFAULT_RETRY_AFTER_S = 2

# FailureKind -> (status, code); every one is a "server_error" in OpenAI's shape
_HTTP = {
    FailureKind.QUEUE_TIMEOUT: (503, "queue_timeout"),
    FailureKind.KV_CACHE_FULL: (503, "kv_cache_full"),
    FailureKind.SHUTTING_DOWN: (503, "shutting_down"),
    FailureKind.MODEL: (500, None),
    FailureKind.INTERNAL: (500, None),
}


def error_of(ev: Failed) -> APIError:
    """The HTTP answer to a failed request (a 503 says when to retry)."""
    status, code = _HTTP[ev.kind]
    headers = None
    if status == 503:
        headers = {"Retry-After": str(ev.retry_after if ev.retry_after is not None else DEFAULT_RETRY_AFTER_S)}
    return APIError(status, ev.message, etype="server_error", code=code, headers=headers)


class RequestRun:
    """One submitted request: a job per prompt, ``n_choices`` choices in all, their events
    tagged with the choice index."""

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

    def interrupt(self, ev: Failed) -> None:
        """End the request with ``ev``, its jobs cancelled: at shutdown."""
        self.queue.put_nowait((0, ev))
        self.cancel()

    def more_text(self, i: int) -> str:
        """Text of choice ``i``'s plain token events already queued behind the current one (a
        client that reads slower than tokens come gets them in one chunk instead of one each)."""
        parts = []
        while not self.queue.empty():
            j, ev = self.queue._queue[0]     # peek: only plain Token events (no logprobs) are merged
            if j != i or type(ev) is not Token or ev.logprobs is not None:
                break
            parts.append(self.queue.get_nowait()[1].text)
        return "".join(parts)

    async def next_event(self, request: Request) -> tuple[int, Event] | None:
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
            if type(ev) is Failed:
                self.done = True
                self.cancel()                   # one choice failed: the response fails
            elif type(ev) is Done:
                self.open -= 1
                self.done = self.open == 0
            return i, ev

    async def first(self, request: Request) -> tuple[int, Event] | None:
        """The first event, raising the request's error if it failed before any text."""
        got = await self.next_event(request)
        if got is not None and type(got[1]) is Failed:
            raise error_of(got[1])
        return got


class Outbox:
    """Scheduler events to one event loop, one wake-up per burst: a step emits a token for
    every running request, and a ``call_soon_threadsafe`` each (a self-pipe write and a loop
    iteration) would cost the event loop more than the tokens themselves."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, tuple]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


_OUTBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox]" = weakref.WeakKeyDictionary()


def outbox_of(loop: asyncio.AbstractEventLoop) -> Outbox:
    box = _OUTBOXES.get(loop)
    if box is None:
        box = _OUTBOXES[loop] = Outbox(loop)
    return box
