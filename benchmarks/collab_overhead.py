"""What ``collab`` stores beyond ``int8`` for sessions that share nothing (issue 20): real KV of
sessions of one family on the default model (as ``collab_coding.py``), every block new.

Per block size: int8's bytes of each whole delta (framed), against collab's manifests and blocks
(framed) plus what a block's tier entry holds besides its payload: its token ids (4 bytes each:
its own ``block`` ids since collab v2; v1 held the whole chain from position 0, also reported).

    python benchmarks/collab_overhead.py [--sessions 8] [--user-tokens 50]
"""

from __future__ import annotations

import argparse
import json
import os

from _common import machine
from collab_coding import real_deltas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=128)
    ap.add_argument("--user-tokens", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from kv3d_codec_collab.codec import CollabCodec
    from kv3d_codec_int8.codec import Int8Codec
    from kv3d_core.kv import framing

    deltas = real_deltas(a.sessions, a.system_tokens, a.user_tokens, a.threads)
    int8 = Int8Codec()
    whole = sum(len(framing.frame("int8", int8.version, int8.encode(d))) for d in deltas)
    out = {"benchmark": "collab_overhead", "cells": [d.n_cells for d in deltas],
           "family_prefix": int(deltas[0].positions[0]), "int8_whole_bytes": whole, "by_block": {}}
    for bt in (32, 64):
        c = CollabCodec(block_tokens=bt)
        man = blk = own = chain = 0
        for d in deltas:
            p0 = int(d.positions[0])
            keys = [f"{i:040x}" for i in range(d.n_cells // bt)]
            manifest, blocks = c.encode_blocks(d, keys, lambda _k: False)
            man += len(framing.frame(c.codec_id, c.version, manifest))
            blk += sum(len(framing.frame(c.codec_id, c.version, x)) for x in blocks.values())
            own += 4 * bt * len(keys)
            chain += sum(4 * (p0 + (i + 1) * bt) for i in range(len(keys)))
        out["by_block"][bt] = {"manifests": man, "blocks": blk, "block_tokens_v2": own, "block_tokens_v1": chain,
                               "over_int8": (man + blk + own) / whole,
                               "over_int8_with_v1_block_tokens": (man + blk + chain) / whole,
                               "over_int8_payloads_only": (man + blk) / whole}
    out.update(machine=machine(), load_avg_at_end=list(os.getloadavg()))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
