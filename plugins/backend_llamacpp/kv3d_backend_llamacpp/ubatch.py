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
    items = sorted((int(s), int(n)) for s, n in lengths if n > 0)
    if not items:
        return 0
    n_ubatch = max(1, int(n_ubatch))
    if not streams:
        total = sum(n for _, n in items)
        return -(-total // n_ubatch)
    seqs = [s for s, _ in items]
    left = [n for _, n in items]
    first = 0                                # lowest index with tokens left
    ubatches = 0
    while True:
        while first < len(left) and left[first] == 0:
            first += 1
        if first == len(left):
            return ubatches
        # the run: consecutive ids with tokens left, from the first one (a sequence with
        # none left, or a missing id, ends it: llama.cpp accepts only last_seq_id + 1)
        end = first + 1
        while end < len(left) and left[end] > 0 and seqs[end] == seqs[end - 1] + 1 and end - first <= n_ubatch:
            end += 1
        n_seqs = end - first
        take = min(min(left[first:end]), max(1, n_ubatch // n_seqs))
        for i in range(first, end):
            left[i] -= take
        ubatches += 1
