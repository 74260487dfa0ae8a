"""Conformance tests of a backend's state layout, :class:`~kv3d_core.contracts.state.StateLayout`.

Subclass :class:`StateLayoutContract` and provide two fixtures: ``layout`` (the
backend's :attr:`~kv3d_core.contracts.ExecutionBackend.state_layout`) and ``blob`` (a
state blob of one sequence from that backend, holding positions ``0 .. n-1`` for some
``n >= 8``, e.g. ``backend.seq_state_get(seq)`` after decoding a prompt).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kv3d_core.contracts.codec import KVArrays
from kv3d_core.contracts.state import StateLayout
from kv3d_core.errors import StateFormatError


def _values(a: KVArrays) -> list[np.ndarray]:
    return [np.asarray(x) for x in (*a.k, *a.v)]


def _same(a: KVArrays, b: KVArrays) -> bool:
    return (np.array_equal(a.positions, b.positions) and len(a.k) == len(b.k)
            and all(np.array_equal(x, y) for x, y in zip(_values(a), _values(b))))


class StateLayoutContract:
    """The :class:`~kv3d_core.contracts.state.StateLayout` contract (fixtures ``layout``
    and ``blob``: see the module docstring).

    Class attribute:

    - ``joins`` (default True): :meth:`~kv3d_core.contracts.state.StateLayout.concat_layout`
      joins a prefix and its delta. False for a layout that cannot (a sliding-window
      model's two sections): it must then raise ``StateFormatError``.
    """

    joins: bool = True

    @pytest.fixture
    def arrays(self, layout: StateLayout, blob) -> KVArrays:
        a = layout.parse(blob)
        assert a.n_cells >= 8 and a.positions.tolist() == list(range(a.n_cells)), \
            "the blob fixture must hold positions 0 .. n-1, n >= 8"
        return a

    def test_is_a_state_layout_with_a_name(self, layout):
        assert isinstance(layout, StateLayout) and isinstance(layout.name, str) and layout.name

    def test_parse_gives_float16_rows_and_build_gives_the_blob_back(self, layout, blob, arrays):
        assert arrays.positions.dtype == np.int32 and len(arrays.k) == len(arrays.v) >= 1
        for x in _values(arrays):
            assert x.dtype == np.float16 and x.ndim == 2 and x.shape[0] == arrays.n_cells
        assert all(a.shape[1] % arrays.head_dim_k == 0 for a in arrays.k)
        assert all(a.shape[1] % arrays.head_dim_v == 0 for a in arrays.v)
        assert bytes(layout.build(arrays)) == bytes(blob)

    def test_select_keeps_the_cells_asked_for_in_order(self, layout, arrays):
        n = arrays.n_cells
        tail = layout.select(arrays, n // 2)
        assert tail.positions.tolist() == list(range(n // 2, n))
        assert all(np.array_equal(t, x[n // 2:]) for t, x in zip(_values(tail), _values(arrays)))
        mid = layout.select(arrays, 2, n - 2)
        assert mid.positions.tolist() == list(range(2, n - 2))
        assert layout.select(arrays, n).n_cells == 0
        assert _same(layout.parse(layout.build(tail)), tail)       # a delta is a state of its own
        assert layout.parse(layout.build(layout.select(arrays, n))).n_cells == 0

    def test_cut_gives_a_prefix_and_refuses_positions_it_does_not_hold(self, layout, arrays):
        n = arrays.n_cells
        whole = layout.cut(arrays, n)
        assert _same(whole, arrays)
        with pytest.raises(StateFormatError):
            layout.cut(arrays, n + 1)
        with pytest.raises(StateFormatError):
            layout.cut(layout.select(arrays, 1), n)

    def test_allocate_then_fill_is_build(self, layout, arrays):
        zero = np.broadcast_to(np.float16(0), (arrays.n_cells, max(x.shape[1] for x in _values(arrays))))
        template = KVArrays(arrays.positions, [zero[:, :a.shape[1]] for a in arrays.k],
                            [zero[:, :a.shape[1]] for a in arrays.v], arrays.head_dim_k, arrays.head_dim_v,
                            arrays.extra)
        given: list[np.ndarray] = []
        w = layout.allocate(template, lambda nbytes: given.append(np.empty(nbytes, np.uint8)) or given[-1])
        assert len(given) == 1 and w.nbytes == given[0].size
        assert w.arrays.positions.tolist() == arrays.positions.tolist()
        for dst, src in zip(_values(w.arrays), _values(arrays)):
            assert dst.flags.writeable and dst.flags.c_contiguous and dst.shape == src.shape
            dst[...] = src
        assert bytes(w.finish()) == bytes(layout.build(arrays))

    def test_concat_layout_joins_a_prefix_and_its_delta(self, layout, arrays):
        n = arrays.n_cells
        if not self.joins:
            with pytest.raises(StateFormatError):
                layout.concat_layout(layout.select(arrays, 0, n // 2), layout.select(arrays, n // 2))
            return
        head, tail = layout.cut(arrays, n // 2), layout.select(arrays, n // 2)
        w = layout.allocate(layout.concat_layout(head, tail))
        for dst, a, b in zip(_values(w.arrays), _values(head), _values(tail)):
            dst[:n // 2], dst[n // 2:] = a, b
        assert _same(layout.parse(w.finish()), arrays)
        with pytest.raises(StateFormatError):
            layout.concat_layout(tail, head)                         # positions must follow

    def test_damaged_blobs_raise_state_format_error(self, layout, blob):
        raw = bytes(blob)
        for bad in (b"", b"\0" * 7, raw[:len(raw) // 2], raw[:-1], raw + b"\0", b"\xff" * 64):
            with pytest.raises(StateFormatError):
                layout.parse(bad)

    def test_parse_is_thread_safe(self, layout, blob, arrays):
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(20):
                    assert _same(layout.parse(blob), arrays)
            except BaseException as exc:      # reported below
                errors.append(exc)
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
