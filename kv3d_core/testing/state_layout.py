"""The fake backend's state blobs: a :class:`~kv3d_core.contracts.state.StateLayout` of
K/V rows as they are, and a reference for the layout of a backend of one's own.

Blob (little-endian)::

    b"KV3DROWS" | u32 header_bytes | header: JSON, space-padded to a multiple of 8 bytes
      {"n": cells, "k": [K width per layer], "v": [V width per layer],
       "head_dim_k": .., "head_dim_v": .., "extra": {...}}
    positions: n x i32, zero-padded to a multiple of 8 bytes
    every K layer's rows (n x width float16), then every V layer's

Rows are stored as they are, so :func:`parse` returns views into the blob and
:meth:`RowsLayout.allocate` hands out views a codec decodes straight into.
"""

from __future__ import annotations

import copy
import json
import struct
from typing import Callable

import numpy as np

from kv3d_core.contracts.codec import KVArrays
from kv3d_core.contracts.state import Blob, StateLayout
from kv3d_core.errors import StateFormatError

MAGIC = b"KV3DROWS"
NAME = "kv3d-rows"
_HEAD = struct.Struct("<8sI")
MAX_HEADER = 1 << 20


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


class _Writer:
    """:class:`~kv3d_core.contracts.state.StateWriter` over one buffer: every array a view."""

    def __init__(self, buf: np.ndarray, arrays: KVArrays) -> None:
        self._buf, self.arrays, self.nbytes, self.direct = buf, arrays, int(buf.size), True

    def finish(self) -> memoryview:
        return memoryview(self._buf)


class RowsLayout(StateLayout):
    """K/V rows as they are, after a JSON header (module docstring: the blob)."""

    name = NAME

    def _header(self, arrays: KVArrays) -> tuple[bytes, int]:
        head = {"n": arrays.n_cells, "k": [int(a.shape[1]) for a in arrays.k], "v": [int(a.shape[1]) for a in arrays.v],
                "head_dim_k": int(arrays.head_dim_k), "head_dim_v": int(arrays.head_dim_v), "extra": arrays.extra}
        try:
            text = json.dumps(head, separators=(",", ":"), sort_keys=True).encode()
        except (TypeError, ValueError) as exc:
            raise StateFormatError(f"the arrays' extra is not JSON-serializable: {exc}") from exc
        text += b" " * (_pad8(_HEAD.size + len(text)) - _HEAD.size - len(text))
        widths = head["k"] + head["v"]
        return _HEAD.pack(MAGIC, len(text)) + text, _pad8(4 * arrays.n_cells) + 2 * arrays.n_cells * sum(widths)

    def _check(self, arrays: KVArrays) -> None:
        n = arrays.n_cells
        for a in (*arrays.k, *arrays.v):
            if a.ndim != 2 or a.shape[0] != n:
                raise StateFormatError(f"K/V arrays must be [{n}, width], got {a.shape}")

    def _views(self, buf: np.ndarray, off: int, n: int, kw: list[int], vw: list[int],
               readonly: bool) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        pos = buf[off:off + 4 * n].view("<i4")
        off += _pad8(4 * n)
        out: list[list[np.ndarray]] = [[], []]
        for side, widths in enumerate((kw, vw)):
            for w in widths:
                a = buf[off:off + 2 * n * w].view("<f2").reshape(n, w)
                off += 2 * n * w
                out[side].append(a)
        if readonly:
            for a in (pos, *out[0], *out[1]):
                a.flags.writeable = False
        return pos, out[0], out[1]

    def parse(self, blob: Blob) -> KVArrays:
        buf = np.frombuffer(memoryview(blob).cast("B"), np.uint8)
        if buf.size < _HEAD.size:
            raise StateFormatError(f"a {NAME} blob of {buf.size} bytes is too short")
        magic, hlen = _HEAD.unpack_from(buf)
        if magic != MAGIC:
            raise StateFormatError(f"not a {NAME} blob (magic {magic!r})")
        if hlen > MAX_HEADER or _HEAD.size + hlen > buf.size:
            raise StateFormatError(f"header of {hlen} bytes does not fit the blob")
        try:
            head = json.loads(bytes(buf[_HEAD.size:_HEAD.size + hlen]))
            n, kw, vw = int(head["n"]), [int(w) for w in head["k"]], [int(w) for w in head["v"]]
            hk, hv, extra = int(head["head_dim_k"]), int(head["head_dim_v"]), dict(head["extra"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StateFormatError(f"{NAME} header damaged: {exc}") from exc
        if n < 0 or min([*kw, *vw, 1]) < 1 or len(kw) != len(vw):
            raise StateFormatError(f"{NAME} header describes no valid layout")
        off = _HEAD.size + hlen
        if buf.size != off + _pad8(4 * n) + 2 * n * sum(kw + vw):
            raise StateFormatError(f"a {NAME} blob of {buf.size} bytes, its header describes another size")
        pos, k, v = self._views(buf, off, n, kw, vw, readonly=True)
        if n > 1 and not bool(np.all(pos[1:] > pos[:-1])):
            raise StateFormatError("cell positions are not increasing")
        return KVArrays(pos, k, v, hk, hv, extra)

    def build(self, arrays: KVArrays) -> bytes:
        self._check(arrays)
        header, _ = self._header(arrays)
        pos = np.ascontiguousarray(arrays.positions, "<i4").tobytes()
        parts = [header, pos, b"\0" * (_pad8(len(pos)) - len(pos))]
        parts += [np.ascontiguousarray(a, "<f2").tobytes() for a in (*arrays.k, *arrays.v)]
        return b"".join(parts)

    def select(self, arrays: KVArrays, min_pos: int, max_pos: int | None = None) -> KVArrays:
        pos = np.asarray(arrays.positions)
        mask = pos >= int(min_pos)
        if max_pos is not None:
            mask &= pos < int(max_pos)
        keep = np.flatnonzero(mask)
        if keep.size and int(keep[-1]) - int(keep[0]) + 1 == keep.size:
            take: slice | np.ndarray = slice(int(keep[0]), int(keep[-1]) + 1)
        else:
            take = keep
        return KVArrays(np.ascontiguousarray(pos[take], np.int32), [a[take] for a in arrays.k],
                        [a[take] for a in arrays.v], arrays.head_dim_k, arrays.head_dim_v, copy.deepcopy(arrays.extra))

    def concat_layout(self, head: KVArrays, tail: KVArrays) -> KVArrays:
        self._check(head)
        self._check(tail)
        widths = [a.shape[1] for a in (*tail.k, *tail.v)]
        if (head.head_dim_k, head.head_dim_v) != (tail.head_dim_k, tail.head_dim_v) or \
                [a.shape[1] for a in (*head.k, *head.v)] != widths or len(head.k) != len(tail.k):
            raise StateFormatError("head and tail have different K/V layouts")
        if head.n_cells and tail.n_cells and int(np.max(head.positions)) >= int(np.min(tail.positions)):
            raise StateFormatError("the tail's positions do not follow the head's")
        n = head.n_cells + tail.n_cells
        zero = np.broadcast_to(np.float16(0), (n, max(widths, default=0)))
        return KVArrays(np.concatenate([np.asarray(head.positions, np.int32), np.asarray(tail.positions, np.int32)]),
                        [zero[:, :a.shape[1]] for a in tail.k], [zero[:, :a.shape[1]] for a in tail.v],
                        tail.head_dim_k, tail.head_dim_v, copy.deepcopy(tail.extra))

    def allocate(self, template: KVArrays, alloc: Callable[[int], np.ndarray] | None = None) -> _Writer:
        self._check(template)
        header, body = self._header(template)
        total = len(header) + body
        buf = np.empty(total, np.uint8) if alloc is None else alloc(total)
        if buf.dtype != np.uint8 or buf.shape != (total,) or not buf.flags.c_contiguous or not buf.flags.writeable:
            raise StateFormatError(f"the blob's memory must be a writable contiguous uint8 array of {total} bytes")
        buf[:len(header)] = np.frombuffer(header, np.uint8)
        n = template.n_cells
        pos, k, v = self._views(buf, len(header), n, [a.shape[1] for a in template.k],
                                [a.shape[1] for a in template.v], readonly=False)
        pos[:] = template.positions
        buf[len(header) + 4 * n:len(header) + _pad8(4 * n)] = 0
        return _Writer(buf, KVArrays(np.array(pos, np.int32), k, v, template.head_dim_k, template.head_dim_v,
                                     copy.deepcopy(template.extra)))
