"""The in-memory fake backend (:class:`kv3d_core.testing.FakeBackend`): its contract
behaviour, then the prefix cache, the tier stack and the scheduler running their real logic
on it. No model is loaded; the whole file runs in about a second."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from conftest import collect as collect_events

from kv3d_core.contracts import BatchEntry, FamilyKey, PromptView, SamplingParams
from kv3d_core.engine.prompt import ChatPrompter
from kv3d_core.engine.scheduler import Job, Scheduler, SchedulerConfig
from kv3d_core.errors import BackendError, KVCacheFullError, ModelLoadError, NoFreeCells, StateRestoreError
from kv3d_core.kv.codec_none import NoneCodec
from kv3d_core.metrics import Metrics
from kv3d_core.prefix.cache import Lease, PrefixCache
from kv3d_core.prefix.detectors import ExactDetector
from kv3d_core.testing import FakeBackend, StateLayoutContract
from kv3d_core.testing.backend import BOS, EOS, IM_END, IM_START
from kv3d_core.tiers.entry import CacheEntry
from kv3d_core.tiers.ram import RamTier
from kv3d_core.tiers.stack import TierStack

LAYOUTS = pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
SYSTEM = "You are a careful assistant. Answer briefly and cite the manual."
OTHER_SYSTEM = "You translate everything into French, politely."


def toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def fill(b: FakeBackend, seq: int, tokens: list[int], pos0: int = 0, chunk: int | None = None) -> np.ndarray:
    """Decode ``tokens`` into ``seq`` from ``pos0`` in chunks; a copy of the last logits."""
    step = chunk or b.max_batch_tokens
    out = None
    for i in range(0, len(tokens), step):
        part = tokens[i:i + step]
        out = b.decode([BatchEntry(seq, part, pos0 + i, i + len(part) == len(tokens))])[0]
    return np.array(b.logits(out))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits.astype(np.float64) - p_logits.max()
    lp -= np.log(np.exp(lp).sum())
    lq = q_logits.astype(np.float64) - q_logits.max()
    lq -= np.log(np.exp(lq).sum())
    return float(np.sum(np.exp(lp) * (lp - lq)))


# -- the fake's own contract --------------------------------------------------------------
def test_tokenizer_is_byte_level_and_parses_control_tokens_only_when_asked():
    b = FakeBackend()
    text = "héllo <|im_start|>✓"
    special = b.tokenize(text)
    plain = b.tokenize(text, parse_special=False)
    assert special == list("héllo ".encode()) + [IM_START] + list("✓".encode())
    assert IM_START not in plain and b"".join(map(b.token_piece, plain)).decode() == text
    assert b"".join(map(b.token_piece, special)).decode() == "héllo ✓"     # control pieces are empty
    assert b.control_tokens() == {"<s>": BOS, "</s>": EOS, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
    assert b.is_eog(EOS) and b.is_eog(IM_END) and not b.is_eog(IM_START) and not b.is_eog(ord("a"))
    assert b.tokenize("a", add_special=True) == [97]
    assert FakeBackend(add_bos=True).tokenize("a", add_special=True) == [BOS, 97]
    assert b.token_piece(b.info.n_vocab - 1).isalpha()
    with pytest.raises(BackendError):
        b.token_piece(b.info.n_vocab)
    # chat prompts render with the ChatML fallback; the family ends where the user's text starts
    r = ChatPrompter.for_backend(b).chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert r.tokens == b.tokenize("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert r.family_len == len(b.tokenize("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"))


@pytest.mark.parametrize("kwargs, word", [
    (dict(n_layer=0), "n_layer"), (dict(head_dim_v=0), "head_dim_v"), (dict(max_batch_tokens=0), "max_batch_tokens"),
    (dict(n_ctx_seq=512, n_ctx_train=256), "n_ctx_train"), (dict(n_seq_max=0), "n_seq_max"),
    (dict(n_vocab=10), "n_vocab"), (dict(n_ctx=0), "n_ctx"),
])
def test_a_bad_shape_is_refused_naming_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        FakeBackend(**kwargs)
    with pytest.raises(ModelLoadError, match="model.path"):
        FakeBackend(model_path="m.gguf")


def test_the_streams_layout_sizes_one_stream_per_sequence_and_the_fingerprint_tells_layouts_apart():
    s, u = FakeBackend(kv_unified=False, n_seq_max=4, n_ctx_seq=64), FakeBackend(n_seq_max=4, n_ctx_seq=64, n_ctx=100)
    assert (s.info.n_ctx, s.info.n_ctx_seq, u.info.n_ctx, u.info.n_ctx_seq) == (256, 64, 100, 64)
    assert s.info.fingerprint != u.info.fingerprint
    assert FakeBackend(hot_mb=1).info.n_ctx == 2**20 // FakeBackend().info.kv_bytes_per_token
    assert FakeBackend(seed=1).info.fingerprint != FakeBackend().info.fingerprint == FakeBackend().info.fingerprint


def test_decode_continues_positions_and_returns_llama_output_rows():
    b = FakeBackend()
    outs = b.decode([BatchEntry(3, [1, 2, 3, 4], 0, True), BatchEntry(1, [5, 6], 0, True),
                     BatchEntry(2, [7], 0, False)])
    assert outs == [6, 1, None]              # batch rows in sequence order: 1 (0-1), 2 (2), 3 (3-6)
    assert b.seq_tokens(3) == [1, 2, 3, 4] and b.seq_pos_min(3) == 0 and b.seq_pos_max(3) == 3
    assert b.seq_pos_max(0) == -1 and b.seq_pos_min(0) == -1
    assert (b.decode_calls, b.decoded_tokens, b.cells_used) == (1, 7, 7)
    row = b.logits(6)
    assert row.dtype == np.float32 and row.shape == (b.info.n_vocab,)
    with pytest.raises(BackendError):
        b.logits(2)                          # that entry asked for no logits
    before = (b.cells_used, b.seq_tokens(1), b.seq_tokens(3))
    for bad in ([BatchEntry(1, [9], 3, True)],                    # leaves a gap
                [BatchEntry(1, [9], 1, True)],                    # a position the sequence holds
                [BatchEntry(1, [9], 2), BatchEntry(3, [9], 5)],   # one good entry, one gap
                [BatchEntry(1, [b.info.n_vocab], 2)],             # outside the vocabulary
                [BatchEntry(0, list(range(65)), 0)],              # past max_batch_tokens
                [BatchEntry(8, [1], 0)]):                         # no such sequence
        with pytest.raises(BackendError):
            b.decode(bad)
    assert (b.cells_used, b.seq_tokens(1), b.seq_tokens(3)) == before and b.decode_calls == 1
    assert b.logits(6) is row                # a refused batch keeps the last outputs
    assert b.decode([BatchEntry(1, [9], 2), BatchEntry(1, [10], 3, True)]) == [None, 1]
    assert b.seq_tokens(1) == [5, 6, 9, 10] and b.decoded_tokens == 9


def test_seq_copy_shares_cells_and_frees_them_with_the_last_holder():
    b = FakeBackend(kv_unified=True)
    fill(b, 0, toks(1, 10))
    b.seq_copy(0, 1, 0, 6)
    assert b.cells_used == 10                # shared, not copied
    assert b.cell_holders(0, 5) == {0, 1} and b.cell_holders(0, 6) == {0} and b.seq_pos_max(1) == 5
    assert np.array_equal(b.seq_kv(1)[1], b.seq_kv(0)[1][:6])
    fill(b, 1, [7, 8, 9, 10], pos0=6)
    assert b.cells_used == 14
    b.seq_remove(0)
    assert b.cells_used == 10 and b.cell_holders(1, 0) == {1}    # the shared cells live on in seq 1
    b.seq_copy(1, 2, 0, -1)
    assert b.cells_used == 10 and b.cell_holders(2, 9) == {1, 2}
    with pytest.raises(BackendError):
        b.seq_copy(1, 2, 0, 3)               # seq 2 holds those positions already
    b.seq_remove(1)
    assert b.cells_used == 10
    b.seq_remove(2)
    assert b.cells_used == 0 and b.cells_free == b.info.n_ctx


def test_seq_copy_between_streams_copies_the_cells():
    b = FakeBackend(kv_unified=False, n_ctx_seq=16)
    fill(b, 0, toks(1, 10))
    b.seq_copy(0, 1, 0, 6)
    assert b.cells_used == 16 and b.cell_holders(0, 0) == {0} and b.cell_holders(1, 0) == {1}
    assert np.array_equal(b.seq_kv(1)[1], b.seq_kv(0)[1][:6])
    b.seq_remove(0)
    assert b.cells_used == 6
    fill(b, 2, toks(2, 16))
    b.seq_remove(2, 0, 9)
    fill(b, 2, toks(3, 9), pos0=16)          # seq 2: positions 9..24, a full stream
    with pytest.raises(KVCacheFullError):
        b.seq_copy(2, 1, 9, -1)              # 6 + 16 cells: more than a stream holds
    assert b.cells_used == 22 and b.seq_pos_max(1) == 5


def test_seq_remove_ranges_and_position_bounds():
    b = FakeBackend()
    t = toks(2, 10)
    full = fill(b, 0, t)
    b.seq_remove(0, 3, 6)
    assert b.seq_kv(0)[0].tolist() == [0, 1, 2, 6, 7, 8, 9] and b.cells_used == 7
    assert (b.seq_pos_min(0), b.seq_pos_max(0)) == (0, 9)
    b.seq_remove(0, -1, 2)
    assert b.seq_kv(0)[0].tolist() == [2, 6, 7, 8, 9] and b.seq_pos_min(0) == 2
    b.seq_remove(0, 8, -1)
    assert b.seq_kv(0)[0].tolist() == [2, 6, 7] and b.seq_pos_max(0) == 7
    b.seq_remove(0)
    assert (b.seq_pos_min(0), b.seq_pos_max(0), b.cells_used) == (-1, -1, 0)
    # cutting the last cell and decoding its token again gives the same logits (the quality guard's move)
    fill(b, 1, t)
    b.seq_remove(1, 9, -1)
    out = b.decode([BatchEntry(1, t[9:], 9, True)])[0]
    assert np.array_equal(b.logits(out), full)


def test_cells_and_logits_are_a_function_of_the_token_history():
    a, c = FakeBackend(), FakeBackend()
    t = toks(3, 40)
    la = fill(a, 0, t)
    # the same tokens in another sequence of another instance, in other chunks, beside other work
    other = toks(4, 40)
    out = None
    for i in range(0, 40, 7):
        out = c.decode([BatchEntry(1, other[i:i + 7], i, True), BatchEntry(5, t[i:i + 7], i, i + 7 >= 40)])[1]
    assert np.array_equal(c.logits(out), la)
    assert np.array_equal(c.seq_kv(5)[1], a.seq_kv(0)[1])
    # another first token: another first cell, other logits at the end
    lb = fill(a, 2, [t[0] ^ 1] + t[1:])
    assert not np.array_equal(a.seq_kv(2)[1][0], a.seq_kv(0)[1][0])
    assert not np.array_equal(lb, la)
    # another token in the middle: the cells before it are the same, the ones from it differ
    mid = t[:20] + [(t[20] + 1) % 256] + t[21:]
    lm = fill(a, 3, mid)
    kv0, kv3 = a.seq_kv(0)[1], a.seq_kv(3)[1]
    assert np.array_equal(kv3[:20], kv0[:20]) and not np.array_equal(kv3[20], kv0[20])
    assert not np.array_equal(lm, la)
    assert not np.array_equal(fill(FakeBackend(seed=1), 0, t), la)     # another model


@LAYOUTS
def test_state_blob_round_trips_exactly(unified):
    b = FakeBackend(kv_unified=unified)
    fill(b, 0, toks(4, 50))
    blob = b.seq_state_get(0)
    layout = b.state_layout
    arrays = layout.parse(blob)
    assert arrays.positions.tolist() == list(range(50))
    assert arrays.extra["n_stream"] == (1 if unified else 8)
    assert (len(arrays.k), arrays.k[0].shape, arrays.head_dim_k) == (2, (50, 16), 8)
    assert arrays.f16_bytes() == 50 * b.info.kv_bytes_per_token
    assert np.array_equal(np.concatenate([*arrays.k, *arrays.v], axis=1), b.seq_kv(0)[1])
    assert layout.build(arrays) == blob
    b.seq_state_set(5, blob)
    assert b.seq_kv(5)[0].tolist() == list(range(50))
    assert np.array_equal(b.seq_kv(5)[1], b.seq_kv(0)[1])
    assert b.seq_tokens(5) == [-1] * 50                  # a blob holds no tokens
    assert b.cells_used == 100 and b.state_gets == 1 and b.state_sets == 1
    outs = b.decode([BatchEntry(0, [1, 2], 50, True), BatchEntry(5, [1, 2], 50, True)])
    assert np.array_equal(b.logits(outs[0]), b.logits(outs[1]))
    # a set replaces whatever the sequence held
    fill(b, 6, toks(5, 70))
    b.seq_state_set(6, blob)
    assert np.array_equal(b.seq_kv(6)[1], b.seq_kv(0)[1][:50]) and b.cells_used == 52 + 52 + 50
    # the empty state round-trips too
    empty = b.seq_state_get(7)
    b.seq_state_set(6, empty)
    assert b.seq_pos_max(6) == -1 and b.cells_used == 104


class TestRowsLayout(StateLayoutContract):
    """The fake's state layout meets the layout contract (as the llama.cpp one does)."""

    @pytest.fixture(params=[True, False], ids=["unified", "streams"])
    def backend(self, request):
        b = FakeBackend(kv_unified=request.param)
        fill(b, 1, toks(11, 40))
        return b

    @pytest.fixture
    def layout(self, backend):
        return backend.state_layout

    @pytest.fixture
    def blob(self, backend):
        return backend.seq_state_get(1)


def test_a_refused_blob_leaves_the_sequence_empty():
    b = FakeBackend()
    fill(b, 0, toks(6, 30))
    blob = b.seq_state_get(0)
    damaged = bytearray(blob)
    damaged[8:12] = b"\xff\xff\xff\x7f"                  # the header's length
    others = [FakeBackend(kv_unified=False), FakeBackend(n_layer=3), FakeBackend(head_dim=4)]
    for o in others:
        fill(o, 0, toks(6, 30))
    bad_blobs = [blob[:-3], b"\x00" * 16, bytes(damaged)] + [o.seq_state_get(0) for o in others]
    for bad in bad_blobs:
        fill(b, 2, toks(7, 10))
        assert b.cells_used == 40
        with pytest.raises(StateRestoreError) as info:
            b.seq_state_set(2, bad)
        assert not isinstance(info.value, NoFreeCells)
        assert b.seq_pos_max(2) == -1 and b.cells_used == 30


def test_damaged_kv_values_load_but_change_the_logits():
    b = FakeBackend()
    fill(b, 0, toks(8, 40))
    blob = bytearray(b.seq_state_get(0))
    blob[-1] ^= 0x40                          # an exponent bit of the last V value of the last cell
    b.seq_state_set(1, bytes(blob))          # values are not checked (llama.cpp does not either)
    kv0, kv1 = b.seq_kv(0)[1], b.seq_kv(1)[1]
    assert int((kv0 != kv1).sum()) == 1
    outs = b.decode([BatchEntry(0, [9], 40, True), BatchEntry(1, [9], 40, True)])
    assert not np.array_equal(b.logits(outs[0]), b.logits(outs[1]))


def test_the_unified_pool_runs_out_of_cells():
    b = FakeBackend(n_ctx=48)
    fill(b, 0, toks(9, 30))
    b.seq_copy(0, 1, 0, 30)
    assert b.cells_free == 18
    with pytest.raises(KVCacheFullError):
        b.decode([BatchEntry(2, toks(10, 19), 0, True)])
    assert b.seq_pos_max(2) == -1 and b.cells_free == 18 and b.decode_calls == 1
    fill(b, 2, toks(10, 18))
    assert b.cells_free == 0
    blob = b.seq_state_get(0)
    with pytest.raises(NoFreeCells):
        b.seq_state_set(3, blob)
    assert b.seq_pos_max(3) == -1
    b.seq_remove(2)
    b.seq_remove(0)                          # seq 1 still holds the 30 shared cells
    with pytest.raises(NoFreeCells):
        b.seq_state_set(3, blob)
    assert b.cells_free == 18
    b.seq_remove(1)
    b.seq_state_set(3, blob)
    assert b.cells_used == 30
    b.seq_state_set(3, blob)                 # its own 30 cells are dropped first: fits again
    assert b.cells_used == 30


def test_a_stream_runs_out_of_cells_on_its_own():
    b = FakeBackend(kv_unified=False, n_seq_max=4, n_ctx_seq=16)
    assert (b.info.n_ctx, b.info.n_ctx_seq) == (64, 16)
    fill(b, 0, toks(11, 16))
    with pytest.raises(KVCacheFullError):
        b.decode([BatchEntry(0, [1], 16, True)])
    assert b.seq_pos_max(0) == 15
    fill(b, 1, toks(12, 16))                 # the other streams are untouched
    b.seq_remove(0, 0, 4)                    # cells, not positions, are what a stream holds
    fill(b, 0, [1, 2, 3, 4], pos0=16)
    assert b.seq_kv(0)[0].tolist() == list(range(4, 20))
    small = FakeBackend(kv_unified=False, n_seq_max=4, n_ctx_seq=8)
    with pytest.raises(NoFreeCells):
        small.seq_state_set(2, b.seq_state_get(1))
    assert small.seq_pos_max(2) == -1


def test_greedy_sampling_is_argmax_and_seeded_sampling_repeats():
    b = FakeBackend()
    o = b.decode([BatchEntry(0, toks(12, 20), 0, True)])[0]
    row = b.logits(o).copy()
    first, second = (int(x) for x in np.argsort(-row)[:2])
    assert b.make_sampler(SamplingParams(temperature=0)).sample(o) == first
    ban = b.make_sampler(SamplingParams(temperature=0, logit_bias=((first, float("-inf")),)))
    assert ban.sample(o) == second
    pen = b.make_sampler(SamplingParams(temperature=0, presence_penalty=100.0))
    pen.accept(first)
    assert pen.sample(o) == second

    def draws(**kw) -> list[int]:
        s = b.make_sampler(SamplingParams(**kw))
        return [s.sample(o) for _ in range(20)]

    assert draws(temperature=1.0, seed=7) == draws(temperature=1.0, seed=7)
    assert draws(temperature=1.0, seed=7) != draws(temperature=1.0, seed=8)
    assert len(set(draws(temperature=1.0, seed=7))) > 5
    assert set(draws(temperature=1.0, seed=7, top_k=1)) == {first}
    assert set(draws(temperature=1.0, seed=7, top_p=1e-6)) == {first}
    assert set(draws(temperature=1.0, seed=7, min_p=0.999)) == {first}
    assert set(draws(temperature=5.0, seed=7, top_k=2)) <= {first, second}
    # sample_many: the same tokens as sampling one by one
    outs = b.decode([BatchEntry(0, [1], 20, True), BatchEntry(1, toks(13, 5), 0, True)])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=3)]
    many = b.sample_many([b.make_sampler(p) for p in params], outs)
    assert many == [b.make_sampler(p).sample(out) for p, out in zip(params, outs)]
    assert many[0] == int(b.logits(outs[0]).argmax())
    assert b.token_logprob(outs[0], many[0], 3).top[0][0] == many[0]
    with pytest.raises(BackendError):
        b.make_sampler(SamplingParams(grammar='root ::= "a"'))
    assert b.check_grammar('root ::= "a"')
    with pytest.raises(BackendError):
        b.make_sampler(SamplingParams(logit_bias=((b.info.n_vocab, 1.0),)))
    closed = b.make_sampler(SamplingParams(temperature=0))
    closed.close()
    with pytest.raises(BackendError):
        closed.sample(outs[0])


def test_model_info_and_fingerprint():
    for unified in (True, False):
        info = FakeBackend(kv_unified=unified).info
        assert info.build["kv_unified"] is unified
        assert info.kv_bytes_per_token == 2 * 2 * 2 * (8 + 8)
        assert (info.n_ctx, info.n_ctx_seq, info.n_seq_max, info.n_vocab) == (8 * 256, 256, 8, 512)
        assert info.chat_template is None and info.eos_token == "</s>"
    assert FakeBackend().info.fingerprint == FakeBackend().info.fingerprint
    variants = ({}, {"kv_unified": False}, {"n_layer": 3}, {"head_dim": 16}, {"seed": 1}, {"head_dim_v": 4})
    fps = {FakeBackend(**kw).info.fingerprint for kw in variants}
    assert len(fps) == len(variants) and all(len(f) == 32 and int(f, 16) >= 0 for f in fps)
    assert FakeBackend(hot_mb=1).info.n_ctx == 2**20 // 128
    with pytest.raises(ModelLoadError):
        FakeBackend(model_path="model.gguf")
    b = FakeBackend()
    b.close()
    b.close()
    with pytest.raises(BackendError):
        b.decode([BatchEntry(0, [1], 0, True)])


# -- the prefix cache on the fake ---------------------------------------------------------
def chat(b: FakeBackend, system: str, user: str) -> tuple[PromptView, FamilyKey]:
    r = ChatPrompter.for_backend(b).chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
    view = PromptView(r.tokens, r.family_len, b.info.model_id)
    return view, ExactDetector().family(view)


def prefill(cache: PrefixCache, b: FakeBackend, lease: Lease, view: PromptView,
            family: FamilyKey) -> tuple[CacheEntry | None, np.ndarray]:
    """The scheduler's prefill of one request: chunks ending at the family boundary, a
    snapshot offered after each. Returns (the snapshot the sequence shares, last logits)."""
    tokens = list(view.tokens)
    n, snap, out = lease.n_cached, lease.snapshot, None
    while n < len(tokens):
        k = min(len(tokens) - n, b.max_batch_tokens)
        if family.length > n and snap is None:
            k = min(k, family.length - n)
        out = b.decode([BatchEntry(lease.seq, tokens[n:n + k], n, n + k == len(tokens))])[0]
        cache.note_decoded(lease.seq, k)
        n += k
        snap = cache.maybe_snapshot(lease.seq, n, tokens, family, snap)
    return snap, np.array(b.logits(out))


def run_prompt(cache: PrefixCache, b: FakeBackend, view: PromptView,
               family: FamilyKey) -> tuple[Lease, CacheEntry | None, np.ndarray]:
    lease = cache.acquire(view, family)
    assert lease is not None
    snap, logits = prefill(cache, b, lease, view, family)
    return lease, snap, logits


def extend_greedy(cache: PrefixCache, b: FakeBackend, seq: int, tokens: list[int], logits: np.ndarray,
                  k: int) -> list[int]:
    """``k`` greedy tokens decoded after ``tokens`` (a reply); the whole context."""
    tokens = list(tokens)
    for _ in range(k):
        tokens.append(int(np.argmax(logits)))
        out = b.decode([BatchEntry(seq, tokens[-1:], len(tokens) - 1, True)])[0]
        cache.note_decoded(seq, 1)
        logits = np.array(b.logits(out))
    return tokens


def hits(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("kv3d_prefix_hits_total")


@LAYOUTS
def test_the_prefix_cache_reuses_a_family_prefix(unified):
    b = FakeBackend(kv_unified=unified)
    metrics = Metrics()
    cache = PrefixCache(b, ExactDetector(), metrics)
    v1, f1 = chat(b, SYSTEM, "What does the manual say about fuses?")
    v2, f2 = chat(b, SYSTEM, "And about cables?")
    assert f1 == f2 and f1.length >= cache.min_snapshot_tokens
    lease1, snap1, _ = run_prompt(cache, b, v1, f1)
    assert (lease1.source, lease1.n_cached) == ("miss", 0) and snap1 is not None
    cache.release(lease1.seq, list(v1.tokens), len(v1.tokens), f1, snap1, keep=False)   # only the snapshot stays
    b.reset_counters()
    lease2, snap2, logits2 = run_prompt(cache, b, v2, f2)
    assert lease2.n_cached == f2.length and lease2.snapshot is snap1 and snap2 is snap1
    assert b.decoded_tokens == len(v2.tokens) - f2.length          # the family prefix was not recomputed
    if unified:
        assert b.cell_holders(lease2.seq, 0) == {lease2.seq, snap1.seq}    # shared cells
    else:
        assert b.state_sets == 1                                   # loaded from the snapshot's host copy
    ref = FakeBackend(kv_unified=unified)
    assert np.array_equal(logits2, fill(ref, 0, list(v2.tokens)))
    assert np.array_equal(b.seq_kv(lease2.seq)[1], ref.seq_kv(0)[1])
    assert hits(metrics) == 1


@LAYOUTS
def test_the_prefix_cache_continues_a_hot_session(unified):
    b = FakeBackend(kv_unified=unified)
    cache = PrefixCache(b, ExactDetector(), Metrics())
    v1, f1 = chat(b, SYSTEM, "What does the manual say about fuses?")
    lease1, snap1, logits1 = run_prompt(cache, b, v1, f1)
    ctx = extend_greedy(cache, b, lease1.seq, list(v1.tokens), logits1, 3)
    cache.release(lease1.seq, ctx, len(ctx), f1, snap1, keep=True, n_prompt=len(v1.tokens))
    turn2 = ctx + b.tokenize("<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n")
    view2 = PromptView(turn2, f1.length, b.info.model_id)
    b.reset_counters()
    lease2, _, logits2 = run_prompt(cache, b, view2, f1)
    assert (lease2.source, lease2.n_cached, lease2.seq) == ("hot", len(ctx), lease1.seq)
    assert b.decoded_tokens == len(turn2) - len(ctx) and b.state_sets == 0
    assert np.array_equal(logits2, fill(FakeBackend(kv_unified=unified), 0, turn2))


# -- the tier stack on the fake --------------------------------------------------------------
def make_codec(name: str):
    if name == "none":
        return NoneCodec()
    return pytest.importorskip("kv3d_codec_int8.codec").Int8Codec()


@LAYOUTS
@pytest.mark.parametrize("codec_name", ["none", "int8"])
def test_a_spilled_session_restores_from_the_ram_tier(unified, codec_name):
    codec = make_codec(codec_name)
    b = FakeBackend(kv_unified=unified)
    metrics = Metrics()
    stack = TierStack(RamTier(capacity_mb=8), None, codec, b.info, metrics)
    try:
        cache = PrefixCache(b, ExactDetector(), metrics, tiers=stack, hot_sessions=0)
        v1, f1 = chat(b, SYSTEM, "What does the manual say about fuses?")
        lease1, snap1, logits1 = run_prompt(cache, b, v1, f1)
        ctx = extend_greedy(cache, b, lease1.seq, list(v1.tokens), logits1, 4)
        cache.release(lease1.seq, ctx, len(ctx), f1, snap1, keep=True, n_prompt=len(v1.tokens))
        more = b.tokenize("<|im_end|>\n<|im_start|>user\nAnd cables?<|im_end|>\n<|im_start|>assistant\n")
        view2 = PromptView(ctx + more, f1.length, b.info.model_id)
        if unified:
            # idle sessions stay in the pool until their cells are needed: evict it now
            entry, n = cache.plan(view2, f1)
            assert entry.kind == "session" and n == len(ctx)
            cache.evict(entry)
        stack.flush()
        L = f1.length
        assert b.cells_used == (L if unified else 0)        # unified: the family snapshot's cells stay
        assert cache.stats()["warm"]["sessions"] == 1
        assert metrics.registry.get_sample_value("kv3d_spills_total", {"tier": "warm"}) >= 1

        b.reset_counters()
        lease2 = cache.acquire(view2, f1)
        assert (lease2.source, lease2.n_cached) == ("warm", len(ctx))
        assert b.decoded_tokens == 0 and b.state_sets == 1
        ref = FakeBackend(kv_unified=unified)
        fill(ref, 0, ctx)
        pos, kv = b.seq_kv(lease2.seq)
        assert pos.tolist() == ref.seq_kv(0)[0].tolist() == list(range(len(ctx)))
        rkv = ref.seq_kv(0)[1]
        assert np.array_equal(kv[:L], rkv[:L])              # the family prefix never went through the codec
        if unified:
            assert b.cell_holders(lease2.seq, 0) == {lease2.seq, snap1.seq}
        err = np.abs(kv[L:].astype(np.float32) - rkv[L:].astype(np.float32)).max()
        if codec.lossless:
            assert err == 0
        else:
            assert 0 < err <= 0.5 / 127 * (1 + 2**-10) + 2**-11     # int8's bound for values in (-1, 1)
        # the request goes on from the restored cells
        _, logits2 = prefill(cache, b, lease2, view2, f1)
        fresh = fill(ref, 0, more, pos0=len(ctx))
        assert b.decoded_tokens == len(more)
        if codec.lossless:
            assert np.array_equal(logits2, fresh)
        else:
            assert 0 < kl(fresh, logits2) < 1e-3
    finally:
        stack.close()


# -- the scheduler on the fake -------------------------------------------------------------
def collect(q: queue.Queue) -> tuple[str, str, dict]:
    text, done = collect_events(q, timeout=10)
    return text, done.reason, done.usage


def run_jobs(unified: bool, specs: list[tuple[PromptView, FamilyKey, int]],
             together: bool, **config) -> tuple[list[tuple[str, str, dict]], Scheduler]:
    """Greedy jobs on a fresh fake, engine and scheduler: all submitted at once, or each
    after the previous one finished. Returns ([(text, reason, usage)], scheduler)."""
    b = FakeBackend(kv_unified=unified)
    metrics = Metrics()
    cache = PrefixCache(b, ExactDetector(), metrics)
    sched = Scheduler(b, cache, metrics, SchedulerConfig(max_running=8, prefill_chunk=32, **config))
    sched.start()
    try:
        def submit(i: int) -> queue.Queue:
            view, family, max_tokens = specs[i]
            q: queue.Queue = queue.Queue()
            sched.submit(Job(f"job-{i}", view, family, SamplingParams(temperature=0), max_tokens, [], q.put))
            return q
        if together:
            queues = [submit(i) for i in range(len(specs))]
            return [collect(q) for q in queues], sched
        return [collect(submit(i)) for i in range(len(specs))], sched
    finally:
        sched.stop()


def greedy_reference(view: PromptView, max_tokens: int, unified: bool) -> tuple[str, str, int]:
    """What one greedy request should answer, decoded directly (no cache, no scheduler)."""
    b = FakeBackend(kv_unified=unified)
    tokens = list(view.tokens)
    logits = fill(b, 0, tokens)
    out: list[int] = []
    while True:
        t = int(np.argmax(logits))
        out.append(t)
        if b.is_eog(t):
            return b"".join(map(b.token_piece, out[:-1])).decode("utf-8", "replace"), "stop", len(out)
        if len(out) >= max_tokens:
            return b"".join(map(b.token_piece, out)).decode("utf-8", "replace"), "length", len(out)
        logits = fill(b, 0, [t], pos0=len(tokens) + len(out) - 1)


@LAYOUTS
def test_the_scheduler_runs_concurrent_greedy_jobs_as_it_runs_them_alone(unified):
    b = FakeBackend()
    specs = []
    for i, (system, user) in enumerate([(SYSTEM, "Fuses?"), (OTHER_SYSTEM, "Good morning."),
                                        (SYSTEM, "Cables, and how to coil them?"), (OTHER_SYSTEM, "Thanks!"),
                                        (SYSTEM, "Batteries?"), (OTHER_SYSTEM, "Where is the station?")]):
        view, family = chat(b, system, user)
        specs.append((view, family, 6 + i))
    together, sched = run_jobs(unified, specs, together=True)
    alone, _ = run_jobs(unified, specs, together=False)
    assert sched.max_batch_seqs_seen > 1                      # they really ran side by side
    for (view, family, max_tokens), t, a in zip(specs, together, alone):
        text, reason, n = greedy_reference(view, max_tokens, unified)
        assert (t[0], t[1], t[2]["completion_tokens"]) == (text, reason, n)
        assert (a[0], a[1], a[2]["completion_tokens"]) == (text, reason, n)
        assert t[2]["prompt_tokens"] == a[2]["prompt_tokens"] == len(view.tokens)
    # one at a time, the later members of a family load its snapshot instead of computing it
    assert [a[2]["cached_tokens"] for a in alone[:2]] == [0, 0]
    assert all(a[2]["cached_tokens"] >= spec[1].length for a, spec in zip(alone[2:], specs[2:]))


@LAYOUTS
def test_raw_prompts_arriving_together_share_their_common_prefix_within_a_namespace_only(unified):
    """Prompts without a family (family_len 0) admitted together and sharing 80 tokens get one
    implicit family per namespace: in each namespace one computes the prefix, the other loads
    its snapshot; a tenant's request never waits for or loads another namespace's prefix.
    Replies equal those of the requests run one by one."""
    b = FakeBackend()
    shared = toks(21, 80)
    specs = []
    for salt in ("tenant-a", "tenant-b"):
        for i in range(2):
            view = PromptView(shared + toks(30 + i, 12), 0, b.info.model_id, salt)
            family = ExactDetector().family(view)
            assert family.length == 0
            specs.append((view, family, 4))
    together, sched = run_jobs(unified, specs, together=True, implicit_families=True)
    assert sched.metrics.snapshot_adoptions._value.get() == 2
    assert [r[2]["cached_tokens"] >= 80 for r in together].count(True) == 2
    for salt in (0, 2):                                   # one of each namespace's pair was served from cache
        assert [together[salt][2]["cached_tokens"] > 0, together[salt + 1][2]["cached_tokens"] > 0].count(True) == 1
    alone, _ = run_jobs(unified, specs, together=False)
    assert [r[:2] for r in together] == [r[:2] for r in alone]
    off, sched = run_jobs(unified, specs, together=True)          # the default: off
    assert sched.metrics.snapshot_adoptions._value.get() == 0, "scheduler.implicit_families=false still grouped them"
    assert [r[:2] for r in off] == [r[:2] for r in alone]
    split = sched.ttft_split
    assert split["n"] == len(specs) and split["parked"] == 0 and split["queued"] >= 0 and split["admitted"] > 0


def test_steps_are_counted_by_kind_and_prefill_tokens_are_the_prompt_tokens_computed():
    """The counters the analytics price a prompt token with: every step is a prefill step
    (it held prompt tokens) or a decode-only one, and the prefill tokens are exactly the
    prompt tokens not served from cache."""
    b = FakeBackend()
    specs = [(*chat(b, system, user), 5) for system, user in [(SYSTEM, "Fuses?"), (SYSTEM, "Cables?"),
                                                               (OTHER_SYSTEM, "Good morning.")]]
    results, sched = run_jobs(False, specs, together=False)
    m = sched.metrics
    steps = {k: m.llama_steps.labels(k)._value.get() for k in ("prefill", "decode")}
    seconds = {k: m.llama_step_seconds.labels(k)._value.get() for k in ("prefill", "decode")}
    assert steps["prefill"] >= len(specs) and steps["decode"] >= 1
    assert sum(steps.values()) == sched.steps and all(v > 0 for v in seconds.values())
    computed = sum(u["prompt_tokens"] - u["cached_tokens"] for _, _, u in results)
    assert results[1][2]["cached_tokens"] > 0 and m.prefill_tokens._value.get() == computed


# -- fewer passes of the model per step (KV stream per sequence) ------------------------------
class _LlamaSplitBackend(FakeBackend):
    """The fake with llama.cpp's micro-batch rule (``kv3d_backend_llamacpp.ubatch``): with a
    stream per sequence, one pass per run of consecutive sequence ids, equal tokens each."""

    def micro_batches(self, lengths):
        from kv3d_backend_llamacpp import ubatch
        return ubatch.count(lengths, self.max_batch_tokens, streams=not self.info.build["kv_unified"])


class _Seq:
    def __init__(self, seq: int) -> None:
        self.seq = seq


def _planner(worth: int) -> Scheduler:
    b = _LlamaSplitBackend(kv_unified=False, n_seq_max=16, max_batch_tokens=512)
    metrics = Metrics()
    return Scheduler(b, PrefixCache(b, ExactDetector(), metrics), metrics, SchedulerConfig(microbatch_tokens=worth))


def test_prefill_chunks_of_consecutive_streams_are_cut_to_one_length_where_that_saves_passes():
    pytest.importorskip("kv3d_backend_llamacpp")
    decoding = [(s, 1) for s in range(4)]
    a, b, c, far, other = _Seq(4), _Seq(5), _Seq(6), _Seq(9), _Seq(12)
    sched = _planner(128)
    count = sched.backend.micro_batches
    natural = [(a, 32), (b, 20), (c, 32)]
    assert count(decoding + [(j.seq, k) for j, k in natural]) == 4      # 1 token each, 19 each, then 12 twice
    plan = sched._fewer_microbatches(decoding, natural)
    assert [(j.seq, k) for j, k in plan] == [(4, 20), (5, 20), (6, 20)]
    assert count(decoding + [(j.seq, k) for j, k in plan]) == 2
    assert sched.microbatch_plans["trimmed_tokens"] == 24
    # ids apart: nothing to cut to one length; a small chunk costing a pass of its own waits,
    # unless it is the step's first (the one whose turn it is)
    plan = sched._fewer_microbatches(decoding, [(a, 32), (far, 20), (other, 300)])
    assert [(j.seq, k) for j, k in plan] == [(4, 32), (12, 300)]
    plan = sched._fewer_microbatches(decoding, [(far, 20), (a, 32), (other, 300)])
    assert [(j.seq, k) for j, k in plan] == [(9, 20), (12, 300)]
    # cutting more tokens than the passes saved are worth: left as it is
    plan = _planner(8)._fewer_microbatches(decoding, natural)
    assert [(j.seq, k) for j, k in plan] == [(4, 32), (5, 20), (6, 32)]
    plan = _planner(8)._fewer_microbatches(decoding, [(a, 32), (far, 20), (other, 300)])
    assert [(j.seq, k) for j, k in plan] == [(4, 32), (9, 20), (12, 300)]


def test_microbatch_tokens_defaults_to_off_on_a_cpu_and_can_be_set():
    b = FakeBackend(kv_unified=False)
    assert b.info.gpu_layers == 0
    metrics = Metrics()
    cache = PrefixCache(b, ExactDetector(), metrics)
    assert Scheduler(b, cache, metrics, SchedulerConfig())._microbatch_tokens == 0
    assert Scheduler(b, cache, metrics, SchedulerConfig(microbatch_tokens=64))._microbatch_tokens == 64


def test_with_fewer_passes_planned_concurrent_greedy_jobs_answer_as_each_alone():
    """Raw prompts of different lengths prefilling together on consecutive streams: the plan
    cuts their chunks (tokens put off to later steps), the replies are those of each job
    run alone, and every step's passes are counted (``kv3d_step_microbatches``)."""
    pytest.importorskip("kv3d_backend_llamacpp")
    b = _LlamaSplitBackend(kv_unified=False)
    specs = [(PromptView(toks(60 + i, 40 + 23 * i), 0, b.info.model_id), 5 + i) for i in range(6)]
    metrics = Metrics()
    cache = PrefixCache(b, ExactDetector(), metrics)
    sched = Scheduler(b, cache, metrics, SchedulerConfig(max_running=8, prefill_chunk=32, microbatch_tokens=64))
    sched.start()
    try:
        queues = []
        for i, (view, max_tokens) in enumerate(specs):
            q: queue.Queue = queue.Queue()
            sched.submit(Job(f"job-{i}", view, ExactDetector().family(view), SamplingParams(temperature=0),
                             max_tokens, [], q.put))
            queues.append(q)
        together = [collect(q) for q in queues]
    finally:
        sched.stop()
    assert sched.microbatch_plans["trimmed_tokens"] > 0
    assert sched.microbatch_plans["passes"] >= sched.steps > 0
    assert metrics.step_microbatches._sum.get() == sched.microbatch_plans["passes"]
    for (view, max_tokens), (text, reason, usage) in zip(specs, together):
        assert (text, reason, usage["completion_tokens"]) == greedy_reference(view, max_tokens, False)


def test_a_step_larger_than_one_stream_preempts_nobody():
    """With a stream per sequence a step's tokens are spread over the streams: 8 prompts of 48
    tokens in streams of 64 cells go in one 384-token step, no request is preempted (the
    check once compared the whole step with one stream's size), and each reply is its own."""
    b = FakeBackend(kv_unified=False, n_seq_max=8, n_ctx_seq=64, max_batch_tokens=512)
    metrics = Metrics()
    cache = PrefixCache(b, ExactDetector(), metrics)
    assert cache.ensure_cells(8 * 48)
    sched = Scheduler(b, cache, metrics, SchedulerConfig(max_running=8, prefill_chunk=64))
    specs = [PromptView(toks(90 + i, 48), 0, b.info.model_id) for i in range(8)]
    queues = []
    for i, view in enumerate(specs):
        q: queue.Queue = queue.Queue()
        sched.submit(Job(f"job-{i}", view, ExactDetector().family(view), SamplingParams(temperature=0), 6, [], q.put))
        queues.append(q)
    sched.start()
    try:
        replies = [collect(q) for q in queues]
    finally:
        sched.stop()
    assert metrics.preemptions._value.get() == 0
    assert sched.max_batch_seqs_seen == 8
    for view, (text, reason, usage) in zip(specs, replies):
        assert (text, reason, usage["completion_tokens"]) == greedy_reference(view, 6, False)


def test_a_stream_that_reports_itself_full_preempts_then_fails_never_spins():
    """llama.cpp answering "no KV cells" in the streams layout (it should not: requests fit
    their streams): evicting frees no cell of a running stream, so the scheduler preempts the
    newest request and retries; with one request left it fails that request
    (``kv_cache_full``) instead of retrying the same batch forever."""
    from kv3d_core.engine.events import Failed

    class AlwaysFull(FakeBackend):
        def decode(self, entries):
            if any(len(e.tokens) > 1 for e in entries):
                raise KVCacheFullError("no free KV cells for the batch")
            return super().decode(entries)

    b = AlwaysFull(kv_unified=False, n_seq_max=4, n_ctx_seq=64)
    metrics = Metrics()
    sched = Scheduler(b, PrefixCache(b, ExactDetector(), metrics), metrics, SchedulerConfig(max_running=2))
    queues = []
    for i in range(2):
        view = PromptView(toks(120 + i, 20), 0, b.info.model_id)
        q: queue.Queue = queue.Queue()
        sched.submit(Job(f"job-{i}", view, ExactDetector().family(view), SamplingParams(temperature=0), 4, [], q.put))
        queues.append(q)
    sched.start()
    try:
        ends = []
        for q in queues:
            ev = q.get(timeout=10)
            while not isinstance(ev, Failed):
                ev = q.get(timeout=10)
            ends.append(ev)
    finally:
        sched.stop()
    assert all(e.kind.value == "kv_cache_full" for e in ends), ends
    assert metrics.preemptions._value.get() >= 1


class RecordingBackend(FakeBackend):
    """The fake backend, keeping every step's ``(seq, pos0, n_tokens)`` entries."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.steps: list[list[tuple[int, int, int]]] = []

    def decode(self, entries):
        self.steps.append([(e.seq, e.pos0, len(e.tokens)) for e in entries])
        return super().decode(entries)


def run_recorded(specs: list[PromptView], n_ctx_seq: int,
                 config: SchedulerConfig) -> tuple[RecordingBackend, Scheduler]:
    """Greedy 4-token jobs of ``specs``, all submitted before the scheduler starts (sequences are
    handed out in submission order), on a recording backend with a KV stream per sequence; every
    reply is checked against the job's alone."""
    b = RecordingBackend(kv_unified=False, n_seq_max=4, n_ctx_seq=n_ctx_seq, max_batch_tokens=128)
    metrics = Metrics()
    sched = Scheduler(b, PrefixCache(b, ExactDetector(), metrics), metrics, config)
    views = [PromptView(v.tokens, 0, b.info.model_id) for v in specs]
    queues = []
    for i, view in enumerate(views):
        q: queue.Queue = queue.Queue()
        sched.submit(Job(f"job-{i}", view, ExactDetector().family(view), SamplingParams(temperature=0), 4, [], q.put))
        queues.append(q)
    sched.start()
    try:
        replies = [collect(q) for q in queues]
    finally:
        sched.stop()
    for view, (text, reason, usage) in zip(views, replies):
        assert (text, reason, usage["completion_tokens"]) == greedy_reference(view, 4, False)
    return b, sched


def test_finish_first_keeps_long_prompts_out_of_the_steps_that_end_short_ones():
    """``scheduler.finish_first``: a long prompt (200 tokens) and two short ones (20, 28)
    prefilling together; every step that ends a prompt carries no chunk of a prompt it does not
    end, the long one goes on in the steps between, and every reply is the job's alone. Off (the
    default), the first step carries all three."""
    specs = [PromptView(toks(150 + i, n), 0, "fake") for i, n in enumerate((200, 20, 28))]
    for finish_first in (True, False):
        b, sched = run_recorded(specs, 256, SchedulerConfig(max_running=3, prefill_chunk=64,
                                                            finish_first=finish_first))
        lengths = {0: 200, 1: 20, 2: 28}                 # sequences are handed out in submission order
        prefill = [[(s, p, k) for s, p, k in step if k > 1 or p + k < lengths[s]] for step in b.steps]
        if finish_first:
            assert sched.finish_first_deferred > 0
            for step in prefill:
                ending = [s for s, p, k in step if p + k == lengths[s]]
                if ending:
                    assert all(p + k == lengths[s] for s, p, k in step), step
            assert any(s == 0 for step in prefill for s, _, _ in step)     # the long one went on
        else:
            assert sched.finish_first_deferred == 0
            assert {s for s, _, _ in prefill[0]} == {0, 1, 2}


def test_an_admission_budget_admits_the_rest_of_a_burst_at_later_steps():
    """``scheduler.admit_budget_ms``: once an admission pass has admitted a request and run
    this long, the requests still waiting are admitted at the next steps (0: one a step), and
    every reply is still the job's alone. With no budget (the default) the first step admits
    all of them."""

    specs = [PromptView(toks(170 + i, 12 + i), 0, "fake") for i in range(3)]
    for budget in (0.0, None):
        b, _ = run_recorded(specs, 128, SchedulerConfig(max_running=3, admit_budget_ms=budget))
        first_step = {s: next(i for i, step in enumerate(b.steps) if any(e[0] == s for e in step))
                      for s in range(3)}
        if budget == 0.0:
            assert sorted(first_step.values()) == [0, 1, 2], b.steps[:4]
        else:
            assert set(first_step.values()) == {0}, b.steps[:4]
