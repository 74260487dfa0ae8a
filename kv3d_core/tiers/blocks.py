"""Blocks of KV shared by sessions, for a :class:`~kv3d_core.contracts.codec.BlockCodec`.

A session's delta is cut into blocks of ``block_tokens`` cells. Each block is named by
:func:`chain_keys`: a hash chain over the codec (id, version, block size), the session's
namespace (tenant and ``cache_salt``: two tenants never share a block), the model
fingerprint and every token id up to the block's end -- so two sessions name a block alike
exactly when they hold the same tokens up to its end, at the same positions. A block is a
tier entry of its own (kind ``"block"``; ``tokens`` the whole chain up to the block's end,
``n_prefix`` its first position), stored once and listed by the manifests of the sessions that
use it (:class:`BlockRefs`). A fetch compares that chain, id by id, with the session's tokens
up to the block's end, so even a collision of the keys is a miss, never another history's
cells: a block's K and V depend on every token before it, and the issue's contract is exact
sharing, checked by token ids, not by a hash. (Keeping only the block's own ids was measured
to save 0.14 % of the seed workload's bytes, and left the history to the 160-bit key alone.)

Life cycle (:class:`BlockStore`, used by :class:`~kv3d_core.tiers.stack.TierStack`):

- Spill (writer thread): the session's references are counted *before* its blocks are looked
  up, then the blocks no tier holds are encoded and put -- warm, and cold when the manifest
  goes there -- before the manifest; blocks already held are touched (at least as recent as
  the sessions listing them, so LRU eviction takes sessions first).
- A session leaves every tier (resumed, evicted, damaged): its references are released and
  the blocks no session lists any more are deleted on the writer thread, where every spill
  runs too, so a block a new spill just counted on is never deleted under it.
- A block a tier evicted (and no tier holds) or found damaged makes every session listing it
  a miss (:meth:`BlockStore.lost`): those sessions are dropped, never restored wrongly.
- Restart: the references are rebuilt from the stored sessions' metadata (their keys follow
  from namespace, tokens and ``n_prefix``; no payload is read); a session whose block is
  missing is dropped, a block no session lists is deleted.
"""

from __future__ import annotations

import collections
import hashlib
import queue
import threading
from typing import Callable, Iterable

import numpy as np

from kv3d_core.contracts.codec import BlockCodec, KVArrays
from kv3d_core.contracts.tier import EntryMeta, StorageTier, TierEntry
from kv3d_core.errors import CacheFault, CodecError
from kv3d_core.kv import framing

KIND = "block"


class BlockMissing(CacheFault):
    """A block a session lists is in no tier, damaged, or not the one the chain names: the
    session is a miss (recompute), counted; it implicates that entry only."""

    reason = "block_missing"
    component = "entry"


def chain_keys(codec: BlockCodec, namespace: str, fingerprint: str, tokens: np.ndarray,
               n_prefix: int) -> list[str]:
    """Keys of the whole blocks of ``tokens[n_prefix:]`` (block ``i``: cells ``n_prefix + i *
    block_tokens`` up to the next block): 40-hex-digit BLAKE2b digests, each over the previous
    one and its block's token ids; the first one's seed covers the codec id, version, block
    format and block size, ``namespace``, ``fingerprint`` and ``tokens[:n_prefix]``."""
    b = int(codec.block_tokens)
    toks = np.ascontiguousarray(tokens, dtype="<i4")
    seed = (f"kv3d-block\0{codec.codec_id}\0{codec.version}\0{codec.block_format}\0{b}\0{namespace}\0"
            f"{fingerprint}\0").encode()
    h = hashlib.blake2b(seed + toks[:n_prefix].tobytes(), digest_size=20).digest()
    keys = []
    for start in range(n_prefix, len(toks) - b + 1, b):
        h = hashlib.blake2b(h + toks[start:start + b].tobytes(), digest_size=20).digest()
        keys.append(h.hex())
    return keys


class BlockRefs:
    """Which stored sessions list which blocks (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, set[str]] = collections.defaultdict(set)
        self._uses: dict[str, list[str]] = {}

    def add(self, session: str, keys: list[str]) -> None:
        """Count ``session``'s references to ``keys`` (replacing any it had)."""
        with self._lock:
            for k in self._uses.pop(session, ()):
                self._users[k].discard(session)
            self._uses[session] = list(keys)
            for k in keys:
                self._users[k].add(session)

    def release(self, session: str) -> list[str]:
        """Drop ``session``'s references; the blocks it listed that no session lists now."""
        with self._lock:
            freed = []
            for k in self._uses.pop(session, ()):
                users = self._users.get(k)
                if users is not None:
                    users.discard(session)
                    if not users:
                        del self._users[k]
                        freed.append(k)
            return freed

    def users(self, block: str) -> set[str]:
        with self._lock:
            return set(self._users.get(block, ()))

    def keys_of(self, session: str) -> list[str]:
        with self._lock:
            return list(self._uses.get(session, ()))

    def used(self, block: str) -> bool:
        with self._lock:
            return bool(self._users.get(block))

    def counts(self) -> tuple[int, int]:
        """(blocks listed by some session, references in all)."""
        with self._lock:
            return len(self._users), sum(len(u) for u in self._users.values())


Tiers = Callable[[], tuple[StorageTier | None, StorageTier | None]]


class BlockStore:
    """The tier stack's side of a block codec: storing, fetching, counting and freeing blocks.

    ``tiers()`` returns the stack's current (warm, cold) tiers (either may be None, or be
    switched off later). ``put_cold(entry)`` is the stack's cold write (down tiers skipped,
    counted)."""

    def __init__(self, codec: BlockCodec, fingerprint: str, tiers: Tiers,
                 put_cold: Callable[[TierEntry], bool]) -> None:
        self.codec = codec
        self.fingerprint = fingerprint
        self._tiers = tiers
        self._put_cold = put_cold
        self.refs = BlockRefs()
        self._lost: queue.SimpleQueue[str] = queue.SimpleQueue()

    def keys_for(self, namespace: str, tokens: np.ndarray, n_prefix: int) -> list[str]:
        return chain_keys(self.codec, namespace, self.fingerprint, tokens, n_prefix)

    def _held(self, key: str) -> bool:
        return any(t is not None and t.contains(key) for t in self._tiers())

    # -- spill (writer thread) -------------------------------------------------------------
    def store(self, arrays: KVArrays, meta_base: dict, n_prefix: int, to_cold: bool) -> tuple[bytes, int]:
        """Put the blocks of session delta ``arrays`` that no tier holds yet and return
        ``(framed manifest, bytes of the blocks written)``. Raises BlockMissing when a new
        block could be stored nowhere (the session is then not stored)."""
        tokens = meta_base["tokens"]
        keys = self.keys_for(meta_base["namespace"], tokens, n_prefix)
        self.refs.add(meta_base["key"], keys)     # counted first: a pending free leaves them alone
        manifest, blocks = self.codec.encode_blocks(arrays, keys, self._held)
        warm, cold = self._tiers()
        b, written = int(self.codec.block_tokens), 0
        for i, key in enumerate(keys):
            body = blocks.get(key)
            if body is None:
                for t in (warm, cold):
                    if t is not None:
                        t.touch(key)
                continue
            end = n_prefix + (i + 1) * b
            payload = framing.frame(self.codec.codec_id, self.codec.version, body)
            meta = EntryMeta(key=key, kind=KIND, namespace=meta_base["namespace"], family=meta_base["family"],
                             tokens=np.asarray(tokens[:end], np.int32).copy(), n_prefix=end - b,
                             codec_id=self.codec.codec_id, codec_version=self.codec.version,
                             model_fingerprint=self.fingerprint, f16_bytes=arrays.f16_bytes() * b // max(1, arrays.n_cells))
            entry = TierEntry(meta, payload)
            in_warm = warm is not None and warm.put(entry)
            in_cold = cold is not None and (to_cold or not in_warm) and self._put_cold(entry)
            if not (in_warm or in_cold):
                raise BlockMissing(f"block {key[:8]} of {meta_base['key'][:8]} could be stored in no tier")
            written += len(payload)
        return framing.frame(self.codec.codec_id, self.codec.version, manifest), written

    def ensure_cold(self, session: str, warm: StorageTier | None, cold: StorageTier) -> None:
        """Before a session's manifest reaches the cold tier: copy its blocks only warm holds."""
        for key in self.refs.keys_of(session):
            if cold.contains(key):
                cold.touch(key)
                continue
            got = warm.get(key) if warm is not None else None
            if got is not None:
                self._put_cold(got)

    def free(self, keys: Iterable[str]) -> None:
        """Writer thread: delete the blocks among ``keys`` that no session lists (now)."""
        for key in keys:
            if self.refs.used(key):
                continue
            for t in self._tiers():
                if t is not None:
                    t.delete(key)

    # -- restore (scheduler thread or restore pool) ---------------------------------------------
    def decode_into(self, key: str, namespace: str, tokens: np.ndarray, n_prefix: int, payload,
                    alloc: Callable[[KVArrays], KVArrays]) -> KVArrays:
        """Decode session ``key``'s framed manifest and its blocks into ``alloc``'s arrays."""
        manifest = framing.unframe(payload, self.codec.codec_id, self.codec.version)
        listed = self.codec.manifest_keys(manifest)
        expected = self.keys_for(namespace, tokens, n_prefix)
        if listed != expected:
            raise CodecError(f"{key[:8]}: its manifest lists other blocks than its tokens name")
        at = {k: n_prefix + (i + 1) * int(self.codec.block_tokens) for i, k in enumerate(expected)}

        def fetch(block: str) -> memoryview:
            end = at.get(block)
            if end is None:
                raise CodecError(f"{key[:8]}: the codec asked for block {block[:8]}, which it does not list")
            return self._fetch(block, namespace, tokens, end)

        return self.codec.decode_blocks_into(manifest, fetch, alloc)

    def _fetch(self, block: str, namespace: str, tokens: np.ndarray, end: int) -> memoryview:
        start = end - int(self.codec.block_tokens)
        chain = np.asarray(tokens[:end], np.int32)
        for t in self._tiers():
            got = t.get(block) if t is not None else None
            if got is None:
                continue
            m = got.meta
            if (m.kind != KIND or m.namespace != namespace or m.model_fingerprint != self.fingerprint
                    or m.n_prefix != start or not np.array_equal(m.tokens, chain)):
                t.delete(block)
                continue
            try:
                return framing.unframe(got.payload, self.codec.codec_id, self.codec.version)
            except CodecError:
                t.delete(block)
        self._lost.put(block)
        raise BlockMissing(f"block {block[:8]} is in no tier (evicted or damaged)")

    def lost(self, key: str) -> None:
        """A tier lost block ``key`` (evicted, damaged): its sessions become misses."""
        if not self._held(key):
            self._lost.put(key)

    def drain_lost(self) -> set[str]:
        """The sessions listing a block lost since the last call (scheduler thread)."""
        out: set[str] = set()
        while True:
            try:
                out |= self.refs.users(self._lost.get_nowait())
            except queue.Empty:
                return out

    # -- restart ----------------------------------------------------------------------------
    def reindex(self, metas: list[EntryMeta]) -> tuple[list[str], list[str]]:
        """Rebuild the references from stored metadata: ``(sessions missing a block, blocks no
        session lists)``."""
        blocks = {m.key for m in metas if m.kind == KIND}
        missing = []
        for m in metas:
            if m.kind != "session" or (m.codec_id, m.codec_version) != (self.codec.codec_id, self.codec.version):
                continue
            keys = self.keys_for(m.namespace, np.asarray(m.tokens, np.int32), m.n_prefix)
            self.refs.add(m.key, keys)
            if any(k not in blocks for k in keys):
                missing.append(m.key)
        return missing, [k for k in blocks if not self.refs.used(k)]
