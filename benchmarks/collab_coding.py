"""Does family-shared coding shrink ``collab``'s blocks beyond int8 per block? (issue 20)

Real sessions of one family on the default model: a shared system prompt, then each session's
own user message. Every session's delta (cells past the family prefix) is cut into blocks of
``--block`` cells, and each block coded three ways:

- ``int8``: what ``collab`` stores -- the int8 codec's payload (zstd over the codes' nibbles);
- ``int8 raw + zstd``: the int8 codes and scales without int8's own zstd (``zstd_level=0``),
  compressed by zstd level 3 as one frame;
- ``int8 raw + family dictionary``: the same, with a zstd dictionary trained on the blocks of the
  first half of the sessions (stored once per family: its size is added, amortized over the
  blocks coded with it) and measured on the blocks of the other half.

zstd is lossless: a dictionary adds no error, so it is worth keeping if it shrinks bytes.
(Per-family quantization scales are not measured: int8's per-token, per-head scales are about 3 %
of its bytes, and any coarser scale adds error, which the issue rules out.)

    python benchmarks/collab_coding.py [--sessions 16] [--user-tokens 192] [--block 32]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import zstandard

from _common import machine, text_of_tokens


def blocks_of(delta, b: int):
    from kv3d_core.contracts import KVArrays

    for lo in range(0, delta.n_cells - b + 1, b):
        yield KVArrays(delta.positions[lo:lo + b], [x[lo:lo + b] for x in delta.k], [x[lo:lo + b] for x in delta.v],
                       delta.head_dim_k, delta.head_dim_v, delta.extra)


def session_deltas(eng, n: int, system_tokens: int, user_tokens: int) -> list:
    """The deltas of ``n`` sessions sharing one system prompt, read from llama.cpp's state."""
    from kv3d_core.contracts import BatchEntry

    b, cache = eng.backend, eng.cache
    layout = b.state_layout
    system = text_of_tokens(b, system_tokens, seed=7)
    out = []
    for i in range(n):
        user = text_of_tokens(b, user_tokens, seed=100 + i)
        prep = eng.prepare_chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
        tokens = list(prep.prompt.tokens)
        seq = cache.alloc_seq()
        for p0 in range(0, len(tokens), 256):
            b.decode([BatchEntry(seq, tokens[p0:p0 + 256], p0, False)])
        d = layout.select(layout.parse(b.seq_state_get(seq)), prep.family.length)
        out.append(type(d)(d.positions.copy(), [x.copy() for x in d.k], [x.copy() for x in d.v],
                           d.head_dim_k, d.head_dim_v, dict(d.extra)))
        b.seq_remove(seq, 0, -1)
        cache._free_seq(seq)
    return out


def real_deltas(sessions: int, system_tokens: int, user_tokens: int, threads: int) -> list:
    """:func:`session_deltas` of the default model, on an engine of its own (closed after)."""
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    eng = Engine(compose([f"server.threads={threads}", "cache.gpu_hot_mb=256", "scheduler.n_seq_max=4",
                          "cache.layout=unified"]))
    try:
        return session_deltas(eng, sessions, system_tokens, user_tokens)
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=128)
    ap.add_argument("--user-tokens", type=int, default=192)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--dict-kb", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from kv3d_codec_int8.codec import Int8Codec

    deltas = real_deltas(a.sessions, a.system_tokens, a.user_tokens, a.threads)
    int8, raw = Int8Codec(), Int8Codec(zstd_level=0)
    half = a.sessions // 2
    train = [raw.encode(x) for d in deltas[:half] for x in blocks_of(d, a.block)]
    test = [x for d in deltas[half:] for x in blocks_of(d, a.block)]
    dictionary = zstandard.train_dictionary(a.dict_kb * 1024, train)
    plain_c = zstandard.ZstdCompressor(level=3)
    dict_c = zstandard.ZstdCompressor(level=3, dict_data=dictionary)
    sizes = {"int8": 0, "int8_raw_zstd": 0, "int8_raw_family_dict": 0}
    for x in test:
        r = raw.encode(x)
        sizes["int8"] += len(int8.encode(x))
        sizes["int8_raw_zstd"] += len(plain_c.compress(r))
        sizes["int8_raw_family_dict"] += len(dict_c.compress(r))
    # what cutting into blocks costs by itself: int8 of each whole delta against collab's payloads
    # (int8 per whole block plus the tail) for a few block sizes, every block new
    from kv3d_codec_collab.codec import CollabCodec

    whole = sum(len(int8.encode(d)) for d in deltas)
    per_block = {}
    for bt in (16, 32, 64):
        c = CollabCodec(block_tokens=bt)
        total = 0
        for d in deltas:
            keys = [f"{i:040x}" for i in range(d.n_cells // bt)]
            manifest, blocks = c.encode_blocks(d, keys, lambda _k: False)
            total += len(manifest) + sum(len(x) for x in blocks.values())
        per_block[bt] = total / whole
    dict_bytes = len(dictionary.as_bytes())
    f16 = sum(x.f16_bytes() for x in test)
    out = {
        "benchmark": "collab_coding", "blocks_measured": len(test), "blocks_trained": len(train),
        "block_cells": a.block, "sessions": a.sessions, "f16_bytes": f16, "bytes": sizes,
        "dictionary_bytes": dict_bytes,
        "ratio_f16": {k: f16 / v for k, v in sizes.items()},
        "family_dict_vs_int8": (sizes["int8_raw_family_dict"] + dict_bytes) / sizes["int8"],
        "family_dict_vs_int8_without_dict_bytes": sizes["int8_raw_family_dict"] / sizes["int8"],
        "int8_whole_delta_bytes": whole, "collab_bytes_over_int8_whole": per_block,
        "machine": machine(), "load_avg_at_end": list(os.getloadavg()),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
