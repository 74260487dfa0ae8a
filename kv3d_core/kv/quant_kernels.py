"""Vectorized building blocks of the quantizing delta codecs (``int8`` here, and
``block`` in the ``kv3d-codec-block`` plugin).

- :func:`flatten` / :func:`unflatten`: all K layers then all V layers of a
  :class:`~kv3d_core.contracts.codec.KVArrays` as ONE flat float16 buffer, and the
  per-layer ``[n_cells, width]`` views back into one decoded buffer. Codecs quantize
  groups of consecutive values of that buffer; a group never straddles a row when
  the row width is a multiple of the group size (true for KV heads).
- :func:`group_targets` / :func:`group_spans` / :func:`segments`: the same flat
  buffer when it is not one buffer but the caller's per-layer arrays (e.g. views
  into a llama.cpp state blob, :func:`kv3d_core.kv.state_format.allocate`): which
  layer arrays a run of groups falls in, so decoders write their output in place.
- :func:`f16_bits` / :func:`f16_magnitude_bits`: float32 -> float16 without
  numpy's float16 cast (a software loop in numpy builds without F16C in their
  baseline, as here: 3-5 ns a value, 20-30 ms for a 512-token delta). The caller
  multiplies the values by :data:`F16_SHIFT` in the same operation that applies its
  scales; the float32 bits shifted right by 13 are then the float16 bits of the
  magnitude (normal and subnormal alike). The result is within 0.75 float16 ulp of
  the exact value (round-to-nearest: 0.5 ulp; below 2**-14 the error is at most
  2**-24). Values must stay within +-65504 (the codecs guarantee it).
- :func:`f16_scaled_to_f32`: the decoders' float16 scales -> float32 times
  :data:`F16_SHIFT`, by bit moves instead of numpy's float16 cast (same bits).
- :func:`run_chunks`: runs ``fn(i)`` for every chunk, on a shared thread pool when
  ``threads > 1`` (zstd and numpy release the GIL); threads take chunks as they
  come free. Chunks write disjoint outputs: results do not depend on ``threads``.
- :func:`meta_crc`: CRC-32 over the codec metadata and the small payload sections,
  so a flipped byte anywhere in the header is a :class:`CodecError`, not wrong KV.

Pure functions, thread-safe: scratch buffers are per thread.
"""

from __future__ import annotations

import json
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import zstandard

from kv3d_core.contracts.codec import KVArrays
from kv3d_core.errors import CodecError

#: Values per chunk: the unit of zstd framing, threading and cache-resident work
#: (the float32 scratch of one chunk is 256 KiB).
CHUNK_VALUES = 1 << 16

#: 2**-112 moves the float16 exponent range onto the bottom of float32's, so that the
#: float32 bits >> 13 are float16 bits; (1 + 2**-12) turns the shift's truncation
#: into rounding within 0.75 ulp.
F16_SHIFT = np.float32(2.0 ** -112 * (1.0 + 2.0 ** -12))

F16_MAX = 65504.0

_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


# -- flat buffers -------------------------------------------------------------------
def flatten(arrays: KVArrays) -> np.ndarray:
    """K layers then V layers, each row-major, as one contiguous float16 buffer."""
    n = arrays.n_cells
    parts = []
    for name, layers in (("K", arrays.k), ("V", arrays.v)):
        for il, a in enumerate(layers):
            a = np.asarray(a)
            if a.ndim != 2 or a.shape[0] != n or a.shape[1] <= 0:
                raise CodecError(f"{name} of layer {il} has shape {a.shape}; expected ({n}, width)")
            parts.append(np.asarray(a, dtype=np.float16).reshape(-1))
    if len(arrays.k) != len(arrays.v):
        raise CodecError(f"{len(arrays.k)} K layers but {len(arrays.v)} V layers")
    return np.concatenate(parts) if parts else np.zeros(0, np.float16)


def group_targets(arrays: KVArrays, group: int) -> list[np.ndarray] | None:
    """Each K then V array of ``arrays`` as a writable uint16 ``[groups, group]`` view
    (the order of :func:`flatten`), for codecs that write their float16 output in
    place; None when one is not a C-contiguous float16 array or its size is not a
    multiple of ``group`` (the caller then decodes into a buffer of its own and copies)."""
    out = []
    for a in (*arrays.k, *arrays.v):
        if (not isinstance(a, np.ndarray) or a.dtype != np.float16 or not a.flags.c_contiguous
                or not a.flags.writeable or a.size % group):
            return None
        out.append(a.reshape(-1).view(np.uint16).reshape(-1, group))
    return out


def group_spans(targets: list[np.ndarray]) -> np.ndarray:
    """Start group of each target in the flat buffer, then the total (``len(targets) + 1`` values)."""
    return np.concatenate(([0], np.cumsum([t.shape[0] for t in targets], dtype=np.int64)))


def segments(spans: np.ndarray, a: int, b: int) -> list[tuple[int, int, int]]:
    """The parts of the groups ``[a, b)`` of the flat buffer, one per target they fall in:
    ``(target, first group within the target, group count)``."""
    out = []
    j = int(np.searchsorted(spans, a, side="right")) - 1
    while a < b:
        stop = min(b, int(spans[j + 1]))
        if stop > a:
            out.append((j, a - int(spans[j]), stop - a))
        a = stop
        j += 1
    return out


def unflatten(flat: np.ndarray, n: int, k_width: list[int], v_width: list[int]) -> tuple[list, list]:
    """Per-layer ``[n, width]`` views of ``flat`` (the inverse of :func:`flatten`)."""
    k, v, off = [], [], 0
    for widths, out in ((k_width, k), (v_width, v)):
        for w in widths:
            out.append(flat[off:off + n * w].reshape(n, w))
            off += n * w
    return k, v


# -- float16 output -------------------------------------------------------------------
def scratch(name: str, size: int, dtype: type) -> np.ndarray:
    """A per-thread reusable buffer of at least ``size`` elements (first ``size`` returned)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = bufs[name] = np.empty(max(size, CHUNK_VALUES), dtype)
    return buf[:size]


def f16_bits(y: np.ndarray, out: np.ndarray) -> None:
    """``out`` (uint16) = float16 bits of ``y / F16_SHIFT`` (``y`` float32, already
    multiplied by :data:`F16_SHIFT`, same shape as ``out``; ``y`` is overwritten).

    The sign: float32 bit 31 is copied to bit 28 (always 0 here: the exponent field
    is at most 30), the bit the shift moves to float16's sign bit. Callers that know
    the signs from their codes use :func:`f16_magnitude_bits` and set it themselves.
    """
    i = y.view(np.int32)
    sign = scratch("sign28", y.size, np.int32).reshape(y.shape)
    np.right_shift(i, np.int32(3), out=sign)              # arithmetic: bit 31 -> bits 28..31
    np.bitwise_and(sign, np.int32(1 << 28), out=sign)
    np.bitwise_or(i, sign, out=i)
    np.right_shift(y.view(np.uint32), np.uint32(13), out=out, casting="unsafe")


def f16_scaled_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 ``x * F16_SHIFT`` of finite float16 values ``x`` given as their uint16
    bits, bit for bit what ``bits.view(np.float16).astype(np.float32) * F16_SHIFT`` gives,
    without numpy's float16 cast: the magnitude bits shifted left by 13 are the float32
    of ``|x| * 2**-112`` (exactly, subnormals too), then one multiply by ``1 + 2**-12``
    (the same rounding of the same product) and the sign."""
    b = np.asarray(bits, np.uint16)
    y = (b & np.uint16(0x7FFF)).astype(np.uint32)
    np.multiply(y, np.uint32(1 << 13), out=y)
    f = y.view(np.float32)
    np.multiply(f, np.float32(1.0 + 2.0 ** -12), out=f)
    neg = b >= 0x8000
    if neg.any():
        np.negative(f, out=f, where=neg)
    return f


def f16_magnitude_bits(y: np.ndarray, out: np.ndarray) -> None:
    """``out`` = float16 bits of ``|y| / F16_SHIFT`` without the sign bit (see :func:`f16_bits`)."""
    np.right_shift(y.view(np.uint32), np.uint32(13), out=out, casting="unsafe")


# -- scales ------------------------------------------------------------------------------
def f16_ceil(x: np.ndarray) -> np.ndarray:
    """The smallest float16 >= each non-negative float32/float64 ``x`` (``x`` <= 65504)."""
    s = np.asarray(x).astype(np.float16)
    low = s.astype(np.float64) < x
    if low.any():
        s[low] = np.nextafter(s[low], np.float16(np.inf))
    return s


def f16_floor(x: np.ndarray) -> np.ndarray:
    """The largest float16 <= each ``x`` (``x`` >= -65504)."""
    s = np.asarray(x).astype(np.float16)
    high = s.astype(np.float64) > x
    if high.any():
        s[high] = np.nextafter(s[high], np.float16(-np.inf))
    return s


def shuffle16(a: np.ndarray) -> bytes:
    """uint16/float16 values as their low bytes then their high bytes (zstd likes it)."""
    return np.ascontiguousarray(np.asarray(a).view(np.uint8).reshape(-1, 2).T).tobytes()


def unshuffle16(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`shuffle16`: ``count`` little-endian 16-bit values (as uint16)."""
    planes = np.frombuffer(raw, dtype=np.uint8, count=2 * count).reshape(2, count)
    out = planes[1].astype("<u2")                # high bytes (arithmetic: numpy's byte
    np.multiply(out, np.uint16(256), out=out)    # transposes and 16-bit shifts are slow loops)
    np.bitwise_or(out, planes[0], out=out)
    return out


# -- zstd ---------------------------------------------------------------------------------
def compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return c


def decompress(frame: bytes | memoryview, expected: int, what: str) -> bytes:
    """One zstd frame that must hold exactly ``expected`` bytes (checked before allocating)."""
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    try:
        size = zstandard.frame_content_size(frame)
        if size != expected:
            raise CodecError(f"{what}: zstd frame holds {size} bytes, layout needs {expected}")
        raw = d.decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: zstd frame damaged: {exc}") from exc
    if len(raw) != expected:
        raise CodecError(f"{what}: decompressed to {len(raw)} bytes, layout needs {expected}")
    return raw


# -- threads --------------------------------------------------------------------------------
def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix=f"kv3d-codec{threads}")
        return pool


def run_chunks(fn: Callable[[int], None], n_chunks: int, threads: int) -> None:
    """``fn(i)`` once for every ``i`` in ``range(n_chunks)``: in the calling thread, or
    on ``threads`` threads (the calling one and ``threads - 1`` pool threads) that take
    the next chunk as they come free, so a thread the OS does not schedule holds up
    nothing but its own chunk. The first exception (e.g. the CodecError of a damaged
    frame) stops the others from taking new chunks and is raised once every thread is
    done (no run outlives the call)."""
    if threads <= 1 or n_chunks <= 1:
        for i in range(n_chunks):
            fn(i)
        return
    todo = iter(range(n_chunks))          # next() on it is atomic under the GIL
    failed: list[BaseException] = []

    def drain() -> None:
        for i in todo:
            if failed:
                return
            try:
                fn(i)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after every thread ends
                failed.append(exc)
                return

    futures = [_pool(threads - 1).submit(drain) for _ in range(min(threads, n_chunks) - 1)]
    drain()
    for f in futures:
        if not f.cancel():                # not started yet (a busy machine): nothing left for it
            f.result()
    if failed:
        raise failed[0]


# -- integrity --------------------------------------------------------------------------------
def meta_crc(meta: dict, *sections: bytes | memoryview) -> int:
    """CRC-32 of ``meta`` (every key but ``crc``, as canonical JSON) and ``sections``."""
    body = {k: v for k, v in meta.items() if k != "crc"}
    try:
        c = zlib.crc32(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
    except (TypeError, ValueError) as exc:
        raise CodecError(f"codec metadata is not JSON-serializable: {exc}") from exc
    for s in sections:
        c = zlib.crc32(s, c)
    return c


def meta_int(meta: dict, key: str, lo: int, hi: int) -> int:
    """``meta[key]`` as an int within ``lo..hi``, else :class:`CodecError`."""
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CodecError(f"codec metadata {key}={v!r} is not an integer within {lo}..{hi}")
    return v
