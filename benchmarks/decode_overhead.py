"""Per-step overhead of kv3d's serving path against raw batched ``llama_decode`` (issue 15).

Decode-heavy: N sequences, short distinct prompts (no prefix sharing), ``--gen`` tokens each,
greedy. Two measurements, one after the other on the same machine and settings:

* **raw**: the backend alone in this process -- one ``llama_decode`` of N tokens per step and a
  greedy argmax per row (``sample_many``), nothing else: what llama.cpp itself does per step;
* **kv3d**: a real ``kv3d serve`` (the KV stream layout, N streams) driven over HTTP by N streaming
  clients at once (``/v1/completions``, token-id prompts, ``ignore_eos``), and the scheduler's own
  split of its step time from ``/debug/stats`` (``decode`` = llama_decode, ``sample``, ``other``).

    python benchmarks/decode_overhead.py --seqs 8 --gen 128                  # CPU, default model
    python benchmarks/decode_overhead.py --model m.gguf --n-gpu-layers -1 --seqs 32,64 --gen 512

Prints one JSON object (and writes it with ``--out``): per N, raw and kv3d generated tok/s,
their ratio (the target: kv3d >= 60 % of raw), and the step-time split.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from _common import Server, machine


def prompts(n: int, length: int, n_vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lo = min(100, n_vocab // 4)
    return [[int(t) for t in rng.integers(lo, n_vocab, length)] for _ in range(n)]


def raw(a, n: int) -> dict:
    from kv3d_core.contracts.backend import BatchEntry, SamplingParams
    from kv3d_core.plugins import make_plugin_manager

    b = make_plugin_manager().create("backend", "llamacpp", model_path=a.model, n_seq_max=n, kv_unified=False,
                                     n_ctx_seq=a.stream_ctx, n_threads=a.threads, n_gpu_layers=a.n_gpu_layers)
    try:
        ps = prompts(n, a.prompt_tokens, b.info.n_vocab)
        samplers = [b.make_sampler(SamplingParams(temperature=0.0)) for _ in range(n)]
        per = max(1, b.max_batch_tokens // a.prompt_tokens)      # prompts, as many as a batch holds
        toks = []
        for i in range(0, n, per):
            outs = b.decode([BatchEntry(s, ps[s], 0, True) for s in range(i, min(n, i + per))])
            toks += b.sample_many(samplers[i:i + per], outs)
        pos = a.prompt_tokens
        for _ in range(4):                                     # warm-up steps
            outs = b.decode([BatchEntry(s, [toks[s]], pos, True) for s in range(n)])
            toks = b.sample_many(samplers, outs)
            pos += 1
        t_decode = 0.0
        t0 = time.perf_counter()
        for _ in range(a.gen):
            t1 = time.perf_counter()
            outs = b.decode([BatchEntry(s, [toks[s]], pos, True) for s in range(n)])
            t_decode += time.perf_counter() - t1
            toks = b.sample_many(samplers, outs)
            pos += 1
        wall = time.perf_counter() - t0
        for smp in samplers:
            smp.close()
        return {"tokens_per_s": n * a.gen / wall, "step_ms": wall / a.gen * 1e3,
                "decode_ms_per_step": t_decode / a.gen * 1e3, "n_vocab": b.info.n_vocab}
    finally:
        b.close()


def served(a, n: int, n_vocab: int, log: Path) -> dict:
    overrides = [f"model.path={a.model}" if a.model else "model.path=null", "cache.layout=streams",
                 f"scheduler.n_seq_max={n}", f"scheduler.max_running={n}", f"cache.stream_ctx={a.stream_ctx}",
                 f"backend.n_gpu_layers={a.n_gpu_layers}", "cache.hot_sessions=0", "safe_mode=false",
                 *([f"server.threads={a.threads}"] if a.threads else []), *a.set]
    with Server(overrides, log) as srv:
        ps = prompts(n, a.prompt_tokens, n_vocab, seed=1)

        def one(p: list[int], max_tokens: int) -> int:
            body = {"model": srv.model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
            usage = None
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=3600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        d = json.loads(line[6:])
                        usage = d.get("usage") or usage
            return int(usage["completion_tokens"])

        with concurrent.futures.ThreadPoolExecutor(n) as pool:   # warm-up: every stream once
            list(pool.map(lambda p: one(p, 4), prompts(n, a.prompt_tokens, n_vocab, seed=2)))
        before = httpx.get(srv.url + "/debug/stats", timeout=60).json()["scheduler"]
        if a.mark:                   # a profiler waiting for the timed phase (pipeline.sh, decodeprof)
            Path(a.mark).write_text(f"{srv.proc.pid}\n")
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            generated = sum(pool.map(lambda p: one(p, a.gen), ps))
        wall = time.perf_counter() - t0
        if a.mark:
            Path(a.mark).unlink(missing_ok=True)
        after = httpx.get(srv.url + "/debug/stats", timeout=60).json()["scheduler"]
    steps = after["steps"] - before["steps"]
    split = {k: (after["step_seconds"][k] - before["step_seconds"][k]) / max(1, steps) * 1e3
             for k in ("decode", "sample", "admit", "other")}
    return {"tokens_per_s": generated / wall, "generated": generated, "wall_s": wall, "steps": steps,
            "step_ms_split": split}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: the embedded default model)")
    ap.add_argument("--seqs", default="8", help="comma-separated sequence counts")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--stream-ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="more kv3d serve overrides")
    ap.add_argument("--mark", default=None, help="a file holding the server's pid while the timed decode runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out: dict = {"benchmark": "decode_overhead", "prompt_tokens": a.prompt_tokens, "gen": a.gen,
                 "n_gpu_layers": a.n_gpu_layers, "machine": machine(), "runs": {}}
    log = Path(tempfile.mkdtemp()) / "server.log"
    for n in (int(x) for x in a.seqs.split(",")):
        r = raw(a, n)
        k = served(a, n, r["n_vocab"], log)
        out["runs"][n] = {"raw": r, "kv3d": k, "ratio": k["tokens_per_s"] / r["tokens_per_s"]}
        print(f"{n} sequences: raw {r['tokens_per_s']:.0f} tok/s ({r['step_ms']:.2f} ms/step, "
              f"decode {r['decode_ms_per_step']:.2f}); kv3d {k['tokens_per_s']:.0f} tok/s = "
              f"{k['tokens_per_s'] / r['tokens_per_s']:.0%} of raw; kv3d step split (ms) "
              + ", ".join(f"{p} {v:.2f}" for p, v in k["step_ms_split"].items()), flush=True)
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
