"""Shared fixtures: a real `kv3d serve` process over real HTTP, the official
`openai` client, the real default model."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

# Never read a developer's own ~/.config/kv3d/config.json in tests (in-process compose() included).
os.environ.setdefault("KV3D_USER_CONFIG", "none")

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"

# Small, fast settings for tests on a 2-core machine.
TEST_OVERRIDES = [
    "server.cached_tokens=exact",   # tests check reuse to the token; the default (block) has its own test
    "server.threads=2",
    "cache.gpu_hot_mb=96",        # the unified layout's pool
    "cache.stream_ctx=1024",      # the streams layout: 16 streams of 1024 cells
    "scheduler.n_seq_max=16",
    "server.log_level=warning",
]


def collect(q: queue.Queue, timeout: float = 300):
    """A request's scheduler events, read from ``q`` until it ends: (text, its Done event);
    a Failed event fails the test."""
    from kv3d_core.engine.events import Done, Token
    text = ""
    while True:
        ev = q.get(timeout=timeout)
        if isinstance(ev, Token):
            text += ev.text
        elif isinstance(ev, Done):
            return text, ev
        else:
            raise AssertionError(f"request failed: {ev}")


def engine_chat(eng, messages: list[dict], max_tokens: int = 8) -> tuple[str, dict]:
    """One greedy chat request straight to an in-process Engine: (text, usage)."""
    from kv3d_core.contracts import SamplingParams
    q: queue.Queue = queue.Queue()
    eng.submit(eng.prepare_chat(messages), SamplingParams(temperature=0), max_tokens, [], q.put)
    text, done = collect(q)
    return text, done.usage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `kv3d serve` subprocess."""

    def __init__(self, overrides: list[str], log_path: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.overrides = list(overrides)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "Server":
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("KV3D_USER_CONFIG", "none")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kv3d_core.cli", "serve", f"server.port={self.port}", *TEST_OVERRIDES, *self.overrides],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kv3d serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"kv3d serve did not become healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                key, _, val = line.rpartition(" ")
                out[key] = float(val)
        return out

    def stats(self) -> dict:
        return httpx.get(self.url + "/debug/stats", timeout=30).json()


@contextlib.contextmanager
def running_server(tmp_path: Path, overrides: list[str] = (), env: dict | None = None) -> Iterator[Server]:
    srv = Server(list(overrides), tmp_path / f"server-{time.monotonic_ns()}.log", env).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    with running_server(tmp, [f"cache.ssd_cold_path={tmp / 'cold'}"]) as srv:
        yield srv


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture()
def model_id() -> str:
    return MODEL_ID
