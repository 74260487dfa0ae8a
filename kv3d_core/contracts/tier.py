"""Contract of the storage tier plugin kind.

A storage tier keeps encoded KV entries -- session deltas and family prefix
snapshots -- under a byte budget, least recently used first out. The hot tier
(cells inside the llama.cpp context) is not a plugin; plugins are the tiers
below it: warm (RAM, built in) and cold (e.g. ``tier_ssd``). Tiers form a chain:
what one evicts is offered to the next (see ``kv3d_core.tiers.stack``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np


@dataclass(frozen=True)
class EntryMeta:
    """What the index needs to find an entry without reading its payload."""

    key: str
    """Hex digest naming the entry (never request text)."""
    kind: str
    """``"snapshot"`` (a family prefix) or ``"session"`` (a delta on top of one)."""
    namespace: str
    family: str
    tokens: np.ndarray
    """int32 token ids of the whole sequence the entry restores (prefix included)."""
    n_prefix: int
    """Leading tokens not in the payload: they come from the family snapshot.
    0 for snapshots and for opaque (full-sequence) payloads."""
    codec_id: str
    codec_version: int
    model_fingerprint: str
    f16_bytes: int
    """Size of the payload's cells as f16, for ratio metrics."""


@dataclass
class TierEntry:
    meta: EntryMeta
    payload: bytes

    @property
    def nbytes(self) -> int:
        return len(self.payload) + int(self.meta.tokens.nbytes)


Evicted = Callable[[TierEntry], None]


@dataclass(frozen=True)
class Followed:
    """What :meth:`StorageTier.follow` returns: what other servers changed in a shared store."""

    added: tuple[EntryMeta, ...] = ()
    """Entries other servers published since the previous call, oldest first (this model's
    fingerprint only; this server's own puts are left out)."""
    removed: tuple[str, ...] = ()
    """Keys of this model's entries other servers removed (deleted, evicted) since the
    previous call, where the tier can tell cheaply; may stay empty."""
    rescan: bool = False
    """The feed lost track (trimmed past this reader, the store restarted): ``added`` then
    lists every entry the tier holds, as :meth:`StorageTier.entries` does (this server's
    own included), and ``removed`` is empty."""


class StorageTier(abc.ABC):
    """A byte-budgeted store of :class:`TierEntry`.

    Requirements:

    - :attr:`used_bytes` never exceeds :attr:`capacity_bytes` after a call
      returns. :meth:`put` of an entry larger than the capacity returns False and
      stores nothing. Making room evicts least-recently-used entries (a
      :meth:`get` hit or a :meth:`put` refreshes an entry) and hands each evicted
      entry to the ``on_evict`` callback given to :meth:`bind`, if any.
    - :meth:`get` returns the entry exactly as put, or None. Any damage (I/O error,
      checksum, format, model fingerprint, truncation) is a miss: the entry is
      removed and the failure counted through the ``on_error(reason)`` callback;
      it never raises and never returns altered bytes.
    - A write that cannot be done (disk full, I/O error) is dropped: :meth:`put`
      returns False, calls ``on_dropped(reason)``, and the tier keeps serving.
      ``"io_error"`` and ``"disk_full"`` name *systemic* faults (the store itself
      fails: a read-only or vanished directory, a full disk): the core then stops
      writing to the tier and calls :meth:`check`, with backoff, until it passes.
      Every other reason, and every ``on_error`` reason, concerns one entry only.
    - :meth:`put` and :meth:`get` may be called from several threads.
    - :meth:`entries` lists what the tier holds (after a restart, what survived),
      so the core can rebuild its index.
    - A *shared* tier (:attr:`shared`: other servers read and write the same store)
      may offer a feed (:meth:`follow`) of what the others publish, so the core
      indexes their entries while it runs, not only at start.
    """

    name: str = "?"
    level: str = "warm"  # "warm" or "cold"
    persistent: bool = False
    shared: bool = False
    """True when other servers read and write the same store (the ``redis`` tier): the core
    then publishes what it computes to it promptly (family snapshots, idle sessions) and
    follows what the others publish (:meth:`follow`)."""

    def bind(self, *, model_fingerprint: str, on_evict: Evicted | None = None,
             on_error: Callable[[str], None] | None = None,
             on_dropped: Callable[[str], None] | None = None) -> None:
        """Called once by the core before use: the fingerprint of the loaded model
        (entries of another fingerprint are never returned) and the callbacks."""
        self.model_fingerprint = model_fingerprint
        self.on_evict = on_evict
        self.on_error = on_error
        self.on_dropped = on_dropped

    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int: ...

    @abc.abstractmethod
    def put(self, entry: TierEntry) -> bool:
        """Store ``entry`` (replacing one of the same key). False when not stored."""

    @abc.abstractmethod
    def get(self, key: str) -> TierEntry | None:
        """The entry, or None on a miss (absent or damaged)."""

    @abc.abstractmethod
    def contains(self, key: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an entry if present."""

    @abc.abstractmethod
    def entries(self) -> Iterable[EntryMeta]:
        """Metadata of every entry held."""

    def __len__(self) -> int:
        return sum(1 for _ in self.entries())

    def touch(self, key: str) -> bool:
        """Mark ``key`` as just used without reading it (the core keeps a family
        snapshot at least as recent as the sessions that need it, so LRU eviction takes
        the sessions first). False when the tier does not hold it. Default: no recency
        change."""
        return self.contains(key)

    def follow(self) -> Followed | None:
        """Optional, for shared tiers: what other servers published -- and, where the tier
        can tell cheaply, removed -- since the previous call (the first call: since
        :meth:`bind`), as :class:`Followed`. Only entries of the bound model fingerprint;
        never this server's own puts (a rescan may list them). When the tier cannot tell
        what it missed, it answers ``rescan=True`` with every entry it holds. None when the
        tier has no feed (the default) or cannot read it now (the next call catches up).
        The core calls it from one thread of its own (never the scheduler thread), every
        ``cache.follow_s`` seconds, and indexes the entries it does not know yet; an entry
        that turns out gone or damaged on :meth:`get` is a miss as ever. Must not raise."""
        return None

    def check(self) -> str | None:
        """Whether the tier can take writes now: None when it can, else why not (for
        ``/health``). Called after a write was dropped for a systemic fault, and again with
        backoff until it passes; it may repair what it can (the SSD tier re-creates a
        deleted directory). Must not raise. Default: None."""
        return None

    def close(self) -> None:
        """Flush and release resources."""
