"""The ``int8`` delta codec: int8 codes with an absmax scale per token per KV head,
zstd over the codes and the scales.

Format (after the shared :mod:`kv3d_core.kv.framing` header, codec id ``int8``, version 1)::

    meta   layout (n_cells, widths, head dims, extra) + group, chunk_groups, zstd,
           scales_bytes, crc
    payload  positions   int32 x n_cells
             frame_sizes uint32 x n_chunks          (bytes of each code frame)
             scales      float16 x n_groups, low bytes then high bytes, one zstd frame
                         (raw when zstd is off)
             codes       int8 x n_groups*group, one zstd frame per chunk of
                         chunk_groups groups (raw when zstd is off)

The values of all K layers then all V layers form one flat buffer cut into groups
of ``group = gcd(head_dim_k, head_dim_v)`` values: one group is one KV head of one
token (rows are whole heads). Per group, ``s`` = absmax/127 rounded up to a float16
(down where 127*s would pass float16's 65504) and ``q = rint(x / s)`` in -127..127.

Error bound, per value: ``|decoded - x| <= s/2 + one float16 ulp of the decoded
value`` (the ulp term: the float16 result, within 0.75 ulp, see
:mod:`kv3d_core.kv.quant_kernels`), with ``s <= absmax/127 * (1 + 2**-10)`` (float16 rounding of the
scale). Zero groups decode to exact zeros; results are always finite.

Integrity: a CRC-32 covers the metadata, positions, frame sizes and scales; zstd
frame checksums cover the codes. Anything that does not add up raises
:class:`~kv3d_core.errors.CodecError`.

Speed: decode works chunk by chunk (64 Ki values, cache-resident): zstd frame,
int8 -> float32, one multiply by the scales, float16 bits by a shift
(:func:`kv3d_core.kv.quant_kernels.f16_magnitude_bits`), sign from the codes. ``threads > 1`` runs
chunks on a thread pool.
"""

from __future__ import annotations

import math

import numpy as np

from kv3d_core.contracts.codec import DeltaCodec, KVArrays
from kv3d_core.errors import CodecError
from kv3d_core.kv import framing
from kv3d_core.kv.codec_none import check_layout, layout_meta

from kv3d_core.kv import quant_kernels as K

QMAX = 127


def _quantize(x16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (int8, same shape) and scales (float16, one per row) of ``[groups, group]`` values."""
    x = x16.astype(np.float32)
    am = np.max(np.abs(x), axis=1)
    if not np.isfinite(am).all():
        raise CodecError("KV holds inf/NaN values; int8 cannot code them")
    t = am.astype(np.float64) / QMAX
    s16 = K.f16_ceil(t)                                   # |x/s| <= 127: error <= s/2
    big = s16.astype(np.float64) * QMAX > K.F16_MAX       # 127*s must stay a finite float16:
    if big.any():                                         # rounded down, |x/s| <= 127.13 still
        s16[big] = K.f16_floor(t[big])                    # rounds to 127 within s/2
    s = s16.astype(np.float32)
    np.divide(x, s[:, None], out=x, where=(s > 0)[:, None])   # zero groups are all zeros already
    np.rint(x, out=x)
    np.clip(x, -QMAX, QMAX, out=x)
    return x.astype(np.int8), s16


def _dequantize(codes: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """``out`` (uint16 ``[g, group]``) = float16 bits of ``codes * scale / F16_SHIFT``
    (``scale`` float32 already multiplied by :data:`~kv3d_core.kv.quant_kernels.F16_SHIFT`)."""
    y = K.scratch("y", codes.size, np.float32).reshape(codes.shape)
    sign = K.scratch("sign16", codes.size, np.int16).reshape(codes.shape)
    np.copyto(y, codes)                                   # int8 -> float32 (exact)
    np.multiply(y, scale[:, None], out=y)
    K.f16_magnitude_bits(y, out)
    np.bitwise_and(codes, np.int16(-0x8000), out=sign)    # negative codes -> 0x8000
    np.bitwise_or(out, sign.view(np.uint16), out=out)


class Int8Codec(DeltaCodec):
    """int8 codes, absmax scale per token per KV head (float16), zstd over codes and scales.

    Settings: ``zstd_level`` (0 = no zstd; 1..19, default 3), ``threads`` (chunks
    coded in parallel, default 1). Error bound: see the module docstring.
    """

    codec_id = "int8"
    version = 1
    lossless = False

    def __init__(self, zstd_level: int = 3, threads: int = 1, **unknown: object) -> None:
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; int8 takes zstd_level, threads")
        if isinstance(zstd_level, bool) or not isinstance(zstd_level, int) or not 0 <= zstd_level <= 19:
            raise TypeError(f"zstd_level={zstd_level!r}: use an integer 0..19 (0 = no zstd)")
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 64:
            raise TypeError(f"threads={threads!r}: use an integer 1..64")
        self.zstd_level = zstd_level
        self.threads = threads

    @staticmethod
    def group_of(head_dim_k: int, head_dim_v: int) -> int:
        return math.gcd(int(head_dim_k), int(head_dim_v))

    # -- encode -------------------------------------------------------------------------
    def encode(self, arrays: KVArrays) -> bytes:
        if arrays.head_dim_k <= 0 or arrays.head_dim_v <= 0:
            raise CodecError(f"head dims must be positive, got {arrays.head_dim_k}, {arrays.head_dim_v}")
        flat = K.flatten(arrays)
        g = self.group_of(arrays.head_dim_k, arrays.head_dim_v)
        n_groups = -(-flat.size // g)
        if n_groups * g != flat.size:                     # rows not whole heads: pad the last group
            flat = np.concatenate([flat, np.zeros(n_groups * g - flat.size, np.float16)])
        x = flat.reshape(n_groups, g)
        cg = max(1, K.CHUNK_VALUES // g)
        n_chunks = -(-n_groups // cg)
        scales = np.empty(n_groups, np.float16)
        frames: list[bytes] = [b""] * n_chunks
        level = self.zstd_level

        def work(i: int) -> None:
            a, b = i * cg, min(n_groups, (i + 1) * cg)
            codes, scales[a:b] = _quantize(x[a:b])
            frames[i] = K.compressor(level).compress(codes.data) if level else codes.tobytes()

        K.run_chunks(work, n_chunks, self.threads)
        scale_bytes = K.shuffle16(scales)
        if level:
            scale_bytes = K.compressor(level).compress(scale_bytes)
        head = b"".join((
            np.ascontiguousarray(arrays.positions, dtype="<i4").tobytes(),
            np.array([len(f) for f in frames], "<u4").tobytes(),
            scale_bytes,
        ))
        meta = layout_meta(arrays)
        meta.update(group=g, chunk_groups=cg, zstd=bool(level), scales_bytes=len(scale_bytes))
        meta["crc"] = K.meta_crc(meta, head)
        return framing.pack(self.codec_id, self.version, meta, b"".join((head, *frames)))

    # -- decode -------------------------------------------------------------------------
    def decode(self, data: bytes) -> KVArrays:
        meta, payload = framing.unpack(data, self.codec_id, self.version)
        n, kw, vw = check_layout(meta)
        hk = K.meta_int(meta, "head_dim_k", 1, 1 << 16)
        hv = K.meta_int(meta, "head_dim_v", 1, 1 << 16)
        g = K.meta_int(meta, "group", 1, 1 << 16)
        cg = K.meta_int(meta, "chunk_groups", 1, 1 << 30)
        sb = K.meta_int(meta, "scales_bytes", 0, len(payload))
        crc = K.meta_int(meta, "crc", 0, 0xFFFFFFFF)
        zstd_on = meta.get("zstd")
        if not isinstance(zstd_on, bool) or not isinstance(meta.get("extra"), dict):
            raise CodecError("codec metadata has no valid zstd flag or extra")
        if g != self.group_of(hk, hv):
            raise CodecError(f"group {g} does not match head dims {hk}/{hv}")
        n_values = n * (sum(kw) + sum(vw))
        n_groups = -(-n_values // g)
        n_chunks = -(-n_groups // cg)
        head_len = 4 * n + 4 * n_chunks + sb
        if head_len > len(payload):
            raise CodecError(f"payload of {len(payload)} bytes is shorter than its {head_len}-byte head")
        head = payload[:head_len]
        if K.meta_crc(meta, head) != crc:
            raise CodecError("int8 payload damaged: metadata/scales checksum mismatch")
        positions = np.frombuffer(head, "<i4", count=n).astype(np.int32)
        sizes = np.frombuffer(head, "<u4", count=n_chunks, offset=4 * n).astype(np.int64)
        ends = head_len + np.cumsum(sizes)
        if n_chunks and int(ends[-1]) != len(payload) or not n_chunks and head_len != len(payload):
            raise CodecError(f"code frames add up to {int(ends[-1]) if n_chunks else head_len} bytes, "
                             f"payload has {len(payload)}")
        starts = ends - sizes
        raw_scales = head[4 * n + 4 * n_chunks:]
        if zstd_on:
            raw_scales = K.decompress(raw_scales, 2 * n_groups, "scales")
        elif len(raw_scales) != 2 * n_groups:
            raise CodecError(f"scales hold {len(raw_scales)} bytes, layout needs {2 * n_groups}")
        scale = K.unshuffle16(raw_scales, n_groups).view(np.float16).astype(np.float32)
        np.multiply(scale, K.F16_SHIFT, out=scale)
        out = np.empty(n_groups * g, np.uint16)
        out2 = out.reshape(n_groups, g)

        def work(i: int) -> None:
            a, b = i * cg, min(n_groups, (i + 1) * cg)
            frame = payload[int(starts[i]):int(ends[i])]
            need = (b - a) * g
            raw = K.decompress(frame, need, f"code frame {i}") if zstd_on else frame
            if len(raw) != need:
                raise CodecError(f"code frame {i} holds {len(raw)} bytes, layout needs {need}")
            codes = np.frombuffer(raw, np.int8).reshape(b - a, g)
            _dequantize(codes, scale[a:b], out2[a:b])

        K.run_chunks(work, n_chunks, self.threads)
        k, v = K.unflatten(out.view(np.float16)[:n_values], n, kw, vw)
        return KVArrays(positions, k, v, hk, hv, dict(meta["extra"]))
