"""Contract of a backend's state layout: how the per-sequence state blob of
:meth:`~kv3d_core.contracts.backend.ExecutionBackend.seq_state_get` maps to
:class:`~kv3d_core.contracts.codec.KVArrays` and back.

The core never reads a blob itself. It asks the backend for its layout
(:attr:`~kv3d_core.contracts.backend.ExecutionBackend.state_layout`) and works on
K/V arrays: a session's delta is ``select(parse(blob), n_prefix)``, a restore is
``allocate`` + a codec decoding into the writer's arrays + ``finish``. A backend
whose state is not K/V rows (or not understood) has no layout (``None``): the core
then stores its blobs whole, compressed, and restores them as they are (no shared
prefix, no delta codec), counted in ``kv3d_codec_fallback_total``.

The llama.cpp layout lives in the llama.cpp backend plugin
(``kv3d_backend_llamacpp.state_format``); :mod:`kv3d_core.testing.state_layout` is a
small layout of the fake backend, and a reference for a backend of one's own.
"""

from __future__ import annotations

import abc
from typing import Callable, Protocol

import numpy as np

from kv3d_core.contracts.codec import KVArrays

Blob = bytes | bytearray | memoryview | np.ndarray
"""Any bytes-like object: what ``seq_state_get`` returns and ``seq_state_set`` takes."""


class StateWriter(Protocol):
    """A blob being filled in place (:meth:`StateLayout.allocate`).

    - ``arrays``: the layout's :class:`KVArrays` (its positions, head dims and ``extra``)
      with writable, C-contiguous float16 ``[n_cells, width]`` K/V arrays, views into the
      blob where the layout stores rows as they are (else scratch arrays :meth:`finish`
      copies in). Every value must be written before :meth:`finish`.
    - ``nbytes``: the blob's size; ``direct``: True when every array is a view into the
      blob (:meth:`finish` copies nothing).
    """

    arrays: KVArrays
    nbytes: int
    direct: bool

    def finish(self) -> memoryview:
        """The blob for ``seq_state_set`` (the arrays keep pointing into it)."""


class StateLayout(abc.ABC):
    """One backend's per-sequence state blobs as K/V arrays.

    Requirements:

    - :meth:`parse` and :meth:`build` round-trip: ``build(parse(b))`` is ``b`` byte for
      byte, and ``parse`` may return read-only views into ``b`` (do not mutate ``b``
      while they are in use).
    - ``extra`` of the arrays holds whatever the layout needs to rebuild a blob (small,
      JSON-serializable); codecs carry it through unchanged, so a stored delta rebuilds
      into a blob of the same layout.
    - Anything not understood raises :class:`~kv3d_core.errors.StateFormatError` saying
      what; never wrong-shaped arrays, never a crash. The core then stores the blob whole
      (opaque) or recomputes.
    - Thread-safe: the core parses and allocates on its writer and restore threads too.
    """

    name: str = ""
    """The layout's name, e.g. ``"llama.cpp-seq-state"``."""

    @abc.abstractmethod
    def parse(self, blob: Blob) -> KVArrays:
        """The cells of one sequence's blob, in position order."""

    @abc.abstractmethod
    def build(self, arrays: KVArrays) -> Blob:
        """The blob ``seq_state_set`` takes for ``arrays`` (of :meth:`parse`,
        :meth:`select` or a codec's decode)."""

    @abc.abstractmethod
    def select(self, arrays: KVArrays, min_pos: int, max_pos: int | None = None) -> KVArrays:
        """Only the cells at positions ``>= min_pos`` (and ``< max_pos`` when given),
        order kept; views where the kept cells are one run of rows. A session's delta is
        ``select(arrays, n_prefix)``."""

    def cut(self, arrays: KVArrays, n: int) -> KVArrays:
        """The cells at positions ``[0, n)`` as the state of a sequence that stopped at
        ``n`` (a family prefix, a branch of a session). Raises
        :class:`~kv3d_core.errors.StateFormatError` when ``arrays`` do not hold every
        one of those positions, or no longer hold what such a sequence would (a sliding
        window that has moved past ``n``). The default: :meth:`select` and a count."""
        from kv3d_core.errors import StateFormatError

        head = self.select(arrays, 0, n)
        if head.n_cells != n:
            raise StateFormatError(f"the state holds {head.n_cells} of the {n} positions asked for")
        return head

    @abc.abstractmethod
    def concat_layout(self, head: KVArrays, tail: KVArrays) -> KVArrays:
        """The layout of ``head``'s cells followed by ``tail``'s (a family prefix then a
        session's delta past it) as a template for :meth:`allocate`: positions and
        ``extra`` real, K/V zero-stride placeholders. Raises
        :class:`~kv3d_core.errors.StateFormatError` when the two cannot be joined."""

    @abc.abstractmethod
    def allocate(self, template: KVArrays, alloc: Callable[[int], np.ndarray] | None = None) -> StateWriter:
        """The blob :meth:`build` would make for ``template``'s layout (positions, K/V
        shapes, head dims, ``extra``; the K/V values are not read: zero-stride
        placeholders do), headers written, the K/V rows left for the caller to fill
        through the writer's ``arrays``. ``alloc(nbytes)`` gives the blob's memory (a
        C-contiguous uint8 array, e.g. the backend's ``state_buffer``); default: a fresh
        numpy array. Raises :class:`~kv3d_core.errors.StateFormatError` where
        :meth:`build` would."""
