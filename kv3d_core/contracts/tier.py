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
    """

    name: str = "?"
    level: str = "warm"  # "warm" or "cold"
    persistent: bool = False

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

    def check(self) -> str | None:
        """Whether the tier can take writes now: None when it can, else why not (for
        ``/health``). Called after a write was dropped for a systemic fault, and again with
        backoff until it passes; it may repair what it can (the SSD tier re-creates a
        deleted directory). Must not raise. Default: None."""
        return None

    def close(self) -> None:
        """Flush and release resources."""
