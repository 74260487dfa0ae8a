"""Time to first token of a prefix-family hit vs a miss (issue 3).

A miss is the first request of a family: its whole prompt (a ~1,024-token system
prompt + a ~50-token user message) is computed. A hit is a later request of the
same family with another user message: the system prompt's KV is shared from the
family snapshot (seq_cp) and only the user message is computed. Requests are sent
one at a time over HTTP (streaming), so TTFT is latency, not queueing.

    python benchmarks/prefix_ttft.py [--families 6] [--hits-per-family 4] [--system-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import Server, machine, pct, stream_chat, text_of_tokens, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", type=int, default=6)
    ap.add_argument("--hits-per-family", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--user-tokens", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tok = tokenizer()
    systems = [text_of_tokens(tok, a.system_tokens, seed=1000 + f) for f in range(a.families)]
    users = [[text_of_tokens(tok, a.user_tokens, seed=f * 100 + i) + " What should I do?"
              for i in range(a.hits_per_family + 1)] for f in range(a.families)]
    tok.close()
    info = machine()
    log = Path(tempfile.mkdtemp()) / "server.log"
    miss, hit, cached = [], [], []
    with Server([f"server.threads={a.threads}", "cache.gpu_hot_mb=512"], log) as srv:
        stream_chat(srv.url, srv.model, [{"role": "user", "content": "warm-up"}], 2)
        for f in range(a.families):
            msgs = [{"role": "system", "content": systems[f]}, {"role": "user", "content": users[f][0]}]
            r = stream_chat(srv.url, srv.model, msgs, 8, temperature=0)
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            miss.append(r["ttft"])
            for i in range(1, a.hits_per_family + 1):
                msgs = [{"role": "system", "content": systems[f]}, {"role": "user", "content": users[f][i]}]
                r = stream_chat(srv.url, srv.model, msgs, 8, temperature=0)
                cached.append(r["usage"]["prompt_tokens_details"]["cached_tokens"] / r["usage"]["prompt_tokens"])
                hit.append(r["ttft"])
        prompt_tokens = r["usage"]["prompt_tokens"]
    out = {
        "benchmark": "prefix_ttft", "system_tokens": a.system_tokens, "user_tokens": a.user_tokens,
        "prompt_tokens": prompt_tokens, "families": a.families, "hits": len(hit), "misses": len(miss),
        "ttft_miss_p50_s": pct(miss, 50), "ttft_miss_p95_s": pct(miss, 95),
        "ttft_hit_p50_s": pct(hit, 50), "ttft_hit_p95_s": pct(hit, 95),
        "hit_over_miss_p50": pct(hit, 50) / pct(miss, 50), "cached_share_of_prompt": sum(cached) / len(cached),
        "target": "hit <= 1/10 of miss", "target_met": pct(hit, 50) <= pct(miss, 50) / 10,
        "threads": a.threads, "machine": info,
    }
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
