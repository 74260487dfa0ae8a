"""The ``block`` delta codec: 4-bit codes in groups of 32 consecutive values, one
float16 scale and one float16 offset per group (like ggml's Q4_1), two codes a byte.

Format of the codec's bytes (codec id ``block``, version 1; the core frames them, see
:mod:`kv3d_core.kv.framing`), led by :func:`~kv3d_core.kv.framing.pack_meta`'s JSON metadata::

    meta     layout (n_cells, widths, head dims, extra) + group_size, offset,
             chunk_groups, zstd, params_bytes, crc
    payload  positions    int32 x n_cells
             frame_sizes  uint32 x n_chunks
             params       float16 scales (then float16 offsets when ``offset``),
                          low bytes then high bytes; one zstd frame when zstd is on
             codes        one frame per chunk of chunk_groups groups (zstd when on, raw
                          otherwise) of N/2 bytes for its N values: byte j holds the code
                          of value j (low nibble) and of value j + N/2 (high nibble)

The values of all K layers then all V layers form one flat buffer cut into groups
of ``group_size`` values (a row of 192 = 6 groups of 32; groups never straddle a
row when the width is a multiple of the group size).

- ``offset=True`` (default): ``m`` = the largest float16 <= the group's minimum,
  ``d`` = (max - m)/15 rounded up to a float16, ``code = rint((x - m)/d)`` in 0..15,
  decoded ``m + code*d``. 20 bytes per 32 values: 3.2x smaller than float16.
- ``offset=False``: symmetric, ``d`` = max(-min/8, max/7) rounded up to a float16,
  ``code - 8`` in -8..7, decoded ``(code - 8)*d``. 18 bytes per 32 values: 3.56x.

Where an end code would pass float16's 65504 (values beyond about +-57000): with ``offset``,
``d`` is rounded down (the extremes still round to codes 0/15 within d/2); symmetric, code 0
(``-8*d``) is left unused and ``d`` = max|x|/7.5 rounded up, so codes 1..15 (``-7*d..7*d``)
cover the group within d/2.

Error bound, per value: ``|decoded - x| <= d/2 + one float16 ulp of the decoded
value`` (``d`` = the group's step: at most (max - min)/15 rounded up, i.e. 1/30 of
the group's range, plus float16 rounding); zero groups decode to zeros. On real
SmolLM2 KV its RMS error is about 9x the int8 codec's (relative RMS 9.5% vs 1.0%;
13% with ``offset=False``): the coarse side of an A/B against ``int8``.

Integrity: a CRC-32 covers metadata, positions, frame sizes and the scale/offset
arrays; the 4-bit codes are not checksummed unless zstd is on (frame checksums).

Speed: chunked (64 Ki values) and vectorized: nibble split, uint8 -> float32,
multiply-add of the group parameters, float16 bits by a shift
(:func:`kv3d_core.kv.quant_kernels.f16_bits`). ``threads > 1`` runs chunks in parallel.
"""

from __future__ import annotations

import numpy as np

from kv3d_core.contracts.codec import DeltaCodec, KVArrays
from kv3d_core.errors import CodecError
from kv3d_core.kv import framing
from kv3d_core.kv.codec_none import check_layout, layout_meta

from kv3d_core.kv import quant_kernels as K

LEVELS = 15


def _quantize(x16: np.ndarray, offset: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed codes (uint8, ``groups*gs/2``: byte j holds values j and j + half of the
    chunk), scales and offsets (float16, one per group) of ``[groups, gs]`` values."""
    x = x16.astype(np.float32)
    mn = x.min(axis=1).astype(np.float64)
    mx = x.max(axis=1).astype(np.float64)
    if not (np.isfinite(mn).all() and np.isfinite(mx).all()):
        raise CodecError("KV holds inf/NaN values; the block codec cannot code them")
    if offset:
        m16 = K.f16_floor(mn)
        m = m16.astype(np.float64)
        t = (mx - m) / LEVELS
        d16 = K.f16_ceil(t)
        over = m + LEVELS * d16.astype(np.float64) > K.F16_MAX
    else:
        t = np.maximum(np.maximum(-mn, 0) / 8, np.maximum(mx, 0) / 7)
        d16 = K.f16_ceil(t)
        over = 8 * d16.astype(np.float64) > K.F16_MAX
    if over.any():              # an end code must stay a finite float16
        if offset:              # step rounded down: the extremes still round to codes 0/15 within d/2
            d16[over] = K.f16_floor(t[over])
        else:                   # -8*d would overflow, so code 0 is clipped off below: codes 1..15
            # (-7d..7d) must hold both ends within d/2 (7*d <= 7 * 65504/7.5 stays finite)
            d16[over] = K.f16_ceil(np.maximum(-mn[over], mx[over]) / 7.5)
    if not offset:
        m = -8 * d16.astype(np.float64)
        m16 = np.zeros_like(d16)                         # not stored: decode uses -8*d
    d = d16.astype(np.float64)
    nz = d > 0
    dd = np.where(nz, d, 1)[:, None]
    # safety net: no code may decode outside float16's range (a no-op after the rounding above)
    cmin = np.maximum(0, np.ceil((-K.F16_MAX - m[:, None]) / dd))
    cmax = np.minimum(LEVELS, np.floor((K.F16_MAX - m[:, None]) / dd))
    y = x.astype(np.float64)
    np.subtract(y, m[:, None], out=y)
    np.divide(y, dd, out=y)
    y[~nz] = 0
    np.rint(y, out=y)
    np.clip(y, cmin, cmax, out=y)
    c = y.astype(np.uint8).reshape(-1)
    h = c.size // 2                                      # even: group sizes are even
    packed = c[:h] | (c[h:] << 4)
    return packed, d16, m16


def _dequantize(packed: np.ndarray, scale: np.ndarray, shift: np.ndarray, out: np.ndarray) -> None:
    """``out`` (uint16 ``[g, gs]``) = float16 bits of ``code*d + m`` (``scale`` and ``shift``
    float32 per group, already multiplied by :data:`~kv3d_core.kv.quant_kernels.F16_SHIFT`)."""
    g, gs = out.shape
    h = packed.size
    codes = K.scratch("codes4", 2 * h, np.uint8)
    y = K.scratch("y", 2 * h, np.float32).reshape(g, gs)
    p = K.scratch("param", 2 * h, np.float32).reshape(g, gs)
    np.bitwise_and(packed, np.uint8(15), out=codes[:h])
    np.right_shift(packed, np.uint8(4), out=codes[h:])
    np.copyto(y, codes.reshape(g, gs))
    np.copyto(p, scale[:, None])                          # broadcast copy, then long contiguous loops
    np.multiply(y, p, out=y)
    np.copyto(p, shift[:, None])
    np.add(y, p, out=y)
    K.f16_bits(y, out)


class BlockCodec(DeltaCodec):
    """4-bit codes, groups of ``group_size`` values with a float16 scale (and offset).

    Settings: ``group_size`` (even, 2..1024, default 32), ``offset`` (default true:
    min/scale per group; false: symmetric, scale only), ``zstd_level`` (0 = none,
    the default: 4-bit codes barely compress), ``threads`` (default 1).
    Error bound: see the module docstring.
    """

    codec_id = "block"
    version = 1
    lossless = False

    def __init__(self, group_size: int = 32, offset: bool = True, zstd_level: int = 0, threads: int = 1,
                 **unknown: object) -> None:
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; block takes group_size, offset, "
                            "zstd_level, threads")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not 2 <= group_size <= 1024 \
                or group_size % 2:
            raise TypeError(f"group_size={group_size!r}: use an even integer 2..1024")
        if not isinstance(offset, bool):
            raise TypeError(f"offset={offset!r}: use true or false")
        if isinstance(zstd_level, bool) or not isinstance(zstd_level, int) or not 0 <= zstd_level <= 19:
            raise TypeError(f"zstd_level={zstd_level!r}: use an integer 0..19 (0 = no zstd)")
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 64:
            raise TypeError(f"threads={threads!r}: use an integer 1..64")
        self.group_size = group_size
        self.offset = offset
        self.zstd_level = zstd_level
        self.threads = threads

    # -- encode -------------------------------------------------------------------------
    def encode(self, arrays: KVArrays) -> bytes:
        flat = K.flatten(arrays)
        gs = self.group_size
        n_groups = -(-flat.size // gs)
        if n_groups * gs != flat.size:
            flat = np.concatenate([flat, np.zeros(n_groups * gs - flat.size, np.float16)])
        x = flat.reshape(n_groups, gs)
        cg = max(1, K.CHUNK_VALUES // gs)
        n_chunks = -(-n_groups // cg)
        scales = np.empty(n_groups, np.float16)
        shifts = np.empty(n_groups, np.float16)
        frames: list[bytes] = [b""] * n_chunks
        level = self.zstd_level

        def work(i: int) -> None:
            a, b = i * cg, min(n_groups, (i + 1) * cg)
            packed, scales[a:b], shifts[a:b] = _quantize(x[a:b], self.offset)
            frames[i] = K.compressor(level).compress(packed.data) if level else packed.tobytes()

        K.run_chunks(work, n_chunks, self.threads)
        params = K.shuffle16(np.concatenate([scales, shifts]) if self.offset else scales)
        if level:
            params = K.compressor(level).compress(params)
        head = b"".join((
            np.ascontiguousarray(arrays.positions, dtype="<i4").tobytes(),
            np.array([len(f) for f in frames], "<u4").tobytes(),
            params,
        ))
        meta = layout_meta(arrays)
        meta.update(group_size=gs, offset=self.offset, chunk_groups=cg, zstd=bool(level),
                    params_bytes=len(params))
        meta["crc"] = K.meta_crc(meta, head)
        return framing.pack_meta(meta, b"".join((head, *frames)))

    # -- decode -------------------------------------------------------------------------
    def decode(self, data: bytes) -> KVArrays:
        meta, payload = framing.unpack_meta(data)
        n, kw, vw = check_layout(meta)
        hk = K.meta_int(meta, "head_dim_k", 1, 1 << 16)
        hv = K.meta_int(meta, "head_dim_v", 1, 1 << 16)
        gs = K.meta_int(meta, "group_size", 2, 1024)
        cg = K.meta_int(meta, "chunk_groups", 1, 1 << 30)
        pb = K.meta_int(meta, "params_bytes", 0, len(payload))
        crc = K.meta_int(meta, "crc", 0, 0xFFFFFFFF)
        offset, zstd_on = meta.get("offset"), meta.get("zstd")
        if not isinstance(offset, bool) or not isinstance(zstd_on, bool) or not isinstance(meta.get("extra"), dict):
            raise CodecError("codec metadata has no valid offset/zstd flags or extra")
        if gs % 2:
            raise CodecError(f"group_size {gs} is odd")
        n_values = n * (sum(kw) + sum(vw))
        n_groups = -(-n_values // gs)
        n_chunks = -(-n_groups // cg)
        head_len = 4 * n + 4 * n_chunks + pb
        if head_len > len(payload):
            raise CodecError(f"payload of {len(payload)} bytes is shorter than its {head_len}-byte head")
        head = payload[:head_len]
        if K.meta_crc(meta, head) != crc:
            raise CodecError("block payload damaged: metadata/scales checksum mismatch")
        positions = np.frombuffer(head, "<i4", count=n).astype(np.int32)
        sizes = np.frombuffer(head, "<u4", count=n_chunks, offset=4 * n).astype(np.int64)
        ends = head_len + np.cumsum(sizes)
        if n_chunks and int(ends[-1]) != len(payload) or not n_chunks and head_len != len(payload):
            raise CodecError(f"code frames add up to {int(ends[-1]) if n_chunks else head_len} bytes, "
                             f"payload has {len(payload)}")
        starts = ends - sizes
        n_params = n_groups * (2 if offset else 1)
        raw = head[4 * n + 4 * n_chunks:]
        if zstd_on:
            raw = K.decompress(raw, 2 * n_params, "scales")
        elif len(raw) != 2 * n_params:
            raise CodecError(f"scales hold {len(raw)} bytes, layout needs {2 * n_params}")
        params = K.unshuffle16(raw, n_params).view(np.float16).astype(np.float32)
        scale = params[:n_groups]
        shift = params[n_groups:] if offset else scale * np.float32(-8)
        scale = scale * K.F16_SHIFT
        shift = shift * K.F16_SHIFT
        out = np.empty(n_groups * gs, np.uint16)
        out2 = out.reshape(n_groups, gs)
        h = gs // 2

        def work(i: int) -> None:
            a, b = i * cg, min(n_groups, (i + 1) * cg)
            frame = payload[int(starts[i]):int(ends[i])]
            need = (b - a) * h
            codes = K.decompress(frame, need, f"code frame {i}") if zstd_on else frame
            if len(codes) != need:
                raise CodecError(f"code frame {i} holds {len(codes)} bytes, layout needs {need}")
            _dequantize(np.frombuffer(codes, np.uint8), scale[a:b], shift[a:b], out2[a:b])

        K.run_chunks(work, n_chunks, self.threads)
        k, v = K.unflatten(out.view(np.float16)[:n_values], n, kw, vw)
        return KVArrays(positions, k, v, hk, hv, dict(meta["extra"]))
