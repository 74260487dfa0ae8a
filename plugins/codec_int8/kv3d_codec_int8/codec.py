"""The ``int8`` delta codec: int8 codes with an absmax scale per token per KV head,
zstd over the codes and the scales.

Format of the codec's bytes (codec id ``int8``, version 2; the core frames them, see
:mod:`kv3d_core.kv.framing`), led by :func:`~kv3d_core.kv.framing.pack_meta`'s JSON metadata::

    meta   layout (n_cells, widths, head dims, extra) + group, chunk_groups, zstd,
           scales_bytes, crc
    payload  positions   int32 x n_cells
             frame_sizes uint32 x n_frames          (bytes of each code frame)
             scales      float16 x n_groups, low bytes then high bytes, one zstd frame
                         (raw when zstd is off)
             codes       per chunk of chunk_groups groups: with zstd, two frames, the
                         high nibbles then the low nibbles of its codes (byte k holds
                         those of codes 2k and 2k+1, codes 2k's in its high half); the
                         high ones at ``zstd_level``, the low ones at level -1. Without
                         zstd, one frame of raw int8 codes.

Why nibbles: zstd's entropy stage (Huffman) is most of a restore's time and works per
byte. The high nibbles carry the skew of the codes (about 3 bits of entropy in 4), the
low ones are nearly uniform (4.0 bits in 4: zstd stores them in about 1 ms per 6 MB).
Coding the high nibbles two to a byte halves the bytes Huffman decodes, and the
payload comes out slightly smaller than zstd over whole codes (measured on the
default model: 5.09 MB vs 5.21 MB of codes for a 525-token delta).

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

Speed: three decoders give the same bits. (1) The native one, when the compiled kernel
(``_kernels.c``, built with the plugin; :mod:`.kernels`) and the system zstd library are
both there: a work item of :data:`NATIVE_ITEM_CHUNKS` chunks is one C call that
decompresses each chunk's two frames, joins the nibbles and dequantizes straight into
the caller's arrays, without the GIL, so ``decode_threads`` threads (default: up to 2)
run it on as many cores. (2) Without libzstd: python-zstandard per frame, then the
compiled kernel (one thread by default: python-zstandard holds the GIL). (3) Without the
compiled kernel, the numpy path below, chunk by chunk (64 Ki values, cache-resident
scratch): the frames, int8 -> float32 with negative codes moved up 32 binades (the sign
then comes out of the shift, see :func:`_dequantize_fast`), one multiply by the scales,
and one shift by 13 that narrows to float16 bits as it writes the output.
:meth:`Int8Codec.decode_into` writes straight into the caller's arrays (on restore: the
K/V rows of the llama.cpp state blob, no build copy). Threads take work items as they
come free; the bits do not depend on their number.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kv3d_core.contracts.codec import DeltaCodec, KVArrays
from kv3d_core.errors import CodecError
from kv3d_core.kv import framing
from kv3d_core.kv.codec_none import check_layout, layout_meta

from kv3d_core.kv import quant_kernels as K
from kv3d_codec_int8 import kernels

QMAX = 127


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):       # not on Linux
        return os.cpu_count() or 1


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
    (``scale`` float32 already multiplied by :data:`~kv3d_core.kv.quant_kernels.F16_SHIFT`).
    Any scales; :func:`_dequantize_fast` gives the same bits for the usual ones."""
    y = K.scratch("y", codes.size, np.float32).reshape(codes.shape)
    sign = K.scratch("sign16", codes.size, np.int16).reshape(codes.shape)
    np.copyto(y, codes)                                   # int8 -> float32 (exact)
    np.multiply(y, scale[:, None], out=y)
    K.f16_magnitude_bits(y, out)
    np.bitwise_and(codes, np.int16(-0x8000), out=sign)    # negative codes -> 0x8000
    np.bitwise_or(out, sign.view(np.uint16), out=out)


#: Values per decode work item (whole chunks; about 1 MiB of scratch, L2-sized).
ITEM_VALUES = 1 << 17

#: zstd level of the low nibbles' frames: they are nearly uniform, so a higher level
#: gains nothing and only slows encoding (-1, zstd's fastest strategy, stores them as
#: small as level 1 or 3 does on the default model's KV: within 0.01 %).
LOW_NIBBLE_LEVEL = -1


def split_nibbles(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The high and the low nibbles of the bytes ``u``, two to a byte: byte ``k`` holds
    those of ``u[2k]`` (high half) and ``u[2k+1]`` (low half); an odd count is padded with 0."""
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    even, odd = u[0::2], u[1::2]
    return (even & 0xF0) | (odd >> 4), (even << 4) | (odd & 0x0F)


def join_nibbles(hi: np.ndarray, lo: np.ndarray, out: np.ndarray) -> None:
    """``out`` (uint8, any size up to ``2 * len(hi)``) = the bytes :func:`split_nibbles` split."""
    n = out.size
    np.bitwise_or(hi[:(n + 1) // 2] & 0xF0, lo[:(n + 1) // 2] >> 4, out=out[0::2])
    np.bitwise_or(hi[:n // 2] << 4, lo[:n // 2] & 0x0F, out=out[1::2])


#: Chunks per work item of the native decoder (:meth:`Int8Codec._fill_native`): 256 Ki
#: values, so a restore is a few dozen C calls that two threads share evenly.
NATIVE_ITEM_CHUNKS = 4

#: A negative code ``c`` becomes ``|c| * 2**32`` before the scale multiply (see
#: :func:`_dequantize_fast`).
NEG_TO_SIGN = np.float32(-(2.0 ** 32))

#: float16 bits of the scales :func:`_dequantize_fast` takes besides 0: from 2**-14
#: (smallest normal: every non-zero code then gives a normal float16) to 511.75
#: (128 * 511.75 = 65504: every code gives a finite float16).
FAST_SCALE_BITS = (0x0400, 0x5FFF)


def _dequantize_fast(y: np.ndarray, scale: np.ndarray) -> None:
    """``y`` (float32 ``[g, group]``, holding the codes as converted from int8) becomes
    values whose float32 bits shifted right by 13 and cut to 16 bits are the float16
    bits of ``codes * scale / F16_SHIFT``, bit for bit those of :func:`_dequantize`
    (see :func:`_f16_bits_in_place`). Every pass works in place on one float32
    scratch (the sign needs no int16 passes over the output), so a work item of
    several chunks is dequantized with a few large numpy calls and the output is
    written once. Every scale must be 0 or within :data:`FAST_SCALE_BITS` (as float16).

    Why it is exact: a negative code enters as ``|c| * 2**32`` (the max of ``c`` and
    ``-2**32 * c``). Its product with the scale is ``2**32`` times the product of
    ``|c|`` (one rounding of the same real number, scaled by a power of two, as the
    product is a normal float32): the same float32 bits with 32 added to the exponent
    field. That field is at most 30 for a float16-range value (the
    :data:`~kv3d_core.kv.quant_kernels.F16_SHIFT` offset), so adding 32 sets exactly
    its bit 5 = float32 bit 28, which the shift by 13 moves to bit 15: the float16
    sign. Codes of 0 give +0.
    """
    t = K.scratch("neg", y.size, np.float32).reshape(y.shape)
    np.multiply(y, NEG_TO_SIGN, out=t)
    np.maximum(y, t, out=y)                               # c >= 0: c;  c < 0: |c| * 2**32
    np.multiply(y, scale[:, None], out=y)


def _f16_bits_in_place(scratch: np.ndarray) -> None:
    """Shift the float32 bits of :func:`_dequantize_fast`'s output right by 13, in place:
    the low 16 bits of each uint32 are then the float16 bits (the narrowing copy into
    the output takes them)."""
    np.right_shift(scratch, np.uint32(13), out=scratch)


class Int8Codec(DeltaCodec):
    """int8 codes, absmax scale per token per KV head (float16), zstd over codes and scales.

    Settings: ``zstd_level`` (0 = no zstd; 1..19, default 3: the high nibbles' frames,
    see the module docstring); ``threads`` (chunks encoded in parallel, default 1:
    encoding runs in the background, beside the model); ``decode_threads`` (work items
    decoded in parallel; default ``None``: the larger of ``threads`` and min(2, usable
    cores) -- a restore blocks the serving thread, so a second core is free latency --
    except 1 for the compiled kernel without the system libzstd, whose decode is then
    mostly python-zstandard, which holds the GIL); ``kernel`` (``auto``: the compiled
    kernel when the plugin was built with it, see :mod:`.kernels`; ``numpy``: the numpy
    kernels). Results are the same bits for any thread count and
    either kernel. Error bound: see the module docstring.
    """

    codec_id = "int8"
    version = 2
    lossless = False

    def __init__(self, zstd_level: int = 3, threads: int = 1, decode_threads: int | None = None,
                 kernel: str = "auto", **unknown: object) -> None:
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; int8 takes zstd_level, threads, decode_threads, kernel")
        if kernel not in ("auto", "numpy"):
            raise TypeError(f"kernel={kernel!r}: use auto (the compiled kernel when it was built) or numpy")
        self.kernel = kernel
        self._compiled = kernel == "auto" and kernels.load() is not None
        # zstd inside the compiled decoder: chunks decode without the GIL (else python-zstandard)
        self._zstd = kernels.zstd() if self._compiled else None
        if isinstance(zstd_level, bool) or not isinstance(zstd_level, int) or not 0 <= zstd_level <= 19:
            raise TypeError(f"zstd_level={zstd_level!r}: use an integer 0..19 (0 = no zstd)")
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 64:
            raise TypeError(f"threads={threads!r}: use an integer 1..64")
        if decode_threads is not None and (isinstance(decode_threads, bool) or not isinstance(decode_threads, int)
                                           or not 1 <= decode_threads <= 64):
            raise TypeError(f"decode_threads={decode_threads!r}: use an integer 1..64, or null (automatic)")
        self.zstd_level = zstd_level
        self.threads = threads
        # compiled kernel fed by python-zstandard: a restore is then mostly zstd under the GIL and
        # one thread is faster (measured, docs/BENCHMARKS.md); the other decoders gain from a second
        self.decode_threads = (decode_threads if decode_threads is not None
                               else 1 if self._compiled and self._zstd is None
                               else max(threads, min(2, _cores())))

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
        chunks: list[tuple[bytes, ...]] = [()] * n_chunks
        level = self.zstd_level

        def work(i: int) -> None:
            a, b = i * cg, min(n_groups, (i + 1) * cg)
            if self._compiled:                        # the same bits as _quantize, ~10x faster
                got = kernels.quantize(x[a:b])
                if got is None:
                    raise CodecError("KV holds inf/NaN values; int8 cannot code them")
                codes, scales[a:b] = got
            else:
                codes, scales[a:b] = _quantize(x[a:b])
            if level:
                hi, lo = (kernels.split_nibbles(codes) if self._compiled
                          else split_nibbles(codes.reshape(-1).view(np.uint8)))
                chunks[i] = (K.compressor(level).compress(hi.data), K.compressor(LOW_NIBBLE_LEVEL).compress(lo.data))
            else:
                chunks[i] = (codes.tobytes(),)

        K.run_chunks(work, n_chunks, self.threads)
        frames = [f for c in chunks for f in c]
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
        return framing.pack_meta(meta, b"".join((head, *frames)))

    # -- decode -------------------------------------------------------------------------
    def _read(self, data: bytes) -> "_Payload":
        """The checked header of a payload (everything but the code frames' contents)."""
        meta, payload = framing.unpack_meta(data)
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
        n_frames = 2 * n_chunks if zstd_on else n_chunks
        head_len = 4 * n + 4 * n_frames + sb
        if head_len > len(payload):
            raise CodecError(f"payload of {len(payload)} bytes is shorter than its {head_len}-byte head")
        head = payload[:head_len]
        if K.meta_crc(meta, head) != crc:
            raise CodecError("int8 payload damaged: metadata/scales checksum mismatch")
        positions = np.frombuffer(head, "<i4", count=n).astype(np.int32)
        sizes = np.frombuffer(head, "<u4", count=n_frames, offset=4 * n).astype(np.int64)
        ends = head_len + np.cumsum(sizes)
        if n_frames and int(ends[-1]) != len(payload) or not n_frames and head_len != len(payload):
            raise CodecError(f"code frames add up to {int(ends[-1]) if n_frames else head_len} bytes, "
                             f"payload has {len(payload)}")
        raw_scales = head[4 * n + 4 * n_frames:]
        if zstd_on:
            raw_scales = K.decompress(raw_scales, 2 * n_groups, "scales")
        elif len(raw_scales) != 2 * n_groups:
            raise CodecError(f"scales hold {len(raw_scales)} bytes, layout needs {2 * n_groups}")
        scale_bits = K.unshuffle16(raw_scales, n_groups)
        return _Payload(payload, n, kw, vw, hk, hv, g, cg, n_values, n_groups, n_chunks, positions,
                        ends - sizes, ends, scale_bits, K.f16_scaled_to_f32(scale_bits),
                        zstd_on, dict(meta["extra"]))

    def _fill(self, p: "_Payload", targets: list[np.ndarray]) -> None:
        """Decode every group into ``targets`` (uint16 ``[groups, group]`` arrays that,
        one after the other, are the flat buffer of :func:`~kv3d_core.kv.quant_kernels.flatten`).

        Work items of about :data:`ITEM_VALUES` values (whole chunks): each chunk's zstd
        frame is converted to float32 as it comes out, then the item is dequantized
        in place and written to the targets with one narrowing copy. Items, not
        chunks, are what the threads take: fewer, larger numpy calls hand the GIL
        back and forth less often. With the compiled kernels: :meth:`_fill_native`
        (the system libzstd), or one C dequantization call per target segment.
        """
        spans = K.group_spans(targets)
        if int(spans[-1]) != p.n_groups:
            raise CodecError(f"decode targets hold {int(spans[-1])} groups, the payload {p.n_groups}")
        per = max(1, ITEM_VALUES // (p.chunk_groups * p.group))      # chunks per work item
        if self._compiled:
            t_addr, s_addr = _addresses(p, targets)
            if self._zstd is not None or not p.zstd:
                return self._fill_native(p, spans, t_addr, s_addr)
            work = functools.partial(_item_compiled, p, spans, t_addr, s_addr, per)
        else:
            lo, hi = FAST_SCALE_BITS
            odd = (p.scale_bits != 0) & ((p.scale_bits < lo) | (p.scale_bits > hi))
            slow = set((np.flatnonzero(odd) // (p.chunk_groups * per)).tolist()) if odd.any() else set()
            work = functools.partial(_item_numpy, p, spans, targets, per, slow)
        K.run_chunks(work, -(-p.n_chunks // per), self.decode_threads)

    def _fill_native(self, p: "_Payload", spans: np.ndarray, t_addr: list[int], s_addr: int) -> None:
        """:meth:`_fill` in C: work items of :data:`NATIVE_ITEM_CHUNKS` chunks, each one
        ctypes call that decompresses (the system libzstd) and dequantizes its chunks
        straight into the targets, without the GIL; threads take items as they come free."""
        payload = np.frombuffer(p.payload, np.uint8)
        spans = np.ascontiguousarray(spans, np.int64)
        addrs = np.asarray(t_addr, np.uint64)
        z = self._zstd if p.zstd else None
        args = (payload.ctypes.data, p.starts.ctypes.data, p.ends.ctypes.data)
        tail = (p.chunk_groups, p.n_groups, p.group, s_addr, spans.ctypes.data, addrs.ctypes.data, len(t_addr))
        per = NATIVE_ITEM_CHUNKS

        def work(item: int) -> None:
            first, last = item * per, min(p.n_chunks, (item + 1) * per)
            rc = kernels.decode_chunks(z, *args, first, last, *tail)
            if rc:
                raise CodecError(f"code frame {-1 - rc} damaged (zstd error, checksum or size mismatch)")

        K.run_chunks(work, -(-p.n_chunks // per), self.decode_threads)

    def decode(self, data: bytes) -> KVArrays:
        p = self._read(data)
        out = np.empty(p.n_groups * p.group, np.uint16)
        self._fill(p, [out.reshape(p.n_groups, p.group)])
        k, v = K.unflatten(out.view(np.float16)[:p.n_values], p.n, p.k_width, p.v_width)
        return KVArrays(p.positions, k, v, p.head_dim_k, p.head_dim_v, p.extra)

    def decode_into(self, data: bytes, alloc: Callable[[KVArrays], KVArrays]) -> KVArrays:
        """:meth:`decode` writing the values straight into ``alloc``'s arrays (no copy
        when they are C-contiguous float16 arrays, e.g. views into a state blob)."""
        p = self._read(data)
        # zero-stride placeholders: one broadcast, sliced per layer (a broadcast_to per layer
        # costs more than the rest of the layout work)
        zero = np.broadcast_to(np.float16(0), (p.n, max([*p.k_width, *p.v_width], default=0)))
        template = KVArrays(p.positions, [zero[:, :w] for w in p.k_width], [zero[:, :w] for w in p.v_width],
                            p.head_dim_k, p.head_dim_v, p.extra)
        out = alloc(template)
        if len(out.k) != len(p.k_width) or len(out.v) != len(p.v_width) or any(
                a.shape != (p.n, w) for a, w in zip([*out.k, *out.v], [*p.k_width, *p.v_width])):
            raise CodecError("decode_into: alloc returned arrays of another layout than the payload's")
        targets = K.group_targets(out, p.group)
        if targets is not None:
            self._fill(p, targets)
            return out
        flat = np.empty(p.n_groups * p.group, np.uint16)
        self._fill(p, [flat.reshape(p.n_groups, p.group)])
        k, v = K.unflatten(flat.view(np.float16)[:p.n_values], p.n, p.k_width, p.v_width)
        for dst, src in zip([*out.k, *out.v], [*k, *v]):
            np.copyto(dst, src)
        return out


def _codes(p: "_Payload", i: int) -> np.ndarray:
    """Chunk ``i``'s int8 codes, ``[groups, group]`` (a view of its frame, or of this
    thread's scratch buffer when the frame is zstd-compressed nibbles)."""
    a, b = i * p.chunk_groups, min(p.n_groups, (i + 1) * p.chunk_groups)
    need = (b - a) * p.group
    if p.zstd:
        half = (need + 1) // 2
        hi, lo = (np.frombuffer(K.decompress(p.payload[p.starts[f]:p.ends[f]], half, f"code frame {f}"), np.uint8)
                  for f in (2 * i, 2 * i + 1))
        codes = K.scratch("codes", need, np.uint8)
        join_nibbles(hi, lo, codes)
        return codes.view(np.int8).reshape(b - a, p.group)
    raw = p.payload[p.starts[i]:p.ends[i]]
    if len(raw) != need:
        raise CodecError(f"code frame {i} holds {len(raw)} bytes, layout needs {need}")
    return np.frombuffer(raw, np.int8).reshape(b - a, p.group)


def _addresses(p: "_Payload", targets: list[np.ndarray]) -> tuple[list[int], int]:
    """The targets' and the scales' addresses for the C kernels, their layout checked once
    (the loops then only add offsets)."""
    for t in targets:
        if t.dtype != np.uint16 or t.shape[1:] != (p.group,) or not t.flags.c_contiguous or not t.flags.writeable:
            raise CodecError("decode targets must be writable C-contiguous uint16 [groups, group] arrays")
    scale = p.scale
    assert scale.dtype == np.float32 and scale.flags.c_contiguous and scale.shape == (p.n_groups,)
    return [t.__array_interface__["data"][0] for t in targets], scale.__array_interface__["data"][0]


def _item_compiled(p: "_Payload", spans: np.ndarray, t_addr: list[int], s_addr: int, per: int, item: int) -> None:
    """Work item ``item`` with the C kernel: any scale, straight into the targets."""
    g, cg = p.group, p.chunk_groups
    for i in range(item * per, min(p.n_chunks, (item + 1) * per)):
        ca, cb = i * cg, min(p.n_groups, (i + 1) * cg)
        c_addr = _codes(p, i).__array_interface__["data"][0]
        at = 0
        for j, first, count in K.segments(spans, ca, cb):
            kernels.dequant_ptr(c_addr + at * g, s_addr + 4 * (ca + at), count, g, t_addr[j] + 2 * g * first)
            at += count


def _write(targets: list[np.ndarray], spans: np.ndarray, dec: np.ndarray, a: int, b: int) -> None:
    """Groups ``a:b`` (decoded float16 bits) into the targets: the output is written once."""
    at = 0
    for j, first, count in K.segments(spans, a, b):
        np.copyto(targets[j][first:first + count], dec[at:at + count], casting="unsafe")
        at += count


def _item_numpy(p: "_Payload", spans: np.ndarray, targets: list[np.ndarray], per: int, slow: set[int],
                item: int) -> None:
    """Work item ``item`` in numpy: int8 -> float32 (exact), dequantized in place, one
    narrowing write; an item holding unusual scales (``slow``) takes the general kernel."""
    g, cg = p.group, p.chunk_groups
    chunks = range(item * per, min(p.n_chunks, (item + 1) * per))
    a, b = chunks[0] * cg, min(p.n_groups, (chunks[-1] + 1) * cg)
    if item in slow:
        for i in chunks:
            ca, cb = i * cg, min(p.n_groups, (i + 1) * cg)
            dec16 = K.scratch("bits16", (cb - ca) * g, np.uint16).reshape(cb - ca, g)
            _dequantize(_codes(p, i), p.scale[ca:cb], dec16)
            _write(targets, spans, dec16, ca, cb)
        return
    dec = K.scratch("bits32", (b - a) * g, np.uint32).reshape(b - a, g)
    y = dec.view(np.float32)
    for i in chunks:
        ca, cb = i * cg, min(p.n_groups, (i + 1) * cg)
        np.copyto(y[ca - a:cb - a], _codes(p, i))
    _dequantize_fast(y, p.scale[a:b])
    _f16_bits_in_place(dec)
    _write(targets, spans, dec, a, b)


@dataclass
class _Payload:
    """A payload's checked header: layout, frame offsets, scales (float16 bits, and as
    float32 times F16_SHIFT)."""

    payload: memoryview
    n: int
    k_width: list[int]
    v_width: list[int]
    head_dim_k: int
    head_dim_v: int
    group: int
    chunk_groups: int
    n_values: int
    n_groups: int
    n_chunks: int
    positions: np.ndarray
    starts: np.ndarray          # int64 offsets of each code frame in the payload
    ends: np.ndarray
    scale_bits: np.ndarray
    scale: np.ndarray
    zstd: bool
    extra: dict
