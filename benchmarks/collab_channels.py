"""What coding int8's codes with statistics shared across a family could save (issue 20).

``collab`` stores a block once however many sessions hold it, and codes it as int8 does: the
dedup ceiling of the branching workload is 1.41x int8 with 64-cell blocks (docs/BENCHMARKS.md,
"Where the limit is"), short of the 1.5x target. The issue's other lever is coding with what
a family's sessions share. This measures one such code on real KV of sessions of one family on
the default model (``collab_coding.real_deltas``): the same int8 codes (so exactly int8's
quality), coded with per-channel statistics learnt once from the family's first sessions and
applied to the others.

int8 quantizes each head's row of a cell with one scale, so a channel (one dimension of one
head of one layer) keeps its own distribution of codes across cells: its offset and spread
differ from its neighbours'. int8's zstd frames see a mixture of every channel of 1.6 layers
and code it with one Huffman table. Measured, on the second half of the sessions (bits per value,
the codes only: int8's scales, 16 bits per 64 values, are the same for every row):

- ``int8``: the codes as int8 stores them (high nibbles at zstd level 3, low nibbles at -1, in
  chunks of 64 Ki values);
- ``per-layer model``: the cross-entropy of the codes under one distribution for each layer's K
  or V, learnt on the first half (about what an entropy coder with one shared table per layer
  would store);
- ``per-channel model``: the cross-entropy under a distribution per channel learnt on the first
  half (smoothed with the layer's): about what an entropy coder with shared per-channel
  tables would store;
- ``centred, N classes``: each channel's codes minus its family median, the channels sorted
  into N classes by their family spread, each class's values channel-major in one zstd frame
  (level 3): what zstd alone makes of those statistics, for whole deltas and for
  ``--block``-cell pieces (the state stored once per family: a median byte and a class per
  channel, 2 bytes x 192 channels x 60 arrays for this model, not counted).

    python benchmarks/collab_channels.py [--sessions 8] [--user-tokens 200] [--block 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import zstandard

from _common import machine
from collab_coding import real_deltas


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=128)
    ap.add_argument("--user-tokens", type=int, default=200)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--classes", default="1,4,8,16")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from kv3d_codec_int8 import kernels
    from kv3d_codec_int8.codec import Int8Codec, split_nibbles
    from kv3d_core.kv import quant_kernels as K

    if not kernels.load():
        raise SystemExit("needs int8's compiled kernel")
    deltas = real_deltas(a.sessions, a.system_tokens, a.user_tokens, a.threads)
    half = len(deltas) // 2

    def arrays_codes(d) -> list[np.ndarray]:
        """int8's codes of each K then V array of ``d``, ``[cells, width]``, as int16."""
        g = Int8Codec.group_of(d.head_dim_k, d.head_dim_v)
        out = []
        for x in (*d.k, *d.v):
            c, _ = kernels.quantize(np.asarray(x, np.float16).reshape(-1, g))
            out.append(c.reshape(x.shape).astype(np.int16))
        return out

    codes = [arrays_codes(d) for d in deltas]
    train, test = codes[:half], codes[half:]
    n_arrays = len(codes[0])
    n_test = sum(c.size for cs in test for c in cs)

    # int8 as it stores the codes: the flat buffer (every K array, then every V array) in
    # chunks of CHUNK_VALUES, high nibbles at level 3, low nibbles at -1
    hi_c, lo_c = zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=-1)

    def int8_bytes(cs: list[np.ndarray]) -> int:
        flat = np.concatenate([c.reshape(-1) for c in cs]).astype(np.int8)
        total = 0
        for at in range(0, flat.size, K.CHUNK_VALUES):
            hi, lo = split_nibbles(flat[at:at + K.CHUNK_VALUES].view(np.uint8))
            total += len(hi_c.compress(hi.tobytes())) + len(lo_c.compress(lo.tobytes()))
        return total

    # what the family shares: per array and channel, the median code, the spread around it
    # and the histogram of the codes (first half of the sessions)
    median, spread, hist, mix = [], [], [], []
    for i in range(n_arrays):
        tr = np.concatenate([cs[i] for cs in train])
        m = np.median(tr, axis=0).round().astype(np.int16)
        median.append(m)
        spread.append((tr - m).std(axis=0))
        u = (tr + 128).astype(np.int64)
        hist.append(np.stack([np.bincount(u[:, j], minlength=256) for j in range(u.shape[1])]).astype(float))
        mix.append(np.bincount(u.ravel(), minlength=256).astype(float))

    bits: dict[str, float] = {}
    bits["int8"] = 8 * sum(int8_bytes(cs) for cs in test) / n_test
    mix_bits = chan_bits = 0.0
    for cs in test:
        for i, c in enumerate(cs):
            u = (c + 128).astype(np.int64)
            mp = (mix[i] + 0.5) / (mix[i] + 0.5).sum()
            mix_bits += float(-np.log2(mp[u]).sum())
            alpha = 0.5 * 256            # per-channel counts smoothed with the layer's distribution
            pc = (hist[i] + alpha * mp) / (hist[i].sum(axis=1, keepdims=True) + alpha)
            chan_bits += float(-np.log2(pc[np.arange(u.shape[1])[None, :], u]).sum())
    bits["per-layer model"] = mix_bits / n_test
    bits["per-channel model"] = chan_bits / n_test

    every_spread = np.concatenate(spread)
    classes_of = {}
    for n_cls in (int(x) for x in a.classes.split(",")):
        edges = np.quantile(every_spread, np.linspace(0, 1, n_cls + 1)[1:-1])
        classes_of[n_cls] = [np.searchsorted(edges, s) for s in spread]

    def centred_bytes(cs: list[np.ndarray], n_cls: int, lo: int, hi: int) -> int:
        parts: list[list[np.ndarray]] = [[] for _ in range(n_cls)]
        for i, c in enumerate(cs):
            r = ((c[lo:hi] - median[i]) & 0xFF).astype(np.uint8)
            for k in range(n_cls):
                sel = classes_of[n_cls][i] == k
                if sel.any():
                    parts[k].append(np.ascontiguousarray(r[:, sel].T).reshape(-1))
        return sum(len(hi_c.compress(np.concatenate(p).tobytes())) for p in parts if p)

    def centred_round_trip(cs: list[np.ndarray], n_cls: int) -> bool:
        """The centred class frames decode back to exactly int8's codes (the family's medians
        and classes given): this code loses nothing int8 keeps."""
        dz = zstandard.ZstdDecompressor()
        n = cs[0].shape[0]
        frames = []
        for k in range(n_cls):
            p = [np.ascontiguousarray(((c - median[i]) & 0xFF).astype(np.uint8)[:, classes_of[n_cls][i] == k].T).reshape(-1)
                 for i, c in enumerate(cs) if (classes_of[n_cls][i] == k).any()]
            frames.append(hi_c.compress(np.concatenate(p).tobytes()) if p else b"")
        flat = [np.frombuffer(dz.decompress(f), np.uint8) if f else np.zeros(0, np.uint8) for f in frames]
        at = [0] * n_cls
        for i, c in enumerate(cs):
            out = np.empty(c.shape, np.int16)
            for k in range(n_cls):
                sel = np.flatnonzero(classes_of[n_cls][i] == k)
                m = sel.size * n
                out[:, sel] = flat[k][at[k]:at[k] + m].reshape(sel.size, n).T
                at[k] += m
            back = ((out + median[i]) & 0xFF).astype(np.uint8).view(np.int8).astype(np.int16)
            if not np.array_equal(back, c):
                return False
        return True

    def int8_pieces(cs: list[np.ndarray]) -> int:
        n = cs[0].shape[0]
        return sum(int8_bytes([c[lo:lo + a.block] for c in cs]) for lo in range(0, n, a.block))

    t0 = time.perf_counter()
    bits[f"int8, {a.block}-cell pieces"] = 8 * sum(int8_pieces(cs) for cs in test) / n_test
    for n_cls in classes_of:
        whole = pieces = 0
        for cs in test:
            n = cs[0].shape[0]
            whole += centred_bytes(cs, n_cls, 0, n)
            pieces += sum(centred_bytes(cs, n_cls, lo, lo + a.block) for lo in range(0, n, a.block))
        bits[f"centred, {n_cls} classes"] = 8 * whole / n_test
        bits[f"centred, {n_cls} classes, {a.block}-cell pieces"] = 8 * pieces / n_test
    exact = all(centred_round_trip(cs, n_cls) for cs in test for n_cls in classes_of)
    scale_bits = 16 / Int8Codec.group_of(deltas[0].head_dim_k, deltas[0].head_dim_v)
    res = {
        "benchmark": "collab_channels", "sessions": a.sessions, "train_sessions": half,
        "cells": [d.n_cells for d in deltas], "block_cells": a.block,
        "bits_per_value_codes": {k: round(v, 4) for k, v in bits.items()}, "centred_codes_decode_exactly": exact,
        "scale_bits_per_value": scale_bits,
        "int8_over_with_scales": {k: round((bits["int8"] + scale_bits) / (v + scale_bits), 4) for k, v in bits.items()},
        "seconds": round(time.perf_counter() - t0, 1), "machine": machine(), "load_avg_at_end": list(os.getloadavg()),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
