"""Aggregate generated tokens/s with N concurrent streaming clients vs 1 client (issue 4).

Each client sends streaming chat requests back to back (distinct prompts, temperature
0.7, fixed seed per request, max_tokens fixed) for the same number of requests per
client; aggregate throughput = generated tokens / wall time. Both runs use the same
server process. Batch sizes reached come from kv3d's ``kv3d_batch_sequences`` histogram.

    python benchmarks/concurrency.py [--clients 8] [--requests-per-client 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
import time
from pathlib import Path

from _common import Server, machine, stream_chat

TOPICS = ["a dragon", "the sea", "a small town", "a robot", "winter", "a library", "mountains", "a train",
          "the moon", "a garden", "an old clock", "a market", "the desert", "a lighthouse", "a forest", "rain"]


def run_clients(srv: Server, clients: int, per_client: int, max_tokens: int) -> dict:
    def client(c: int) -> list[dict]:
        out = []
        for i in range(per_client):
            topic = TOPICS[(c * per_client + i) % len(TOPICS)]
            msgs = [{"role": "user", "content": f"Write a story about {topic}. Client {c}, request {i}."}]
            out.append(stream_chat(srv.url, srv.model, msgs, max_tokens, temperature=0.7, seed=c * 1000 + i))
        return out

    before = srv.metrics()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    after = srv.metrics()
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    # batch sizes reached: from the histogram of sequences per llama_decode batch
    buckets = sorted((float(k.split('le="')[1].rstrip('"}')), after[k] - before.get(k, 0))
                     for k in after if k.startswith("kv3d_batch_sequences_bucket") and "+Inf" not in k)
    steps = after.get("kv3d_batch_sequences_count", 0) - before.get("kv3d_batch_sequences_count", 0)
    seqs = after.get("kv3d_batch_sequences_sum", 0) - before.get("kv3d_batch_sequences_sum", 0)
    max_batch = next((le for le, c in buckets if c >= steps), None)
    return {"clients": clients, "requests": len(results), "generated_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "steps": steps, "mean_batch_sequences": seqs / steps if steps else 0,
            "max_batch_sequences_bucket": max_batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    info = machine()
    log = Path(tempfile.mkdtemp()) / "server.log"
    with Server([f"server.threads={a.threads}"], log) as srv:
        stream_chat(srv.url, srv.model, [{"role": "user", "content": "warm-up"}], 4)
        one = run_clients(srv, 1, a.requests_per_client, a.max_tokens)
        many = run_clients(srv, a.clients, a.requests_per_client, a.max_tokens)
    out = {"benchmark": "concurrency", "single": one, "concurrent": many,
           "ratio_tokens_per_s": many["tokens_per_s"] / one["tokens_per_s"],
           "target": f">= 3x with {a.clients} clients", "target_met": many["tokens_per_s"] >= 3 * one["tokens_per_s"],
           "threads": a.threads, "max_tokens": a.max_tokens, "machine": info}
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
