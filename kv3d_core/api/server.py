"""The uvicorn server ``kv3d serve`` runs: it drains on SIGTERM/SIGINT instead of
cutting requests after uvicorn's 5 s grace (:mod:`kv3d_core.api.drain`), and answers
malformed HTTP with an error in OpenAI's shape instead of uvicorn's text/plain."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from types import FrameType

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from kv3d_core.api.drain import Drainer
from kv3d_core.api.errors import APIError

log = logging.getLogger("kv3d.api.server")

# uvicorn's own shutdown, after the drain: only idle connections are left to close
UVICORN_GRACE_S = 5


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; a request h11 cannot parse (a bad Content-Length, broken
    headers) gets a 400 in OpenAI's error shape, with ``Connection: close`` as before."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(APIError(400, msg, code="invalid_http").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains (see :mod:`kv3d_core.api.drain`),
    the second cuts what is still running, a third exits at once. A drained exit is a
    normal one: the signal is not raised again afterwards."""

    def __init__(self, config: uvicorn.Config, drainer: Drainer) -> None:
        super().__init__(config)
        self.drainer = drainer
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._loop is None or self._signals >= 3 or self.should_exit:
            super().handle_exit(sig, frame)      # not serving yet, or told three times: uvicorn's way
            return
        if self._signals == 1:
            log.warning("%s received: draining", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            self._loop.call_soon_threadsafe(self.drainer.hurry)

    def _start_drain(self) -> None:
        def exit_server() -> None:
            self.should_exit = True

        task = self._loop.create_task(self.drainer.begin(exit_server))
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or self._drain_failed(t))

    def _drain_failed(self, task: asyncio.Task) -> None:
        log.error("drain failed; exiting", exc_info=task.exception())
        self.should_exit = True


def serve(app, drainer: Drainer, *, host: str, port: int, log_level: str) -> None:
    """Run ``app`` until drained."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            http=JsonErrorH11Protocol, timeout_graceful_shutdown=UVICORN_GRACE_S)
    DrainingServer(config, drainer).run()
