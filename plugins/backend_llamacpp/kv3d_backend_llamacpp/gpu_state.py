"""Moving one sequence's KV cells between llama.cpp's context and host memory
the GPU can reach directly (experimental; GPU builds of llama.cpp).

``LlamaCppBackend.seq_state_get`` / ``seq_state_set`` pass llama.cpp an
ordinary (pageable) Python buffer. With the KV cache on a CUDA device, llama.cpp
copies a sequence with one ``cudaMemcpyAsync`` + stream synchronize per layer
and per K/V, and from pageable memory the CUDA driver stages every one of them
through its own small pinned bounce buffer: the copy runs at a fraction of the
bus rate. Here the blob lives in *page-locked* memory from ggml's CUDA host
buffer type (``cudaMallocHost`` inside the very libggml-cuda that llama.cpp
uses), so each copy is one direct DMA.

Contract:

* :class:`PinnedBuffer` -- ``nbytes`` of host memory, page-locked when the
  build has CUDA (``pinned`` says whether it is), else ordinary memory; exposes
  ``view`` (a numpy uint8 array over it) and ``ptr``. ``close()`` frees it; a
  closed buffer must not be used.
* :func:`state_get_into` writes the state of ``seq`` into a buffer (returns the
  byte count; raises :class:`BackendError` when it does not fit or llama.cpp
  refuses). :func:`state_set_from` restores ``nbytes`` of a buffer into
  ``seq`` (raises :class:`StateRestoreError` and leaves ``seq`` empty on
  refusal). The bytes are exactly those of ``seq_state_get`` / ``seq_state_set``:
  blobs are interchangeable between both paths.
* :class:`StagingPool` -- the serving path's use of them: ``lend(nbytes)`` gives a
  numpy uint8 array over a pooled buffer (page-locked with CUDA), which goes back
  to the pool when the array (and every view of it) is garbage; ``owns(array)``
  says whether an array lies in such a buffer. Page-locking costs milliseconds
  per call, so buffers are kept (``max_bytes`` in all) and reused.
* :class:`DeviceSnapshots` -- ``LLAMA_STATE_SEQ_FLAGS_ON_DEVICE``: llama.cpp
  copies the cells of a sequence into device buffers it keeps *per source
  sequence id* (a second save of the same id replaces the first) and restores
  them into any sequence, device to device. It frees KV *cells* but not GPU
  memory, so it is no substitute for the warm tier.

The functions take the backend and use its context (``backend._ctx``): this
module is the proposal for methods of ``LlamaCppBackend`` and lives beside it.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from pathlib import Path

import numpy as np

import llama_cpp as L
from kv3d_core.errors import BackendError, StateRestoreError

ON_DEVICE = 2            # LLAMA_STATE_SEQ_FLAGS_ON_DEVICE (llama.h)

_LIB_DIR = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(L.__file__).resolve().parent / "lib")


class _GgmlHost:
    """ctypes bindings to ggml's CUDA host (pinned) buffer type, when the build has one."""

    def __init__(self) -> None:
        self.base = ctypes.CDLL(str(_LIB_DIR / "libggml-base.so"))
        self.base.ggml_backend_buft_alloc_buffer.restype = ctypes.c_void_p
        self.base.ggml_backend_buft_alloc_buffer.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.base.ggml_backend_buffer_get_base.restype = ctypes.c_void_p
        self.base.ggml_backend_buffer_get_base.argtypes = [ctypes.c_void_p]
        self.base.ggml_backend_buffer_get_type.restype = ctypes.c_void_p
        self.base.ggml_backend_buffer_get_type.argtypes = [ctypes.c_void_p]
        self.base.ggml_backend_buffer_free.restype = None
        self.base.ggml_backend_buffer_free.argtypes = [ctypes.c_void_p]
        self.pinned_type: int | None = None
        cuda = _LIB_DIR / "libggml-cuda.so"
        if cuda.exists():
            lib = ctypes.CDLL(str(cuda))
            lib.ggml_backend_cuda_host_buffer_type.restype = ctypes.c_void_p
            lib.ggml_backend_cuda_host_buffer_type.argtypes = []
            self.pinned_type = lib.ggml_backend_cuda_host_buffer_type()


_host: _GgmlHost | None = None


def _ggml() -> _GgmlHost:
    global _host
    if _host is None:
        _host = _GgmlHost()
    return _host


def cuda_build() -> bool:
    """Whether the installed llama.cpp has the CUDA backend (pinned buffers possible)."""
    return _ggml().pinned_type is not None


class PinnedBuffer:
    """Host memory for KV state blobs: page-locked when llama.cpp has CUDA."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        if self.nbytes <= 0:
            raise ValueError("PinnedBuffer needs a positive size")
        g = _ggml()
        self._buf: int | None = None
        self._np: np.ndarray | None = None
        self.pinned = False
        if g.pinned_type is not None:
            buf = g.base.ggml_backend_buft_alloc_buffer(g.pinned_type, self.nbytes)
            if not buf:
                raise MemoryError(f"could not allocate {self.nbytes} bytes of host memory")
            self._buf = buf
            # ggml falls back to an ordinary CPU buffer when cudaMallocHost fails
            self.pinned = g.base.ggml_backend_buffer_get_type(buf) == g.pinned_type
            self.ptr = int(g.base.ggml_backend_buffer_get_base(buf))
            self.view = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))
        else:
            self._np = np.empty(self.nbytes, dtype=np.uint8)
            self.view = self._np
            self.ptr = int(self._np.ctypes.data)

    def as_uint8_p(self):
        return ctypes.cast(ctypes.c_void_p(self.ptr), ctypes.POINTER(ctypes.c_uint8))

    def close(self) -> None:
        if self._buf is not None:
            self.view = np.empty(0, dtype=np.uint8)
            _ggml().base.ggml_backend_buffer_free(self._buf)
            self._buf = None
        self._np = None

    def __enter__(self) -> "PinnedBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class StagingPool:
    """Reused host buffers for state blobs (see the module docstring)."""

    GRAIN = 1 << 20                      # buffers are whole MiB: a little slack lets them be reused

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self._free: list[PinnedBuffer] = []
        self._lock = threading.Lock()
        self.allocations = 0             # buffers ever allocated (reuse shows as few)
        self.pinned = cuda_build()

    def lend(self, nbytes: int) -> np.ndarray:
        n = max(1, int(nbytes))
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= n]
            buf = min(fits, key=lambda b: b.nbytes) if fits else None
            if buf is not None:
                self._free.remove(buf)
        if buf is None:
            buf = PinnedBuffer(-(-n // self.GRAIN) * self.GRAIN)
            self.allocations += 1
        raw = (ctypes.c_uint8 * n).from_address(buf.ptr)
        raw._kv3d_staging = True         # the mark owns() looks for
        weakref.finalize(raw, self._give_back, buf)   # keeps buf alive while raw lives
        return np.frombuffer(raw, dtype=np.uint8)

    def _give_back(self, buf: PinnedBuffer) -> None:
        with self._lock:
            held = sum(b.nbytes for b in self._free)
            if held + buf.nbytes <= self.max_bytes:
                self._free.append(buf)
                return
        buf.close()

    @staticmethod
    def owns(a: object) -> bool:
        """Whether ``a`` is (a view of) an array :meth:`lend` gave."""
        base = a
        for _ in range(8):
            if getattr(base, "_kv3d_staging", False):
                return True
            if isinstance(base, memoryview):
                base = base.obj
            elif isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            else:
                return False
        return False

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for b in free:
            b.close()


def state_size(backend, seq: int, flags: int = 0) -> int:
    """Bytes the state of ``seq`` needs (with ON_DEVICE: only the host-side header)."""
    return int(L.llama_state_seq_get_size_ext(backend._ctx, seq, flags))


def state_get_into(backend, seq: int, buf: PinnedBuffer, flags: int = 0, size: int | None = None) -> int:
    """Write the state of ``seq`` into ``buf``; returns the bytes written."""
    need = state_size(backend, seq, flags) if size is None else int(size)
    if need > buf.nbytes:
        raise BackendError(f"state of sequence {seq} needs {need} bytes, the buffer has {buf.nbytes}")
    if need == 0:
        return 0
    n = int(L.llama_state_seq_get_data_ext(backend._ctx, buf.as_uint8_p(), need, seq, flags))
    if n != need:
        raise BackendError(f"llama_state_seq_get_data_ext wrote {n} of {need} bytes")
    return n


def state_set_from(backend, seq: int, buf: PinnedBuffer, nbytes: int, flags: int = 0) -> None:
    """Restore ``nbytes`` of ``buf`` (a state blob) into ``seq``."""
    if not 0 < nbytes <= buf.nbytes:
        raise StateRestoreError(f"blob of {nbytes} bytes in a buffer of {buf.nbytes}")
    n = int(L.llama_state_seq_set_data_ext(backend._ctx, buf.as_uint8_p(), int(nbytes), seq, flags))
    if n == 0:
        L.llama_memory_seq_rm(backend._mem, seq, -1, -1)
        raise StateRestoreError(f"llama_state_seq_set_data_ext refused a {nbytes}-byte blob")


class DeviceSnapshots:
    """Device-to-device saves of sequences (``LLAMA_STATE_SEQ_FLAGS_ON_DEVICE``).

    ``save(seq)`` copies the cells of ``seq`` into llama.cpp's device storage for
    that sequence id and returns the small host header that names them;
    ``restore(header, dst)`` copies them into ``dst``. A later ``save`` of the same
    ``seq`` invalidates earlier headers of it (llama.cpp keeps one per id)."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def save(self, seq: int) -> bytes:
        size = state_size(self.backend, seq, ON_DEVICE)
        buf = (ctypes.c_uint8 * size)()
        n = int(L.llama_state_seq_get_data_ext(self.backend._ctx, buf, size, seq, ON_DEVICE))
        if n != size:
            raise BackendError(f"on-device save of sequence {seq} wrote {n} of {size} bytes")
        return bytes(buf)

    def restore(self, header: bytes, dst: int) -> None:
        arr = (ctypes.c_uint8 * len(header)).from_buffer_copy(header)
        n = int(L.llama_state_seq_set_data_ext(self.backend._ctx, arr, len(header), dst, ON_DEVICE))
        if n == 0:
            L.llama_memory_seq_rm(self.backend._mem, dst, -1, -1)
            raise StateRestoreError(f"on-device restore into sequence {dst} refused")
