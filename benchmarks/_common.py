"""Helpers shared by the benchmark scripts: a kv3d server subprocess, a tokenizer,
deterministic text of a given token length, percentiles, machine facts."""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent

WORDS = ("policy customer account refund shipping warranty order invoice support product service "
         "delivery return exchange payment card address contact hours store online agent ticket issue "
         "request balance credit discount member premium standard express tracking package damaged "
         "missing replacement survey feedback manager escalation priority response resolution "
         "document section clause reference archive record entry summary detail note guideline").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, overrides: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, KV3D_USER_CONFIG="none")
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kv3d_core.cli", "serve", f"server.port={self.port}",
                                      "server.log_level=warning", *overrides],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kv3d serve exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def tokenizer():
    """The default model's tokenizer (a tiny backend; the model file loads in ~0.1 s)."""
    from kv3d_core.plugins import make_plugin_manager

    return make_plugin_manager().create("backend", "llamacpp", hot_mb=8, n_seq_max=1, n_threads=1)


def text_of_tokens(tok, n_tokens: int, seed: int) -> str:
    """Deterministic prose of about ``n_tokens`` tokens (within a few) for the model's tokenizer."""
    rng = random.Random(seed)
    words: list[str] = []
    while True:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
        words.append(sentence)
        text = " ".join(words)
        if len(tok.tokenize(text)) >= n_tokens:
            return text


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, float), q)) if len(xs) else float("nan")


def machine() -> dict:
    import llama_cpp

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "llama_cpp_python": llama_cpp.__version__,
            "load_avg_at_start": os.getloadavg()}


def stream_chat(url: str, model: str, messages, max_tokens: int, **kw) -> dict:
    """One streaming request: TTFT, tokens, usage."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **kw}
    t0 = time.perf_counter()
    ttft, usage, n_chunks = None, None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            n_chunks += 1
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "total": total, "usage": usage}
