"""The tiers below the hot one -- warm (RAM) then cold (a plugin, e.g. SSD) -- and
the moves between them.

Spill (an idle entry leaves the context), on the scheduler thread only as far
as it must touch the context::

    seq_state_get(seq)                       scheduler thread (~1 ms per 10 MB)
      -> parse -> delta (cells >= n_prefix)  writer thread
      -> codec.encode -> framed -> warm.put  writer thread (the core's header: kv/framing.py)
           warm evicts LRU -> cold.put       writer thread (fsync'd files)

Restore (a request resumes the entry)::

    [prepared ahead: restore pool, while the request waits for admission (streams layout)]
    warm.get or cold.get -> header checked -> codec.decode_into the blob's K/V rows (the backend's StateLayout.allocate)
      unified layout:    -> seq_state_set(seq) -> seq_cp(snapshot seq, seq, 0, n_prefix)
                                                     (the family prefix is shared, not stored)
      a stream per seq:  the blob holds the family prefix's rows (copied from the snapshot's
                         host copy) then the delta's -> one seq_state_set(seq)
    [scheduler thread: seq_state_set, and the whole path when nothing was prepared]

A session's stored state is a reference to its family snapshot plus its delta;
the snapshot is stored once per family in every tier. A state whose layout the
reader does not understand is stored whole as an opaque zstd blob (counted).
Any failure on restore raises :class:`~kv3d_core.errors.CacheFault`; the prefix
cache then serves the request by recompute.

Durability, with a persistent (cold) tier:

- ``write_through`` (``cache.cold_write_through``, default on): every spill is
  written to the persistent tier as well as to warm RAM, so a crash (kill -9)
  loses only the writes in flight. Off, warm entries reach it when warm evicts
  them or at a graceful shutdown.
- A family snapshot is written to the persistent tier once, before the first
  session delta of its family that may reach it (queued ahead of that delta on
  the one writer thread, and files are fsync'd in order), and refreshed in the LRU
  order (``touch``) whenever one of its sessions is written, so eviction takes
  sessions before the snapshot they need.
- At start-up every entry is re-indexed. A session whose snapshot is missing
  (lost, or removed as damaged) is kept as an *orphan*, not deleted: once a
  request recomputes that family prefix (same tokens, so the same snapshot key),
  the orphans are adopted by the new snapshot and resume from their deltas. The
  same happens at run time when a stored snapshot turns out damaged. Anything
  re-indexing drops is logged and counted with its reason.

A *shared* cold tier (several servers on one store: ``StorageTier.shared``) gets family
snapshots as soon as they are made and idle sessions when their request ends, and what
other servers publish is indexed while this one runs (:mod:`kv3d_core.tiers.feed`).

Failures are handled per entry: a damaged entry is a miss, removed and counted
(``kv3d_tier_errors_total``); only a systemic fault -- a write failing for an I/O
error or a full disk -- takes a tier down, until a check passes
(:mod:`kv3d_core.tiers.health`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Iterable, Protocol

import numpy as np
from omegaconf import DictConfig

from kv3d_core.contracts.backend import ExecutionBackend, ModelInfo
from kv3d_core.contracts.codec import BlockCodec, DeltaCodec, KVArrays
from kv3d_core.contracts.session import SessionState
from kv3d_core.contracts.state import StateLayout, StateWriter
from kv3d_core.contracts.tier import EntryMeta, StorageTier, TierEntry
from kv3d_core.errors import (CacheFault, CodecError, StateFormatError, StateRestoreError,
                              TierError)
from kv3d_core.kv import framing, opaque
from kv3d_core.metrics import Metrics
from kv3d_core.tiers import feed
from kv3d_core.tiers.blocks import KIND as BLOCK, BlockMissing, BlockStore
from kv3d_core.tiers.entry import CacheEntry
from kv3d_core.tiers.health import SYSTEMIC, TierWatch
from kv3d_core.tiers.hot import CellLedger, StreamLedger

if TYPE_CHECKING:  # pragma: no cover
    from kv3d_core.plugins import PluginManager
    from kv3d_core.safety import FailureMonitor

log = logging.getLogger("kv3d.tiers")


class TierMiss(CacheFault):
    """The entry is no longer in any tier (evicted): a plain miss, not a fault."""

    reason = "tier_miss"


class DamagedEntry(CacheFault):
    """One stored entry does not match the index (another model, other tokens): a miss,
    counted; it implicates that entry only, never a component."""

    reason = "tier_damaged"
    component = "entry"


class Prepared:
    """A restore decoded ahead of admission (:meth:`TierStack.prepare`): the blob for
    ``entry`` is being built on the restore pool. ``done()`` says whether it is ready;
    the restore that uses it gets what preparing raised, as if it had decoded itself."""

    __slots__ = ("entry", "future")

    def __init__(self, entry: CacheEntry, future: concurrent.futures.Future) -> None:
        self.entry = entry
        self.future = future

    def done(self) -> bool:
        return self.future.done()


class CacheView(Protocol):
    """What the tier stack uses of the prefix cache that attaches it
    (:class:`kv3d_core.prefix.cache.PrefixCache`, one layer up, which this module does
    not import): public members only. The stack adds the entries it re-indexes, drops and
    forgets entries a tier lost, and restores into the cache's backend and cell ledger.
    Only the scheduler thread calls these; the writer thread reaches entries through the
    stack's queues (:meth:`TierStack.drain_gone`)."""

    backend: ExecutionBackend
    streams: bool                           # a KV stream per sequence (else one unified pool)
    ledger: CellLedger | StreamLedger

    def entry(self, key: str) -> CacheEntry | None: ...
    def entries(self) -> list[CacheEntry]: ...
    def add_entry(self, e: CacheEntry) -> None: ...
    def drop_entry(self, e: CacheEntry) -> None: ...
    def forget_entry(self, e: CacheEntry) -> None: ...
    def ensure_hot_snapshot(self, snap: CacheEntry, exclude: Iterable[CacheEntry] = ()) -> bool: ...
    def snapshot_arrays(self, snap: CacheEntry) -> KVArrays: ...
    def state_layout(self) -> StateLayout: ...


class TierStack:
    def __init__(self, warm: StorageTier | None, cold: StorageTier | None, codec: DeltaCodec,
                 info: ModelInfo, metrics: Metrics, *, max_pending_mb: float = 256,
                 monitor: "FailureMonitor | None" = None, write_through: bool = True,
                 retry_s: float = 1.0, retry_max_s: float = 60.0, follow_s: float = 0.0,
                 publish_idle: bool = True) -> None:
        if warm is None and cold is None:
            raise ValueError("a tier stack needs at least one tier")
        self.warm = warm
        self.cold = cold
        # the codec returns and takes its own bytes; the core frames them (codec id, version)
        self.codec = framing.FramedCodec(codec)
        self.info = info
        self.metrics = metrics
        self.max_pending = int(max_pending_mb * 1024 * 1024)
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv3d-spill")
        # restores decoded ahead of admission (streams layout); numpy releases the GIL while it copies
        self.prepare_workers = max(1, min(4, (os.cpu_count() or 2) // 2))
        self._preparer = concurrent.futures.ThreadPoolExecutor(max_workers=self.prepare_workers,
                                                               thread_name_prefix="kv3d-restore")
        self._gone: queue.SimpleQueue[str] = queue.SimpleQueue()    # keys no tier holds any more
        self._moved: queue.SimpleQueue[tuple[str, SessionState]] = queue.SimpleQueue()  # keys now in another tier
        self._f16 = 0
        self._stored = 0
        self.cache: CacheView | None = None
        self.monitor = monitor
        self.disabled_codecs: set[str] = set()
        self._to_disable: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._restores = 0
        self.write_through = bool(write_through)
        self.watch = TierWatch(metrics, retry_s=retry_s, retry_max_s=retry_max_s, on_recovered=self._recovered)
        # scheduler thread only:
        self._orphans: dict[str, dict[str, CacheEntry]] = {}   # family -> sessions waiting for its snapshot
        self._snap_writes: dict[str, concurrent.futures.Future] = {}  # snapshot persists in flight
        # from other threads to the scheduler thread:
        self._snapshot_wanted: queue.SimpleQueue[str] = queue.SimpleQueue()  # families to persist from hot
        self._reconcile = False            # a tier came back (maybe empty): forget what it no longer holds
        self.follow_s = float(follow_s)    # a shared cold tier: read its feed this often (0: never)
        self.publish_idle = bool(publish_idle)
        self._follower: feed.Follower | None = None
        # a block codec's sessions share blocks of KV (tiers/blocks.py)
        self.blocks = BlockStore(codec, info.fingerprint, lambda: (self.warm, self.cold), self._put_cold) \
            if isinstance(codec, BlockCodec) else None
        for tier, on_evict in ((warm, self._warm_evicted), (cold, self._cold_evicted)):
            if tier is not None:
                self.watch.add(tier)
                level = tier.level
                tier.bind(model_fingerprint=info.fingerprint, on_evict=on_evict,
                          on_error=lambda reason, _l=level: self._tier_error(_l, reason),
                          on_dropped=lambda reason, _l=level: self._dropped(_l, reason))
        if monitor is not None:
            for component in ("codec", "warm", "cold"):
                monitor.on_disable(component, lambda c=component: self._to_disable.put(c))

    # -- wiring ---------------------------------------------------------------------------
    def attach(self, cache: CacheView) -> None:
        """Called by the prefix cache; re-indexes what a persistent tier kept across a restart."""
        self.cache = cache
        if self.cold is not None and self.cold.persistent:
            self._reindex(self.cold, SessionState.COLD)
            if self.blocks is not None:
                self._reindex_blocks(self.cold)
        if self.shared and self.follow_s > 0 and self._follower is None:
            self._follower = feed.Follower(self.cold, self.follow_s, self.metrics).start()

    def _reindex_blocks(self, tier: StorageTier) -> None:
        """Count the stored sessions' block references again; drop sessions missing a block,
        delete blocks no session lists."""
        metas = [m for m in tier.entries() if m.model_fingerprint == self.info.fingerprint]
        missing, unused = self.blocks.reindex(metas)
        for key in missing:
            e = self.cache.entry(key)
            if e is not None:
                self.cache.forget_entry(e)
            self._forget_orphan(key)
            self._drop_stored(key, tier.level, "block_missing", "a block it lists is in no tier")
            self.blocks.free(self.blocks.refs.release(key))
        self.blocks.free(unused)

    def _reindex(self, tier: StorageTier, state: SessionState) -> None:
        assert self.cache is not None
        counts = feed.index_metas(self, tier.entries(), state, tier.level)
        for kind, n in counts.items():
            self.metrics.tier_reindexed.labels(tier.level, kind).inc(n)
        self.metrics.tier_orphans.set(self._n_orphans())
        if counts:
            log.info("re-indexed from the %s tier: %d family snapshots, %d sessions, %d sessions waiting for their "
                     "family snapshot", tier.name, counts["snapshot"], counts["session"], counts["orphan"])
        if counts["orphan"]:
            log.warning("%d stored sessions of %d families have no family snapshot (lost or damaged): kept; they "
                        "resume once a request recomputes that family prefix", counts["orphan"], len(self._orphans))

    def _drop_stored(self, key: str, level: str, reason: str, why: str) -> None:
        """Delete an intact entry that cannot be used; logged and counted, never silent."""
        for tier in (self.warm, self.cold):
            if tier is not None:
                tier.delete(key)
        self.metrics.tier_entries_dropped.labels(level, reason).inc()
        log.warning("dropped stored entry %s (%s): %s", key[:12], reason, why)

    def _n_orphans(self) -> int:
        return sum(len(g) for g in self._orphans.values())

    def _dropped(self, level: str, reason: str) -> None:
        self.metrics.tier_dropped_writes.labels(level, reason).inc()
        if reason in SYSTEMIC:
            self.watch.fault(level, reason)

    def _tier_error(self, level: str, reason: str) -> None:
        # one damaged entry: a miss, counted -- never a reason to switch the tier off
        self.metrics.tier_errors.labels(level, reason).inc()

    def _recovered(self, level: str) -> None:       # tier-watch thread
        self._reconcile = True

    def health_reasons(self) -> list[str]:
        """Why a tier is down (systemic faults), for ``/health``."""
        return self.watch.reasons()

    # -- switching components off (requested by the monitor, applied on the scheduler thread) --
    def apply_disables(self) -> None:
        from kv3d_core.kv.codec_none import NoneCodec

        while True:
            try:
                component = self._to_disable.get_nowait()
            except queue.Empty:
                return
            if component == "codec" and self.codec.codec_id != "none":
                self.disabled_codecs.add(self.codec.codec_id)
                log.error("codec %s switched off: new spills use the lossless none codec", self.codec.codec_id)
                self.codec = framing.FramedCodec(NoneCodec())
            elif component in ("warm", "cold"):
                tier = self.warm if component == "warm" else self.cold
                if tier is None:
                    continue
                state = SessionState.WARM if component == "warm" else SessionState.COLD
                if component == "warm":
                    self.warm = None
                else:
                    self.cold = None
                self.watch.remove(component)
                log.error("%s tier %s switched off: its entries are dropped", component, tier.name)
                for e in [e for e in self.cache.entries() if e.state is state]:
                    self._gone.put(e.key)
                if self.warm is None and self.cold is None:
                    self.monitor.disable("restore", f"every tier below the hot one is off ({component} was last)")

    def should_check_quality(self) -> bool:
        """True for 1 in ``quality_sample_every`` restores (the quality guard)."""
        every = self.monitor.cfg.quality_sample_every if self.monitor is not None else 0
        self._restores += 1
        return every > 0 and self._restores % every == 0

    def _warm_evicted(self, entry: TierEntry) -> None:          # writer thread
        self.metrics.evictions.labels("warm").inc()
        cold = self.cold
        if cold is not None and (cold.contains(entry.meta.key) or self._put_cold(entry)):
            self._set_state(entry.meta.key, SessionState.COLD)
        else:
            self._gone.put(entry.meta.key)

    def _put_cold(self, entry: TierEntry) -> bool:
        """Write ``entry`` to the cold tier (writer thread, or shutdown): not while it is
        down; a session delta only after its family snapshot."""
        cold = self.cold
        if cold is None:
            return False
        if not self.watch.up(cold.level):
            self._dropped(cold.level, "tier_down")
            return False
        meta = entry.meta
        needs_snapshot = meta.kind == "session" and meta.n_prefix > 0 and cold.persistent
        if needs_snapshot:
            self._persist_family(meta.family)
        if meta.kind == "session" and self.blocks is not None:
            self.blocks.ensure_cold(meta.key, self.warm, cold)
        if not cold.put(entry):
            return False
        self.metrics.spills.labels(cold.level).inc()
        if needs_snapshot:
            cold.touch(meta.family)              # as recent as its newest session: LRU takes sessions first
        return True

    def _persist_family(self, family: str) -> None:
        """Make the persistent tier hold the family snapshot (key = family digest) before a
        session delta that needs it (writer thread): normally already done by
        :meth:`_persist_snapshot`; copied from warm if only warm holds it; else the
        scheduler thread is asked to write it from the hot tier."""
        cold = self.cold
        if cold is None or cold.contains(family):
            return
        got = self.warm.get(family) if self.warm is not None else None
        if got is not None and got.meta.kind == "snapshot" and cold.put(got):
            self.metrics.spills.labels(cold.level).inc()
            return
        self._snapshot_wanted.put(family)

    def _cold_evicted(self, entry: TierEntry) -> None:
        self.metrics.evictions.labels("cold").inc()
        self._gone.put(entry.meta.key)

    def _set_state(self, key: str, state: SessionState) -> None:
        """Any thread (the writer's, mostly): entry ``key`` is now held by the tier of
        ``state``; the scheduler thread, which alone changes entries, applies it
        (:meth:`drain_gone`)."""
        self._moved.put((key, state))

    def drain_gone(self) -> None:
        """Scheduler thread, before each admission: apply the writer thread's results --
        entries that moved to the cold tier, entries no tier holds any more --, persist family
        snapshots the writer asked for, let orphans join a recomputed family snapshot."""
        cache = self.cache
        assert cache is not None
        if self._follower is not None:           # what other servers published to a shared tier
            feed.apply(self, self._follower)
        while True:                              # moves first: a key that moved, then went, is gone
            try:
                key, state = self._moved.get_nowait()
            except queue.Empty:
                break
            e = cache.entry(key)
            if e is not None and e.state in (SessionState.WARM, SessionState.COLD):
                e.state = state
        while True:
            try:
                key = self._gone.get_nowait()
            except queue.Empty:
                break
            e = cache.entry(key)
            if e is not None and e.state in (SessionState.WARM, SessionState.COLD):
                cache.drop_entry(e)
            else:
                self._forget_orphan(key)
                if self.blocks is not None:
                    self.blocks.lost(key)
        if self.blocks is not None:
            self._drop_block_users()
        if self._reconcile:
            self._reconcile = False
            self._forget_unheld()
        while True:
            try:
                family = self._snapshot_wanted.get_nowait()
            except queue.Empty:
                break
            snap = cache.entry(family)
            if snap is not None and snap.kind == "snapshot":
                self._persist_snapshot(snap)
        if self._orphans:
            self._adopt_orphans()

    def _drop_block_users(self) -> None:
        """Sessions listing a block that was lost (evicted, damaged) are misses: dropped."""
        for key in self.blocks.drain_lost():
            e = self.cache.entry(key)
            if e is not None and e.state in (SessionState.WARM, SessionState.COLD):
                self.cache.drop_entry(e)
            elif e is None:
                self._forget_orphan(key)
                self._delete(key)

    def _forget_unheld(self) -> None:
        """A tier came back (its directory maybe re-created, empty): forget the entries no
        tier holds any more."""
        cache = self.cache
        stored = [e for e in cache.entries() if e.state in (SessionState.WARM, SessionState.COLD)]
        lost = [e for e in stored if not self.holds(e)]
        for e in sorted(lost, key=lambda e: e.kind != "session"):     # sessions before their snapshots
            cache.drop_entry(e)
        for family, group in list(self._orphans.items()):
            for e in [e for e in group.values() if not self.holds(e)]:
                self._forget_orphan(e.key)
        if lost:
            log.warning("%d stored entries were lost with the tier's old directory", len(lost))

    def _orphan_dependents(self, snap: CacheEntry) -> None:
        """``snap`` is dropped: its stored sessions wait for it to be recomputed."""
        cache = self.cache
        deps = [e for e in cache.entries() if e.kind == "session" and e.snapshot is snap
                and e.state in (SessionState.WARM, SessionState.COLD)]
        for e in deps:
            cache.forget_entry(e)
            e.snapshot = None
            self._orphans.setdefault(e.family, {})[e.key] = e
        if deps:
            log.warning("family snapshot %s dropped: %d stored sessions wait for it to be recomputed",
                        snap.key[:12], len(deps))
            self.metrics.tier_orphans.set(self._n_orphans())

    def _forget_orphan(self, key: str) -> None:
        for family, group in self._orphans.items():
            if group.pop(key, None) is not None:
                if not group:
                    del self._orphans[family]
                self.metrics.tier_orphans.set(self._n_orphans())
                return

    def _adopt_orphans(self) -> None:
        """Orphans whose family snapshot exists again (a request recomputed the prefix)
        are resumable: linked to it, indexed, and the snapshot persisted."""
        cache = self.cache
        for family in list(self._orphans):
            snap = cache.entry(family)
            if snap is None or snap.kind != "snapshot":
                continue
            group = self._orphans.pop(family)
            adopted = 0
            for e in group.values():
                if not self.holds(e):
                    continue
                e.snapshot = snap
                if not feed.prefix_of(snap, e):
                    e.snapshot = None
                    self._drop_stored(e.key, e.state.value, "prefix_mismatch",
                                      "its prefix differs from the recomputed family snapshot's tokens")
                    continue
                cache.add_entry(e)
                adopted += 1
            if adopted:
                log.info("family snapshot %s recomputed: %d stored sessions resumable again", family[:12], adopted)
                self.metrics.tier_orphans_adopted.inc(adopted)
                self._persist_snapshot(snap)
        self.metrics.tier_orphans.set(self._n_orphans())

    # -- spill (scheduler thread, then writer thread) -------------------------------------
    def spill(self, e: CacheEntry, seq: int) -> bool:
        """Store session or snapshot ``e`` from sequence ``seq``, which is freed right after.
        With a KV stream per sequence, a session whose family prefix its snapshot holds is
        read from the device without the prefix: those cells are dropped from its stream
        first, so only the delta's bytes are copied to the host (the prefix is most of a
        session's cells)."""
        n_prefix = self._delta_start(e) if self.cache.streams else 0
        if n_prefix:
            self.cache.backend.seq_remove(seq, 0, n_prefix)
        return self.spill_blob(e, self.cache.backend.seq_state_get(seq), delta_only=n_prefix > 0)

    def _delta_start(self, e: CacheEntry) -> int:
        """Cells of ``e`` its stored form leaves to its family snapshot (0: stored whole)."""
        if e.kind != "session" or e.snapshot is None:
            return 0
        if self.cache.streams and self.info.sliding_window:
            # a sliding-window model's state has a second section holding only a window of
            # cells, which a prefix + delta blob cannot rebuild: such sessions are stored whole
            return 0
        return len(e.snapshot.tokens)

    def spill_blob(self, e: CacheEntry, blob, *, delta_only: bool = False, to_cold: bool | None = None) -> bool:
        """Store ``e`` from its state blob (a sequence's, or a snapshot's host copy;
        ``delta_only``: a session's blob without its family prefix's cells). ``to_cold``:
        write it to the cold tier too (default: with write-through, and a family snapshot
        always to a shared tier, so other servers need not compute it)."""
        if e.kind == "session" and e.snapshot is not None:
            self._persist_snapshot(e.snapshot)      # queued ahead of the delta that needs it
        if to_cold is None:
            to_cold = self.write_through or (e.kind == "snapshot" and self.shared)
        ok = self._submit(e, blob, to_cold=to_cold, delta_only=delta_only)
        if ok and e.kind == "snapshot" and to_cold:
            self._snap_writes[e.key] = e.pending    # (a streams snapshot, stored when it is made)
        return ok

    def _submit(self, e: CacheEntry, blob, *, to_cold: bool, delta_only: bool = False) -> bool:
        with self._pending_lock:
            if self._pending_bytes + len(blob) > self.max_pending:
                self._dropped("warm", "backlog")
                return False
            self._pending_bytes += len(blob)
        n_prefix = self._delta_start(e)
        e.n_prefix = n_prefix
        meta_base = dict(key=e.key, kind=e.kind, namespace=e.namespace, family=e.family,
                         tokens=np.asarray(e.tokens, np.int32).copy(), model_fingerprint=self.info.fingerprint)
        e.pending = self._writer.submit(self._encode_and_store, blob, n_prefix, meta_base, to_cold, delta_only)
        if self.warm is not None:
            self.metrics.spills.labels("warm").inc()
        return True

    def _persist_snapshot(self, snap: CacheEntry) -> None:
        """Scheduler thread: make the persistent tier hold family snapshot ``snap`` --
        once per family, not once per session. A hot snapshot is written from its
        sequence (it stays hot; when it leaves the hot tier later, this copy is kept)."""
        cold = self.cold
        if cold is None or not cold.persistent or snap.kind != "snapshot" or not self.watch.up(cold.level):
            return                               # (a tier that is down is asked again once it is back)
        inflight = self._snap_writes.get(snap.key)
        if inflight is not None and not inflight.done():
            return
        self._snap_writes.pop(snap.key, None)
        if cold.contains(snap.key):
            return
        if snap.hot:
            blob = snap.blob if snap.blob is not None else self.cache.backend.seq_state_get(snap.seq)
            if self._submit(snap, blob, to_cold=True):
                self._snap_writes[snap.key] = snap.pending
        else:
            self._snapshot_copy(snap.key)

    def _snapshot_copy(self, key: str) -> None:
        """A spilled snapshot only warm holds: copy it to the persistent tier (writer thread)."""
        def copy() -> bool:
            if self.cold is None or self.cold.contains(key) or self.warm is None:
                return False
            got = self.warm.get(key)
            return got is not None and self._put_cold(got)
        self._snap_writes[key] = self._writer.submit(copy)

    def _encode_and_store(self, blob, n_prefix: int, meta_base: dict, to_cold: bool = False,
                          delta_only: bool = False) -> bool:
        try:
            try:
                layout = self.cache.state_layout()
                arrays = layout.parse(blob)
                if n_prefix:
                    arrays = layout.select(arrays, n_prefix)
                if arrays.n_cells != len(meta_base["tokens"]) - n_prefix:
                    raise StateFormatError(f"state holds {arrays.n_cells} cells, expected "
                                           f"{len(meta_base['tokens']) - n_prefix}")
                codec = self.codec          # one codec for the payload and its label (apply_disables swaps it)
                blocks = self.blocks if self.blocks is not None and codec.inner is self.blocks.codec else None
                if blocks is not None and meta_base["kind"] == "session":
                    payload, written = blocks.store(arrays, meta_base, n_prefix, to_cold)
                    self._stored += written
                else:
                    payload = codec.encode(arrays)
                codec_id, version, f16 = codec.codec_id, codec.version, arrays.f16_bytes()
            except StateFormatError as exc:
                self.metrics.codec_fallback.inc()
                if delta_only:                  # an opaque blob must hold every cell: not storable
                    log.debug("state layout not understood (%s): session %s not stored", exc, meta_base["key"][:8])
                    self._gone.put(meta_base["key"])
                    return False
                log.debug("state layout not understood (%s): storing the opaque blob", exc)
                payload = opaque.encode(blob)
                codec_id, version, f16, n_prefix = opaque.CODEC_ID, opaque.VERSION, len(blob), 0
            entry = TierEntry(EntryMeta(**meta_base, n_prefix=n_prefix, codec_id=codec_id, codec_version=version,
                                        f16_bytes=f16), payload)
            self._f16 += f16
            self._stored += len(payload)
            if self._stored:
                self.metrics.codec_ratio.labels(self.codec.codec_id).set(self._f16 / self._stored)
            in_warm = self.warm is not None and self.warm.put(entry)
            in_cold = False
            if self.cold is not None and (to_cold or not in_warm):
                # write-through, a snapshot to persist, no warm tier, or too large for RAM
                in_cold = self._put_cold(entry)
                if in_cold and not in_warm:
                    self._set_state(entry.meta.key, SessionState.COLD)
            if not (in_warm or in_cold):
                self._gone.put(entry.meta.key)
            return in_warm or in_cold
        except BlockMissing as exc:             # a block no tier took: not stored, not a codec failure
            log.debug("session %s not stored: %s", meta_base["key"][:8], exc)
            self._gone.put(meta_base["key"])
            return False
        except Exception as exc:
            log.exception("spill failed")
            self._gone.put(meta_base["key"])
            if self.monitor is not None:
                self.monitor.failure("codec", "encode", f"encoding {meta_base['key'][:8]} raised {exc!r}")
            return False
        finally:
            with self._pending_lock:
                self._pending_bytes -= len(blob)

    # -- restore (scheduler thread) ----------------------------------------------------------
    def _fetch(self, e: CacheEntry) -> tuple[TierEntry, str]:
        pending = getattr(e, "pending", None)
        if pending is not None:
            try:
                ok = pending.result(timeout=30)
            except Exception as exc:  # the spill itself failed
                raise TierMiss(f"spill of {e.key[:8]} failed: {exc}") from exc
            if not ok:
                raise TierMiss(f"{e.key[:8]} was not stored")
        for tier in (self.warm, self.cold):
            if tier is None:
                continue
            try:
                got = tier.get(e.key)
            except Exception as exc:   # the contract says get never raises: a broken plugin
                raise TierError(f"{tier.name}.get raised {type(exc).__name__}: {exc}", tier.level) from exc
            if got is not None:
                if got.meta.model_fingerprint != self.info.fingerprint:
                    tier.delete(e.key)
                    self.metrics.tier_errors.labels(tier.level, "model").inc()
                    raise DamagedEntry(f"{e.key[:8]} belongs to another model")
                if not np.array_equal(got.meta.tokens, e.tokens):
                    tier.delete(e.key)
                    self.metrics.tier_errors.labels(tier.level, "tokens").inc()
                    raise DamagedEntry(f"{e.key[:8]}: stored tokens differ from the index")
                return got, tier.level
        raise TierMiss(f"{e.key[:8]} is in no tier")

    def prepare(self, e: CacheEntry) -> Prepared | None:
        """Scheduler thread, streams layout: start building the blob that restores stored
        session ``e`` (fetch, checks, the codec decoding into page-locked memory, the family
        prefix's rows copied in) on the restore pool, while its request waits for admission;
        :meth:`restore` then only loads it. None when nothing can be prepared."""
        cache = self.cache
        if cache is None or not cache.streams or e.kind != "session":
            return None
        snap = e.snapshot
        head_blob = snap.blob if snap is not None else None   # held here: the host copy may go meanwhile
        fut = self._preparer.submit(self._prepare, e, snap, head_blob)
        self.metrics.restores_prepared.labels("started").inc()
        return Prepared(e, fut)

    def _prepare(self, e: CacheEntry, snap: CacheEntry | None,
                 head_blob) -> tuple[bytes | memoryview, str, CacheEntry | None] | None:
        """Restore pool: :meth:`prepare`'s work. None when the entry needs its family prefix
        and that was not in host memory (the restore then brings it back itself)."""
        got, level = self._fetch(e)
        try:
            head = None
            if got.meta.n_prefix and got.meta.codec_id != opaque.CODEC_ID:
                if snap is None or len(snap.tokens) != got.meta.n_prefix:
                    raise TierMiss(f"{e.key[:8]}: its family snapshot is gone")
                if head_blob is None:
                    return None
                head = self.cache.state_layout().parse(head_blob)
            blob, snap = self._decode(e, got, joined=True, head=head, snap=snap)
        except CacheFault:
            raise
        except Exception as exc:
            raise CodecError(f"decoding {e.key[:8]} raised {type(exc).__name__}: {exc}") from exc
        return blob, level, snap

    def _prepared(self, e: CacheEntry, prepared: Prepared | None):
        """The prepared blob of ``e`` (waiting for it if still in the works), or None."""
        if prepared is None or prepared.entry is not e:
            return None
        try:
            ready = prepared.future.result(timeout=60)
        except CacheFault:
            raise
        except Exception as exc:       # (the pool shut down, a timeout): decode here instead
            log.debug("prepared restore of %s unusable: %r", e.key[:8], exc)
            return None
        if ready is None or (ready[2] is not None and ready[2] is not e.snapshot):
            return None                # no prefix in host memory then, or the family snapshot changed
        self.metrics.restores_prepared.labels("used").inc()
        return ready

    def restore(self, e: CacheEntry, seq: int, prepared: Prepared | None = None) -> CacheEntry | None:
        """Load ``e`` into the empty sequence ``seq``; returns the snapshot whose cells
        it now shares (None when it holds all its cells itself). ``prepared``: the blob
        :meth:`prepare` built for ``e`` (raises what building it raised)."""
        assert self.cache is not None
        cache = self.cache
        t0 = time.perf_counter()
        ready = self._prepared(e, prepared)
        if ready is not None:
            blob, level, snap = ready
        else:
            got, level = self._fetch(e)
            try:
                blob, snap = self._decode(e, got, joined=cache.streams)
            except CacheFault:
                raise
            except Exception as exc:       # a codec plugin failing in a way its contract does not allow
                raise CodecError(f"decoding {e.key[:8]} raised {type(exc).__name__}: {exc}") from exc
        try:
            cache.backend.seq_state_set(seq, blob)    # raises StateRestoreError (the seq is then empty)
        except CacheFault:
            raise
        except Exception as exc:
            raise StateRestoreError(f"set_data raised {type(exc).__name__}: {exc}") from exc
        n = len(e.tokens)
        n_prefix = len(snap.tokens) if snap is not None else 0
        if cache.streams:
            cache.ledger.extend(seq, n)           # the blob held the prefix too
        elif snap is not None:
            cache.backend.seq_copy(snap.seq, seq, 0, n_prefix)
            cache.ledger.share_prefix(snap.seq, seq, n_prefix)
            cache.ledger.extend(seq, n - n_prefix)
        else:
            cache.ledger.extend(seq, n)
        if cache.backend.seq_pos_max(seq) != n - 1:
            raise CacheFault(f"{e.key[:8]} restored to {cache.backend.seq_pos_max(seq) + 1} positions, expected {n}")
        dt = time.perf_counter() - t0
        self.metrics.restores.labels(level).inc()
        self.metrics.restore_seconds.labels(level).observe(dt)
        return snap

    def load_blob(self, e: CacheEntry) -> np.ndarray:
        """The stored state of ``e`` (a family snapshot, kept whole) as a blob in memory the
        backend loads fast from (a KV stream per sequence keeps snapshots in host memory)."""
        got, level = self._fetch(e)
        if got.meta.n_prefix:
            raise CacheFault(f"{e.key[:8]} is a delta, not a whole state")
        try:
            blob, _ = self._decode(e, got)
        except CacheFault:
            raise
        except Exception as exc:
            raise CodecError(f"decoding {e.key[:8]} raised {type(exc).__name__}: {exc}") from exc
        arr = np.frombuffer(blob, np.uint8)      # a view of the backend's buffer (kept alive by it)
        if isinstance(blob, (bytes, bytearray)):  # an opaque entry: into the backend's memory
            out = self.cache.backend.state_buffer(arr.size)
            out[:] = arr
            arr = out
        self.metrics.restores.labels(level).inc()
        return arr

    def _decode(self, e: CacheEntry, got: TierEntry, joined: bool = False, *, head: KVArrays | None = None,
                snap: CacheEntry | None = None) -> tuple[bytes | memoryview, CacheEntry | None]:
        """The blob to load for ``e`` and the snapshot whose prefix it needs. ``joined``: the
        blob holds the prefix's rows too (a KV stream per sequence cannot share them).
        ``head``, ``snap``: the prefix's cells and its snapshot, given (off the scheduler
        thread, which alone may bring a snapshot back); else taken from the cache."""
        cache = self.cache
        meta = got.meta
        ahead = head is not None
        if meta.codec_id == opaque.CODEC_ID:
            blob = opaque.decode(got.payload)
        else:
            if meta.codec_id in self.disabled_codecs:
                raise TierMiss(f"{e.key[:8]} was stored by the disabled codec {meta.codec_id}")
            if (meta.codec_id, meta.codec_version) != (self.codec.codec_id, self.codec.version):
                # stored under another configuration (e.g. before a restart with another codec):
                # unusable now, but not a failure of the active codec
                raise TierMiss(f"{e.key[:8]} was stored by codec {meta.codec_id} v{meta.codec_version}; "
                               f"the active codec is {self.codec.codec_id} v{self.codec.version}")
            if framing.peek_codec(got.payload) != (meta.codec_id, meta.codec_version):
                raise CodecError(f"{e.key[:8]}: payload header and index disagree on the codec")
            if not meta.n_prefix:
                snap = None
            elif not ahead:
                snap = e.snapshot
                if snap is None or len(snap.tokens) != meta.n_prefix:
                    raise TierMiss(f"{e.key[:8]}: its family snapshot is gone")
                if not cache.ensure_hot_snapshot(snap, exclude=[e]):
                    raise TierMiss(f"{e.key[:8]}: no room to restore its family snapshot")
                if joined:
                    head = cache.snapshot_arrays(snap)
            writer = self._decode_to_blob(e, got, head if meta.n_prefix else None)
            blob = writer.finish()
        if meta.codec_id == opaque.CODEC_ID:
            snap = None
        return blob, snap

    def _decode_to_blob(self, e: CacheEntry, got: TierEntry,
                        head: KVArrays | None = None) -> StateWriter:
        """The codec decodes the delta straight into the K/V rows of the blob for
        ``seq_state_set`` (the backend's ``StateLayout.allocate``): no separate build copy. With
        ``head`` (the family prefix's cells), the blob holds the prefix's rows first, copied
        in, and the codec decodes into the rows after them."""
        expected = len(e.tokens) - got.meta.n_prefix
        writers: list[StateWriter] = []
        layout = self.cache.state_layout()
        given: list[KVArrays] = []

        def alloc(template: KVArrays) -> KVArrays:
            if writers:
                raise CodecError(f"{e.key[:8]}: codec {self.codec.codec_id} asked for its output arrays twice")
            if template.n_cells != expected:
                raise CodecError(f"{e.key[:8]} decodes to {template.n_cells} cells, expected {expected}")
            if head is None:
                writers.append(layout.allocate(template, self.cache.backend.state_buffer))
                given.append(writers[0].arrays)
                return given[0]
            try:
                joined = layout.concat_layout(head, template)
            except StateFormatError as exc:
                raise CodecError(f"{e.key[:8]}: its delta does not join its family prefix: {exc}") from exc
            w = layout.allocate(joined, self.cache.backend.state_buffer)
            p = head.n_cells
            for dst, src in zip([*w.arrays.k, *w.arrays.v], [*head.k, *head.v]):
                dst[:p] = src
            writers.append(w)
            given.append(KVArrays(w.arrays.positions[p:], [a[p:] for a in w.arrays.k], [a[p:] for a in w.arrays.v],
                                  template.head_dim_k, template.head_dim_v, w.arrays.extra))
            return given[0]

        if self.blocks is not None and got.meta.kind == "session":
            arrays = self.blocks.decode_into(e.key, e.namespace, e.tokens, got.meta.n_prefix, got.payload, alloc)
        else:
            arrays = self.codec.decode_into(got.payload, alloc)
        if not writers or arrays is not given[0]:
            raise CodecError(f"{e.key[:8]}: codec {self.codec.codec_id} did not decode into the arrays it was given")
        return writers[0]

    def discard(self, e: CacheEntry) -> None:
        """Remove an entry's stored copies (it was resumed, or is gone). A dropped family
        snapshot leaves its stored sessions as orphans (they wait for it to be recomputed)."""
        if e.kind == "snapshot" and self.cache is not None:
            self._orphan_dependents(e)
            self._snap_writes.pop(e.key, None)
        else:
            self._forget_orphan(e.key)
        pending = getattr(e, "pending", None)
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _f, k=e.key: self._delete(k))
        self._delete(e.key)

    def _delete(self, key: str) -> None:
        for tier in (self.warm, self.cold):
            if tier is not None:
                tier.delete(key)
        if self.blocks is not None:
            freed = self.blocks.refs.release(key)
            if freed:        # on the writer thread, after any spill that may count on them again
                try:
                    self._writer.submit(self.blocks.free, freed)
                except RuntimeError:                     # closing: no writer any more
                    self.blocks.free(freed)

    def holds(self, e: CacheEntry) -> bool:
        pending = getattr(e, "pending", None)
        if pending is not None and not pending.done():
            return True
        return any(t is not None and t.contains(e.key) for t in (self.warm, self.cold))

    # -- introspection -------------------------------------------------------------------------
    def _tier_stats(self, tier: StorageTier | None, state: SessionState) -> dict | None:
        if tier is None:
            return None
        entries = [e for e in self.cache.entries() if e.state is state] if self.cache else []
        return {"name": tier.name, "bytes": tier.used_bytes, "capacity_bytes": tier.capacity_bytes,
                "up": self.watch.up(tier.level),
                "sessions": sum(1 for e in entries if e.kind == "session"),
                "snapshots": sum(1 for e in entries if e.kind == "snapshot")}

    def stats(self) -> dict:
        out = {}
        for key, tier, state in (("warm", self.warm, SessionState.WARM), ("cold", self.cold, SessionState.COLD)):
            s = self._tier_stats(tier, state)
            if s is not None:
                out[key] = s
        if self._orphans:
            out["orphans"] = self._n_orphans()
        out["codec"] = {"name": self.codec.codec_id, "f16_bytes": self._f16, "stored_bytes": self._stored,
                        "ratio": (self._f16 / self._stored) if self._stored else None}
        if self.blocks is not None:
            n, refs = self.blocks.refs.counts()
            out["blocks"] = {"blocks": n, "references": refs}
        return out

    def update_gauges(self) -> None:
        for key, tier, state in (("warm", self.warm, SessionState.WARM), ("cold", self.cold, SessionState.COLD)):
            s = self._tier_stats(tier, state)
            if s is not None:
                self.metrics.kv_bytes.labels(key).set(s["bytes"])
                self.metrics.sessions.labels(key).set(s["sessions"])
        self.metrics.tier_orphans.set(self._n_orphans())

    @property
    def persistent(self) -> bool:
        return self.cold is not None and self.cold.persistent

    @property
    def shared(self) -> bool:
        """The cold tier is shared with other servers (:mod:`kv3d_core.tiers.feed`)."""
        return self.cold is not None and self.cold.shared

    def publish(self, e: CacheEntry, seq: int | None) -> None:
        """A shared tier gets ``e`` now, though it stays hot (:func:`feed.publish`)."""
        feed.publish(self, e, seq)

    def persist(self) -> int:
        """Write every warm entry to the persistent tier too (shutdown): family snapshots
        first, then the sessions that need them."""
        self.flush()
        if not self.persistent or self.warm is None:
            return 0
        n = 0
        order = {"snapshot": 0, BLOCK: 1}          # what a session needs before the session
        metas = sorted(self.warm.entries(), key=lambda m: order.get(m.kind, 2))
        for meta in metas:
            if self.cold.contains(meta.key):
                continue
            entry = self.warm.get(meta.key)
            if entry is not None and self._put_cold(entry):
                n += 1
        return n

    def flush(self, timeout: float = 60) -> None:
        """Wait for every spill in flight (tests, shutdown)."""
        self._writer.submit(lambda: None).result(timeout)

    def close(self) -> None:
        try:
            self.flush()
        except Exception:
            pass
        if self._follower is not None:
            self._follower.close()
        self._writer.shutdown(wait=True)
        self._preparer.shutdown(wait=True, cancel_futures=True)
        self.watch.close()
        for tier in (self.warm, self.cold):
            if tier is not None:
                tier.close()


def build_tier_stack(cfg: DictConfig, plugins: "PluginManager", info: ModelInfo, metrics: Metrics,
                     monitor: "FailureMonitor | None" = None) -> TierStack | None:
    """The tiers a configuration asks for: RAM (``cache.ram_warm_mb`` > 0), then the
    ``tier`` plugin when it is not ``ram``; None when there are none."""
    codec = plugins.configure("codec", cfg.codec)      # a DeltaCodec: the plugin manager checks
    warm = None
    if cfg.cache.ram_warm_mb > 0:
        warm = plugins.create("tier", "ram", capacity_mb=cfg.cache.ram_warm_mb)
    cold = None
    if cfg.tier.name != "ram":
        cold = plugins.configure("tier", cfg.tier)
    if warm is None and cold is None:
        return None
    safety = cfg.get("safety", {})
    return TierStack(warm, cold, codec, info, metrics, monitor=monitor,
                     write_through=bool(cfg.cache.get("cold_write_through", True)),
                     retry_s=float(safety.get("tier_retry_s", 1.0)),
                     retry_max_s=float(safety.get("tier_retry_max_s", 60.0)),
                     follow_s=float(cfg.cache.get("follow_s", 0.0) or 0.0),
                     publish_idle=bool(cfg.cache.get("publish_idle", True)))

