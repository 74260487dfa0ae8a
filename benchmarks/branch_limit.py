"""How much a branching ``kv3d bench`` run can share at most (issue 20): from the run's plan and its
``requests.jsonl`` (token counts as served), the cells past the family prefix of every session's
last request (prompt + reply: what its stored entry holds), and how many of them repeat another
session's cells at the same positions after the same tokens -- the bytes dedup can save.

A session's tokens are modelled as segments: its system prompt (its family's, or its own), then per
turn the user message (a regenerate resends its source's) and the reply it received. Two sessions
share cells up to the first segment that differs. Reported: the cells of all sessions, the cells
left when every shared prefix is stored once (token-exact), and the same when only whole
``--block``-cell blocks are shared; with the family snapshots (stored once by every codec) added
to both sides, their ratio is the most a block codec with int8's coding can gain over int8 here.

    python benchmarks/branch_limit.py RUN_DIR [--block 64] [bench overrides of the run ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--family-prefix", type=int, required=True,
                    help="cells of a system prompt as the server cuts its family (one figure for all)")
    ap.add_argument("overrides", nargs="*", help="the workload keys of the run, e.g. requests=60 branch_fork=0.2")
    a = ap.parse_intermixed_args()

    from kv3d_tools.bench.workload import WorkloadSpec, generate

    kw = {}
    for o in a.overrides:
        k, _, v = o.partition("=")
        kw[k] = type(getattr(WorkloadSpec(), k))(v)
    wl = generate(WorkloadSpec(**kw), texts=False)
    served = {}
    for line in Path(a.run_dir, "requests.jsonl").read_text().splitlines():
        r = json.loads(line)
        served[r["index"]] = r
    reqs = wl.requests

    # the user-message segment id of each request: a regenerate's is its source's
    user_id: dict[int, int] = {}
    for r in reqs:
        if r.branch == "regenerate":
            same = [q for q in reqs if q.index < r.index and q.session != r.session and q.parent == r.parent
                    and q.user == r.user]
            user_id[r.index] = user_id[same[-1].index] if same else r.index
        else:
            user_id[r.index] = r.index

    def segments(r) -> list[tuple[str, int, int]]:
        chain = []
        q = r
        while q is not None:
            chain.append(q)
            q = reqs[q.parent] if q.parent is not None else None
        chain.reverse()
        fam = wl.session_family.get(r.session)
        root = wl.session_root.get(r.session, r.session)
        out = [("system", fam if fam is not None else -1 - root, 0)]
        prev_total = a.family_prefix           # the first prompt holds the system prompt
        for q in chain:
            s = served[q.index]
            new_prompt = s["prompt_tokens"] - prev_total
            out.append(("user", user_id[q.index], new_prompt))
            out.append(("reply", q.index, s["completion_tokens"]))
            prev_total = s["prompt_tokens"] + s["completion_tokens"]
        return out

    last = {}
    for r in reqs:
        last[r.session] = r
    seqs = []
    for s, r in last.items():
        segs = segments(r)
        fam = wl.session_family.get(s)
        skip = a.family_prefix if fam is not None else 0
        seqs.append((segs, skip))

    total = unique_tok = unique_blk = 0
    seen_tok: dict[tuple, int] = {}
    blocks: set = set()
    for segs, skip in seqs:
        # the system segment is the family prefix for family sessions (skipped: the snapshot holds it),
        # part of the session's delta when its prompt is its own
        body = [(k, i) for k, i, _ in segs]
        lengths = [n for *_, n in segs]
        lengths[0] = a.family_prefix          # the system segment as the server cuts it (approximately)
        start = skip
        n_all = sum(lengths)
        total += n_all - start
        # token-exact: the longest prefix (in segments) another session already holds
        best = start
        acc = 0
        for j in range(len(body)):
            acc += lengths[j]
            key = tuple(body[:j + 1])
            if key in seen_tok:
                best = max(best, acc)
        for j in range(len(body)):
            seen_tok.setdefault(tuple(body[:j + 1]), 1)
        unique_tok += n_all - best
        # block-exact: block b (cells [start + b*B, start + (b+1)*B)) is named by the segments up to its end
        bounds = []
        acc = 0
        for j in range(len(body)):
            acc += lengths[j]
            bounds.append(acc)
        new_blk = 0
        nb = (n_all - start) // a.block
        for b in range(nb):
            end = start + (b + 1) * a.block
            j = next(i for i, x in enumerate(bounds) if x >= end)
            key = (tuple(body[:j + 1]), end - (bounds[j - 1] if j else 0))
            if key not in blocks:
                blocks.add(key)
                new_blk += a.block
        unique_blk += new_blk + (n_all - start - nb * a.block)
    snap = a.family_prefix * len({f for f in wl.session_family.values() if f is not None})
    out = {"sessions": len(seqs), "cells": total, "cells_token_dedup": unique_tok, "cells_block_dedup": unique_blk,
           "family_snapshot_cells": snap,
           "limit_token_exact": (total + snap) / (unique_tok + snap),
           "limit_blocks": (total + snap) / (unique_blk + snap), "block": a.block,
           "branches": wl.summary()["branches"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
