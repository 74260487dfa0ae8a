"""``ubatch.count`` against llama.cpp itself: how many micro-batches (graph computations) a
real ``llama_decode`` of the default model runs for a batch, counted with llama.cpp's
scheduler eval callback (one call per graph for its first layer's ``attn_norm-0`` node).
Both KV layouts, random batches: consecutive and scattered sequence ids, equal and
unequal lengths, more tokens than one micro-batch holds."""

from __future__ import annotations

import ctypes
import glob
import os
import random

import pytest

L = pytest.importorskip("llama_cpp")

from kv3d_backend_llamacpp import ubatch               # noqa: E402
from kv3d_backend_llamacpp.model_files import default_model_path   # noqa: E402

N_SEQ, N_UBATCH, N_BATCH = 8, 32, 160


class _Counted:
    """A raw llama.cpp context of the default model that counts its graph computations."""

    def __init__(self, unified: bool) -> None:
        base = glob.glob(os.path.join(os.path.dirname(L.__file__), "lib", "libggml-base.so*"))
        if not base:
            pytest.skip("libggml-base not found beside llama_cpp")
        self._ggml = ctypes.CDLL(base[0])
        self._ggml.ggml_get_name.restype = ctypes.c_char_p
        self._ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
        self.graphs = 0

        @L.ggml_backend_sched_eval_callback
        def on_node(t, ask, _ud):
            if ask and self._ggml.ggml_get_name(t) == b"attn_norm-0":
                self.graphs += 1
            return False
        self._cb = on_node                      # kept alive as long as the context
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(default_model_path()).encode(), L.llama_model_default_params())
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = N_SEQ * 256, N_BATCH, N_UBATCH, N_SEQ
        cp.n_threads = cp.n_threads_batch = 2
        cp.kv_unified = unified
        cp.cb_eval = on_node
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(N_BATCH, 0, 1)

    def decode(self, lengths: list[tuple[int, int]]) -> int:
        """Decode one batch of ``(seq, n_tokens)`` (sequence-ordered, as the backend writes
        it) on an empty cache; the number of graphs llama.cpp computed."""
        L.llama_memory_clear(self.mem, True)
        b, n = self.batch, 0
        for seq, k in sorted(lengths):
            for j in range(k):
                b.token[n], b.pos[n], b.n_seq_id[n] = 100 + j, j, 1
                b.seq_id[n][0] = seq
                b.logits[n] = 1 if j == k - 1 else 0
                n += 1
        b.n_tokens = n
        self.graphs = 0
        assert L.llama_decode(self.ctx, b) == 0
        return self.graphs

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def _batches(rng: random.Random) -> list[list[tuple[int, int]]]:
    fixed = [
        [(0, 1)], [(0, 1), (1, 1)], [(0, 1), (2, 1)],                   # a gap splits decoding sequences
        [(s, 1) for s in range(8)], [(s, 1) for s in range(8) if s != 4],
        [(2, 20), (3, 20), (4, 20)], [(2, 20), (4, 20), (6, 20)],       # equal chunks: consecutive or not
        [(0, 1), (1, 1), (2, 30), (3, 30)], [(0, 1), (2, 30), (1, 1), (5, 30)],
        [(3, 40), (4, 12)], [(0, 100)], [(0, 70), (1, 70)], [(s, 19) for s in range(8)],
    ]
    rand = []
    for _ in range(12):
        seqs = rng.sample(range(N_SEQ), rng.randint(1, N_SEQ))
        lengths = [(s, rng.choice([1, 1, 1, rng.randint(2, 40)])) for s in seqs]
        while sum(k for _, k in lengths) > N_BATCH:
            lengths.pop()
        rand.append(lengths)
    return fixed + rand


@pytest.mark.parametrize("unified", [False, True], ids=["streams", "unified"])
def test_count_matches_llama_cpp(unified: bool) -> None:
    ctx = _Counted(unified)
    try:
        for lengths in _batches(random.Random(7)):
            assert ubatch.count(lengths, N_UBATCH, streams=not unified) == ctx.decode(lengths), lengths
    finally:
        ctx.close()


def test_count_rules() -> None:
    """The rules the scheduler plans with, spelled out (no model needed)."""
    assert ubatch.count([(s, 1) for s in range(64)], 512, streams=True) == 1
    assert ubatch.count([(s, 1) for s in range(64) if s not in (10, 40)], 512, streams=True) == 3
    decoding = [(s, 1) for s in range(60)]
    assert ubatch.count(decoding + [(60, 112), (61, 112), (62, 112), (63, 112)], 512, streams=True) == 2
    # ids apart: the first joins the decoding run's micro-batch (one token), then one each
    assert ubatch.count(decoding[:-4] + [(56, 112), (58, 112), (60, 112), (62, 112)], 512, streams=True) == 5
    assert ubatch.count([(0, 300), (1, 300)], 512, streams=True) == 2            # 256 each, then 44 each
    assert ubatch.count([(0, 300), (1, 300)], 512, streams=False) == 2
    assert ubatch.count([(5, 0)], 512, streams=True) == 0


def _split_equal_tokens(lengths: list[tuple[int, int]], n_ubatch: int) -> int:
    """llama.cpp's ``split_equal(n_ubatch, sequential=true)`` token by token, as written there:
    the reference for batches larger than the model test decodes."""
    tokens = [seq for seq, k in sorted(lengths) for _ in range(k)]
    used = [False] * len(tokens)
    passes = 0
    while not all(used):
        seqs: list[int] = []
        for i, seq in enumerate(tokens):
            if used[i] or seq in seqs:
                continue
            if seqs and seq != seqs[-1] + 1:
                continue
            seqs.append(seq)
            if len(seqs) > n_ubatch:
                break
        idx = {s: [i for i, t in enumerate(tokens) if t == s and not used[i]] for s in seqs}
        n = 0
        while all(len(idx[s]) > n for s in seqs):
            for s in seqs:
                used[idx[s][n]] = True
            n += 1
            if (n + 1) * len(seqs) > n_ubatch:
                break
        passes += 1
    return passes


@pytest.mark.parametrize("n_ubatch", [512, 48, 8])
def test_count_matches_the_token_level_split_on_large_batches(n_ubatch: int) -> None:
    """64 sequences, most decoding (blocks of them are one entry in ``count``), some prefilling,
    gaps anywhere; also micro-batches smaller than the sequence count."""
    rng = random.Random(n_ubatch)
    for _ in range(60):
        seqs = sorted(rng.sample(range(72), rng.randint(1, 64)))
        lengths = [(s, 1 if rng.random() < 0.8 else rng.randint(2, 200)) for s in seqs]
        assert ubatch.count(lengths, n_ubatch, streams=True) == _split_equal_tokens(lengths, n_ubatch), lengths
