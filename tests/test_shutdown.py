"""Graceful shutdown on SIGTERM: stop admitting, let requests in flight finish, end the rest
cleanly, persist, exit 0. A real `kv3d serve` process, real HTTP, the real model."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from conftest import MODEL_ID, Server

SYSTEM = "You are a storyteller. Answer with a long, detailed story."


def _body(i: int, stream: bool, max_tokens: int) -> dict:
    return {"model": MODEL_ID, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Tell me story number {i} about a lighthouse."}]}


def _counting(i: int, stream: bool) -> dict:
    """A completion that never stops by itself (greedy counting) within its 1,000 tokens (the
    tests' sessions hold 1,024: a request that cannot fit is refused with a 400)."""
    return {"model": MODEL_ID, "stream": stream, "max_tokens": 1000, "temperature": 0,
            "prompt": f"{i + 1}, {i + 2}, {i + 3}, {i + 4}, {i + 5},"}


class Client(threading.Thread):
    """One request in flight; ``first`` is set when the server has started answering it
    (a stream's first chunk; for a plain request, once it is admitted)."""

    def __init__(self, url: str, i: int, stream: bool, body: dict, path: str = "/v1/chat/completions") -> None:
        super().__init__()
        self.url, self.i, self.stream, self.body, self.path = url + path, i, stream, body, path
        self.first = threading.Event()
        self.status: int | None = None
        self.headers: dict = {}
        self.events: list[str] = []
        self.json: dict | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            if self.stream:
                with httpx.stream("POST", self.url, json=self.body, timeout=600) as r:
                    self.status, self.headers = r.status_code, dict(r.headers)
                    for line in r.iter_lines():
                        if line:
                            self.events.append(line)
                            self.first.set()
            else:
                self.first.set()
                r = httpx.post(self.url, json=self.body, timeout=600)
                self.status, self.headers, self.json = r.status_code, dict(r.headers), r.json()
        except Exception as exc:       # noqa: BLE001 -- reported by the test
            self.error = exc
            self.first.set()


def _running(srv: Server) -> float:
    return srv.metrics().get("kv3d_requests_running", 0.0)


def _wait_running(srv: Server, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _running(srv) < n:
        assert time.monotonic() < deadline, "requests never started"
        time.sleep(0.1)


def test_sigterm_lets_requests_in_flight_finish(tmp_path):
    """SIGTERM with six requests in flight (three streams): none is cut within server.drain_s;
    meanwhile new requests get 503 + Retry-After and /health says draining; the process
    exits 0 and the conversations it held resume from the cold tier after a restart."""
    cold = tmp_path / "cold"
    overrides = ["server.drain_s=300", "+tier=ssd", f"cache.ssd_cold_path={cold}"]
    srv = Server(overrides, tmp_path / "drain.log").start()
    try:
        plain = [Client(srv.url, i, False, _body(i, False, 64)) for i in range(3)]
        for c in plain:
            c.start()
        _wait_running(srv, 3)
        streams = [Client(srv.url, i, True, _body(i, True, 64)) for i in range(3, 6)]
        for c in streams:
            c.start()
        for c in streams:
            assert c.first.wait(300)
        clients = plain + streams
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(srv.url + "/v1/chat/completions", json=_body(99, False, 2), timeout=60)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.headers["connection"] == "close"
        assert refused.json()["error"]["code"] == "shutting_down"
        health = httpx.get(srv.url + "/health", timeout=60)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        for c in clients:
            c.join(600)
        assert srv.proc.wait(120) == 0
    finally:
        srv.stop()
    for c in clients:
        assert c.error is None and c.status == 200, (c.i, c.error, c.status, c.json, c.events[-3:])
        if c.stream:
            assert c.events[-1] == "data: [DONE]"
            last = json.loads(c.events[-2][6:])
            assert last["choices"][0]["finish_reason"] in ("stop", "length"), c.events[-3:]
            assert not any('"error"' in e for e in c.events)
        else:
            assert c.json["choices"][0]["finish_reason"] in ("stop", "length")
            assert c.json["usage"]["completion_tokens"] >= 1
    log = srv.log_path.read_text(errors="replace")
    in_flight = int(log.split("draining: ")[1].split(" request")[0])
    assert in_flight == 6, log[-3000:]                    # all six were in flight at the signal ...
    assert "drained in" in log and "drain time over" not in log and "Traceback" not in log, log[-3000:]
    # the conversations finished during the drain were persisted: a restart resumes one
    srv2 = Server(overrides, tmp_path / "restart.log").start()
    try:
        first = next(c for c in clients if not c.stream)
        follow = _body(first.i, False, 2)
        follow["messages"] += [{"role": "assistant", "content": first.json["choices"][0]["message"]["content"]},
                               {"role": "user", "content": "And then?"}]
        r = httpx.post(srv2.url + "/v1/chat/completions", json=follow, timeout=300)
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        srv2.stop()


def test_past_the_drain_time_requests_end_cleanly(tmp_path):
    """Requests still running after server.drain_s end in OpenAI's error shape: a stream with
    an error event then ``data: [DONE]``, a plain request with a 503 JSON body -- never a
    text/plain 500 or a stream cut mid-chunk."""
    srv = Server(["server.drain_s=1"], tmp_path / "cut.log").start()
    try:
        clients = [Client(srv.url, i, i % 2 == 0, _counting(i, i % 2 == 0), "/v1/completions") for i in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            assert c.first.wait(300)             # the streams have sent their first chunk
        _wait_running(srv, 4)
        srv.proc.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(300)
        assert srv.proc.wait(120) == 0
    finally:
        srv.stop()
    for c in clients:
        assert c.error is None, (c.i, c.error)
        if c.stream:
            assert c.status == 200
            assert c.events[-1] == "data: [DONE]"
            err = json.loads(c.events[-2][6:])["error"]
            assert err["code"] == "shutting_down" and err["type"] == "server_error"
        else:
            assert c.status == 503 and c.headers["retry-after"]
            assert c.json["error"]["code"] == "shutting_down"
    log = srv.log_path.read_text(errors="replace")
    assert "drain time over" in log and "Traceback" not in log, log[-3000:]
