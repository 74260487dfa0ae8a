"""The ``collab`` block codec (:class:`~kv3d_core.contracts.codec.BlockCodec`).

A session's delta is cut into blocks of ``block_tokens`` cells; the core names and stores
them (:mod:`kv3d_core.tiers.blocks`), so a block several sessions hold is stored once. Every
block, and the session's private tail, is coded by the inner codec on its own: ``int8`` (the
default: int8's codes are per token and KV head, so a block decodes to exactly the values
``int8`` gives for those cells, and quality is int8's) or ``none`` (lossless float16).

A manifest (the session's own entry), after the core's header::

    framing.pack_meta({layout, "block_tokens", "keys", "tail", ["start"]}) | [positions (int32)] | tail | u32 CRC-32

``keys``: the session's block keys in order; ``tail``: the byte length of the inner codec's
payload of the cells after the last whole block; ``start``: present when the cells' positions
are ``start, start + 1, ...`` (a sequence's delta always is), which then are not written out
(version 1 wrote them always: 4 bytes per cell, which the blocks and the tail hold again).
The CRC covers everything before it; the
inner payloads carry their own checks (int8: CRC-32 and zstd checksums). A block is the inner
codec's bytes as they are, framed by the core.
"""

from __future__ import annotations

import concurrent.futures
import os
import struct
import threading
import zlib
from typing import Callable

import numpy as np

from kv3d_core.contracts.codec import BlockCodec, BlockFetch, KVArrays
from kv3d_core.errors import CodecError
from kv3d_core.kv import framing
from kv3d_core.kv.codec_none import NoneCodec, check_layout, layout_meta

_CRC = struct.Struct("<I")
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    """A shared pool of ``n`` block decoders (one per size, made on first use)."""
    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="kv3d-collab")
        return _POOLS[n]


def _inner(name: str, zstd_level: int):
    if name == "int8":
        from kv3d_codec_int8.codec import Int8Codec

        return Int8Codec(zstd_level=zstd_level, decode_threads=1)    # blocks decode in parallel instead
    if name == "none":
        return NoneCodec()
    raise TypeError(f"inner={name!r}: use int8 or none")


def _rows(a: KVArrays, lo: int, hi: int) -> KVArrays:
    return KVArrays(a.positions[lo:hi], [x[lo:hi] for x in a.k], [x[lo:hi] for x in a.v],
                    a.head_dim_k, a.head_dim_v, a.extra)


class CollabCodec(BlockCodec):
    """Blocks of ``block_tokens`` cells shared across sessions, each coded by ``inner``.

    Settings: ``block_tokens`` (1..4096, default 64), ``inner`` (``int8``, default, or
    ``none``), ``zstd_level`` (the inner int8 codec's, default 3), ``decode_threads`` (blocks
    decoded in parallel on restore, default min(2, usable cores): the int8 kernels leave the GIL,
    so one block's Python work overlaps another's decoding). Error bound: the inner codec's
    (int8: half a scale step plus one float16 ulp per value; none: bit-exact).
    """

    codec_id = "collab"
    version = 2

    def __init__(self, block_tokens: int = 64, inner: str = "int8", zstd_level: int = 3,
                 decode_threads: int | None = None, **unknown: object) -> None:
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; collab takes block_tokens, inner, zstd_level, "
                            "decode_threads")
        if decode_threads is not None and (isinstance(decode_threads, bool) or not isinstance(decode_threads, int)
                                           or not 1 <= decode_threads <= 64):
            raise TypeError(f"decode_threads={decode_threads!r}: use an integer 1..64, or null (automatic)")
        self.decode_threads = decode_threads if decode_threads is not None else min(2, len(os.sched_getaffinity(0)))
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or not 1 <= block_tokens <= 4096:
            raise TypeError(f"block_tokens={block_tokens!r}: use an integer 1..4096")
        self.block_tokens = block_tokens
        self.inner = _inner(inner, zstd_level)
        self.inner_name = inner
        self.block_format = f"{inner}/{self.inner.codec_id}/{self.inner.version}"
        self.lossless = bool(self.inner.lossless)

    # -- encode -----------------------------------------------------------------------------
    def encode(self, arrays: KVArrays) -> bytes:
        return self.encode_blocks(arrays, [], lambda _k: False)[0]

    def encode_blocks(self, arrays: KVArrays, keys: list[str],
                      have: Callable[[str], bool]) -> tuple[bytes, dict[str, bytes]]:
        b = self.block_tokens
        n_blocks = len(keys)
        if n_blocks * b > arrays.n_cells:
            raise CodecError(f"{n_blocks} blocks of {b} cells need {n_blocks * b} cells, the delta has {arrays.n_cells}")
        meta = layout_meta(arrays)
        blocks = {}
        for i, key in enumerate(keys):
            if key not in blocks and not have(key):
                blocks[key] = bytes(self.inner.encode(_rows(arrays, i * b, (i + 1) * b)))
        tail = bytes(self.inner.encode(_rows(arrays, n_blocks * b, arrays.n_cells)))
        meta.update(block_tokens=b, keys=list(keys), tail=len(tail), inner=self.inner_name)
        pos = np.ascontiguousarray(arrays.positions, dtype="<i4")
        start = int(pos[0]) if len(pos) else 0
        if start >= 0 and np.array_equal(pos, np.arange(start, start + len(pos), dtype="<i4")):
            meta["start"] = start
            positions = b""
        else:
            positions = pos.tobytes()
        body = framing.pack_meta(meta, positions + tail)
        return body + _CRC.pack(zlib.crc32(body)), blocks

    # -- decode -----------------------------------------------------------------------------
    def _read(self, manifest) -> tuple[dict, np.ndarray, memoryview, list[str]]:
        mv = memoryview(manifest)
        if len(mv) < _CRC.size:
            raise CodecError("collab manifest truncated")
        body = mv[:-_CRC.size]
        if zlib.crc32(body) != _CRC.unpack_from(mv, len(mv) - _CRC.size)[0]:
            raise CodecError("collab manifest checksum mismatch")
        meta, rest = framing.unpack_meta(body)
        n, _, _ = check_layout(meta)
        try:
            b, keys, tail = int(meta["block_tokens"]), meta["keys"], int(meta["tail"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"collab manifest incomplete: {exc}") from exc
        start = meta.get("start")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)
                                  or not 0 <= start <= 2 ** 31 - 1 - n):
            raise CodecError("collab manifest: its start position is not a valid position")
        n_pos = 0 if start is not None else 4 * n
        if (b != self.block_tokens or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
                or len(keys) * b > n or tail < 0 or len(rest) != n_pos + tail or meta.get("inner") != self.inner_name):
            raise CodecError("collab manifest: its fields do not add up")
        positions = (np.arange(start, start + n, dtype=np.int32) if start is not None
                     else np.frombuffer(rest[:n_pos], dtype="<i4").astype(np.int32))
        return meta, positions, rest[n_pos:], keys

    def manifest_keys(self, manifest: bytes) -> list[str]:
        return list(self._read(manifest)[3])

    def decode(self, data: bytes) -> KVArrays:
        def alloc(t: KVArrays) -> KVArrays:
            return KVArrays(t.positions.copy(), [np.empty(x.shape, np.float16) for x in t.k],
                            [np.empty(x.shape, np.float16) for x in t.v], t.head_dim_k, t.head_dim_v, t.extra)

        return self.decode_into(data, alloc)

    def decode_into(self, data: bytes, alloc: Callable[[KVArrays], KVArrays]) -> KVArrays:
        def no_blocks(key: str) -> bytes:
            raise CodecError(f"collab payload lists block {key[:8]}: decode it with its blocks (decode_blocks_into)")

        return self.decode_blocks_into(data, no_blocks, alloc)

    def decode_blocks_into(self, manifest: bytes, fetch: BlockFetch,
                           alloc: Callable[[KVArrays], KVArrays]) -> KVArrays:
        meta, positions, tail, keys = self._read(manifest)
        n, kw, vw = check_layout(meta)
        zero = np.zeros((), np.float16)
        template = KVArrays(positions, [np.broadcast_to(zero, (n, w)) for w in kw],
                            [np.broadcast_to(zero, (n, w)) for w in vw],
                            int(meta["head_dim_k"]), int(meta["head_dim_v"]), dict(meta["extra"]))
        out = alloc(template)
        if ([a.shape for a in out.k], [a.shape for a in out.v]) != ([(n, w) for w in kw], [(n, w) for w in vw]):
            raise CodecError("decode_into: alloc returned arrays of another layout than the decoded one")
        b = self.block_tokens
        parts = [(i * b, (i + 1) * b) for i in range(len(keys))] + [(len(keys) * b, n)]

        def work(j: int) -> None:
            lo, hi = parts[j]
            self._decode_part(fetch(keys[j]) if j < len(keys) else tail, _rows(out, lo, hi), positions[lo:hi])

        if self.decode_threads > 1 and len(parts) > 1:
            # the inner kernels leave the GIL while they decode: one block's Python work overlaps another's
            futures = [_pool(self.decode_threads).submit(work, j) for j in range(len(parts))]
            concurrent.futures.wait(futures)        # every write into ``out`` ends before we return or raise
            for f in futures:
                f.result()
        else:
            for j in range(len(parts)):
                work(j)
        return out

    def _decode_part(self, data, target: KVArrays, positions: np.ndarray) -> None:
        """The inner codec decodes one block (or the tail) into ``target``'s rows."""
        def alloc(t: KVArrays) -> KVArrays:
            if (t.n_cells != len(positions) or not np.array_equal(t.positions, positions)
                    or [a.shape for a in t.k] != [a.shape for a in target.k]
                    or [a.shape for a in t.v] != [a.shape for a in target.v]):
                raise CodecError("a block holds other cells than its manifest expects")
            return target

        got = self.inner.decode_into(data, alloc)
        if got is not target:
            raise CodecError("the inner codec did not decode into the block's rows")

    def __repr__(self) -> str:
        return f"CollabCodec(block_tokens={self.block_tokens}, inner={self.inner_name!r})"
