"""What one scheduler step costs, by how its prefill tokens are spread over sequences (issue 15).

With a KV stream per sequence (``kv_unified=false``) llama.cpp splits a batch into
micro-batches of *equal* token counts per sequence over runs of consecutive sequence ids
(``split_equal(..., sequential=true)``): the decoding sequences' one token each form one
micro-batch, and every prefilling sequence (or run of consecutive ids with equal lengths)
another, each a whole pass through the model. This measures a step -- ``llama_decode`` and
the greedy argmax of every row (``sample_many``, where the GPU's work is waited for) -- for
``--seqs`` decoding sequences of ``--context`` cells each plus these prefill mixes:

    none               decoding only
    1xP                one sequence prefills the rest of the batch (P = n_batch - decoding)
    2xP/2              two sequences, non-consecutive ids
    4xP/4              four, non-consecutive ids
    4xP/4-consecutive  four, consecutive ids (one micro-batch)
    P-64+64            two, unequal lengths

    python benchmarks/step_mix.py --seqs 8 --context 256                          # CPU, default model
    python benchmarks/step_mix.py --model m.gguf --n-gpu-layers -1 --seqs 32,64 --context 1152

Prints (and writes with ``--out``) one JSON object: per sequence count and mix, the median
step time in ms over ``--reps`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from _common import machine

def mixes(p: int) -> dict[str, list[int]]:
    """The prefill mixes of a step with ``p`` prefill tokens (n_batch less the decoding ones)."""
    q = p // 4
    return {"none": [], f"1x{p}": [p], f"2x{p // 2}": [p // 2] * 2, f"4x{q}": [q] * 4,
            f"4x{q}-consecutive": [q] * 4, f"{p - 64}+64": [p - 64, 64]}


SPARE = 8        # prefilling sequences beyond the decoding ones


def run(a, n: int) -> dict:
    from kv3d_core.contracts.backend import BatchEntry, SamplingParams
    from kv3d_core.plugins import make_plugin_manager

    total = n + SPARE
    b = make_plugin_manager().create("backend", "llamacpp", model_path=a.model, n_seq_max=total, kv_unified=False,
                                     n_ctx_seq=a.context + 512, n_threads=a.threads, n_gpu_layers=a.n_gpu_layers,
                                     n_batch=a.n_batch, n_ubatch=a.n_batch)
    rng = np.random.default_rng(0)
    lo = min(100, b.info.n_vocab // 4)

    def toks(k: int) -> list[int]:
        return [int(t) for t in rng.integers(lo, b.info.n_vocab, k)]
    try:
        for s in range(n):                               # every decoding sequence holds --context cells
            p = toks(a.context)
            for i in range(0, a.context, b.max_batch_tokens):
                b.decode([BatchEntry(s, p[i:i + b.max_batch_tokens], i, i + b.max_batch_tokens >= a.context)])
        samplers = [b.make_sampler(SamplingParams(temperature=0.0)) for _ in range(total)]
        pos = a.context
        out: dict[str, float] = {}
        for name, lengths in mixes(b.max_batch_tokens - n).items():
            ids = (list(range(n, n + len(lengths))) if name.endswith("consecutive")
                   else list(range(n, n + 2 * len(lengths), 2)))
            times = []
            for rep in range(a.reps + 2):
                batch = [BatchEntry(s, toks(1), pos, True) for s in range(n)]
                batch += [BatchEntry(s, toks(k), 0, True) for s, k in zip(ids, lengths)]
                batch.sort(key=lambda e: e.seq)          # as the backend orders a batch
                t0 = time.perf_counter()
                outs = b.decode(batch)
                b.sample_many([samplers[e.seq] for e in batch], outs)
                dt = time.perf_counter() - t0
                for s in range(n):                       # the decoding sequences stay at --context cells
                    b.seq_remove(s, pos, -1)
                for s in ids:
                    b.seq_remove(s)
                if rep >= 2:                             # two warm-up steps per mix
                    times.append(dt)
            out[name] = round(statistics.median(times) * 1e3, 3)
            print(f"{n} sequences, {name:18s} {out[name]:8.2f} ms/step", flush=True)
        for smp in samplers:
            smp.close()
        return out
    finally:
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--seqs", default="8", help="comma-separated decoding sequence counts")
    ap.add_argument("--context", type=int, default=256, help="cells each decoding sequence holds")
    ap.add_argument("--n-batch", type=int, default=512, help="llama.cpp n_batch = n_ubatch (kv3d's default)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = {"machine": machine(), "model": a.model or "embedded default", "context": a.context,
              "n_batch": a.n_batch, "n_gpu_layers": a.n_gpu_layers,
              "step_ms": {int(n): run(a, int(n)) for n in a.seqs.split(",")}}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
