"""Hostile inputs against a real `kv3d serve`: what they cost the server and its other clients.

    python benchmarks/hostile_load.py [--baseline-python OTHER/.venv/bin/python --baseline-cwd OTHER]
                                      [--rounds 3] [--out F.json]

Measures, on one server (the real default model):

- ``small_alone_s``: a 1-token chat request on an idle server (median of 5, before and
  after each round: the baseline of the ratios);
- ``small_behind_huge_s``: the same request sent while six 15 MB prompts are in flight
  (refused by the cheap bound, or tokenized in full by a server without it);
- ``small_behind_big_s``: the same while twelve ~300 KB prompts (under the bound, so
  really tokenized, then refused for the context) are in flight;
- ``refuse_15mb_s``: time to answer one 15 MB prompt (sending included);
- ``rss_growth_400mb_mb``: peak server RSS growth over a 400 MB chunked POST and one
  declaring ``Content-Length: 400 MB``.

``--baseline-python``/``--baseline-cwd`` start a second server from another checkout (e.g.
the commit before the hardening); rounds alternate between the two servers, so both see
the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
OVERRIDES = ["server.threads=2", "cache.gpu_hot_mb=96", "scheduler.n_seq_max=32", "server.log_level=warning"]
SMALL = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small(url: str) -> float:
    t = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=SMALL, timeout=600)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t


def _behind(url: str, body: bytes, n: int) -> float:
    """Latency of the small request sent 0.3 s after ``n`` copies of ``body``."""
    threads = [threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", content=body, timeout=600,
                                                          headers={"content-type": "application/json"}))
               for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    dt = _small(url)
    for t in threads:
        t.join()
    return dt


class _PeakRss(threading.Thread):
    """Highest RSS of ``proc`` while running (sampled every 20 ms)."""

    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = proc, proc.memory_info().rss, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)


def _rss_400mb(url: str, proc: psutil.Process) -> float:
    """Peak RSS growth (MiB) while a 400 MB body is sent, chunked and then with Content-Length."""
    host, port = url.removeprefix("http://").split(":")
    rss0 = proc.memory_info().rss
    sampler = _PeakRss(proc)
    sampler.start()
    mb = b" " * 2**20
    for head, chunks in (
        (b"Transfer-Encoding: chunked\r\n\r\n", (b"%x\r\n" % len(mb) + mb + b"\r\n" for _ in range(400))),
        (b"Content-Length: %d\r\n\r\n" % (400 * 2**20), (mb for _ in range(400))),
    ):
        with socket.create_connection((host, int(port)), timeout=300) as sock:
            try:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             + head)
                for c in chunks:
                    sock.sendall(c)
                sock.recv(65536)                 # the answer (a server that reads it all answers at the end)
            except OSError:
                pass
    time.sleep(0.5)
    sampler.stop.set()
    sampler.join()
    return (sampler.peak - rss0) / 2**20


class _Server:
    def __init__(self, python: str, cwd: str) -> None:
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, KV3D_USER_CONFIG="none")
        self.proc = subprocess.Popen([python, "-m", "kv3d_core.cli", "serve", f"server.port={self.port}", *OVERRIDES],
                                     cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.commit = subprocess.run(["git", "-C", cwd, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
        _small(self.url)                                               # warm-up

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def _round(url: str, proc: psutil.Process, huge: bytes, big: bytes) -> dict[str, float]:
    res: dict[str, float] = {"small_alone_s": statistics.median(_small(url) for _ in range(5))}
    t = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", content=huge, timeout=600, headers={"content-type": "application/json"})
    res["refuse_15mb_s"] = time.perf_counter() - t
    assert r.status_code == 400, r.text[:300]
    res["small_behind_huge_s"] = _behind(url, huge, 6)
    res["small_behind_big_s"] = _behind(url, big, 12)
    res["small_alone_after_s"] = statistics.median(_small(url) for _ in range(5))
    res["rss_growth_400mb_mb"] = _rss_400mb(url, proc)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-python", help="run a second server from another checkout, alternating rounds")
    ap.add_argument("--baseline-cwd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    huge = json.dumps({**SMALL, "messages": [{"role": "user", "content": "lorem ipsum " * 1_250_000}]}).encode()
    big = json.dumps({**SMALL, "messages": [{"role": "user", "content": "lorem ipsum dolor sit amet " * 11_000}]}
                     ).encode()
    servers = {"kv3d": _Server(sys.executable, str(Path(__file__).resolve().parent.parent))}
    if args.baseline_python:
        servers["baseline"] = _Server(args.baseline_python, args.baseline_cwd)
    rounds: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, srv in servers.items():
                rounds[name].append(_round(srv.url, psutil.Process(srv.proc.pid), huge, big))
    finally:
        for srv in servers.values():
            srv.close()
    out: dict = {"load_average": os.getloadavg()}
    for name, rs in rounds.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        alone = statistics.median([r["small_alone_s"] for r in rs] + [r["small_alone_after_s"] for r in rs])
        med["behind_huge_ratio"] = med["small_behind_huge_s"] / alone
        med["behind_big_ratio"] = med["small_behind_big_s"] / alone
        out[name] = {"commit": servers[name].commit, "median": med, "rounds": rs}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
