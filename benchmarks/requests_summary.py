"""The headline figures of a `kv3d bench` run from its ``requests.jsonl`` alone (per system and
round: generated tok/s, TTFT p50 by kind, p95 of first turns), for a run whose report was lost
or to recompute one.

    python benchmarks/requests_summary.py RUN_DIR/requests.jsonl[.gz]
"""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "-"


def main(path: str) -> None:
    rows = load(path)
    systems = list(dict.fromkeys(r["system"] for r in rows))
    print("| system | round | gen tok/s | TTFT p50 shared / own / resume (ms) | TTFT p95 first turns (ms) | errors |")
    print("|---|---|---|---|---|---|")
    for name in systems:
        for rnd in sorted({r["round"] for r in rows if r["system"] == name}):
            rs = [r for r in rows if r["system"] == name and r["round"] == rnd]
            ok = [r for r in rs if not r["error"]]
            wall = max(r["start_s"] + r["latency_s"] for r in ok)
            gen = sum(r["completion_tokens"] for r in ok)
            shared = [r["ttft_s"] for r in ok if r["turn"] == 0 and r["family"] is not None and r["reusable"]]
            own = [r["ttft_s"] for r in ok if r["turn"] == 0 and (r["family"] is None or not r["reusable"])]
            resume = [r["ttft_s"] for r in ok if r["turn"] > 0]
            first = [r["ttft_s"] for r in ok if r["turn"] == 0]
            print(f"| {name} | {rnd + 1} | {gen / wall:.0f} | {ms(shared, 50)} / {ms(own, 50)} / {ms(resume, 50)} "
                  f"| {ms(first, 95)} | {len(rs) - len(ok)} |")


if __name__ == "__main__":
    main(sys.argv[1])
