"""Reader/writer of llama.cpp per-sequence state blobs (``llama_state_seq_get_data``): the
llama.cpp backend's :class:`~kv3d_core.contracts.state.StateLayout` (:class:`LlamaStateLayout`).

Contract:

- :func:`parse` turns the blob of ONE sequence into :class:`KVArrays` (positions,
  per-layer float16 K and V rows, one row per cell) and :func:`build` turns such
  arrays back into a blob ``llama_state_seq_set_data`` accepts. ``build(parse(b))``
  is ``b`` byte for byte.
- :func:`select` keeps the cells at positions ``>= min_pos`` (a session's delta past
  its family prefix). Rebuilding "shared prefix + own suffix" is: ``set_data`` the
  suffix blob into the destination (which first drops every cell it had), then
  ``seq_cp(snapshot, dst, 0, prefix_len)``.
- Anything not understood raises :class:`~kv3d_core.errors.StateFormatError` saying
  what was unexpected; nothing here crashes the process or returns wrong-shaped arrays.
  The caller falls back to treating the blob as opaque (or to recompute).
- :func:`allocate` is :func:`build` without the copy: it lays out the blob of a
  layout (a :class:`KVArrays` whose values do not matter yet) with every header
  written, and hands out writable K/V arrays -- views into the blob wherever it
  stores rows as they are -- for a codec to decode into; :meth:`BlobWriter.finish`
  then returns the blob, byte for byte what :func:`build` returns for the filled
  arrays.
- Vectorized: cell records are read with a structured dtype, K/V rows are
  ``np.frombuffer`` views (read-only, zero-copy) into the blob when V is not
  transposed; do not mutate a ``bytearray`` blob while its arrays are in use.

Layout (little-endian), from the vendored llama.cpp of llama-cpp-python 0.3.36
(``llama-context.cpp`` ``state_seq_get_data``, ``llama-kv-cache.cpp``
``state_write``/``state_write_meta``/``state_write_data``, ``llama-kv-cache-iswa.cpp``)::

    u32 magic = 0xaf143cd8 | i32 seq_id
    one SECTION per KV cache of the model's memory (1; 2 for iSWA: base cache, then SWA cache):
      u32 n_stream                                  (1 with kv_unified; n_seq_max otherwise)
      per stream: u32 cell_count                    (0: nothing else for this stream)
        cell_count x {i32 pos, u32 n_seq_id (=1), i32 seq_id}     (no cell ext: M-RoPE/PLE refused)
        u32 v_trans | u32 n_layer
        n_layer x {i32 k_type, u64 k_row_bytes, cell_count rows}
        v_trans == 0: n_layer x {i32 v_type, u64 v_row_bytes, cell_count rows}
        v_trans == 1: n_layer x {i32 v_type, u32 v_elem_bytes, u32 n_embd_v_gqa,
                                 n_embd_v_gqa x cell_count elements (transposed)}

Only f16 K/V (ggml type 1) is read. Sliding-window models (iSWA, e.g. gemma3) write
two sections; the SWA section holds only the cells inside the window, a subset of
the base section's cells. Both are returned as one :class:`KVArrays`: the cells of
the first section, the base layers followed by the SWA layers; SWA layer rows of
cells the SWA section does not hold are zero, and ``extra["sections"][i]["rows"]``
records which rows each section holds (``None``: all of them, in order; else
``[[start, stop], ...]`` runs of row indices, in the section's cell order).
"""

from __future__ import annotations

import copy
import struct
from typing import Any, Callable

import numpy as np

from kv3d_core.contracts.codec import KVArrays
from kv3d_core.contracts.state import StateLayout
from kv3d_core.errors import StateFormatError

MAGIC = 0xAF143CD8
LAYOUT = "llama.cpp-seq-state"
LAYOUT_VERSION = 1
GGML_TYPE_F16 = 1
LLAMA_MAX_SEQ = 256
MAX_SECTIONS = 2  # llama_kv_cache: 1, llama_kv_cache_iswa: 2
MAX_LAYERS = 4096

_CELL = np.dtype([("pos", "<i4"), ("n_seq_id", "<u4"), ("seq_id", "<i4")])
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_TYPE_ROW = struct.Struct("<iQ")
_TYPE_EL_N = struct.Struct("<iII")
_GGML_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 30: "bf16"}


def _type_name(t: int) -> str:
    return f"{t} ({_GGML_NAMES[t]})" if t in _GGML_NAMES else str(t)


class _Reader:
    """Bounds-checked little-endian reader over a memoryview."""

    def __init__(self, mv: memoryview) -> None:
        self.mv = mv
        self.off = 0
        self.size = len(mv)

    def left(self) -> int:
        return self.size - self.off

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise StateFormatError(
                f"state blob truncated: {what} needs {n} bytes at offset {self.off}, only {self.left()} left")

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        self.need(st.size, what)
        out = st.unpack_from(self.mv, self.off)
        self.off += st.size
        return out

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)[0]

    def i32(self, what: str) -> int:
        return self.unpack(_I32, what)[0]

    def array(self, dtype: np.dtype | str, count: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        self.need(count * dt.itemsize, what)
        a = np.frombuffer(self.mv, dtype=dt, count=count, offset=self.off)
        self.off += count * dt.itemsize
        if a.flags.writeable:
            a.flags.writeable = False
        return a


class _Section:
    """The cells of one KV cache (one section of the blob)."""

    def __init__(self, n_stream: int) -> None:
        self.n_stream = n_stream
        self.stream = 0
        self.positions = np.zeros(0, np.int32)
        self.v_trans: int | None = None
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    @property
    def n_cells(self) -> int:
        return int(self.positions.shape[0])


def _read_section(r: _Reader, index: int, seq_id: int, head_dim_k: int, head_dim_v: int) -> _Section:
    where = f"section {index}"
    n_stream = r.u32(f"{where} stream count")
    if not 1 <= n_stream <= LLAMA_MAX_SEQ:
        raise StateFormatError(f"{where}: stream count {n_stream} outside 1..{LLAMA_MAX_SEQ}")
    sec = _Section(n_stream)
    seen = False
    for s in range(n_stream):
        w = f"{where} stream {s}"
        n = r.u32(f"{w} cell count")
        if n == 0:
            continue
        if seen:
            raise StateFormatError(f"{where}: cells in more than one stream; one sequence lives in one stream")
        seen = True
        sec.stream = s
        if n * _CELL.itemsize > r.left():
            raise StateFormatError(
                f"{w}: cell count {n} needs {n * _CELL.itemsize} bytes of cell records, only {r.left()} left")
        cells = r.array(_CELL, n, f"{w} cell records")
        bad = np.flatnonzero(cells["n_seq_id"] != 1)
        if bad.size:
            i = int(bad[0])
            raise StateFormatError(
                f"{w}: cell {i} has n_seq_id={int(cells['n_seq_id'][i])}; only one-sequence records without "
                "cell extensions (n_seq_id=1, no M-RoPE/PLE ext) are understood")
        bad = np.flatnonzero(cells["seq_id"] != seq_id)
        if bad.size:
            i = int(bad[0])
            raise StateFormatError(
                f"{w}: cell {i} belongs to sequence {int(cells['seq_id'][i])}, the blob is of sequence {seq_id}")
        pos = cells["pos"].astype(np.int32)
        if pos.size and int(pos.min()) < 0:
            raise StateFormatError(f"{w}: negative cell position {int(pos.min())}")
        sec.positions = pos
        v_trans = r.u32(f"{w} v_trans")
        if v_trans not in (0, 1):
            raise StateFormatError(f"{w}: v_trans={v_trans}, expected 0 or 1")
        sec.v_trans = v_trans
        n_layer = r.u32(f"{w} layer count")
        if not 1 <= n_layer <= MAX_LAYERS:
            raise StateFormatError(f"{w}: layer count {n_layer} outside 1..{MAX_LAYERS}")
        for il in range(n_layer):
            t, row = r.unpack(_TYPE_ROW, f"{w} K header of layer {il}")
            if t != GGML_TYPE_F16:
                raise StateFormatError(f"{w}: K of layer {il} has ggml type {_type_name(t)}; only f16 is read")
            if row <= 0 or row % (2 * head_dim_k):
                raise StateFormatError(
                    f"{w}: K row of layer {il} is {row} bytes, not a multiple of head_dim_k={head_dim_k} f16 values")
            width = row // 2
            sec.k.append(r.array("<f2", n * width, f"{w} K rows of layer {il}").reshape(n, width))
        for il in range(n_layer):
            if v_trans == 0:
                t, row = r.unpack(_TYPE_ROW, f"{w} V header of layer {il}")
                if t != GGML_TYPE_F16:
                    raise StateFormatError(f"{w}: V of layer {il} has ggml type {_type_name(t)}; only f16 is read")
                if row <= 0 or row % (2 * head_dim_v):
                    raise StateFormatError(
                        f"{w}: V row of layer {il} is {row} bytes, not a multiple of head_dim_v={head_dim_v} f16 values")
                width = row // 2
                sec.v.append(r.array("<f2", n * width, f"{w} V rows of layer {il}").reshape(n, width))
            else:
                t, el, width = r.unpack(_TYPE_EL_N, f"{w} transposed V header of layer {il}")
                if t != GGML_TYPE_F16:
                    raise StateFormatError(f"{w}: V of layer {il} has ggml type {_type_name(t)}; only f16 is read")
                if el != 2:
                    raise StateFormatError(f"{w}: V element of layer {il} is {el} bytes, f16 has 2")
                if width <= 0 or width % head_dim_v:
                    raise StateFormatError(
                        f"{w}: V width of layer {il} is {width}, not a multiple of head_dim_v={head_dim_v}")
                vt = r.array("<f2", n * width, f"{w} transposed V of layer {il}").reshape(width, n)
                sec.v.append(np.ascontiguousarray(vt.T))
    return sec


def _runs(idx: np.ndarray) -> list[list[int]]:
    """Row indices as ``[[start, stop], ...]`` runs of consecutive values (order kept)."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], breaks))]
    stops = idx[np.concatenate((breaks - 1, [idx.size - 1]))] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def _expand(runs: Any, n_cells: int, what: str) -> np.ndarray:
    """Inverse of :func:`_runs`, checked against ``n_cells``."""
    try:
        pairs = [(int(a), int(b)) for a, b in runs]
    except (TypeError, ValueError) as exc:
        raise StateFormatError(f"{what}: rows are not [start, stop] runs: {exc}") from None
    if any(not 0 <= a < b <= n_cells for a, b in pairs):
        raise StateFormatError(f"{what}: a row run lies outside 0..{n_cells}")
    if not pairs:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(a, b) for a, b in pairs])


def _map_rows(base_pos: np.ndarray, pos: np.ndarray, where: str) -> np.ndarray:
    """Row of ``base_pos`` holding each position of ``pos`` (all must be found, once)."""
    order = np.argsort(base_pos, kind="stable")
    sorted_pos = base_pos[order]
    if sorted_pos.size > 1 and bool(np.any(sorted_pos[1:] == sorted_pos[:-1])):
        raise StateFormatError(f"{where}: the first section repeats a position; cannot line up the sections")
    at = np.searchsorted(sorted_pos, pos)
    ok = at < sorted_pos.size
    ok[ok] = sorted_pos[at[ok]] == pos[ok]
    if not bool(ok.all()):
        p = int(pos[np.flatnonzero(~ok)[0]])
        raise StateFormatError(f"{where}: holds position {p}, which the first section does not")
    rows = order[at]
    if np.unique(rows).size != rows.size:
        raise StateFormatError(f"{where}: repeats a position")
    return rows


def parse(blob: bytes | bytearray | memoryview, *, head_dim_k: int, head_dim_v: int,
          n_layer: int | None = None) -> KVArrays:
    """The cells of one sequence's state blob as :class:`KVArrays`.

    ``n_layer``, when given, is the number of KV layers the model has (all sections
    together); a blob holding another number is refused (this also catches an iSWA
    blob cut exactly between its two sections).
    """
    if head_dim_k <= 0 or head_dim_v <= 0:
        raise StateFormatError(f"head dims must be positive (got {head_dim_k}, {head_dim_v})")
    try:
        mv = memoryview(blob).cast("B")
    except (TypeError, ValueError) as exc:
        raise StateFormatError(f"state blob is not a contiguous byte buffer: {exc}") from None
    r = _Reader(mv)
    magic = r.u32("magic")
    if magic != MAGIC:
        raise StateFormatError(f"state blob magic is {magic:#010x}, expected {MAGIC:#010x}")
    seq_id = r.i32("sequence id")
    if not 0 <= seq_id < LLAMA_MAX_SEQ:
        raise StateFormatError(f"state blob is of sequence {seq_id}, outside 0..{LLAMA_MAX_SEQ - 1}")
    sections: list[_Section] = []
    while r.left() > 0:
        if len(sections) == MAX_SECTIONS:
            raise StateFormatError(
                f"{r.left()} trailing bytes after {MAX_SECTIONS} KV cache sections at offset {r.off}")
        sec = _read_section(r, len(sections), seq_id, head_dim_k, head_dim_v)
        if sections and sec.n_stream != sections[0].n_stream:
            raise StateFormatError(
                f"section {len(sections)} has {sec.n_stream} streams, section 0 has {sections[0].n_stream}")
        sections.append(sec)
    if not sections:
        raise StateFormatError("state blob holds no KV cache section")
    first = sections[0]
    for i, sec in enumerate(sections[1:], 1):
        if (sec.n_cells == 0) != (first.n_cells == 0):
            raise StateFormatError(
                f"section {i} holds {sec.n_cells} cells, section 0 holds {first.n_cells}: "
                "a sliding-window section is empty exactly when the base one is (trailing bytes?)")
    n_layers = sum(len(s.k) for s in sections)
    if n_layer is not None and first.n_cells and n_layers != n_layer:
        raise StateFormatError(f"state blob holds {n_layers} layers, the model has {n_layer}")

    n = first.n_cells
    ks: list[np.ndarray] = []
    vs: list[np.ndarray] = []
    meta: list[dict] = []
    for i, sec in enumerate(sections):
        entry: dict = {"stream": sec.stream, "v_trans": sec.v_trans, "n_layer": len(sec.k), "rows": None}
        if i == 0 or sec.n_cells == 0 or np.array_equal(sec.positions, first.positions):
            ks += sec.k
            vs += sec.v
        else:
            rows = _map_rows(first.positions, sec.positions, f"section {i}")
            entry["rows"] = _runs(rows)
            for src, dst in ((sec.k, ks), (sec.v, vs)):
                for a in src:
                    full = np.zeros((n, a.shape[1]), np.float16)
                    full[rows] = a
                    dst.append(full)
        meta.append(entry)
    extra = {"layout": LAYOUT, "version": LAYOUT_VERSION, "seq_id": seq_id,
             "n_stream": first.n_stream, "sections": meta}
    return KVArrays(first.positions, ks, vs, int(head_dim_k), int(head_dim_v), extra)


def _layout(arrays: KVArrays) -> tuple[int, int, list[dict]]:
    """(seq_id, n_stream, sections) of ``arrays.extra``, checked."""
    extra = arrays.extra or {}
    if extra.get("layout") != LAYOUT or extra.get("version") != LAYOUT_VERSION:
        raise StateFormatError(
            f"KVArrays.extra does not describe a {LAYOUT} v{LAYOUT_VERSION} blob "
            f"(layout={extra.get('layout')!r}, version={extra.get('version')!r})")
    try:
        seq_id = int(extra["seq_id"])
        n_stream = int(extra["n_stream"])
        sections = list(extra["sections"])
        for s in sections:
            int(s["stream"]), int(s["n_layer"]), s["v_trans"], s["rows"]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFormatError(f"KVArrays.extra layout is incomplete: {exc!r}") from None
    if not 0 <= seq_id < LLAMA_MAX_SEQ or not 1 <= n_stream <= LLAMA_MAX_SEQ:
        raise StateFormatError(f"KVArrays.extra has seq_id={seq_id}, n_stream={n_stream}")
    if not 1 <= len(sections) <= MAX_SECTIONS:
        raise StateFormatError(f"KVArrays.extra has {len(sections)} sections, expected 1..{MAX_SECTIONS}")
    return seq_id, n_stream, sections


def _check_arrays(arrays: KVArrays, sections: list[dict]) -> int:
    n = arrays.n_cells
    pos = arrays.positions
    if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer):
        raise StateFormatError(f"positions must be a 1-D integer array, got {pos.dtype} {pos.shape}")
    n_layer = sum(int(s["n_layer"]) for s in sections)
    if len(arrays.k) != n_layer or len(arrays.v) != n_layer:
        raise StateFormatError(
            f"{len(arrays.k)} K and {len(arrays.v)} V layers, the layout has {n_layer}")
    for name, layers, hd in (("K", arrays.k, arrays.head_dim_k), ("V", arrays.v, arrays.head_dim_v)):
        for il, a in enumerate(layers):
            if a.dtype != np.float16 or a.ndim != 2 or a.shape[0] != n or a.shape[1] <= 0 or a.shape[1] % hd:
                raise StateFormatError(
                    f"{name} of layer {il} is {a.dtype} {a.shape}; expected float16 ({n}, k*{hd})")
    return n


def _plan(arrays: KVArrays) -> tuple[int, int, np.ndarray, int, list[tuple]]:
    """The checked layout that :func:`build` and :func:`allocate` write: seq id, stream
    count, positions, cell count, and per section ``(first layer, n_layer, rows,
    cells, stream, v_trans)`` (``rows`` None: every cell). Raises StateFormatError."""
    seq_id, n_stream, sections = _layout(arrays)
    n = _check_arrays(arrays, sections)
    pos_all = np.asarray(arrays.positions)
    if n and (int(pos_all.min()) < 0 or int(pos_all.max()) >= 2**31):
        raise StateFormatError("cell position outside 0..2**31-1")
    plan = []
    li = 0
    for i, s in enumerate(sections):
        nl = int(s["n_layer"])
        rows = None if s["rows"] is None else _expand(s["rows"], n, f"section {i}")
        cnt = n if rows is None else int(rows.size)
        stream = int(s["stream"])
        if not 0 <= stream < n_stream:
            raise StateFormatError(f"section {i}: stream {stream} outside 0..{n_stream - 1}")
        if cnt and (nl == 0 or s["v_trans"] not in (0, 1)):
            raise StateFormatError(f"section {i}: {cnt} cells but n_layer={nl}, v_trans={s['v_trans']!r}")
        plan.append((li, nl, rows, cnt, stream, int(s["v_trans"]) if cnt else 0))
        li += nl
    return seq_id, n_stream, pos_all, n, plan


def _cell_records(pos_all: np.ndarray, rows: np.ndarray | None, cnt: int, seq_id: int) -> np.ndarray:
    cells = np.empty(cnt, _CELL)
    cells["pos"] = pos_all if rows is None else pos_all[rows]
    cells["n_seq_id"] = 1
    cells["seq_id"] = seq_id
    return cells


def build(arrays: KVArrays) -> bytes:
    """The ``llama_state_seq_set_data`` blob holding ``arrays``' cells."""
    seq_id, n_stream, pos_all, n, plan = _plan(arrays)
    parts: list[Any] = [struct.pack("<Ii", MAGIC, seq_id)]
    for li, nl, rows, cnt, stream, v_trans in plan:
        ks, vs = arrays.k[li:li + nl], arrays.v[li:li + nl]
        if cnt == 0:
            parts.append(struct.pack(f"<{1 + n_stream}I", n_stream, *([0] * n_stream)))
            continue
        parts.append(struct.pack(f"<{1 + stream}I", n_stream, *([0] * stream)))
        parts.append(_U32.pack(cnt))
        parts.append(_cell_records(pos_all, rows, cnt, seq_id).data)
        parts.append(struct.pack("<II", v_trans, nl))
        for a in ks:
            parts.append(_TYPE_ROW.pack(GGML_TYPE_F16, 2 * a.shape[1]))
            parts.append(_rows_bytes(a, rows, False))
        for a in vs:
            if v_trans:
                parts.append(_TYPE_EL_N.pack(GGML_TYPE_F16, 2, a.shape[1]))
            else:
                parts.append(_TYPE_ROW.pack(GGML_TYPE_F16, 2 * a.shape[1]))
            parts.append(_rows_bytes(a, rows, bool(v_trans)))
        parts.append(struct.pack(f"<{n_stream - 1 - stream}I", *([0] * (n_stream - 1 - stream))))
    return b"".join(parts)


def _rows_bytes(a: np.ndarray, rows: np.ndarray | None, transposed: bool) -> memoryview:
    """The f16 bytes of ``a``'s rows (``None``: all), row-major or transposed; no copy
    when ``a`` is already a contiguous little-endian f16 array and nothing is selected."""
    src = a if rows is None else a[rows]
    if transposed:
        src = src.T
    return np.ascontiguousarray(src, dtype="<f2").data.cast("B")


class BlobWriter:
    """A ``llama_state_seq_set_data`` blob filled in place (made by :func:`allocate`).

    - ``arrays``: the layout's :class:`KVArrays` (its positions, head dims and
      ``extra``) with writable, C-contiguous float16 ``[n_cells, width]`` K/V arrays:
      views into the blob where the blob stores a layer's rows as they are (V not
      transposed, the section holds every cell), else scratch arrays that
      :meth:`finish` copies in (transposed V; a sliding-window section's subset of
      rows; a section holding no cell at all has scratch arrays nothing reads).
      Every value must be written before :meth:`finish`.
    - ``nbytes``: the blob's size.
    """

    def __init__(self, buf: np.ndarray, arrays: KVArrays,
                 deferred: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]], direct: bool) -> None:
        self._buf = buf
        self.arrays = arrays
        self._deferred = deferred
        self.nbytes = int(buf.size)
        #: True when every K/V array is a view into the blob (:meth:`finish` copies nothing)
        self.direct = direct

    def finish(self) -> memoryview:
        """The blob (a bytes-like view of the buffer; the arrays keep pointing into it)."""
        for dst, src, rows, transposed in self._deferred:
            part = src if rows is None else src[rows]
            np.copyto(dst, part.T if transposed else part)
        return memoryview(self._buf)


def concat_layout(head: KVArrays, tail: KVArrays) -> KVArrays:
    """The layout of ``head``'s cells followed by ``tail``'s (one sequence: a family prefix
    and a session's delta past it), as a template for :func:`allocate`: positions and
    ``extra`` are real, K/V are zero-stride placeholders. Both must have the same layout of
    one section (a KV stream per sequence restores a session as one blob; sliding-window
    models, whose second section keeps only a window of cells, are not joined here).
    Raises :class:`StateFormatError`."""
    _, n_stream_h, sec_h = _layout(head)
    _, n_stream_t, sec_t = _layout(tail)
    _check_arrays(head, sec_h)
    _check_arrays(tail, sec_t)
    if len(sec_h) != 1 or len(sec_t) != 1:
        raise StateFormatError("only single-section layouts can be joined")
    if n_stream_h != n_stream_t or sec_h[0]["v_trans"] != sec_t[0]["v_trans"] or \
            sec_h[0]["n_layer"] != sec_t[0]["n_layer"]:
        raise StateFormatError("head and tail have different layouts")
    if (head.head_dim_k, head.head_dim_v) != (tail.head_dim_k, tail.head_dim_v) or \
            [a.shape[1] for a in head.k + head.v] != [a.shape[1] for a in tail.k + tail.v]:
        raise StateFormatError("head and tail have different K/V widths")
    if head.n_cells and tail.n_cells and int(np.max(head.positions)) >= int(np.min(tail.positions)):
        raise StateFormatError("the tail's positions do not follow the head's")
    n = head.n_cells + tail.n_cells
    zero = np.broadcast_to(np.float16(0), (n, max(a.shape[1] for a in head.k + head.v)))
    extra = copy.deepcopy(tail.extra)
    extra["sections"][0]["rows"] = None
    return KVArrays(np.concatenate([np.asarray(head.positions, np.int32), np.asarray(tail.positions, np.int32)]),
                    [zero[:, :a.shape[1]] for a in tail.k], [zero[:, :a.shape[1]] for a in tail.v],
                    tail.head_dim_k, tail.head_dim_v, extra)


def allocate(template: KVArrays, alloc: Callable[[int], np.ndarray] | None = None) -> BlobWriter:
    """The blob :func:`build` would make for ``template``'s layout (positions, K/V
    shapes, head dims, ``extra``; the K/V values are not read -- zero-stride
    placeholders such as ``np.broadcast_to(np.float16(0), shape)`` will do), with
    every header and cell record written and the K/V rows left for the caller to
    fill through :attr:`BlobWriter.arrays`. ``alloc(nbytes)`` gives the blob's memory
    (a C-contiguous uint8 array, e.g. the backend's
    :meth:`~kv3d_core.contracts.backend.ExecutionBackend.state_buffer`); default: a
    fresh numpy array. Raises :class:`StateFormatError` where :func:`build` would."""
    seq_id, n_stream, pos_all, n, plan = _plan(template)

    # the blob as a list of header bytes and row slots (K/V, layer, rows, transposed,
    # width, cell count), as build() writes it
    parts: list[Any] = [struct.pack("<Ii", MAGIC, seq_id)]
    for first, nl, rows, cnt, stream, v_trans in plan:
        li = first + nl
        if cnt == 0:
            parts.append(struct.pack(f"<{1 + n_stream}I", n_stream, *([0] * n_stream)))
            continue
        parts += [struct.pack(f"<{2 + stream}I", n_stream, *([0] * stream), cnt),
                  _cell_records(pos_all, rows, cnt, seq_id).tobytes(), struct.pack("<II", v_trans, nl)]
        for il in range(first, li):
            w = int(template.k[il].shape[1])
            parts += [_TYPE_ROW.pack(GGML_TYPE_F16, 2 * w), ("k", il, rows, False, w, cnt)]
        for il in range(first, li):
            w = int(template.v[il].shape[1])
            parts += [_TYPE_EL_N.pack(GGML_TYPE_F16, 2, w) if v_trans else _TYPE_ROW.pack(GGML_TYPE_F16, 2 * w),
                      ("v", il, rows, bool(v_trans), w, cnt)]
        parts.append(struct.pack(f"<{n_stream - 1 - stream}I", *([0] * (n_stream - 1 - stream))))

    total = sum(len(p) if type(p) is bytes else 2 * p[4] * p[5] for p in parts)
    buf = np.empty(total, np.uint8) if alloc is None else alloc(total)
    if buf.dtype != np.uint8 or buf.shape != (total,) or not buf.flags.c_contiguous or not buf.flags.writeable:
        raise StateFormatError(f"the blob's memory must be a writable contiguous uint8 array of {total} bytes")
    mv = memoryview(buf)
    k: list[np.ndarray | None] = [None] * len(template.k)
    v: list[np.ndarray | None] = [None] * len(template.v)
    deferred: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]] = []
    off = 0
    for p in parts:
        if type(p) is bytes:
            mv[off:off + len(p)] = p
            off += len(p)
            continue
        kind, il, rows, transposed, w, cnt = p
        region = buf[off:off + 2 * cnt * w].view("<f2")
        off += 2 * cnt * w
        if rows is None and not transposed:
            arr = region.reshape(n, w)
        else:
            arr = np.empty((n, w), np.float16)
            deferred.append((region.reshape(w, cnt) if transposed else region.reshape(cnt, w), arr, rows, transposed))
        (k if kind == "k" else v)[il] = arr
    assert off == total
    direct = not deferred
    for layers, tmpl in ((k, template.k), (v, template.v)):
        for il, a in enumerate(layers):
            if a is None:         # a section that holds none of the cells: the blob has no rows for it
                layers[il] = np.empty(tmpl[il].shape, np.float16)
                direct = direct and n == 0
    arrays = KVArrays(np.ascontiguousarray(pos_all, dtype=np.int32), k, v, template.head_dim_k,
                      template.head_dim_v, copy.deepcopy(template.extra))
    return BlobWriter(buf, arrays, deferred, direct)


def select(arrays: KVArrays, min_pos: int, max_pos: int | None = None) -> KVArrays:
    """Only the cells at positions ``>= min_pos`` (and ``< max_pos`` when given; order
    kept; arrays are views when the kept cells are one contiguous run of rows)."""
    seq_id, n_stream, sections = _layout(arrays)
    n = _check_arrays(arrays, sections)
    pos = np.asarray(arrays.positions)
    mask = pos >= int(min_pos)
    if max_pos is not None:
        mask &= pos < int(max_pos)
    keep = np.flatnonzero(mask)
    if keep.size == n:
        return KVArrays(arrays.positions, list(arrays.k), list(arrays.v), arrays.head_dim_k,
                        arrays.head_dim_v, copy.deepcopy(arrays.extra))
    if keep.size and int(keep[-1]) - int(keep[0]) + 1 == keep.size:
        take: slice | np.ndarray = slice(int(keep[0]), int(keep[-1]) + 1)
    else:
        take = keep
    new_index = np.full(n, -1, np.int64)
    new_index[keep] = np.arange(keep.size)
    extra = copy.deepcopy(arrays.extra)
    for i, s in enumerate(extra["sections"]):
        if s["rows"] is None:
            continue
        old = _expand(s["rows"], n, f"section {i}")
        mapped = new_index[old]
        mapped = mapped[mapped >= 0]
        s["rows"] = None if np.array_equal(mapped, np.arange(keep.size)) else _runs(mapped)
    return KVArrays(
        np.ascontiguousarray(arrays.positions[take], dtype=np.int32),
        [a[take] for a in arrays.k],
        [a[take] for a in arrays.v],
        arrays.head_dim_k, arrays.head_dim_v, extra,
    )


class LlamaStateLayout(StateLayout):
    """This module as the backend's :class:`~kv3d_core.contracts.state.StateLayout`: the
    blobs of one model (its head dims and KV layer count, checked on every parse)."""

    name = LAYOUT

    def __init__(self, *, head_dim_k: int, head_dim_v: int, n_layer: int) -> None:
        self.head_dim_k, self.head_dim_v, self.n_layer = int(head_dim_k), int(head_dim_v), int(n_layer)

    def parse(self, blob: bytes | bytearray | memoryview) -> KVArrays:
        return parse(blob, head_dim_k=self.head_dim_k, head_dim_v=self.head_dim_v, n_layer=self.n_layer)

    def build(self, arrays: KVArrays) -> bytes:
        return build(arrays)

    def select(self, arrays: KVArrays, min_pos: int, max_pos: int | None = None) -> KVArrays:
        return select(arrays, min_pos, max_pos)

    def cut(self, arrays: KVArrays, n: int) -> KVArrays:
        """:meth:`StateLayout.cut`; a sliding-window model's state (two sections) only
        while it holds no position past ``n``: its window section no longer holds the
        cells before ``n`` that a sequence stopped at ``n`` would."""
        if len(arrays.extra.get("sections", ())) != 1 and arrays.n_cells and int(np.max(arrays.positions)) >= n:
            raise StateFormatError("a sliding-window state cannot be cut before its end")
        return super().cut(arrays, n)

    def concat_layout(self, head: KVArrays, tail: KVArrays) -> KVArrays:
        return concat_layout(head, tail)

    def allocate(self, template: KVArrays, alloc: Callable[[int], np.ndarray] | None = None) -> BlobWriter:
        return allocate(template, alloc)
