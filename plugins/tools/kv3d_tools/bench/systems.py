"""The servers a benchmark compares, each a subprocess on a free local port.

* ``kv3d``          -- ``python -m kv3d_core.cli serve`` with the bench's serve overrides;
* ``kv3d_safe``     -- the same with ``safe_mode=true`` (no cache reuse);
* ``llama_server``  -- llama.cpp's C++ ``llama-server`` (the server a user would pick instead),
  built from the same llama.cpp source and flags as kv3d's backend, with its best settings for
  the workload: a slot per client, a KV stream per slot, host-RAM prompt cache, idle-slot export
  (``bench/llama_server.py``); the baseline of every ratio;
* ``llama_server_unified`` -- the same with one unified KV cache for all slots (``--kv-unified``);
* ``llamacpp_peer`` -- llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``)
  on the same GGUF with its RAM prompt cache on (``--cache true --cache_type ram``); it serves
  one request at a time.

A :class:`ServerProcess` starts its command, waits until the health URL answers
200, samples the process's RSS (psutil) in a background thread while it runs,
and stops it with SIGTERM (then SIGKILL). Its output goes to a log file next to
the report.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

KV3D = "kv3d"
KV3D_SAFE = "kv3d_safe"
LLAMA_SERVER = "llama_server"
LLAMA_SERVER_UNIFIED = "llama_server_unified"
PEER = "llamacpp_peer"
SYSTEMS = (KV3D, KV3D_SAFE, LLAMA_SERVER, LLAMA_SERVER_UNIFIED, PEER)
LLAMA_SERVERS = (LLAMA_SERVER, LLAMA_SERVER_UNIFIED)
#: what kv3d's ratios are measured against, first present wins
BASELINES = (LLAMA_SERVER, LLAMA_SERVER_UNIFIED, PEER)


class BenchError(RuntimeError):
    """A server would not start or answer."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    name: str
    argv: list[str]
    port: int
    health_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    rss_peak: int = 0
    _sampler: threading.Thread | None = None
    _stop_sampling: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self._start_sampler()
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} while starting "
                                 f"({' '.join(self.argv)}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise BenchError(f"{self.name} did not answer {self.health_path} within {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def rss(self) -> int | None:
        """Resident set size of the server process now, in bytes."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.Error:
            return None

    def _start_sampler(self, every_s: float = 0.25) -> None:
        def loop() -> None:
            while not self._stop_sampling.wait(every_s):
                r = self.rss()
                if r is not None:
                    self.rss_peak = max(self.rss_peak, r)
        r = self.rss()
        self.rss_peak = max(self.rss_peak, r or 0)
        self._sampler = threading.Thread(target=loop, name=f"rss-{self.name}", daemon=True)
        self._sampler.start()

    def get_json(self, path: str, timeout: float = 30) -> dict:
        return httpx.get(self.url + path, timeout=timeout).raise_for_status().json()

    def get_text(self, path: str, timeout: float = 30) -> str:
        return httpx.get(self.url + path, timeout=timeout).raise_for_status().text

    def stop(self) -> None:
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join(5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kv3d_server(name: str, serve_overrides: list[str], log_path: Path) -> ServerProcess:
    """``kv3d serve`` with ``serve_overrides`` (``safe_mode=true`` added for kv3d_safe).
    The user's config file is not read (``KV3D_USER_CONFIG=none``): the bench's
    composed configuration is the whole truth, so a run is reproducible."""
    port = free_port()
    overrides = [o for o in serve_overrides if not _key(o).startswith(("server.port", "server.host"))]
    if not any(_key(o) == "server.log_level" for o in overrides):
        overrides.append("server.log_level=warning")
    if name == KV3D_SAFE:
        overrides = [o for o in overrides if _key(o) != "safe_mode"] + ["safe_mode=true"]
    argv = [sys.executable, "-m", "kv3d_core.cli", "serve", "server.host=127.0.0.1", f"server.port={port}", *overrides]
    return ServerProcess(name, argv, port, "/health", log_path, env={"KV3D_USER_CONFIG": "none"})


def peer_server(model_path: str, model_id: str, *, n_ctx: int, n_threads: int, n_batch: int, cache_bytes: int,
                logits_all: bool, log_path: Path) -> ServerProcess:
    """llama-cpp-python's OpenAI server with its RAM prompt cache. It serves one
    request at a time; later ones wait (``--interrupt_requests false``)."""
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--model_alias", model_id,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads), "--n_batch", str(n_batch),
            "--cache", "true", "--cache_type", "ram", "--cache_size", str(cache_bytes),
            "--logits_all", str(logits_all).lower(), "--verbose", "false",
            # its default (true) cancels the running request when another arrives; false queues them
            "--interrupt_requests", "false"]
    return ServerProcess(PEER, argv, port, "/v1/models", log_path)


def llama_server_process(name: str, binary: str, settings, model_path: str, model_id: str,
                         log_path: Path) -> ServerProcess:
    """llama.cpp's ``llama-server`` with ``settings`` (a ``LlamaServerSettings``)."""
    port = free_port()
    return ServerProcess(name, settings.argv(binary, model_path, model_id, port), port, "/health", log_path)


def peer_available() -> str | None:
    """None when llama-cpp-python's server imports; else why not."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except Exception as exc:  # ImportError of its extras, mostly
        return (f"llama_cpp.server does not import ({type(exc).__name__}: {exc}); install its extras: "
                "pip install sse-starlette 'starlette-context>=0.3.6,<0.4' pydantic-settings PyYAML")
    return None


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")
