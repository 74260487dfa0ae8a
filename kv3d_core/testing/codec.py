"""Conformance tests of the delta codec contract, :class:`~kv3d_core.contracts.DeltaCodec`.

Subclass :class:`CodecContract` and provide a ``codec`` fixture; see its docstring for the
class attributes that state the codec's documented choices.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

import numpy as np
import pytest

from kv3d_core.contracts.codec import DeltaCodec, KVArrays
from kv3d_core.errors import CodecError
from kv3d_core.kv import framing, opaque

#: A lossy codec's default bound when the subclass states none: loose on purpose (it
#: catches garbage, not imprecision); set ``max_rel_error`` to the codec's documented bound.
DEFAULT_LOSSY_ERROR = 0.25

EXTRA = {"layout": "contract", "n_stream": 1, "sections": [{"stream": 0, "rows": None, "v_trans": 0}],
         "note": "ünï ✓", "f": 0.25, "nested": {"a": [1, 2, None, True], "b": {}}}


# -- sample KV ------------------------------------------------------------------------------------
def _values(rng: np.random.Generator, n: int, width: int, head_dim: int, sd: float) -> np.ndarray:
    """float16 ``[n, width]`` shaped like real K/V: normal values, a few large channels per
    head (rotary dims), rare isolated outliers."""
    x = rng.normal(0.0, sd, (n, width // head_dim, head_dim))
    if n and head_dim > 2:
        x[:, :, rng.choice(head_dim, min(3, head_dim), replace=False)] *= 6
    m = rng.random(x.shape) < 0.003
    x[m] = rng.choice([-1, 1], int(m.sum())) * rng.uniform(10, 25, int(m.sum()))
    return x.reshape(n, width).astype(np.float16)


def make_kv(n: int, k_width: list[int], v_width: list[int], head_dim_k: int, head_dim_v: int, *,
            pos0: int = 0, seed: int = 0, extra: dict | None = None) -> KVArrays:
    """KV cells of ``n`` positions from ``pos0``, one K and one V array per layer."""
    rng = np.random.default_rng(seed)
    k = [_values(rng, n, w, head_dim_k, 1.5) for w in k_width]
    v = [_values(rng, n, w, head_dim_v, 0.8) for w in v_width]
    return KVArrays(np.arange(pos0, pos0 + n, dtype=np.int32), k, v, head_dim_k, head_dim_v,
                    copy.deepcopy(EXTRA if extra is None else extra))


def _filled(a: KVArrays, fill: Callable[[np.random.Generator, tuple[int, int]], np.ndarray], seed: int) -> KVArrays:
    rng = np.random.default_rng(seed)
    return KVArrays(a.positions, [fill(rng, x.shape).astype(np.float16) for x in a.k],
                    [fill(rng, x.shape).astype(np.float16) for x in a.v], a.head_dim_k, a.head_dim_v, a.extra)


def _strided_read_only(a: KVArrays) -> KVArrays:
    """The same values as non-contiguous, read-only views (as a parser's views into a blob)."""
    def view(x: np.ndarray) -> np.ndarray:
        wide = np.zeros((x.shape[0], 2 * x.shape[1]), x.dtype)
        wide[:, ::2] = x
        out = wide[:, ::2]
        out.setflags(write=False)
        return out
    pos = np.repeat(a.positions, 2)[::2]
    pos.setflags(write=False)
    return KVArrays(pos, [view(x) for x in a.k], [view(x) for x in a.v], a.head_dim_k, a.head_dim_v, a.extra)


def kv_cases() -> list[tuple[str, KVArrays]]:
    """Small :class:`KVArrays` covering the layouts and values a codec meets: several layers,
    K and V of different widths and head dims, per-layer widths, 0/1/many cells, positions not
    starting at 0 or with gaps, zeros, constant rows, float16 extremes and subnormals, and
    non-contiguous read-only inputs. All values are finite."""
    typical = make_kv(17, [128] * 3, [128] * 3, 64, 64, pos0=100, seed=1)
    cases = [
        ("3 layers, 2 KV heads of 64, 17 cells from 100", typical),
        ("K and V head dims differ (48 and 32)", make_kv(11, [96] * 2, [64] * 2, 48, 32, pos0=7, seed=2)),
        ("layers of different widths", make_kv(9, [64, 128, 32], [32, 128, 64], 32, 32, seed=3)),
        ("one cell at position 4095", make_kv(1, [128] * 2, [128] * 2, 64, 64, pos0=4095, seed=4)),
        ("no cells", make_kv(0, [128] * 2, [128] * 2, 64, 64, seed=5)),
        ("300 cells: more than one 64 Ki-value chunk", make_kv(300, [128] * 2, [128] * 2, 64, 64, pos0=1, seed=6)),
        ("head dim 2, one layer, empty extra", make_kv(5, [2], [4], 2, 2, seed=7, extra={})),
    ]
    gaps = make_kv(7, [64] * 2, [64] * 2, 32, 32, seed=8)
    gaps.positions = np.array([5, 6, 7, 50, 51, 900, 2**31 - 1], np.int32)
    cases.append(("positions with gaps, up to int32 max", gaps))
    base = make_kv(6, [64] * 2, [64] * 2, 32, 32, pos0=3)
    cases.append(("all zeros, some -0.0", _filled(
        base, lambda r, s: np.where(r.random(s) < 0.3, -0.0, 0.0), 9)))
    cases.append(("constant rows", _filled(
        base, lambda r, s: np.repeat(r.normal(0, 2, (s[0], 1)), s[1], axis=1), 10)))
    cases.append(("float16 extremes: +-65504 and +-60000", _filled(
        base, lambda r, s: r.choice([-65504.0, 65504.0, -60000.0, 60000.0, 1.0, -0.5, 0.0], s), 11)))
    cases.append(("float16 subnormals only", _filled(
        base, lambda r, s: r.uniform(-6e-5, 6e-5, s), 12)))
    cases.append(("one large head beside a tiny one", _filled(
        base, lambda r, s: np.concatenate([r.normal(0, 1000, (s[0], s[1] // 2)),
                                           r.normal(0, 1e-3, (s[0], s[1] - s[1] // 2))], axis=1), 13)))
    cases.append(("non-contiguous read-only inputs", _strided_read_only(typical)))
    return cases


def nonfinite_case() -> KVArrays:
    """A typical case holding +inf, -inf and NaN in some K and V rows."""
    a = make_kv(8, [128] * 2, [128] * 2, 64, 64, pos0=20, seed=14)
    a.k[0][0, 3] = np.inf
    a.k[1][1, 5] = -np.inf
    a.v[1][2, 7] = np.nan
    a.v[0][7, 127] = np.inf
    return a


# -- checks ---------------------------------------------------------------------------------------
def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float16).view(np.uint16)


def assert_layout(want: KVArrays, got: KVArrays, what: str) -> None:
    """Same positions, head dims, ``extra``, layer count, shapes; int32 positions, float16 values."""
    assert isinstance(got, KVArrays), f"{what}: decode returned {type(got).__name__}, not KVArrays"
    assert isinstance(got.positions, np.ndarray) and got.positions.dtype == np.int32, \
        f"{what}: positions must be an int32 array, got {getattr(got.positions, 'dtype', type(got.positions))}"
    assert np.array_equal(got.positions, want.positions), f"{what}: positions changed"
    assert (got.head_dim_k, got.head_dim_v) == (want.head_dim_k, want.head_dim_v), f"{what}: head dims changed"
    assert got.extra == want.extra, f"{what}: extra changed: {got.extra!r} != {want.extra!r}"
    assert (len(got.k), len(got.v)) == (len(want.k), len(want.v)), f"{what}: layer count changed"
    for name, gs, ws in (("K", got.k, want.k), ("V", got.v, want.v)):
        for il, (g, w) in enumerate(zip(gs, ws)):
            assert isinstance(g, np.ndarray) and g.dtype == np.float16, \
                f"{what}: {name} of layer {il} is not a float16 array"
            assert g.shape == w.shape, f"{what}: {name} of layer {il} has shape {g.shape}, not {w.shape}"


def assert_identical(want: KVArrays, got: KVArrays, what: str) -> None:
    """Layout as :func:`assert_layout`, and every value bit for bit (NaN payloads, -0.0)."""
    assert_layout(want, got, what)
    for name, gs, ws in (("K", got.k, want.k), ("V", got.v, want.v)):
        for il, (g, w) in enumerate(zip(gs, ws)):
            bad = np.flatnonzero(_bits(g) != _bits(w))
            assert not bad.size, (f"{what}: {name} of layer {il}: {bad.size} values differ, first at flat index "
                                  f"{bad[0]}: {w.reshape(-1)[bad[0]]!r} -> {g.reshape(-1)[bad[0]]!r}")


def assert_well_formed(got: object, what: str) -> None:
    """A :class:`KVArrays` consistent with itself: int32 positions ``[n]``, as many K as V
    layers, float16 ``[n, width]`` arrays with widths that are whole heads, a dict ``extra``."""
    assert isinstance(got, KVArrays), f"{what}: decode returned {type(got).__name__}, not KVArrays"
    pos = got.positions
    assert isinstance(pos, np.ndarray) and pos.ndim == 1 and pos.dtype == np.int32, f"{what}: bad positions"
    n = pos.shape[0]
    assert len(got.k) == len(got.v), f"{what}: {len(got.k)} K layers but {len(got.v)} V layers"
    for name, layers, hd in (("K", got.k, got.head_dim_k), ("V", got.v, got.head_dim_v)):
        assert isinstance(hd, (int, np.integer)) and not isinstance(hd, bool) and hd > 0, \
            f"{what}: head_dim of {name} is {hd!r}"
        for il, x in enumerate(layers):
            assert isinstance(x, np.ndarray) and x.dtype == np.float16 and x.ndim == 2, \
                f"{what}: {name} of layer {il} is not a 2-D float16 array"
            assert x.shape[0] == n and x.shape[1] > 0 and x.shape[1] % hd == 0, \
                f"{what}: {name} of layer {il} has shape {x.shape} ({n} cells, head dim {hd})"
    assert isinstance(got.extra, dict), f"{what}: extra is {type(got.extra).__name__}, not a dict"


def assert_within(want: KVArrays, got: KVArrays, rel: float, floor: float, what: str) -> None:
    """``|got - want| <= rel * max|want| + floor`` per K or V array of a layer; non-finite
    inputs must come back as the same infinity / a NaN."""
    assert_layout(want, got, what)
    for name, gs, ws in (("K", got.k, want.k), ("V", got.v, want.v)):
        for il, (g, w) in enumerate(zip(gs, ws)):
            w64, g64 = w.astype(np.float64), g.astype(np.float64)
            fin = np.isfinite(w64)
            if not fin.all():
                assert np.array_equal(np.isnan(g64), np.isnan(w64)), f"{what}: {name} {il}: NaNs moved"
                inf = np.isinf(w64)
                assert np.array_equal(g64[inf], w64[inf]), f"{what}: {name} {il}: infinities changed"
            if not fin.any():
                continue
            scale = float(np.abs(w64[fin]).max())
            err = np.abs(g64[fin] - w64[fin])
            err[np.isnan(err)] = np.inf
            limit = rel * scale + floor
            worst = int(np.argmax(err)) if err.size else 0
            assert not err.size or err[worst] <= limit, (
                f"{what}: {name} of layer {il}: error {err[worst]:.6g} at a value {w64[fin][worst]:.6g} "
                f"exceeds {rel:g} x {scale:.6g} + {floor:g} = {limit:.6g}")


def _header_end(data: bytes) -> int | None:
    """Length of the JSON metadata head (:func:`kv3d_core.kv.framing.pack_meta`) that leads
    a codec's bytes, or None when the codec does not use it."""
    try:
        meta, body = framing.unpack_meta(data)
    except CodecError:
        return None
    return len(data) - len(body)


class CodecContract:
    """The :class:`~kv3d_core.contracts.DeltaCodec` contract, for a codec's own tests.

    Provide the fixture ``codec`` (a codec instance, settings as it would be configured).
    Every test uses small arrays (:func:`kv_cases`), so the whole class runs in seconds.

    Class attributes (the codec's documented choices):

    - ``max_rel_error``: bound on ``|decoded - original|`` as a fraction of the largest
      ``|original|`` of the same layer's K (or V) array. ``None`` (default): bit-exact when
      ``codec.lossless``, else :data:`DEFAULT_LOSSY_ERROR` (loose; state the real bound).
    - ``abs_error_floor``: added to that bound, for float16 subnormal rounding (``2**-22``).
    - ``nonfinite``: what ``encode`` does with inf/NaN values. ``"preserve"`` (they decode
      unchanged), ``"refuse"`` (``encode`` raises ``CodecError``), ``"any"`` (either, or
      another well-formed result). ``None`` (default): ``"preserve"`` when lossless, else
      ``"refuse"``.
    - ``detects_damage``: True when every damaged payload (a flipped byte, a rewritten
      metadata field) is a ``CodecError`` or decodes to exactly the original values (the
      codec checksums what it reads). False (default): a damaged payload may decode, but
      only to well-formed arrays. Truncated, empty and random payloads are a
      ``CodecError`` either way; no damage may raise anything else.

    The tests call the codec's own :meth:`~DeltaCodec.encode` / :meth:`~DeltaCodec.decode`
    (its bytes, no kv3d header); those about other codecs' payloads go through the core's
    framing (:class:`kv3d_core.kv.framing.FramedCodec`), as the tier stack does.
    """

    max_rel_error: float | None = None
    abs_error_floor: float = 2.0 ** -22
    nonfinite: str | None = None
    detects_damage: bool = False

    @pytest.fixture
    def codec(self) -> DeltaCodec:
        pytest.fail(f"{type(self).__name__} must define a `codec` fixture returning the codec under test")

    # -- helpers ----------------------------------------------------------------------------------
    def _rel_error(self, codec: DeltaCodec) -> float:
        if self.max_rel_error is not None:
            return float(self.max_rel_error)
        return 0.0 if codec.lossless else DEFAULT_LOSSY_ERROR

    def _nonfinite(self, codec: DeltaCodec) -> str:
        mode = self.nonfinite or ("preserve" if codec.lossless else "refuse")
        assert mode in ("preserve", "refuse", "any"), f"nonfinite={mode!r}: use preserve, refuse or any"
        return mode

    def check_round_trip(self, codec: DeltaCodec, want: KVArrays, got: KVArrays, what: str) -> None:
        rel = self._rel_error(codec)
        if rel == 0.0:
            assert_identical(want, got, what)
        else:
            assert_within(want, got, rel, self.abs_error_floor, what)

    def check_damaged(self, codec: DeltaCodec, data: bytes, reference: KVArrays, what: str) -> bool:
        """Decode a damaged payload: True when it raised CodecError; otherwise the result
        must be the reference (``detects_damage``) or at least well-formed."""
        try:
            got = codec.decode(data)
        except CodecError:
            return True
        except Exception as exc:  # noqa: BLE001 - the contract: CodecError and nothing else
            pytest.fail(f"{what}: decode raised {type(exc).__name__} ({exc}) instead of CodecError")
        if self.detects_damage:
            assert_identical(reference, got, f"{what} (decoded without an error, so it must be unchanged)")
        else:
            assert_well_formed(got, what)
        return False

    @staticmethod
    def must_refuse(codec: DeltaCodec, data: bytes, what: str) -> None:
        try:
            codec.decode(data)
        except CodecError:
            return
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{what}: decode raised {type(exc).__name__} ({exc}) instead of CodecError")
        pytest.fail(f"{what}: decode accepted it")

    # -- identity ---------------------------------------------------------------------------------
    def test_identity(self, codec):
        assert isinstance(codec, DeltaCodec)
        cid = codec.codec_id
        assert isinstance(cid, str) and cid and cid != "?" and cid.isascii(), f"codec_id {cid!r}"
        assert isinstance(codec.version, int) and 0 <= codec.version < 2**16, f"version {codec.version!r}"
        assert isinstance(codec.lossless, bool)

    def test_the_core_frames_the_codecs_bytes(self, codec):
        """The codec returns its own bytes, without the core's header (the core adds it:
        a codec writing it too would be framed twice); the framed payload names the codec
        and version, and the core hands ``decode`` exactly the codec's bytes back."""
        _, a = kv_cases()[0]
        raw = codec.encode(a)
        try:
            twice = framing.peek_codec(raw) == (codec.codec_id, codec.version)
        except CodecError:
            twice = False
        assert not twice, "encode wrote kv3d's framing header itself: the core adds it (kv3d_core.kv.framing)"
        framed = framing.FramedCodec(codec)
        data = framed.encode(a)
        assert framing.peek_codec(data) == (codec.codec_id, codec.version)
        assert bytes(framing.unframe(data, codec.codec_id, codec.version)) == raw
        self.check_round_trip(codec, a, framed.decode(data), "through the core's framing")

    def test_decode_takes_a_memoryview(self, codec):
        """The core hands ``decode`` and ``decode_into`` the bytes after its header as a
        memoryview (no copy)."""
        what, a = kv_cases()[0]
        data = codec.encode(a)
        want = codec.decode(data)
        assert_identical(want, codec.decode(memoryview(data)), f"{what}: decode of a memoryview")
        assert_identical(want, codec.decode(memoryview(b"xx" + data)[2:]), f"{what}: decode of an offset memoryview")

        def alloc(t: KVArrays) -> KVArrays:
            return KVArrays(t.positions.copy(), [np.empty(x.shape, np.float16) for x in t.k],
                            [np.empty(x.shape, np.float16) for x in t.v], t.head_dim_k, t.head_dim_v,
                            copy.deepcopy(t.extra))

        assert_identical(want, codec.decode_into(memoryview(data), alloc), f"{what}: decode_into of a memoryview")

    # -- round trips ------------------------------------------------------------------------------
    @pytest.mark.parametrize("case", range(len(kv_cases())), ids=[w for w, _ in kv_cases()])
    def test_round_trip(self, codec, case):
        """Positions, head dims, shapes, dtype and ``extra`` come back unchanged, the values
        within the bound; ``encode`` leaves its input untouched."""
        what, a = kv_cases()[case]
        before = copy.deepcopy(a)
        data = codec.encode(a)
        assert isinstance(data, bytes), f"{what}: encode returned {type(data).__name__}, not bytes"
        assert_identical(before, a, f"{what}: encode changed its input")
        self.check_round_trip(codec, a, codec.decode(data), what)

    def test_non_finite_values(self, codec):
        a = nonfinite_case()
        mode = self._nonfinite(codec)
        try:
            data = codec.encode(a)
        except CodecError:
            assert mode != "preserve", "encode refused inf/NaN, but nonfinite='preserve'"
            return
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"encode of inf/NaN raised {type(exc).__name__} ({exc}), not CodecError")
        assert mode != "refuse", "encode accepted inf/NaN, but nonfinite='refuse' (set it to 'preserve' or 'any')"
        got = codec.decode(data)
        if mode == "preserve":
            self.check_round_trip(codec, a, got, "inf/NaN")
        else:
            assert_layout(a, got, "inf/NaN")

    # -- determinism --------------------------------------------------------------------------------
    def test_same_input_same_bytes(self, codec):
        """Equal inputs give equal bytes, whatever their memory layout; decoding twice gives
        the same values."""
        cases = kv_cases()
        typical = cases[0][1]
        data = codec.encode(typical)
        assert codec.encode(typical) == data
        assert codec.encode(copy.deepcopy(typical)) == data
        assert codec.encode(cases[-1][1]) == data, "a strided read-only copy of the input encodes differently"
        fortran = KVArrays(typical.positions.copy(), [np.asfortranarray(x) for x in typical.k],
                           [np.asfortranarray(x) for x in typical.v], typical.head_dim_k, typical.head_dim_v,
                           copy.deepcopy(typical.extra))
        assert codec.encode(fortran) == data, "a Fortran-ordered copy of the input encodes differently"
        assert_identical(codec.decode(data), codec.decode(data), "decoding twice")

    # -- damaged and foreign payloads ----------------------------------------------------------------
    def _payload(self, codec) -> tuple[KVArrays, bytes, KVArrays, int]:
        """(input, payload, its decoded reference, header length) of the typical case."""
        a = kv_cases()[0][1]
        data = codec.encode(a)
        h = _header_end(data)
        return a, data, codec.decode(data), min(len(data), 512) if h is None else h

    def test_truncated_payloads_are_refused(self, codec):
        _, data, _, h = self._payload(codec)
        cuts = set(range(min(h + 16, len(data))))
        cuts |= {int(c) for c in np.linspace(h, len(data) - 1, 48)}
        cuts |= {len(data) - 1, len(data) - 2, len(data) - 3}
        for cut in sorted(c for c in cuts if 0 <= c < len(data)):
            self.must_refuse(codec, data[:cut], f"payload truncated to {cut} of {len(data)} bytes")

    def test_trailing_bytes_are_refused(self, codec):
        _, data, _, _ = self._payload(codec)
        for tail in (b"\0", b"\0" * 7, data[-16:]):
            self.must_refuse(codec, data + tail, f"payload with {len(tail)} bytes appended")

    def test_empty_and_random_bytes_are_refused(self, codec):
        rng = np.random.default_rng(15)
        self.must_refuse(codec, b"", "empty payload")
        for n in (1, 3, 16, 100, 1000, 5000):
            self.must_refuse(codec, rng.bytes(n), f"{n} random bytes")
        self.must_refuse(codec, b"\0" * 64, "64 zero bytes")

    def test_flipped_bytes(self, codec):
        """Every byte of the header (framing and metadata), a sample of the body: CodecError,
        or (``detects_damage=False``) well-formed arrays; never another exception."""
        _, data, ref, h = self._payload(codec)
        spots = [(i, m) for i in range(h) for m in (0x01, 0x80)]
        body = sorted({int(i) for i in np.linspace(h, len(data) - 1, 48)} | {len(data) - 1})
        spots += [(i, m) for i in body if i >= h for m in (0x01, 0x80, 0x5A)]
        for i, mask in spots:
            bad = bytearray(data)
            bad[i] ^= mask
            self.check_damaged(codec, bytes(bad), ref, f"byte {i} of {len(data)} xor {mask:#04x}")

    def test_random_body_after_a_valid_header(self, codec):
        _, data, ref, h = self._payload(codec)
        rng = np.random.default_rng(16)
        for n in (len(data) - h, len(data) - h + 1, 0, 9):
            self.check_damaged(codec, data[:h] + rng.bytes(n), ref, f"valid header, {n} random body bytes")

    def test_rewritten_metadata(self, codec):
        """Each field of the JSON metadata (for codecs whose bytes start with
        :func:`kv3d_core.kv.framing.pack_meta`) removed or given a bad value (huge sizes
        included: a decoder must not allocate what a damaged length announces)."""
        a, data, ref, h = self._payload(codec)
        if _header_end(data) is None:
            pytest.skip("the codec's bytes do not start with kv3d_core.kv.framing.pack_meta's metadata")
        meta, body = framing.unpack_meta(data)
        bad_values = [None, True, -1, 0, 2**40, -2**63, 1.5, "x", "", [], {}, [1, 2], {"a": 1}]
        for key in list(meta):
            variants = [(f"{key} removed", {k: v for k, v in meta.items() if k != key})]
            variants += [(f"{key}={v!r}", dict(meta, **{key: v})) for v in bad_values if v != meta[key]]
            if isinstance(meta[key], list) and meta[key]:
                variants += [(f"{key}[0]={v!r}", dict(meta, **{key: [v] + meta[key][1:]}))
                             for v in (0, -1, 2**31, 2**40) if v != meta[key][0]]
            for what, m in variants:
                self.check_damaged(codec, framing.pack_meta(m, body), ref, f"metadata {what}")

    def test_other_codecs_payloads_are_refused(self, codec):
        """Through the core's framing, another codec's payload and this payload labelled
        with another id or version never reach ``decode``: a CodecError. Handed straight to
        ``decode``, the built-in ``none`` codec's bytes are a CodecError or well-formed
        arrays, never another exception."""
        a, raw, ref, _ = self._payload(codec)
        framed = framing.FramedCodec(codec)
        from kv3d_core.kv.codec_none import NoneCodec

        foreign = {"opaque-zstd (the core's fallback encoding)": opaque.encode(b"\1" * 300),
                   "this payload labelled with another codec id": framing.frame("kv3d-contract-other",
                                                                                codec.version, raw),
                   f"this payload labelled v{(codec.version + 1) % 2**16}": framing.frame(
                       codec.codec_id, (codec.version + 1) % 2**16, raw)}
        if codec.version > 0:
            foreign[f"this payload labelled v{codec.version - 1}"] = framing.frame(codec.codec_id, codec.version - 1,
                                                                                   raw)
        if codec.codec_id != "none":
            foreign["none (the built-in codec)"] = framing.FramedCodec(NoneCodec()).encode(a)
        for what, payload in foreign.items():
            self.must_refuse(framed, payload, what)
        if codec.codec_id != "none":
            try:
                got = codec.decode(NoneCodec().encode(a))
            except CodecError:
                return
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"decode of the none codec's bytes raised {type(exc).__name__} ({exc}), not CodecError")
            assert_well_formed(got, "the none codec's bytes")

    # -- decode_into --------------------------------------------------------------------------------
    @pytest.mark.parametrize("layout", ["contiguous", "one buffer", "strided"])
    @pytest.mark.parametrize("case", [0, 1, 2, 4, 5], ids=["typical", "k/v dims", "widths", "empty", "300 cells"])
    def test_decode_into_gives_the_decode_values(self, codec, case, layout):
        """``decode_into`` calls ``alloc`` once with the decoded layout and fills its arrays
        (C-contiguous, views into one buffer like a state blob, or strided) with exactly the
        values ``decode`` gives, returning alloc's object."""
        what, a = kv_cases()[case]
        data = codec.encode(a)
        want = codec.decode(data)
        calls = []

        def alloc(t: KVArrays) -> KVArrays:
            calls.append(t)
            assert_layout(want, t, f"{what}: the template given to alloc")
            shapes = [x.shape for x in (*t.k, *t.v)]
            if layout == "contiguous":
                arrays = [np.full(s, np.float16(np.nan)) for s in shapes]
            elif layout == "one buffer":
                buf = np.full(sum(int(np.prod(s)) for s in shapes) + 3, np.float16(np.nan))
                arrays, off = [], 3                 # odd offset: not 8-byte aligned
                for s in shapes:
                    arrays.append(buf[off:off + int(np.prod(s))].reshape(s))
                    off += int(np.prod(s))
            else:
                arrays = [np.full((s[0], 2 * s[1]), np.float16(np.nan))[:, ::2] for s in shapes]
            return KVArrays(t.positions.copy(), arrays[:len(t.k)], arrays[len(t.k):], t.head_dim_k, t.head_dim_v,
                            copy.deepcopy(t.extra))

        out = codec.decode_into(data, alloc)
        assert len(calls) == 1, f"alloc called {len(calls)} times"
        assert_identical(want, out, f"{what}: decode_into ({layout})")

    def test_decode_into_alloc_errors_propagate(self, codec):
        data = codec.encode(kv_cases()[0][1])

        class Boom(Exception):
            pass

        boom = Boom("from alloc")

        def alloc(t):
            raise boom

        with pytest.raises(Boom) as info:
            codec.decode_into(data, alloc)
        assert info.value is boom

    def test_decode_into_refuses_arrays_of_another_layout(self, codec):
        """alloc returning arrays of other shapes is a CodecError (as the default
        ``decode_into`` raises), never a write past them."""
        data = codec.encode(kv_cases()[0][1])

        def fewer_rows(t):
            return KVArrays(t.positions, [np.zeros((max(0, x.shape[0] - 1), x.shape[1]), np.float16) for x in t.k],
                            [np.zeros((max(0, x.shape[0] - 1), x.shape[1]), np.float16) for x in t.v],
                            t.head_dim_k, t.head_dim_v, t.extra)

        def fewer_layers(t):
            return KVArrays(t.positions, [np.zeros(x.shape, np.float16) for x in t.k[1:]],
                            [np.zeros(x.shape, np.float16) for x in t.v[1:]], t.head_dim_k, t.head_dim_v, t.extra)

        for alloc in (fewer_rows, fewer_layers):
            with pytest.raises(CodecError):
                codec.decode_into(data, alloc)

    def test_decode_into_refuses_damaged_payloads(self, codec):
        _, data, _, h = self._payload(codec)

        def alloc(t):
            return KVArrays(t.positions, [np.zeros(x.shape, np.float16) for x in t.k],
                            [np.zeros(x.shape, np.float16) for x in t.v], t.head_dim_k, t.head_dim_v, t.extra)

        for cut in (0, h // 2, h, (h + len(data)) // 2, len(data) - 1):
            with pytest.raises(CodecError):
                codec.decode_into(data[:cut], alloc)

    # -- threads ------------------------------------------------------------------------------------
    def test_concurrent_calls_give_the_serial_results(self, codec):
        """Four threads encoding and decoding at once get exactly what one thread gets."""
        cases = [a for _, a in kv_cases()[:3]] + [kv_cases()[5][1]]
        want = [codec.encode(a) for a in cases]
        decoded = [codec.decode(d) for d in want]
        problems: list[str] = []
        barrier = threading.Barrier(4)

        def run(t: int) -> None:
            try:
                barrier.wait(timeout=30)
                for r in range(3):
                    for j in range(len(cases)):
                        i = (j + t) % len(cases)
                        if codec.encode(cases[i]) != want[i]:
                            problems.append(f"thread {t}: encode of case {i} differs")
                        assert_identical(decoded[i], codec.decode(want[i]), f"thread {t}: decode of case {i}")
            except BaseException as exc:  # noqa: BLE001 - reported below
                problems.append(f"thread {t}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "a thread hung"
        assert not problems, "\n".join(problems[:10])
