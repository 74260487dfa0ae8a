"""The prefix cache: which cached KV a request reuses, and where it lives.

It owns, for one backend:

- the :class:`~kv3d_core.prefix.radix.RadixIndex` of every cached sequence
  (family snapshots and idle sessions, in any tier),
- the family snapshots: one sequence per family holding its prefix's cells,
  shared with every session of the family through ``seq_cp``; reference-counted
  by the hot sequences derived from it, evictable (LRU) only at zero,
- the hot tier's sequence ids and cell ledger, and the LRU of idle entries,
- the storage tiers below (warm/cold), through a :class:`~kv3d_core.tiers.stack.TierStack`.

Its entries are :class:`~kv3d_core.tiers.entry.CacheEntry` records, which the tier stack
spills, restores and re-indexes as well.

Two KV layouts (the backend's ``info.build["kv_unified"]``):

- **a KV stream per sequence** (``cache.layout=streams``, the default): every running
  request decodes in a stream of its own, so a step attends only to each sequence's own
  cells. A family snapshot is a host copy of its prefix's state (built once, stored once
  in the tiers below) that is loaded into a request's stream on admission
  (``seq_state_set``); a resumed session's stream gets one blob with the prefix's rows and
  its decoded delta. When a request ends its session stays in its stream only while
  streams are plentiful (``cache.hot_sessions``, ``cache.free_streams``); the rest leave
  for the warm tier (their delta past the family prefix, through the codec).
- **unified** (``cache.layout=unified``): one cell pool; a family snapshot is a sequence
  whose cells every family member shares (``seq_cp``); idle sessions stay in the pool
  until their cells are needed, and every step attends over every used cell.

Only the scheduler thread calls it.
"""

from __future__ import annotations

import itertools
import collections
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from kv3d_core.contracts.detector import Candidate, FamilyKey, PrefixDetector, PromptView, family_digest
from kv3d_core.contracts.session import SessionState
from kv3d_core.contracts.backend import BatchEntry
from kv3d_core.contracts.codec import KVArrays
from kv3d_core.contracts.state import StateLayout
from kv3d_core.errors import BackendError, CacheFault, NoFreeCells, QualityGuardTripped, StateFormatError
from kv3d_core.prefix.radix import RadixIndex
from kv3d_core.tiers.entry import CacheEntry
from kv3d_core.tiers.hot import CellLedger, SeqPool, StreamLedger

if TYPE_CHECKING:  # pragma: no cover
    from kv3d_core.contracts.backend import ExecutionBackend
    from kv3d_core.safety import FailureMonitor
    from kv3d_core.metrics import Metrics
    from kv3d_core.prefix.workload import WorkloadRecorder
    from kv3d_core.tiers.stack import Prepared, TierStack

log = logging.getLogger("kv3d.prefix")

_TIER_RANK = {SessionState.IDLE: 0, SessionState.WARM: 1, SessionState.COLD: 2}


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)) in nats."""
    lp = p_logits - p_logits.max()
    lp -= np.log(np.exp(lp).sum())
    lq = q_logits - q_logits.max()
    lq -= np.log(np.exp(lq).sum())
    return float(np.sum(np.exp(lp) * (lp - lq)))


@dataclass
class Lease:
    """What :meth:`PrefixCache.acquire` gave a request."""

    seq: int
    n_cached: int
    source: str                    # "miss" | "hot" | "warm" | "cold"
    snapshot: CacheEntry | None


class PrefixCache:
    def __init__(
        self,
        backend: "ExecutionBackend",
        detector: PrefixDetector,
        metrics: "Metrics",
        *,
        enabled: bool = True,
        min_snapshot_tokens: int = 32,
        hot_idle_s: float | None = None,
        hot_idle_watermark: float = 0.5,
        tiers: "TierStack | None" = None,
        monitor: "FailureMonitor | None" = None,
        hot_sessions: int | None = None,
        free_streams: int = 1,
        prefix_host_mb: float = 512,
        prepare_restores: bool = True,
        workload: "WorkloadRecorder | None" = None,
    ) -> None:
        self.backend = backend
        self.info = backend.info
        self.detector = detector
        self.metrics = metrics
        self.enabled = enabled
        self.min_snapshot_tokens = max(1, int(min_snapshot_tokens))
        if hot_idle_s is not None and not float(hot_idle_s) >= 0:
            raise ValueError(f"cache.hot_idle_s={hot_idle_s!r}: use seconds >= 0, or null (never)")
        self.hot_idle_s = None if hot_idle_s is None else float(hot_idle_s)
        if not 0 <= float(hot_idle_watermark) <= 1:
            raise ValueError(f"cache.hot_idle_watermark={hot_idle_watermark!r}: use a fraction 0..1")
        self.hot_idle_watermark = float(hot_idle_watermark)
        self.tiers = tiers
        self.pool = SeqPool(self.info.n_seq_max)
        self.streams = not self.info.build.get("kv_unified", True)
        if self.streams:
            self.ledger: CellLedger | StreamLedger = StreamLedger(self.info.n_seq_max,
                                                                  self.info.n_ctx // self.info.n_seq_max)
        else:
            self.ledger = CellLedger(self.info.n_ctx)
        if hot_sessions is not None and int(hot_sessions) < 0:
            raise ValueError(f"cache.hot_sessions={hot_sessions!r}: use a count >= 0, or null (no limit)")
        self.hot_sessions = None if hot_sessions is None else int(hot_sessions)
        self.free_streams = max(0, int(free_streams))
        self.prefix_host_bytes = int(float(prefix_host_mb) * 2**20)
        self.prepare_restores = bool(prepare_restores)
        self.workload = workload                 # the analytics' view of lookups (prefix/workload.py)
        self._host: OrderedDict[CacheEntry, None] = OrderedDict()   # snapshots' host copies, LRU first
        self._host_used = 0
        self._prefix_loads = True       # streams: copies into a stream (set_data) allowed
        self.index: RadixIndex[CacheEntry] = RadixIndex()
        self.snapshots: dict[tuple[str, str], CacheEntry] = {}
        self._idle: OrderedDict[CacheEntry, None] = OrderedDict()   # hot, evictable candidates, LRU first
        self._by_key: dict[str, CacheEntry] = {}
        self.monitor = monitor
        self._restore_off = False
        if monitor is not None:
            monitor.on_disable("restore", self._request_restore_off)
        if tiers is not None:
            tiers.attach(self)

    # -- faults --------------------------------------------------------------------------
    def _fault(self, exc: CacheFault, what: str) -> None:
        if self.monitor is not None:
            self.monitor.failure(exc.component, exc.reason, f"{what}: {exc}")
        else:
            self.metrics.fallbacks.labels(exc.reason).inc()
            log.warning("%s failed (%s): served by recompute", what, exc)

    def _request_restore_off(self) -> None:
        self._restore_off = True                 # applied on the scheduler thread

    def _apply_restore_off(self) -> None:
        if not self._restore_off:
            return
        if self.streams and self._prefix_loads:
            # prefixes reach a stream through set_data too: stop loading them (recompute)
            self._prefix_loads = False
            for e in [e for e in self._by_key.values() if e.kind == "snapshot"]:
                self.drop_entry(e)
            log.error("loading family prefixes into KV streams switched off: family members recompute them")
        if self.tiers is None:
            return
        for e in [e for e in self._by_key.values() if e.state in (SessionState.WARM, SessionState.COLD)]:
            self.drop_entry(e)
        log.error("spilling and restoring switched off: idle sessions are dropped when cells are needed")
        self.tiers = None

    # -- bookkeeping ---------------------------------------------------------------
    def _touch(self, e: CacheEntry) -> None:
        e.last_used = time.monotonic()
        if e in self._idle:
            self._idle.move_to_end(e)

    # -- entries (scheduler thread; the tier stack's view of the cache, tiers/stack.CacheView) --
    def entry(self, key: str) -> CacheEntry | None:
        """The entry stored under ``key`` (a session's key, a snapshot's family digest)."""
        return self._by_key.get(key)

    def entries(self) -> list[CacheEntry]:
        """Every entry, in every tier (a list: callers drop entries while walking it)."""
        return list(self._by_key.values())

    def add_entry(self, e: CacheEntry) -> None:
        """Index ``e`` (found by its tokens from now on)."""
        self.index.insert(e)
        self._by_key[e.key] = e
        if e.kind == "snapshot":
            self.snapshots[(e.namespace, e.family)] = e

    def forget_entry(self, e: CacheEntry) -> None:
        """Unindex ``e``; whatever it holds (cells, stored copies) is the caller's to release."""
        self.index.remove(e)
        self._by_key.pop(e.key, None)
        self._idle.pop(e, None)
        if e.kind == "snapshot" and self.snapshots.get((e.namespace, e.family)) is e:
            del self.snapshots[(e.namespace, e.family)]

    def _free_seq(self, seq: int) -> None:
        self.backend.seq_remove(seq)
        self.ledger.drop(seq)
        self.pool.release(seq)

    def _make_idle(self, e: CacheEntry) -> None:
        """``e`` (hot) is evictable from now on."""
        e.idle_since = time.monotonic()
        self._idle[e] = None
        self._idle.move_to_end(e)

    def _unref(self, snap: CacheEntry | None) -> None:
        if snap is None or self.streams:         # streams: snapshots hold no cells of a sequence
            return
        snap.refs -= 1
        if snap.refs <= 0 and snap.hot:
            snap.refs = 0
            self._make_idle(snap)

    def _ref(self, snap: CacheEntry | None) -> None:
        if snap is None or self.streams:
            return
        snap.refs += 1
        self._idle.pop(snap, None)

    def update_gauges(self) -> None:
        m = self.metrics
        m.prefix_families.set(len(self.snapshots))
        m.kv_bytes.labels("hot").set(self.ledger.used * self.info.kv_bytes_per_token)
        if self.streams:
            m.kv_bytes.labels("host").set(self._host_used)
        m.sessions.labels("hot").set(sum(1 for e in self._by_key.values() if e.hot and e.kind == "session"))
        if self.tiers is not None:
            self.tiers.update_gauges()

    # -- lookup ----------------------------------------------------------------------
    def plan(self, prompt: PromptView, family: FamilyKey) -> tuple[CacheEntry | None, int]:
        """The cached entry to reuse and how many tokens of it (deepest match wins;
        among equals hot before warm before cold, then most recent)."""
        if not self.enabled:
            return None, 0
        limit = len(prompt.tokens) - 1          # at least one token must be decoded for logits
        best: CacheEntry | None = None
        best_n = 0
        seen: set[CacheEntry] = set()
        # The request's own namespace (its tenant and salt) holds sessions and snapshots; a family
        # shared across tenants adds its snapshot's namespace, where only snapshots live.
        spaces = [family.namespace] if family.scope == family.namespace else [family.namespace, family.scope]
        for space in spaces:
            for lcp, entries in self.index.match(space, prompt.tokens):
                if min(lcp, limit) < best_n or (best is not None and min(lcp, limit) == best_n and best.hot):
                    break
                for e in itertools.islice((x for x in entries if x not in seen), 256):
                    seen.add(e)
                    if space != family.namespace and e.kind != "snapshot":
                        continue                 # never another tenant's conversation
                    cand = Candidate(e.family, lcp, int(e.tokens.shape[0]), e.kind)
                    n = min(self.detector.reusable(prompt, family, cand), lcp, limit)
                    if n <= 0:
                        continue
                    if (n > best_n or (n == best_n and best is not None and
                                       (_TIER_RANK[e.state], -e.last_used) < (_TIER_RANK[best.state], -best.last_used))):
                        best, best_n = e, n
        return best, best_n

    # -- capacity --------------------------------------------------------------------
    def evictable_cells(self, exclude: Iterable[CacheEntry] = ()) -> int:
        """Cells that evicting every evictable idle entry would free: idle sessions, and
        snapshots no running request holds (their cells are shared with the idle sessions
        of their family, so they are counted together, not entry by entry)."""
        ex = set(exclude)
        sessions = [e for e in self._idle if e.kind == "session" and e not in ex and e.seq is not None]
        held = collections.Counter(e.snapshot for e in sessions if e.snapshot is not None)
        snaps = {e for e in self._idle if e.kind == "snapshot"} | set(held)   # idle, or idle once those go
        snaps = [e for e in snaps if e not in ex and e.seq is not None and e.refs - held[e] <= 0]
        return self.ledger.freed_by(e.seq for e in sessions + snaps)

    def _evict_one(self, exclude: set[CacheEntry]) -> bool:
        victim = None
        for e in self._idle:                     # idle sessions first, LRU first
            if e.kind == "session" and e not in exclude:
                victim = e
                break
        if victim is None:
            for e in self._idle:                 # then snapshots nobody shares
                if e.kind == "snapshot" and e.refs <= 0 and e not in exclude:
                    victim = e
                    break
        if victim is None:
            return False
        self.evict(victim)
        return True

    def evict(self, e: CacheEntry) -> None:
        """Move an idle hot entry out of the context: spilled to the tiers when there
        are any (and it is worth keeping), else dropped."""
        assert e.seq is not None
        seq = e.seq
        self._idle.pop(e, None)
        kept = False
        if (self.tiers is not None and self.enabled and (e.kind == "snapshot" or e.pending is not None)
                and self.tiers.holds(e)):
            kept = True                          # its stored (or published) copy is still valid: nothing to write
        elif self.tiers is not None and self.enabled:
            try:
                kept = self.tiers.spill(e, seq)
            except CacheFault as exc:
                self._fault(exc, f"spill of {e.key[:8]}")
                kept = False
        self._free_seq(seq)
        e.seq = None
        if e.kind == "session":
            self._unref(e.snapshot)
        if kept:
            e.state = SessionState.WARM
        else:
            e.state = SessionState.DROPPED
            self.forget_entry(e)
        self.metrics.evictions.labels("hot").inc()

    def ensure_cells(self, n: int, exclude: Iterable[CacheEntry] = ()) -> bool:
        if self.streams:
            # every sequence decodes in its own stream, and requests are limited to a stream's
            # size: a batch always has its cells, however many tokens it holds across streams
            # (n may exceed one stream); what a request waits for is a free stream
            return True
        ex = set(exclude)
        while self.ledger.free < n:
            if not self._evict_one(ex):
                return False
        return True

    def trim_idle(self, now: float | None = None) -> int:
        """Spill hot entries idle for longer than ``hot_idle_s`` while the hot tier is
        fuller than ``hot_idle_watermark`` (a fraction of its cells), oldest first, until
        it is not.

        Why: llama.cpp's unified KV cache computes every step's attention over the
        whole used cell range, so idle sessions' cells slow every other request's steps
        (docs/BENCHMARKS.md, "Hot-tier size"), while spilling one costs a state copy and
        an encode, and bringing it back a restore. Below the watermark the span is
        bounded and spilling would be work for nothing (on a GPU, where a step is cheap,
        that work costs more than the cells). The scheduler calls this between steps
        only while requests run (an idle server pays nothing for what it keeps). Sessions
        go first; a family snapshot becomes idle when the last sequence sharing it goes
        and may leave ``hot_idle_s`` later. Only with a tier below to spill to (without
        one, idle entries stay until their cells are needed). Off unless configured: on
        the 2-core CPU bench it cost tokens/s, on the H200 it cut hits' TTFT (measured both
        ways in docs/BENCHMARKS.md). Returns the entries spilled."""
        if self.hot_idle_s is None or self.tiers is None or not self.enabled or not self._idle or self.streams:
            return 0
        limit = self.hot_idle_watermark * self.ledger.n_cells
        if self.ledger.used <= limit:
            return 0
        now = time.monotonic() if now is None else now
        cutoff = now - self.hot_idle_s
        done = 0
        for kind in ("session", "snapshot"):
            stale = sorted((x for x in self._idle if x.kind == kind and x.idle_since < cutoff and x.seq is not None),
                           key=lambda x: x.idle_since)
            for e in stale:
                if self.ledger.used <= limit:
                    return done
                if kind == "snapshot" and e.refs > 0:
                    continue
                self.evict(e)
                self.metrics.idle_spills.labels(kind).inc()
                done += 1
        return done

    def alloc_seq(self, exclude: Iterable[CacheEntry] = ()) -> int | None:
        ex = set(exclude)
        while self.pool.free == 0:
            if not self._evict_one(ex):
                return None
        return self.pool.alloc()

    # -- request life cycle ----------------------------------------------------------
    def prepare(self, prompt: PromptView, family: FamilyKey) -> "Prepared | None":
        """A request is waiting for admission: when it will resume a session stored below
        the hot tier (KV stream per sequence), start decoding that session's state off the
        scheduler thread (:meth:`TierStack.prepare`); :meth:`acquire` given the handle then
        only loads the blob. None when there is nothing to prepare."""
        if (not (self.streams and self.enabled and self.prepare_restores and self.tiers is not None)
                or self._restore_off):
            return None
        entry, _ = self.plan(prompt, family)
        if (entry is None or entry.kind != "session" or entry.seq is not None
                or entry.state not in (SessionState.WARM, SessionState.COLD)):
            return None
        return self.tiers.prepare(entry)

    def acquire(self, prompt: PromptView, family: FamilyKey, record: bool = True,
                prepared: "Prepared | None" = None) -> Lease | None:
        """A sequence for a request, with as much of its prompt as can be reused
        already in it. None when no sequence or cells can be freed now. ``record``: count
        the lookup in the prefix metrics (a preempted request resuming is not counted again).
        ``prepared``: from :meth:`prepare`, used when the lookup still picks its entry."""
        if self.tiers is not None:
            self.tiers.apply_disables()
            self._apply_restore_off()
        elif self._restore_off:
            self._apply_restore_off()
        if self.tiers is not None:
            self.tiers.drain_gone()
        for _attempt in range(3):
            entry, n = self.plan(prompt, family)
            try:
                lease = self._acquire_from(entry, n, prompt, prepared)
            except CacheFault as exc:
                # restore failed: that entry is gone; try the next best (or recompute)
                if exc.reason == "tier_miss":
                    log.debug("%s: %s", entry.key[:8] if entry else "-", exc)
                else:
                    self._fault(exc, f"restore of {entry.key[:8] if entry else '-'}")
                continue
            if lease is None:
                return None
            if (lease.snapshot is None and family.length == 0 and entry is not None and entry.kind == "session"
                    and self.min_snapshot_tokens <= lease.n_cached < len(entry.tokens)
                    and not _same_conversation(entry, lease.n_cached)):
                lease.snapshot = self._derive_snapshot(lease.seq, prompt.tokens, lease.n_cached, family)
            if record:
                self._record(prompt, family, lease.n_cached)
            return lease
        lease = self._acquire_from(None, 0, prompt)
        if lease is not None and record:
            self._record(prompt, family, 0)
        return lease

    def _record(self, prompt: PromptView, family: FamilyKey, n_cached: int) -> None:
        self.metrics.record_prefix(n_cached > 0, n_cached)
        if self.workload is not None:
            self.workload.record(prompt, family, n_cached)

    def implicit_family(self, family: FamilyKey, tokens, n: int) -> FamilyKey:
        """The implicit family of a prompt without one of its own (a raw completion, no system
        message) whose first ``n`` tokens other requests share: named by those tokens, in the
        prompt's own namespace."""
        return FamilyKey(family.namespace, family_digest(family.scope, list(tokens[:n])), n, family.snapshot_namespace)

    def _derive_snapshot(self, seq: int, tokens, n: int, family: FamilyKey) -> CacheEntry | None:
        """A prompt without a family of its own (a raw completion, no system message) shared its
        first ``n`` tokens with a cached conversation it does not continue: those tokens are a
        prefix several requests share -- an implicit family. Its snapshot is made now from the
        request's sequence (which holds them), so later requests sharing it load the prefix
        instead of restoring whole conversations, and conversations store only their deltas."""
        snap = self.maybe_snapshot(seq, n, list(tokens), self.implicit_family(family, tokens, n), None)
        if snap is not None:
            self.metrics.derived_families.inc()
        return snap

    def _acquire_from(self, entry: CacheEntry | None, n: int, prompt: PromptView,
                      prepared: "Prepared | None" = None) -> Lease | None:
        if self.streams:
            return self._acquire_stream(entry, n, prepared)
        uncached = len(prompt.tokens) - n
        protect = {entry} if entry is not None else set()
        if entry is not None and entry.snapshot is not None:
            protect.add(entry.snapshot)
        if self.ledger.free + self.evictable_cells(protect) < uncached + 1:
            return None
        if entry is None:
            seq = self.alloc_seq()
            return Lease(seq, 0, "miss", None) if seq is not None else None

        self._touch(entry)
        if entry.kind == "snapshot" and not entry.hot:
            if not self.ensure_hot_snapshot(entry):
                return None
        snap = entry if entry.kind == "snapshot" else entry.snapshot
        if snap is not None and n < len(snap.tokens):
            snap = None                          # the request does not cover the whole family prefix
        if entry.hot:
            if entry.kind == "session" and n == len(entry.tokens):
                # the request continues this session: take its sequence over
                seq = entry.seq
                self._discard_published(entry)
                self.forget_entry(entry)
                entry.seq = None
                entry.state = SessionState.PREFILL
                if snap is not entry.snapshot:
                    self._ref(snap)
                    self._unref(entry.snapshot)
                return Lease(seq, n, "hot", snap)
            seq = self.alloc_seq(protect)
            if seq is None:
                return None
            self.backend.seq_copy(entry.seq, seq, 0, n)
            self.ledger.share_prefix(entry.seq, seq, n)
            self._ref(snap)
            return Lease(seq, n, "hot", snap)
        # warm or cold: restore into a fresh sequence; its own cells must fit first
        assert self.tiers is not None
        own = len(entry.tokens) - (entry.n_prefix if entry.snapshot is not None else 0)
        need = own + 1
        if entry.snapshot is not None and not entry.snapshot.hot:
            need += len(entry.snapshot.tokens)   # its spilled family snapshot comes back first
        if not self.ensure_cells(need, protect):
            return None
        return self._restore_spilled(entry, n, protect)

    def _acquire_stream(self, entry: CacheEntry | None, n: int, prepared: "Prepared | None" = None) -> Lease | None:
        """:meth:`_acquire_from` with a KV stream per sequence: the request gets a stream of its
        own, filled with what it reuses (a hot session's stream is taken over as it is)."""
        if entry is not None and not self._prefix_loads and not (
                entry.kind == "session" and entry.seq is not None and n == len(entry.tokens)):
            entry, n = None, 0                   # only a session still in its stream can be used now
        if entry is None:
            seq = self.alloc_seq()
            return Lease(seq, 0, "miss", None) if seq is not None else None
        self._touch(entry)
        snap = entry if entry.kind == "snapshot" else entry.snapshot
        if snap is not None and n < len(snap.tokens):
            snap = None                          # the request does not cover the whole family prefix
        if entry.kind == "session" and entry.seq is not None:
            if n == len(entry.tokens):           # the request continues this session: its stream is
                seq = entry.seq                  # taken over as it is
                self._discard_published(entry)
                self.forget_entry(entry)
                entry.seq = None
                entry.state = SessionState.PREFILL
                return Lease(seq, n, "hot", snap)
            seq = self.alloc_seq({entry})        # a branch of it: its first n positions, copied
            if seq is None:
                return None
            try:
                self._copy_positions(entry.seq, seq, n)
            except CacheFault:
                self._free_seq(seq)
                raise
            return Lease(seq, n, "hot", snap)
        if entry.kind == "snapshot":
            source = "hot" if entry.blob is not None else entry.state.value
            if not self.ensure_hot_snapshot(entry):
                return None
            seq = self.alloc_seq()
            if seq is None:
                return None
            try:
                self._load_prefix(entry, seq, n)
            except CacheFault:
                self._free_seq(seq)
                raise
            return Lease(seq, n, source, snap)
        # a spilled session: one blob of its family prefix and its delta, into a fresh stream
        assert self.tiers is not None
        protect = {entry} | ({entry.snapshot} if entry.snapshot is not None else set())
        return self._restore_spilled(entry, n, protect, prepared)

    def _discard_published(self, entry: CacheEntry) -> None:
        """A hot session another request takes over had been published to a shared tier
        (:meth:`TierStack.publish`): that copy is stale now; the session is published again,
        longer, when this request ends."""
        if entry.pending is not None and self.tiers is not None:
            self.tiers.discard(entry)
            entry.pending = None

    def _restore_spilled(self, entry: CacheEntry, n: int, protect: set[CacheEntry],
                         prepared: "Prepared | None" = None) -> Lease | None:
        """Both layouts: a warm or cold entry (and its family snapshot) restored into a fresh
        sequence, quality-checked when sampled, cut to the ``n`` positions the request reuses."""
        assert self.tiers is not None
        seq = self.alloc_seq(protect)
        if seq is None:
            return None
        tier = entry.state.value
        try:
            restored_snap = self._restore_with_room(entry, seq, protect, prepared)
            if entry.kind == "session" and self.tiers.should_check_quality():
                self._quality_check(entry, seq, restored_snap, protect)
        except CacheFault:
            self._free_seq(seq)
            self.drop_entry(entry)
            raise
        entry.pending = None
        if n < len(entry.tokens):
            self.backend.seq_remove(seq, n, -1)
            self.ledger.truncate(seq, n)
        else:
            self.tiers.discard(entry)            # the session continues; its stored copy is stale
            self.forget_entry(entry)
            entry.state = SessionState.PREFILL
        if restored_snap is None or n < len(restored_snap.tokens):
            return Lease(seq, n, tier, None)
        self._ref(restored_snap)                 # (a no-op with streams: snapshots hold no cells there)
        return Lease(seq, n, tier, restored_snap)

    # -- KV stream per sequence: moving cells through host memory -------------------------
    def _load_prefix(self, snap: CacheEntry, seq: int, n: int) -> None:
        """Fill the empty sequence ``seq`` with the snapshot's positions ``[0, n)``."""
        if not self.streams:
            self.backend.seq_copy(snap.seq, seq, 0, n)
            self.ledger.share_prefix(snap.seq, seq, n)
            return
        assert snap.blob is not None
        try:
            self.backend.seq_state_set(seq, snap.blob)
        except NoFreeCells:
            raise
        n_snap = len(snap.tokens)
        if n < n_snap:
            self.backend.seq_remove(seq, n, -1)
        self.ledger.extend(seq, min(n, n_snap))

    def _copy_positions(self, src: int, dst: int, n: int) -> None:
        """Streams: ``dst`` (empty) gets ``src``'s positions ``[0, n)``, through host memory
        (llama.cpp's cross-stream ``seq_cp`` copies a whole stream, later, at the next decode;
        a branch of a hot session is rare enough for the safe path)."""
        layout = self.state_layout()
        head = layout.cut(layout.parse(self.backend.seq_state_get(src)), n)
        self.backend.seq_state_set(dst, layout.build(head))
        self.ledger.extend(dst, n)

    def snapshot_arrays(self, snap: CacheEntry) -> KVArrays:
        """Streams: the snapshot's cells, read from its host copy (views into it)."""
        if snap.blob is None and not self.ensure_hot_snapshot(snap):
            raise CacheFault(f"family snapshot {snap.key[:8]} could not be brought back")
        return self.state_layout().parse(snap.blob)

    def state_layout(self) -> StateLayout:
        """The backend's :class:`~kv3d_core.contracts.state.StateLayout`; a backend without
        one raises :class:`StateFormatError` (its states are kept whole, never cut)."""
        layout = self.backend.state_layout
        if layout is None:
            raise StateFormatError("the backend's state blobs have no K/V layout")
        return layout

    def _host_add(self, snap: CacheEntry) -> None:
        self._host[snap] = None
        self._host_used += int(snap.blob.nbytes)
        while self._host_used > self.prefix_host_bytes and len(self._host) > 1:
            victim = next(iter(self._host))
            if self.tiers is not None and self.tiers.holds(victim):
                self._host_drop(victim)
                victim.state = SessionState.WARM
                self.metrics.evictions.labels("hot").inc()
            else:                                # nowhere else: the family is computed anew later
                self.drop_entry(victim)

    def _host_drop(self, e: CacheEntry) -> None:
        if e in self._host:
            del self._host[e]
            self._host_used -= int(e.blob.nbytes)
        e.blob = None

    def _spill_idle_sessions(self) -> int:
        """Streams: idle sessions leave their streams for the tiers below, least recently used
        first, while more than ``hot_sessions`` of them stay or fewer than ``free_streams``
        streams are free (a new request should find a stream without waiting for a spill)."""
        if not self.streams or self.tiers is None or not self.enabled:
            return 0
        done = 0
        idle = [e for e in self._idle if e.kind == "session" and e.seq is not None]
        while idle and ((self.hot_sessions is not None and len(idle) > self.hot_sessions)
                        or self.pool.free < self.free_streams):
            self.evict(idle.pop(0))
            self.metrics.idle_spills.labels("session").inc()
            done += 1
        return done

    def _restore_with_room(self, entry: CacheEntry, seq: int, exclude: set[CacheEntry],
                           prepared: "Prepared | None" = None) -> CacheEntry | None:
        """Restore ``entry`` into ``seq``; when the backend finds too few free cells for the
        state, make room and try once more.

        The ledger makes room before every restore, so this is a safety net for when it and
        llama.cpp disagree (cells llama.cpp still holds, other cache layouts): evict idle
        entries (least recently used first) until as many cells again as the entry needs are
        free, then retry. A second refusal reaches the caller (recompute); being a capacity
        shortfall, it never switches restoring off."""
        assert self.tiers is not None
        try:
            return self.tiers.restore(entry, seq, prepared)
        except NoFreeCells:
            need = len(entry.tokens)
            target = min(self.ledger.n_cells, self.ledger.free + need)
            ex = set(exclude) | {entry}
            if entry.snapshot is not None:
                ex.add(entry.snapshot)
            evicted = 0
            while self.ledger.free < target and self._evict_one(ex):
                evicted += 1
            if not evicted:
                raise
            log.info("restore of %s found too few free cells: evicted %d idle entries, retrying",
                     entry.key[:8], evicted)
            self.metrics.restore_retries.inc()
            return self.tiers.restore(entry, seq, prepared)

    def _quality_check(self, entry: CacheEntry, seq: int, snap: CacheEntry | None,
                       protect: set[CacheEntry]) -> None:
        """The quality guard: recompute the restored session's own tokens in a scratch
        sequence and compare the next-token distribution of its last position with the
        restored sequence's. Raises :class:`QualityGuardTripped` over the threshold."""
        toks = [int(t) for t in entry.tokens]
        n = len(toks)
        start = len(snap.tokens) if snap is not None else 0
        if n - start < 1 or n < 2:
            return
        keep = protect | ({snap} if snap else set())
        if not self.ensure_cells(n - start + 1, keep):
            return                               # no room for a check now: skip this sample
        scratch = self.alloc_seq(keep)
        if scratch is None:
            return
        b = self.backend
        try:
            # restored: drop its last cell and decode it again, keeping the logits
            b.seq_remove(seq, n - 1, -1)
            out = b.decode([BatchEntry(seq, [toks[-1]], n - 1, True)])[0]
            restored = np.array(b.logits(out), dtype=np.float64)
            # recomputed: the family prefix shared from the snapshot, the rest decoded anew
            if start:
                self._load_prefix(snap, scratch, start)
            pos, step = start, b.max_batch_tokens
            while pos < n:
                chunk = toks[pos:pos + step]
                out = b.decode([BatchEntry(scratch, chunk, pos, pos + len(chunk) == n)])[0]
                pos += len(chunk)
            fresh = np.array(b.logits(out), dtype=np.float64)
        except BackendError as exc:              # the check itself could not run: the restore is suspect
            raise CacheFault(f"quality check could not run: {exc}") from exc
        finally:
            b.seq_remove(scratch)
            self.ledger.drop(scratch)
            self.pool.release(scratch)
        kl = _kl(fresh, restored)
        self.metrics.quality_checks.inc()
        limit = self.monitor.cfg.quality_max_kl if self.monitor is not None else 0.05
        if not kl <= limit:
            raise QualityGuardTripped(f"restored next-token distribution is {kl:.3g} nats (KL) from a "
                                      f"recompute's; the limit is {limit:g}")

    def drop_entry(self, e: CacheEntry) -> None:
        """Drop ``e`` everywhere: its cells, its host copy, its stored copies, its index entry."""
        self._host_drop(e)
        if e.seq is not None:
            self._free_seq(e.seq)
            e.seq = None
            if e.kind == "session":
                self._unref(e.snapshot)
        if self.tiers is not None:
            self.tiers.discard(e)
        e.state = SessionState.DROPPED
        self.forget_entry(e)

    def snapshot_entry(self, family: FamilyKey) -> CacheEntry | None:
        return self.snapshots.get((family.scope, family.digest))

    def ensure_hot_snapshot(self, snap: CacheEntry, exclude: Iterable[CacheEntry] = ()) -> bool:
        """Bring a spilled snapshot back (for a session restore): into a sequence (unified),
        or into host memory (a KV stream per sequence)."""
        if snap.hot:
            if snap in self._host:
                self._host.move_to_end(snap)
            return True
        if self.tiers is None:
            return False
        if self.streams:
            try:
                blob = self.tiers.load_blob(snap)
            except CacheFault:
                self.drop_entry(snap)
                raise
            snap.blob = blob
            snap.state = SessionState.IDLE
            self._touch(snap)
            self._host_add(snap)
            return snap.blob is not None
        keep = set(exclude) | {snap}
        if not self.ensure_cells(len(snap.tokens), keep):
            return False
        seq = self.alloc_seq(keep)
        if seq is None:
            return False
        try:
            self._restore_with_room(snap, seq, set(exclude))
        except CacheFault:
            self._free_seq(seq)
            self.drop_entry(snap)
            raise
        self._touch(snap)
        snap.seq = seq
        snap.state = SessionState.IDLE
        if snap.refs <= 0:
            self._make_idle(snap)
        return True

    def maybe_snapshot(self, seq: int, n_past: int, tokens: list[int], family: FamilyKey,
                       current: CacheEntry | None) -> CacheEntry | None:
        """After a prefill step: when the sequence now holds its whole family prefix
        and the family has no snapshot yet, share those cells into a new snapshot
        sequence (no copy, no recompute). Returns the snapshot the sequence now
        shares cells with (``current`` when nothing changed)."""
        if (not self.enabled or current is not None or family.length < self.min_snapshot_tokens
                or n_past < family.length):
            return current
        if self.streams:
            return self._stream_snapshot(seq, tokens, family)
        existing = self.snapshot_entry(family)
        if existing is not None:
            if existing.hot or existing.state in (SessionState.WARM, SessionState.COLD):
                return None                      # made by a concurrent request; ours is computed apart
        snap_seq = self.alloc_seq()
        if snap_seq is None:
            return None
        L = family.length
        self.backend.seq_copy(seq, snap_seq, 0, L)
        self.ledger.share_prefix(seq, snap_seq, L)
        snap = CacheEntry(
            key=family.digest, kind="snapshot", namespace=family.scope, family=family.digest,
            tokens=np.asarray(tokens[:L], dtype=np.int32), seq=snap_seq,
        )
        self.add_entry(snap)
        self._ref(snap)
        if self.tiers is not None:
            self.tiers.publish(snap, snap_seq)   # a shared tier: other servers need not compute it
        return snap

    def shares_prefix(self, family: FamilyKey) -> bool:
        """Whether the first request to compute ``family``'s prefix makes it a snapshot the
        others can load (:meth:`maybe_snapshot`): then a request of the family that is still
        computing the prefix may wait for the one furthest along, and adopt its snapshot."""
        return (self.enabled and family.length >= self.min_snapshot_tokens
                and (self._prefix_loads or not self.streams))

    def adopt_snapshot(self, seq: int, n_past: int, tokens: list[int],
                       family: FamilyKey) -> tuple[CacheEntry | None, int]:
        """A request holds the first ``n_past`` tokens of its family prefix in ``seq`` and
        another request has just finished that prefix: its snapshot replaces what ``seq``
        holds, so the prefix is computed once, not once per request that arrived before it
        existed. Returns the snapshot and the positions ``seq`` now holds: ``(None,
        n_past)`` when there is nothing to adopt, ``(None, 0)`` when loading it failed (the
        sequence is then empty, and the request computes its prompt itself)."""
        L = family.length
        snap = self.snapshot_entry(family)
        if (snap is None or not self.enabled or n_past >= L or len(snap.tokens) != L
                or not np.array_equal(snap.tokens, tokens[:L])):
            return None, n_past
        try:
            if not self.ensure_hot_snapshot(snap):
                return None, n_past
            self.backend.seq_remove(seq)
            self.ledger.truncate(seq, 0)
            self._load_prefix(snap, seq, L)
        except Exception as exc:                 # CacheFault, NoFreeCells, a backend refusal
            log.warning("adopting the snapshot of family %s failed: %s", family.digest[:8], exc)
            self.backend.seq_remove(seq)
            self.ledger.truncate(seq, 0)
            return None, 0
        self._touch(snap)
        self._ref(snap)                          # (a no-op with streams: snapshots hold no cells there)
        self.metrics.snapshot_adoptions.inc()
        return snap, L

    def fork(self, src: int, n: int, snapshot: CacheEntry | None) -> int | None:
        """A new sequence sharing the first ``n`` cells of the running sequence ``src``
        (``seq_cp``: no copy), and its family snapshot when it has one: the other choices of
        a request with ``n`` > 1, which start from its prompt. None when no sequence can be
        freed now."""
        seq = self.alloc_seq({snapshot} if snapshot is not None else ())
        if seq is None:
            return None
        if self.streams:
            # ``src`` holds just the prompt's ``n`` positions (no token of the reply is decoded
            # yet): its whole state is the copy (llama.cpp's cross-stream ``seq_cp`` copies a
            # whole stream too, but only later, at the next decode)
            try:
                self.backend.seq_state_set(seq, self.backend.seq_state_get(src))
            except BaseException:
                self._free_seq(seq)
                raise
            self.ledger.extend(seq, n)
        else:
            self.backend.seq_copy(src, seq, 0, n)
            self.ledger.share_prefix(src, seq, n)
        self._ref(snapshot)
        return seq

    def _stream_snapshot(self, seq: int, tokens: list[int], family: FamilyKey) -> CacheEntry | None:
        """Streams: the family's snapshot -- its prefix's state, copied once from the first
        sequence that computed it into host memory (and stored once in the tiers below).
        Family members that computed the prefix themselves share the existing one for their
        deltas (the same tokens give the same cells)."""
        if not self._prefix_loads:
            return None
        existing = self.snapshot_entry(family)
        if existing is not None:
            return existing
        L = family.length
        try:
            layout = self.state_layout()
            built = layout.build(layout.cut(layout.parse(self.backend.seq_state_get(seq)), L))
        except StateFormatError as exc:
            log.debug("no snapshot for family %s: %s", family.digest[:8], exc)
            self.metrics.codec_fallback.inc()
            return None
        blob = self.backend.state_buffer(len(built))
        blob[:] = np.frombuffer(built, np.uint8)
        snap = CacheEntry(key=family.digest, kind="snapshot", namespace=family.scope, family=family.digest,
                          tokens=np.asarray(tokens[:L], dtype=np.int32), blob=blob)
        self.add_entry(snap)
        self._host_add(snap)
        if self.tiers is not None:
            self.tiers.spill_blob(snap, blob)    # stored once below: the host copy may be dropped later
        return snap if snap.blob is not None else None

    def release(self, seq: int, tokens: list[int], n_past: int, family: FamilyKey,
                snapshot: CacheEntry | None, keep: bool, n_prompt: int = 0) -> None:
        """A request is done with its sequence: keep it as an idle session (resumable
        by the next turn) or free it. ``n_prompt``: how many of ``tokens`` its prompt sent."""
        if keep and self.enabled and n_past > 0:
            entry = CacheEntry(
                key=uuid.uuid4().hex, kind="session", namespace=family.namespace, family=family.digest,
                tokens=np.asarray(tokens[:n_past], dtype=np.int32),
                n_prefix=len(snapshot.tokens) if snapshot is not None else 0,
                seq=seq, snapshot=snapshot, n_prompt=min(n_prompt, n_past),
            )
            self.add_entry(entry)
            self._make_idle(entry)
            if self.tiers is not None:
                self.tiers.publish(entry, seq)   # a shared tier: another server may resume it
            self._spill_idle_sessions()
            return
        self._free_seq(seq)
        self._unref(snapshot)

    def note_decoded(self, seq: int, n: int) -> None:
        self.ledger.extend(seq, n)

    def note_truncated(self, seq: int, n_past: int) -> None:
        self.ledger.truncate(seq, n_past)

    # -- introspection -----------------------------------------------------------------
    def stats(self) -> dict:
        hot_sessions = sum(1 for e in self._by_key.values() if e.hot and e.kind == "session")
        out = {
            "enabled": self.enabled,
            "detector": self.detector.name,
            "families": len(self.snapshots),
            "layout": "streams" if self.streams else "unified",
            "hot": {"cells_used": self.ledger.used, "cells_total": self.ledger.n_cells,
                    "bytes": self.ledger.used * self.info.kv_bytes_per_token,
                    "sessions": hot_sessions, "free_sequences": self.pool.free},
            "entries": len(self._by_key),
        }
        if self.streams:
            out["hot"]["stream_cells"] = self.ledger.stream_cells
            out["host"] = {"bytes": self._host_used, "capacity_bytes": self.prefix_host_bytes,
                           "snapshots": len(self._host), "sessions": 0}
        if self.tiers is not None:
            out.update(self.tiers.stats())
        return out

    def persist(self) -> int:
        """At shutdown (scheduler stopped): spill every idle hot entry and copy the warm
        tier into the persistent one, so conversations resume after a restart."""
        if self.tiers is None or not self.enabled:
            return 0
        for e in list(self._idle):
            if e.hot:
                self.evict(e)
        for e in [x for x in self._by_key.values() if x.hot and x.kind == "snapshot"]:
            if e.seq is not None:
                self.evict(e)                    # snapshots still referenced: no sequence uses them now
            elif e.blob is not None and not self.tiers.holds(e):
                self.tiers.spill_blob(e, e.blob)   # streams: its host copy, stored (once) if it is not
        return self.tiers.persist()

    def clear(self) -> None:
        """Drop everything cached (hot and below)."""
        for e in list(self._by_key.values()):
            self.drop_entry(e)


def _same_conversation(entry: CacheEntry, n: int) -> bool:
    """A request sharing ``n`` tokens with session ``entry`` holds all (or all but the last
    token) of the prompt that made it: it goes on with, or regenerates, that conversation,
    and differs from it only in what the conversation generated. Such a prefix belongs to one
    conversation, not to a family several share."""
    return entry.n_prompt > 0 and n >= entry.n_prompt - 1
