"""The int8 codec's compiled dequantization kernel (``_kernels.c``), through ctypes.

Built with the plugin (a setuptools extension marked optional: an install without a C
compiler still works, on the numpy kernels). :func:`load` returns the kernel or None;
:func:`dequant` is the call. The kernel gives exactly the bits of the numpy general
kernel ``codec._dequantize`` for every scale (tested, on every build this CPU runs), 6-15x
faster on one core (AVX-512 or AVX2 where the CPU has them, picked at run time, else the
compiler's vectorization of plain C). ctypes
releases the GIL for the call, so decode threads run it in parallel.

:func:`decode_chunks` decodes whole chunks (zstd frame -> codes -> float16 bits in the
output arrays) in one C call, with the system's zstd library (``libzstd.so.1``, loaded
by :func:`zstd`; its ``ZSTD_decompressDCtx`` and ``ZSTD_isError`` are handed to the
kernel as function pointers, one ``ZSTD_DCtx`` per thread). Without the library the
codec decompresses with python-zstandard and calls :func:`dequant_ptr` per chunk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.machinery
import threading
from pathlib import Path

import numpy as np

_lib: ctypes.CDLL | None = None
_tried = False
_zstd: "_Zstd | None" = None
_zstd_tried = False
_local = threading.local()

#: Oldest libzstd taken (``ZSTD_versionNumber``): 1.4.0, from which ``ZSTD_decompressDCtx``
#: and frame checksums behave as used here.
ZSTD_MIN_VERSION = 10400


def _find() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_kernels{suffix}"
        if p.is_file():
            return p
    return None


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it was not built here."""
    global _lib, _tried
    if not _tried:
        _tried = True
        path = _find()
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
                lib.kv3d_int8_dequant.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_int64, ctypes.c_void_p]
                lib.kv3d_int8_dequant.restype = ctypes.c_int
                lib.kv3d_int8_kernel_level.restype = ctypes.c_int
                lib.kv3d_int8_dequant_at.argtypes = [ctypes.c_int] + lib.kv3d_int8_dequant.argtypes
                lib.kv3d_int8_dequant_at.restype = ctypes.c_int
                lib.kv3d_int8_decode_chunks.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [
                    ctypes.c_void_p] * 3 + [ctypes.c_int64]
                lib.kv3d_int8_decode_chunks.restype = ctypes.c_int64
                lib.kv3d_int8_split_nibbles.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                        ctypes.c_void_p]
                lib.kv3d_int8_split_nibbles.restype = None
                lib.kv3d_int8_quantize_at.argtypes = [ctypes.c_int] + [ctypes.c_void_p, ctypes.c_int64,
                                                                       ctypes.c_int64, ctypes.c_void_p,
                                                                       ctypes.c_void_p]
                lib.kv3d_int8_quantize_at.restype = ctypes.c_int64
                lib.kv3d_int8_quantize.argtypes = lib.kv3d_int8_quantize_at.argtypes[1:]
                lib.kv3d_int8_quantize.restype = ctypes.c_int64
                _lib = lib
            except (OSError, AttributeError):
                _lib = None
    return _lib


#: The builds of the kernel, by the level number ``_kernels.c`` gives them.
LEVELS = {1: "generic", 2: "avx2", 3: "avx512"}


def level() -> str:
    """``avx512``, ``avx2``, ``generic`` (compiled, neither here) or ``numpy`` (not built)."""
    lib = load()
    if lib is None:
        return "numpy"
    return LEVELS.get(lib.kv3d_int8_kernel_level(), "generic")


def dequant(codes: np.ndarray, scale: np.ndarray, out: np.ndarray, build: str | None = None) -> None:
    """``out`` (uint16 ``[g, group]``, C-contiguous) = float16 bits of ``codes * scale /
    F16_SHIFT`` (``codes`` int8 ``[g, group]``, ``scale`` float32 ``[g]``, both C-contiguous),
    on the best build this CPU runs, or on ``build`` (one of :data:`LEVELS`' names;
    ValueError when this CPU cannot run it)."""
    lib = load()
    assert lib is not None
    g, group = codes.shape
    if out.shape != (g, group) or scale.shape != (g,) or out.dtype != np.uint16 or codes.dtype != np.int8 \
            or scale.dtype != np.float32 or not (codes.flags.c_contiguous and out.flags.c_contiguous
                                                  and scale.flags.c_contiguous and out.flags.writeable):
        raise ValueError("dequant: arrays of the wrong shape, type or layout")
    level = 0 if build is None else {v: k for k, v in LEVELS.items()}[build]
    if level and lib.kv3d_int8_kernel_level() < level:
        raise ValueError(f"this CPU cannot run the {build} build")
    if g:
        lib.kv3d_int8_dequant_at(level or lib.kv3d_int8_kernel_level(), codes.ctypes.data, scale.ctypes.data,
                                 g, group, out.ctypes.data)


def dequant_ptr(codes: int, scale: int, n_groups: int, group: int, out: int) -> None:
    """:func:`dequant` on raw addresses (the decoder's inner loop, which has checked the
    layout once for the whole payload): ``n_groups`` groups of ``group`` int8 codes at
    ``codes``, their float32 scales at ``scale``, uint16 output at ``out``."""
    _lib.kv3d_int8_dequant(codes, scale, n_groups, group, out)


class _Zstd:
    """The system zstd library: function pointers for the kernel, a DCtx per thread."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.ZSTD_versionNumber.restype = ctypes.c_uint
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_createDCtx.argtypes = []
        self.version = int(lib.ZSTD_versionNumber())
        self.lib = lib
        self.decompress = ctypes.cast(lib.ZSTD_decompressDCtx, ctypes.c_void_p).value
        self.is_error = ctypes.cast(lib.ZSTD_isError, ctypes.c_void_p).value

    def dctx(self) -> int:
        """This thread's decompression context (made once per thread, freed when it ends)."""
        d = getattr(_local, "dctx", None)
        if d is None:
            d = _local.dctx = _DCtx(self.lib)
        return d.ptr


class _DCtx:
    """A ``ZSTD_DCtx`` owned by one thread's ``threading.local`` (freed with it)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        self._free = lib.ZSTD_freeDCtx
        self.ptr = lib.ZSTD_createDCtx()
        if not self.ptr:
            raise MemoryError("ZSTD_createDCtx failed")

    def __del__(self) -> None:
        self._free(self.ptr)


def zstd() -> _Zstd | None:
    """The system zstd library (1.4 or newer), or None when there is none."""
    global _zstd, _zstd_tried
    if not _zstd_tried:
        _zstd_tried = True
        for name in (ctypes.util.find_library("zstd"), "libzstd.so.1", "libzstd.dylib"):
            if not name:
                continue
            try:
                z = _Zstd(ctypes.CDLL(name))
            except (OSError, AttributeError):
                continue
            if z.version >= ZSTD_MIN_VERSION:
                _zstd = z
                break
    return _zstd


def decode_chunks(z: _Zstd | None, payload: int, starts: int, ends: int, first: int, last: int,
                  chunk_groups: int, n_groups: int, group: int, scale: int, spans: int, targets: int,
                  n_targets: int) -> int:
    """Chunks ``[first, last)`` of a payload (raw addresses, layout checked by the caller),
    decompressed with ``z`` (None: the frames are raw codes) and dequantized into the
    targets; 0, or ``-1 - i`` when chunk ``i`` is damaged. See ``_kernels.c``."""
    if z is None:
        return _lib.kv3d_int8_decode_chunks(None, None, None, payload, starts, ends, first, last,
                                            chunk_groups, n_groups, group, scale, spans, targets, n_targets)
    return _lib.kv3d_int8_decode_chunks(z.decompress, z.is_error, z.dctx(), payload, starts, ends, first, last,
                                        chunk_groups, n_groups, group, scale, spans, targets, n_targets)


def split_nibbles(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The high and the low nibbles of ``codes`` (C-contiguous, one byte each), two to a
    byte, as ``codec.split_nibbles`` gives them (the compiled kernel must be loaded)."""
    u = np.ascontiguousarray(codes).reshape(-1).view(np.uint8)
    half = (u.size + 1) // 2
    hi, lo = np.empty(half, np.uint8), np.empty(half, np.uint8)
    lib = load()
    assert lib is not None, "the compiled kernel is not built"
    lib.kv3d_int8_split_nibbles(u.ctypes.data, u.size, hi.ctypes.data, lo.ctypes.data)
    return hi, lo


#: The builds of the quantizer: 1 = plain C, 2 = AVX2 + F16C (groups of a multiple of 8 values).
QUANTIZE_LEVELS = {1: "generic", 2: "avx2"}


def quantize(x16: np.ndarray, build: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Codes (int8, the shape of ``x16``) and scales (float16, one per row) of the float16
    ``[groups, group]`` values ``x16``, bit for bit what ``codec._quantize`` gives; None when
    a value is inf or NaN. ``build``: one of :data:`QUANTIZE_LEVELS`' names (ValueError
    when this CPU or group size cannot run it); default: the best one."""
    lib = load()
    assert lib is not None, "the compiled kernel is not built"
    x = np.ascontiguousarray(x16, dtype=np.float16)
    g, group = x.shape
    codes = np.empty((g, group), np.int8)
    scale = np.empty(g, np.float16)
    if build is None:
        rc = lib.kv3d_int8_quantize(x.ctypes.data, g, group, codes.ctypes.data, scale.ctypes.data)
    else:
        level = {v: k for k, v in QUANTIZE_LEVELS.items()}[build]
        rc = lib.kv3d_int8_quantize_at(level, x.ctypes.data, g, group, codes.ctypes.data, scale.ctypes.data)
        if rc == -2:
            raise ValueError(f"this CPU or group size cannot run the {build} quantizer")
    return None if rc else (codes, scale)
