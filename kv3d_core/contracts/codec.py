"""Contract of the delta codec plugin kind.

A codec turns the KV cells of one sequence (usually a session's *delta*: the
cells at positions at or past its family prefix) into bytes, and back. It sees
numpy arrays, never llama.cpp blobs: :mod:`kv3d_core.kv.state_format` converts
between the two.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kv3d_core.errors import CodecError


@dataclass
class KVArrays:
    """KV cells of one sequence, layer by layer.

    - ``positions``: int32 ``[n_cells]``, the position of each cell.
    - ``k[l]``: ``[n_cells, k_width[l]]`` float16 (the K row of each cell in layer ``l``).
    - ``v[l]``: ``[n_cells, v_width[l]]`` float16.
    - ``head_dim_k`` / ``head_dim_v``: values per KV head, for codecs that scale
      per head (``k_width`` is a multiple of it).
    - ``extra``: layout facts the state writer needs to rebuild a blob
      (stream count, V transposition, ggml types); codecs must carry it through
      unchanged (it is small and JSON-serializable).
    """

    positions: np.ndarray
    k: list[np.ndarray]
    v: list[np.ndarray]
    head_dim_k: int
    head_dim_v: int
    extra: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_layer(self) -> int:
        return len(self.k)

    def f16_bytes(self) -> int:
        """Bytes of the K and V values as float16: the baseline of codec ratios."""
        return int(sum(a.size for a in self.k) + sum(a.size for a in self.v)) * 2


class DeltaCodec(abc.ABC):
    """Encodes :class:`KVArrays` to bytes and back.

    Requirements:

    - The bytes are the codec's own: :meth:`encode` returns them and :meth:`decode`
      takes them back, in whatever format the codec likes (its own header and magic
      included). The core frames them -- it puts a header with :attr:`codec_id` and
      :attr:`version` in front of them and strips it (:mod:`kv3d_core.kv.framing`) --
      and hands :meth:`decode` only bytes its own id and version wrote, as a
      bytes-like object (``bytes`` or a ``memoryview``; ``bytes(data)`` when the codec
      needs ``bytes``). :meth:`decode` raises :class:`~kv3d_core.errors.CodecError`
      on a truncated payload or any length that does not add up -- never returns
      wrong-shaped arrays, never crashes the process.
    - ``decode(encode(a))`` has the same positions, layer count, shapes and
      ``extra`` as ``a``; values may differ by at most the codec's stated error
      (:attr:`lossless` codecs: bit-exact).
    - Pure functions of their input, thread-safe, vectorized (no per-element
      Python loops): the tiers call them from worker threads.
    - Optional: :meth:`decode_into` decodes straight into arrays the caller
      provides (the tiers hand out views into the blob given to the backend, which
      spares a copy of every value on restore). The default decodes, then copies;
      a codec overrides it when it can write its output in place.
    """

    codec_id: str = "?"
    """Names the format (ASCII, 1..65535 bytes); the core frames payloads with it."""
    version: int = 1
    """Version of the format (0..65535): a payload of another version is never handed to
    :meth:`decode` (a stored entry of an older version is a cache miss)."""
    lossless: bool = False

    @abc.abstractmethod
    def encode(self, arrays: KVArrays) -> bytes:
        """Encode the cells into the codec's own bytes (no kv3d header: the core adds it)."""

    @abc.abstractmethod
    def decode(self, data: bytes) -> KVArrays:
        """Decode what :meth:`encode` produced (``data``: bytes or a memoryview of them)."""

    def decode_into(self, data: bytes, alloc: Callable[[KVArrays], KVArrays]) -> KVArrays:
        """Decode what :meth:`encode` produced into arrays that ``alloc`` provides.

        ``alloc(template)`` is called once, before any value is written. ``template``
        has the decoded positions, head dims and ``extra``, and K/V arrays of the
        decoded shapes whose values mean nothing (they may be read-only zero-stride
        placeholders). It returns a :class:`KVArrays` with the same positions and
        writable float16 K/V arrays of those shapes; the codec writes every value of
        them and returns that object. The values are those :meth:`decode` gives.
        Errors as for :meth:`decode` (:class:`~kv3d_core.errors.CodecError`); an
        exception ``alloc`` raises propagates unchanged.

        Default: :meth:`decode`, then ``alloc(decoded)``, then a copy.
        """
        arrays = self.decode(data)
        out = alloc(arrays)
        dst, src = list(out.k) + list(out.v), list(arrays.k) + list(arrays.v)
        if len(out.k) != len(arrays.k) or len(out.v) != len(arrays.v) or any(
                d.shape != s.shape for d, s in zip(dst, src)):
            raise CodecError("decode_into: alloc returned arrays of another layout than the decoded one")
        for d, s in zip(dst, src):
            np.copyto(d, s)
        return out


BlockFetch = Callable[[str], "bytes | memoryview"]
"""``fetch(block_key)``: the codec's bytes of a stored block (as :meth:`BlockCodec.encode_blocks`
returned them), or raises -- a missing or damaged block is the core's miss, which the codec
lets through unchanged."""


class BlockCodec(DeltaCodec):
    """Optional capability of a delta codec: sessions share *blocks* of KV cells.

    A pure per-entry codec cannot share anything between sessions. A block codec cuts a
    session's delta into blocks of :attr:`block_tokens` cells; the core names each block by a
    hash chain over the session's namespace (tenant and ``cache_salt``), the model fingerprint,
    the codec and every token id up to the block's end (:mod:`kv3d_core.tiers.blocks`), stores
    every block once as a tier entry of kind ``"block"``, counts the sessions that list it and
    deletes it when none does. A session's own entry is then a *manifest*: the keys of its
    blocks plus its private tail (the cells after the last whole block).

    Requirements, beyond :class:`DeltaCodec`'s:

    - :attr:`block_tokens` > 0 and fixed for the codec's lifetime.
    - :meth:`encode_blocks` and :meth:`decode_blocks_into` round-trip like ``encode``/``decode``:
      same positions, shapes, ``extra``; values within the codec's stated error. A block's
      values depend only on that block's cells (never on the rest of the session), so a block
      stored by one session restores exactly as the codec coded it into any other session
      listing it.
    - Blocks and manifests are the codec's own bytes (the core frames both with
      :attr:`codec_id` and :attr:`version`), each checked by the codec: damage is a
      :class:`~kv3d_core.errors.CodecError`, never wrong values. A block whose positions are
      not those the manifest expects is a ``CodecError``.
    - :meth:`encode` / :meth:`decode` still work on their own (a family snapshot, the
      conformance suite): a manifest with no blocks.
    """

    block_tokens: int = 32
    """Cells per block."""
    block_format: str = ""
    """Names how blocks are coded beyond :attr:`codec_id` and :attr:`version` (settings that
    change a block's bytes, e.g. an inner codec): part of every block key, so a block coded
    one way is never handed to a codec configured another way."""

    @abc.abstractmethod
    def encode_blocks(self, arrays: KVArrays, keys: list[str],
                      have: Callable[[str], bool]) -> tuple[bytes, dict[str, bytes]]:
        """``(manifest, blocks)`` for a session's delta ``arrays``.

        ``keys[i]`` names block ``i``: the cells ``[i * block_tokens, (i + 1) * block_tokens)``
        of ``arrays`` (the core passes one key per whole block: ``len(keys) * block_tokens <=
        arrays.n_cells``). ``have(key)`` is True when the core already stores that block: the
        codec need not encode it and leaves it out of ``blocks``. ``blocks`` maps each other
        key to its bytes; the manifest lists every key in order and holds the remaining cells
        (the private tail) and the layout."""

    @abc.abstractmethod
    def manifest_keys(self, manifest: bytes) -> list[str]:
        """The block keys a manifest lists, in order (``CodecError`` when damaged)."""

    @abc.abstractmethod
    def decode_blocks_into(self, manifest: bytes, fetch: BlockFetch,
                           alloc: Callable[[KVArrays], KVArrays]) -> KVArrays:
        """Decode a manifest and its blocks into arrays ``alloc`` provides (as
        :meth:`DeltaCodec.decode_into`: ``alloc`` called once, before any value is written).
        ``fetch(key)`` gives each block's bytes; an exception ``fetch`` or ``alloc`` raises
        propagates unchanged. Errors: :class:`~kv3d_core.errors.CodecError`."""
