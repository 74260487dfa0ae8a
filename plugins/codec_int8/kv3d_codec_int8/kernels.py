"""The int8 codec's compiled dequantization kernel (``_kernels.c``), through ctypes.

Built with the plugin (a setuptools extension marked optional: an install without a C
compiler still works, on the numpy kernels). :func:`load` returns the kernel or None;
:func:`dequant` is the call. The kernel gives exactly the bits of the numpy general
kernel ``codec._dequantize`` for every scale (tested), about 6x faster on one core
(AVX2 where the CPU has it, else the compiler's vectorization of plain C). ctypes
releases the GIL for the call, so decode threads run it in parallel.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import numpy as np

_lib: ctypes.CDLL | None = None
_tried = False


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
                _lib = lib
            except (OSError, AttributeError):
                _lib = None
    return _lib


def level() -> str:
    """``avx2``, ``generic`` (compiled, no AVX2 here) or ``numpy`` (not built)."""
    lib = load()
    if lib is None:
        return "numpy"
    return "avx2" if lib.kv3d_int8_kernel_level() == 2 else "generic"


def dequant(codes: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """``out`` (uint16 ``[g, group]``, C-contiguous) = float16 bits of ``codes * scale /
    F16_SHIFT`` (``codes`` int8 ``[g, group]``, ``scale`` float32 ``[g]``, both C-contiguous)."""
    lib = load()
    assert lib is not None
    g, group = codes.shape
    if out.shape != (g, group) or scale.shape != (g,) or out.dtype != np.uint16 or codes.dtype != np.int8 \
            or scale.dtype != np.float32 or not (codes.flags.c_contiguous and out.flags.c_contiguous
                                                  and scale.flags.c_contiguous and out.flags.writeable):
        raise ValueError("dequant: arrays of the wrong shape, type or layout")
    if g:
        lib.kv3d_int8_dequant(codes.ctypes.data, scale.ctypes.data, g, group, out.ctypes.data)


def dequant_ptr(codes: int, scale: int, n_groups: int, group: int, out: int) -> None:
    """:func:`dequant` on raw addresses (the decoder's inner loop, which has checked the
    layout once for the whole payload): ``n_groups`` groups of ``group`` int8 codes at
    ``codes``, their float32 scales at ``scale``, uint16 output at ``out``."""
    _lib.kv3d_int8_dequant(codes, scale, n_groups, group, out)
