"""Warm and cold restore latency of a 512-token session delta (issues 5 and 6).

One real session is built on the default model: a family prefix (system prompt)
shared with a snapshot sequence, plus 512 tokens of its own. It is spilled through
the configured codec, then restored R times through the production path
(``TierStack.restore``: tier read -> codec decode -> blob -> ``llama_state_seq_set_data``
-> ``seq_cp`` of the family prefix) from the warm (RAM) tier, and R times from the
cold (SSD) tier with the file evicted from the page cache before each read
(``posix_fadvise(DONTNEED)``), so the cold figure includes a real disk read.

Measured in the same run, as the physical references:
- the time of a plain memory copy (``np.copyto``) of the delta's f16 bytes;
- the disk's sequential read time of the same file bytes (page cache dropped).

The codec's settings come from its config group; ``--set`` adds overrides, e.g.
``--set +codec.decode_threads=1`` to decode on one thread (``codec.decode_threads=1``,
without ``+``, once the group's yaml has the key). The output records the codec's
settings and the load average at the start and at the end.

    python benchmarks/restore.py [--codec int8] [--reps 40] [--delta-tokens 512] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine, pct, text_of_tokens


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--delta-tokens", type=int, default=512)
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra configuration override (repeatable)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from kv3d_core.config import compose
    from kv3d_core.contracts import BatchEntry
    from kv3d_core.engine.engine import Engine

    cold_dir = Path(tempfile.mkdtemp(prefix="kv3d-cold-"))
    cfg = compose([f"server.threads={a.threads}", "cache.gpu_hot_mb=256", "scheduler.n_seq_max=8",
                   f"+codec={a.codec}", "+tier=ssd", f"cache.ssd_cold_path={cold_dir}", "cache.ram_warm_mb=512",
                   *a.set])
    eng = Engine(cfg)            # not started: this script drives the cache on its own thread
    try:
        b, cache, tiers = eng.backend, eng.cache, eng.tiers
        system = text_of_tokens(b, a.system_tokens, seed=7)
        user = text_of_tokens(b, a.delta_tokens, seed=8)
        prep = eng.prepare_chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
        tokens = list(prep.prompt.tokens)
        fam = prep.family
        n_delta = len(tokens) - fam.length
        seq = cache.alloc_seq()
        for p0 in range(0, len(tokens), 256):
            chunk = tokens[p0:p0 + 256]
            b.decode([BatchEntry(seq, chunk, p0, False)])
            cache.note_decoded(seq, len(chunk))
        snap = cache.maybe_snapshot(seq, len(tokens), tokens, fam, None)
        assert snap is not None, "the family prefix is long enough for a snapshot"
        cache.release(seq, tokens, len(tokens), fam, snap, keep=True)
        entry = next(e for e in cache.entries() if e.kind == "session")
        cache.evict(entry)
        tiers.flush()
        stored = tiers.warm.get(entry.key)
        f16_bytes = stored.meta.f16_bytes
        # a block codec (collab): the session's entry is a manifest; its blocks are entries of their own
        blocks = [tiers.warm.get(k) for k in (tiers.blocks.refs.keys_of(entry.key) if tiers.blocks else [])]
        payload_bytes = len(stored.payload) + sum(len(x.payload) for x in blocks)

        def restore_once() -> float:
            s = cache.alloc_seq(exclude=[snap])
            t0 = time.perf_counter()
            tiers.restore(entry, s)
            dt = time.perf_counter() - t0
            cache._free_seq(s)
            return dt

        for _ in range(3):
            restore_once()                                   # warm-up
        warm = [restore_once() for _ in range(a.reps)]

        # the memory-copy floor: f16 bytes of the same delta
        src = np.ones(f16_bytes // 2, np.float16)
        dst = np.empty_like(src)
        floor = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            floor.append(time.perf_counter() - t0)

        # cold: move the entry to the SSD tier only
        paths = []
        for x in [stored, *blocks]:
            assert tiers.cold.put(x)
            tiers.warm.delete(x.meta.key)
            paths.append(cold_dir / f"{x.meta.key}.kv3d")
        file_bytes = sum(p.stat().st_size for p in paths)
        cold, seqread = [], []
        for _ in range(a.reps):
            for path in paths:
                drop_cache(path)
            t0 = time.perf_counter()
            for path in paths:
                with open(path, "rb") as f:
                    f.read()
            seqread.append(time.perf_counter() - t0)
            for path in paths:
                drop_cache(path)
            cold.append(restore_once())
        warm_p95, cold_p95, floor_p50, read_p50 = pct(warm, 95), pct(cold, 95), pct(floor, 50), pct(seqread, 50)
        out = {
            "benchmark": "restore", "codec": a.codec, "delta_tokens": n_delta, "prefix_tokens": fam.length,
            "f16_bytes": f16_bytes, "stored_bytes": payload_bytes, "ratio": f16_bytes / payload_bytes,
            "file_bytes": file_bytes, "reps": a.reps,
            "warm_p50_s": pct(warm, 50), "warm_p95_s": warm_p95,
            "memcpy_f16_p50_s": floor_p50, "warm_p95_over_memcpy": warm_p95 / floor_p50,
            "target_warm": "warm p95 <= 5x memcpy of the f16 bytes", "target_warm_met": warm_p95 <= 5 * floor_p50,
            "cold_p50_s": pct(cold, 50), "cold_p95_s": cold_p95, "disk_seq_read_p50_s": read_p50,
            "target_cold": "cold p95 <= 3x warm p95 + disk read time", "cold_budget_s": 3 * warm_p95 + read_p50,
            "target_cold_met": cold_p95 <= 3 * warm_p95 + read_p50,
            "threads": a.threads, "overrides": a.set,
            "codec_settings": {k: v for k, v in vars(tiers.codec).items() if isinstance(v, (int, float, str, bool))},
            "machine": machine(), "load_avg_at_end": list(os.getloadavg()),
        }
    finally:
        eng.close()
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
