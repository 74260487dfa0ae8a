"""How llama.cpp cuts one ``llama_decode`` batch into micro-batches (ubatches).

Each micro-batch is one pass of the whole model (every layer's kernels, on a GPU one
launch sequence of a few ms whatever its size), so a step's cost grows with how many
micro-batches its batch becomes, not only with its tokens. The rule depends on the KV
layout (``llama_kv_cache::init_batch``):

- one unified cell pool (``kv_unified``): ``split_simple``, tokens in order, ``n_ubatch``
  at a time;
- a KV stream per sequence: ``split_equal(n_ubatch, sequential=true)``: a micro-batch holds
  a run of sequences with **consecutive ids**, starting at the lowest one with tokens left,
  and takes **the same number of tokens from each** (the fewest any of them has left, at
  most ``n_ubatch // n_seqs``). So 64 decoding sequences with ids 0..63 are one micro-batch,
  but the same 64 with a gap in their ids are two; four sequences prefilling 112 tokens each
  are one micro-batch when their ids are consecutive and four when they are not.

:func:`count` reproduces ``split_equal`` over sequences rather than tokens (a batch holds a
sequence's tokens together, ordered by sequence id, as ``_Batch.fill`` writes them), for
the scheduler to plan steps and for the ``kv3d_step_microbatches`` histogram. Ported from
llama.cpp's ``src/llama-batch.cpp`` (``llama_batch_allocr::split_equal``, ``n_keep_tail``
0, sequences never coupled); ``tests/test_microbatches.py`` checks it against llama.cpp's
own count of computed graphs.
"""

from __future__ import annotations

from typing import Iterable


def count(lengths: Iterable[tuple[int, int]], n_ubatch: int, *, streams: bool) -> int:
    """Micro-batches one batch becomes. ``lengths``: ``(seq_id, n_tokens)`` of each sequence
    in the batch (one entry per sequence); ``streams``: a KV stream per sequence (else one
    unified pool, where only the total matters)."""
    items = sorted(lengths)
    if not items:
        return 0
    n_ubatch = max(1, int(n_ubatch))
    if not streams:
        return -(-sum(n for _, n in items) // n_ubatch)
    # Consecutive one-token sequences (decoding ones) always share a pass, which takes their one
    # token (the fewest any sequence of a run has left): each such block is one entry of
    # ``width`` sequences, ids ``lo..hi``, so the loop below walks the prefilling sequences and
    # the gaps, not every decoding one. (Not when a run could hold more sequences than a
    # micro-batch takes, n_ubatch + 1: llama.cpp then cuts the run, and blocks must not hide that.)
    merge = len(items) <= n_ubatch
    lo: list[int] = []
    hi: list[int] = []
    left: list[int] = []
    width: list[int] = []
    for seq, n in items:
        if n <= 0:
            continue
        if merge and n == 1 and left and left[-1] == 1 and seq == hi[-1] + 1:
            hi[-1] = seq
            width[-1] += 1
            continue
        lo.append(seq)
        hi.append(seq)
        left.append(n)
        width.append(1)
    first = 0                                # lowest entry with tokens left
    ubatches = 0
    size = len(left)
    while True:
        while first < size and left[first] == 0:
            first += 1
        if first == size:
            return ubatches
        # the run: consecutive ids with tokens left, from the first one (a sequence with
        # none left, or a missing id, ends it: llama.cpp accepts only last_seq_id + 1)
        end, n_seqs, least = first + 1, width[first], left[first]
        while end < size and left[end] > 0 and lo[end] == hi[end - 1] + 1 and n_seqs <= n_ubatch:
            n_seqs += width[end]
            least = min(least, left[end])
            end += 1
        take = min(least, max(1, n_ubatch // n_seqs))
        for i in range(first, end):
            left[i] -= take
        ubatches += 1
