"""Why ``collab``'s blocks take more bytes than ``int8`` of the whole delta, and what would close it
(issue 20). Real KV of sessions of one family on the default model (as ``collab_coding.py``).

int8's codes are zstd-coded per chunk of 64 Ki values of the flat buffer (every K layer, then
every V layer): over a whole delta of n cells a chunk spans 64 Ki / (n * 192) layers, over a
64-cell block 5.3. Each chunk's high nibbles get one Huffman table, so a chunk mixing more layers
(whose code statistics differ) costs more. This measures the bytes of the codes (both nibble
frames; scales and headers apart) of the same cells coded

- ``whole``: as int8 codes a whole delta (the reference);
- ``pieces``: cut into ``--block``-cell pieces plus a tail, each coded as int8 codes it, with the
  high nibbles at zstd levels 3 (int8's) and 16 (zstd's block splitter adapts the table inside a
  frame), and with frames of one layer each;
- ``pieces + per-layer dictionaries``: one zstd dictionary per layer and K/V (``--dict-bytes``
  each, trained on the pieces of the first half of the sessions; their bytes not counted),
  frames of one layer, on the other half.

    python benchmarks/collab_pieces.py [--sessions 8] [--user-tokens 200] [--block 64]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=128)
    ap.add_argument("--user-tokens", type=int, default=200)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--dict-bytes", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from kv3d_codec_int8 import kernels
    from kv3d_codec_int8.codec import split_nibbles
    from kv3d_core.contracts import KVArrays
    from kv3d_core.kv import quant_kernels as K

    deltas = real_deltas(a.sessions, a.system_tokens, a.user_tokens, a.threads)
    chunk = K.CHUNK_VALUES
    low = zstandard.ZstdCompressor(level=-1)
    hi_c = {lvl: zstandard.ZstdCompressor(level=lvl) for lvl in (3, 16)}

    def codes(x: KVArrays) -> np.ndarray:
        if not kernels.load():
            raise SystemExit("needs int8's compiled kernel")
        from kv3d_codec_int8.codec import Int8Codec

        c, _ = kernels.quantize(K.flatten(x).reshape(-1, Int8Codec.group_of(x.head_dim_k, x.head_dim_v)))
        return c.reshape(-1)

    def coded(c: np.ndarray, segments: list[int], lvl: int, dicts=None) -> int:
        """Bytes of the codes ``c`` in frames cut at ``segments`` (value counts): high nibbles at
        ``lvl`` (with the i-th dictionary when given), low nibbles at -1."""
        total, at = 0, 0
        for i, n in enumerate(segments):
            hi, lo = split_nibbles(c[at:at + n].view(np.uint8))
            comp = zstandard.ZstdCompressor(level=lvl, dict_data=dicts[i]) if dicts else hi_c[lvl]
            total += len(comp.compress(hi.tobytes())) + len(low.compress(lo.tobytes()))
            at += n
        return total

    def rows(d: KVArrays, lo: int, hi: int) -> KVArrays:
        return KVArrays(d.positions[lo:hi], [x[lo:hi] for x in d.k], [x[lo:hi] for x in d.v], d.head_dim_k,
                        d.head_dim_v, d.extra)

    def pieces(d: KVArrays) -> list[KVArrays]:
        b, nb = a.block, d.n_cells // a.block
        return [rows(d, i * b, (i + 1) * b) for i in range(nb)] + ([rows(d, nb * b, d.n_cells)] if d.n_cells % b else [])

    def by_chunk(c: np.ndarray) -> list[int]:
        return [min(chunk, c.size - i) for i in range(0, c.size, chunk)]

    def by_layer(x: KVArrays) -> list[int]:
        return [x.n_cells * a_.shape[1] for a_ in (*x.k, *x.v)]

    half = len(deltas) // 2
    out: dict[str, dict[str, int]] = {"all": {}, "second_half": {}}

    def add(part: str, key: str, n: int) -> None:
        out[part][key] = out[part].get(key, 0) + n

    t0 = time.perf_counter()
    samples: list[list[bytes]] = []
    for j, d in enumerate(deltas):
        part = ("all", "second_half") if j >= half else ("all",)
        c = codes(d)
        for p in part:
            add(p, "whole L3", coded(c, by_chunk(c), 3))
            add(p, "whole L16", coded(c, by_chunk(c), 16))
            add(p, "whole, a frame per layer L3", coded(c, by_layer(d), 3))
        for x in pieces(d):
            cx = codes(x)
            for p in part:
                add(p, "pieces L3", coded(cx, by_chunk(cx), 3))
                add(p, "pieces L16", coded(cx, by_chunk(cx), 16))
                add(p, "pieces, a frame per layer L3", coded(cx, by_layer(x), 3))
            if j < half:
                at = 0
                for i, n in enumerate(by_layer(x)):
                    if len(samples) <= i:
                        samples.append([])
                    samples[i].append(split_nibbles(cx[at:at + n].view(np.uint8))[0].tobytes())
                    at += n
    dicts = [zstandard.train_dictionary(a.dict_bytes, s, level=3) for s in samples]
    for d in deltas[half:]:
        for x in pieces(d):
            cx = codes(x)
            add("second_half", "pieces, a frame per layer, per-layer dictionaries L3", coded(cx, by_layer(x), 3, dicts))
    res = {
        "benchmark": "collab_pieces", "sessions": a.sessions, "cells": [d.n_cells for d in deltas],
        "block_cells": a.block, "code_bytes": out,
        "over_whole_L3": {p: {k: v / out[p]["whole L3"] for k, v in out[p].items()} for p in out},
        "dictionary_bytes": sum(len(x.as_bytes()) for x in dicts), "seconds": time.perf_counter() - t0,
        "machine": machine(), "load_avg_at_end": list(os.getloadavg()),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
