"""Soak: N multi-turn chat clients against one real `kv3d serve` for a fixed time.

Each client holds conversations of a few turns (one of several shared system
prompts, the whole history resent every turn, so sessions are resumed, spilled to
the warm and cold tiers and restored), half of them streaming, until the time is up;
then it finishes the request in hand. A sampler reads the server's RSS
(/proc/<pid>/status), /debug/stats (hot KV cells, warm/cold tier bytes and sessions)
and /metrics every few seconds.

Reported: requests sent / answered / counted by the server (kv3d_http_requests_total
of the chat endpoint: all three must be equal), errors by kind (5xx, 503,
other status, connection), latency percentiles, cached-token share, and RSS over
time with its least-squares slope after the warm-up (and the change that slope
makes over the measured window, relative to the mean RSS). Exit status 1 when a
request failed or the counters disagree.

    python benchmarks/soak.py --duration 300 [--clients 16] [--out soak.json] [server overrides ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from _common import Server, WORDS, machine, pct

SYSTEMS = [
    "You are the help desk of a city library. Answer in one or two short sentences.",
    "You are a travel agent for rail journeys across Europe. Be brief and practical.",
    "You are a support agent for a small online bookshop: orders, refunds, shipping. Keep it short.",
    "You are a cooking assistant. Suggest simple recipes with few ingredients, briefly.",
]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def question(rng: random.Random, c: int, turn: int) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18)))
    return f"Client {c}, turn {turn}: a question about {words}?"


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.answered = 0
        self.outcomes: Counter[str] = Counter()
        self.latency: list[float] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.first_errors: list[str] = []

    def record(self, outcome: str, latency: float | None = None, usage: dict | None = None,
               detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome != "connection_error":
                self.answered += 1
            if latency is not None:
                self.latency.append(latency)
            if usage:
                self.prompt_tokens += usage.get("prompt_tokens", 0)
                self.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            if outcome != "ok" and len(self.first_errors) < 10:
                self.first_errors.append(f"{outcome}: {detail[:300]}")


def one_request(http: httpx.Client, url: str, body: dict, stream: bool, tally: Tally) -> str | None:
    """Send one chat request; returns the reply text, or None when it failed (counted)."""
    with tally.lock:
        tally.sent += 1
    t0 = time.perf_counter()
    try:
        if not stream:
            r = http.post(url + "/v1/chat/completions", json=body)
            if r.status_code != 200:
                tally.record(_status_kind(r.status_code), time.perf_counter() - t0, detail=r.text)
                return None
            data = r.json()
            tally.record("ok", time.perf_counter() - t0, data.get("usage"))
            return data["choices"][0]["message"]["content"] or ""
        body = dict(body, stream=True, stream_options={"include_usage": True})
        text, usage, done = [], None, False
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                tally.record(_status_kind(r.status_code), time.perf_counter() - t0, detail=r.text)
                return None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    tally.record("stream_error", time.perf_counter() - t0, detail=line)
                    return None
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
        if not done:
            tally.record("stream_cut", time.perf_counter() - t0, detail="no [DONE]")
            return None
        tally.record("ok", time.perf_counter() - t0, usage)
        return "".join(text)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        tally.record("connection_error", detail=repr(exc))
        return None


def _status_kind(status: int) -> str:
    if status == 503:
        return "503"
    return "5xx" if status >= 500 else f"status_{status}"


def client(c: int, url: str, model: str, deadline: float, turns: int, max_tokens: int, tally: Tally) -> None:
    rng = random.Random(c)
    stream = c % 2 == 1
    with httpx.Client(timeout=300) as http:
        while time.monotonic() < deadline:
            messages = [{"role": "system", "content": SYSTEMS[rng.randrange(len(SYSTEMS))]}]
            for turn in range(turns):
                if time.monotonic() >= deadline:
                    break
                messages.append({"role": "user", "content": question(rng, c, turn)})
                body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                        "temperature": 0.7, "seed": rng.randrange(1 << 30)}
                reply = one_request(http, url, body, stream, tally)
                if reply is None:
                    break                        # start a new conversation
                messages.append({"role": "assistant", "content": reply})


def sampler(srv: Server, t0: float, stop: threading.Event, every: float, cold: Path | None, out: list) -> None:
    while True:
        row = {"t": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(srv.proc.pid)}
        try:
            st = httpx.get(srv.url + "/debug/stats", timeout=30).json()
            row["hot_cells"] = st["hot"]["cells_used"]
            row["hot_sessions"] = st["hot"]["sessions"]
            for tier in ("warm", "cold"):
                if tier in st:
                    row[f"{tier}_bytes"] = st[tier]["bytes"]
                    row[f"{tier}_sessions"] = st[tier]["sessions"]
            row["entries"] = st["entries"]
            row["running"] = st["scheduler"].get("running")
            row["waiting"] = st["scheduler"].get("waiting")
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            row["stats_error"] = repr(exc)
        if cold is not None:
            row["cold_dir_bytes"] = sum(p.stat().st_size for p in cold.glob("*.kv3d") if p.is_file())
        out.append(row)
        if stop.wait(every):
            return


def slope(rows: list[dict], key: str, after: float) -> dict:
    pts = [(r["t"], r[key]) for r in rows if r["t"] >= after and key in r]
    if len(pts) < 3:
        return {"samples": len(pts)}
    t, y = np.array(pts, float).T
    a, b = np.polyfit(t, y, 1)
    window = t[-1] - t[0]
    return {"samples": len(pts), "per_min": a * 60, "first": y[0], "last": y[-1], "min": y.min(), "max": y.max(),
            "mean": y.mean(), "change_over_window_pct": 100 * a * window / y.mean() if y.mean() else None}


def server_chat_requests(m: dict[str, float]) -> tuple[int, dict[str, int]]:
    by_status = {k.split('status="')[1].split('"')[0]: int(v) for k, v in m.items()
                 if k.startswith("kv3d_http_requests_total{") and 'endpoint="/v1/chat/completions"' in k}
    return sum(by_status.values()), by_status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300, help="seconds of load")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation before a new one")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--warmup", type=float, default=60,
                    help="seconds excluded from the RSS slope, at least; the slope also starts only once the warm "
                         "tier is 90%% full (until then RSS grows with what the tiers hold, by design)")
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hot-mb", type=float, default=64, help="cache.gpu_hot_mb (small: idle sessions spill)")
    ap.add_argument("--warm-mb", type=float, default=16, help="cache.ram_warm_mb (small: warm evicts to cold)")
    ap.add_argument("--cold-mb", type=float, default=256, help="cache.ssd_cold_mb (0: no cold tier)")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("overrides", nargs="*", help="more kv3d serve overrides")
    a = ap.parse_args()

    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="kv3d-soak-"))
    cold = tmp / "cold" if a.cold_mb > 0 else None
    overrides = [f"server.threads={a.threads}", f"cache.gpu_hot_mb={a.hot_mb}", f"cache.ram_warm_mb={a.warm_mb}",
                 f"scheduler.max_running={a.clients}", "+codec=int8"]
    if cold is not None:
        overrides += ["+tier=ssd", f"cache.ssd_cold_path={cold}", f"cache.ssd_cold_mb={a.cold_mb}"]
    overrides += a.overrides
    tally = Tally()
    rows: list[dict] = []
    with Server(overrides, tmp / "server.log") as srv:
        t0 = time.monotonic()
        stop = threading.Event()
        sample = threading.Thread(target=sampler, args=(srv, t0, stop, a.sample_s, cold, rows), daemon=True)
        sample.start()
        deadline = t0 + a.duration
        with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:
            futs = [pool.submit(client, c, srv.url, srv.model, deadline, a.turns, a.max_tokens, tally)
                    for c in range(a.clients)]
            for f in futs:
                f.result()
        wall = time.monotonic() - t0
        stop.set()
        sample.join()
        m = srv.metrics()
        health = httpx.get(srv.url + "/health", timeout=10).json()
        final_rss = rss_mb(srv.proc.pid)
    counted, by_status = server_chat_requests(m)
    warm_full = next((r["t"] for r in rows if r.get("warm_bytes", 0) >= 0.9 * a.warm_mb * 2**20), None)
    steady_from = max(a.warmup, warm_full if warm_full is not None else 0)
    errors = sum(n for k, n in tally.outcomes.items() if k != "ok")
    report = {
        "benchmark": "soak", "duration_s": a.duration, "wall_s": wall, "clients": a.clients, "turns": a.turns,
        "max_tokens": a.max_tokens, "overrides": overrides,
        "requests": {"sent": tally.sent, "answered": tally.answered, "counted_by_server": counted,
                     "server_by_status": by_status, "in_equals_out": tally.sent == tally.answered == counted},
        "outcomes": dict(tally.outcomes), "errors": errors,
        "errors_5xx": sum(n for k, n in tally.outcomes.items() if k in ("5xx", "503")),
        "errors_503": tally.outcomes.get("503", 0), "first_errors": tally.first_errors,
        "latency_s": {"p50": pct(tally.latency, 50), "p95": pct(tally.latency, 95), "p99": pct(tally.latency, 99),
                      "max": max(tally.latency, default=float("nan"))},
        "requests_per_s": tally.answered / wall,
        "cached_token_share": tally.cached_tokens / tally.prompt_tokens if tally.prompt_tokens else None,
        "warm_tier_full_at_s": warm_full, "slope_from_s": steady_from,
        "rss_mb": slope(rows, "rss_mb", steady_from) | {"final": final_rss, "at_start": rows[0]["rss_mb"]},
        "hot_cells": slope(rows, "hot_cells", steady_from),
        "tier_counters": {k: v for k, v in sorted(m.items()) if k.startswith((
            "kv3d_spills_total", "kv3d_restores_total", "kv3d_evictions_total", "kv3d_tier_",
            "kv3d_fallbacks_total", "kv3d_preemptions_total", "kv3d_rejected_total"))},
        "health_at_end": health, "samples": rows, "machine": info,
    }
    r = report
    rss = r["rss_mb"]
    print(json.dumps({k: v for k, v in r.items() if k != "samples"}, indent=2, default=float))
    print(f"\nsoak {a.duration:.0f} s, {a.clients} clients: sent {tally.sent}, answered {tally.answered}, counted "
          f"{counted} (in = out: {r['requests']['in_equals_out']}); errors {errors} (5xx {r['errors_5xx']}, 503 "
          f"{r['errors_503']}); p50 {r['latency_s']['p50']:.2f} s p95 {r['latency_s']['p95']:.2f} s; RSS from "
          f"{steady_from:.0f} s (warm tier full at {warm_full} s) {rss.get('first', float('nan')):.0f} -> "
          f"{rss.get('last', float('nan')):.0f} MB, "
          f"slope {rss.get('per_min', float('nan')):+.2f} MB/min ({rss.get('change_over_window_pct') or 0:+.2f} % "
          f"over the window); /health {health['status']}")
    print("\n   t   rss_mb  hot_cells  warm_MB  cold_MB  cold_dir_MB  entries")
    for row in rows:
        print(f"{row['t']:5.0f}  {row['rss_mb']:7.1f}  {row.get('hot_cells', 0):9d}  "
              f"{row.get('warm_bytes', 0) / 2**20:7.1f}  {row.get('cold_bytes', 0) / 2**20:7.1f}  "
              f"{row.get('cold_dir_bytes', 0) / 2**20:11.1f}  {row.get('entries', 0):7d}")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2, default=float))
    raise SystemExit(0 if errors == 0 and r["requests"]["in_equals_out"] else 1)


if __name__ == "__main__":
    main()
