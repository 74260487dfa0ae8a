"""A shared cold tier (several servers on one store, e.g. ``redis``): what the others
publish, indexed while this server runs, and what this one computes, published promptly.

Indexing (:func:`index_metas`) is the one way stored entries enter the prefix cache's
index: at start-up from :meth:`StorageTier.entries` (``TierStack._reindex``) and, while
the server runs, from the tier's feed (:meth:`StorageTier.follow`)::

    kv3d-tier-follow thread          every cache.follow_s: tier.follow() -> Followed
      -> Follower holds it           (bounded: past MAX_PENDING entries, one full listing instead)
    scheduler thread, at admission   TierStack.drain_gone -> apply(): index_metas(...), removals

so a conversation another server stored, or a family snapshot it computed, is found by
the next request's lookup like any stored entry (state ``COLD``: restored through the tier
stack). An entry the feed announced that turns out gone or damaged on get is a miss, as
ever. Publishing (:func:`publish`): with a shared tier, a family snapshot is written to it
when it is made, and an idle session when its request ends (``cache.publish_idle``),
though both stay hot here.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING, Iterable

import numpy as np

from kv3d_core.contracts.session import SessionState
from kv3d_core.contracts.tier import EntryMeta, Followed, StorageTier
from kv3d_core.metrics import Metrics
from kv3d_core.tiers.entry import CacheEntry

if TYPE_CHECKING:  # pragma: no cover
    from kv3d_core.tiers.stack import TierStack

log = logging.getLogger("kv3d.tiers")

MAX_PENDING = 100_000
"""Followed entries held for the scheduler thread at most; past it they are replaced by one
full listing (a server without requests for a long time does not grow without bound)."""


def index_metas(stack: "TierStack", metas: Iterable[EntryMeta], state: SessionState,
                level: str) -> collections.Counter:
    """Index stored entries by their metadata: family snapshots first, then sessions linked
    to their family snapshot (indexed already or among ``metas``). A session whose snapshot
    is missing is kept as an orphan (it resumes once its family prefix is recomputed or
    published); one whose prefix differs from its snapshot's tokens is dropped, logged and
    counted. Entries of another model, and keys the cache (or its orphans) already knows,
    are skipped. Scheduler thread (or before it starts). Returns the counts by kind."""
    cache = stack.cache
    assert cache is not None
    fp = stack.info.fingerprint
    known = {k for group in stack._orphans.values() for k in group}
    metas = [m for m in metas if m.model_fingerprint == fp and cache.entry(m.key) is None and m.key not in known]
    snaps: dict[tuple[str, str], CacheEntry] = {}
    by_family: dict[str, CacheEntry] = {}   # snapshots shared across tenants live in another namespace
    counts: collections.Counter[str] = collections.Counter()
    for m in metas:
        if m.kind == "snapshot" and (m.namespace, m.family) not in snaps:
            e = CacheEntry(key=m.key, kind="snapshot", namespace=m.namespace, family=m.family,
                           tokens=np.asarray(m.tokens, np.int32), state=state)
            snaps[(m.namespace, m.family)] = by_family[m.family] = e
            cache.add_entry(e)
            counts["snapshot"] += 1
    for m in metas:
        if m.kind != "session":
            continue
        snap = None
        if m.n_prefix > 0:
            snap = snaps.get((m.namespace, m.family)) or by_family.get(m.family)
            indexed = cache.entry(m.family)
            if snap is None and indexed is not None and indexed.kind == "snapshot":
                snap = indexed
        e = CacheEntry(key=m.key, kind="session", namespace=m.namespace, family=m.family,
                       tokens=np.asarray(m.tokens, np.int32), n_prefix=m.n_prefix, state=state, snapshot=snap)
        if m.n_prefix > 0 and snap is None:
            # its family snapshot is missing: kept, resumable once that prefix is computed again
            stack._orphans.setdefault(m.family, {})[m.key] = e
            counts["orphan"] += 1
            continue
        if snap is not None and not prefix_of(snap, e):
            stack._drop_stored(m.key, level, "prefix_mismatch",
                               f"its {m.n_prefix}-token prefix differs from its family snapshot's tokens")
            continue
        cache.add_entry(e)
        counts["session"] += 1
    return counts


def prefix_of(snap: CacheEntry, e: CacheEntry) -> bool:
    """``snap`` holds exactly the first ``e.n_prefix`` tokens of session ``e``."""
    n = e.n_prefix
    return len(snap.tokens) == n and np.array_equal(snap.tokens, e.tokens[:n])


class Follower:
    """The thread (``kv3d-tier-follow``) that reads a shared tier's feed every ``interval_s``
    and holds what it got for the scheduler thread (:meth:`take`)."""

    def __init__(self, tier: StorageTier, interval_s: float, metrics: Metrics) -> None:
        if not interval_s > 0:
            raise ValueError(f"cache.follow_s={interval_s!r}: use seconds > 0 (0 turns following off)")
        self.tier = tier
        self.interval_s = float(interval_s)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._pending: list[Followed] = []
        self._held = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Follower":
        self._thread = threading.Thread(target=self._run, name="kv3d-tier-follow", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> bool:
        """Read the feed once (the thread's work; tests call it directly). False when the tier
        answered nothing."""
        try:
            got = self.tier.follow()
        except Exception:                         # the contract says follow never raises
            log.exception("tier %s: follow() raised", self.tier.name)
            return False
        if got is None:
            return False
        n_added, n_removed, rescan = len(got.added), len(got.removed), got.rescan
        with self._lock:
            overflow = not got.rescan and self._held + len(got.added) > MAX_PENDING
        if overflow:                              # nobody took them for long: one full listing instead
            got = Followed(added=tuple(self.tier.entries()), rescan=True)
            self.metrics.tier_feed_rescans.inc()
        with self._lock:
            if got.rescan:                        # it lists everything: what waited is in it
                self._pending, self._held = [], 0
            self._pending.append(got)
            self._held += len(got.added)
        # counted once held: an admission after the count sees the entries
        self.metrics.tier_feed.labels("added").inc(n_added)
        self.metrics.tier_feed.labels("removed").inc(n_removed)
        if rescan:
            self.metrics.tier_feed_rescans.inc()
        return True

    def take(self) -> list[Followed]:
        """What was read since the last call (scheduler thread)."""
        with self._lock:
            out, self._pending, self._held = self._pending, [], 0
        return out

    def close(self, wait: bool = True) -> None:
        """Stop reading; ``wait``: until the thread has ended (its read in flight done)."""
        self._stop.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def apply(stack: "TierStack", follower: Follower) -> None:
    """Scheduler thread (``TierStack.drain_gone``): index what the follower read; forget the
    sessions other servers removed that only the shared tier held here."""
    batches = follower.take()
    if stack.cold is not follower.tier:           # the tier was switched off meanwhile: stop reading it
        follower.close(wait=False)
        stack._follower = None
        return
    for got in batches:
        counts = index_metas(stack, got.added, SessionState.COLD, follower.tier.level)
        for kind, n in counts.items():
            stack.metrics.tier_followed.labels(kind).inc(n)
        for key in got.removed:
            if _forget_removed(stack, key):
                stack.metrics.tier_followed.labels("removed").inc()
    if batches:
        stack.metrics.tier_orphans.set(stack._n_orphans())


def _forget_removed(stack: "TierStack", key: str) -> bool:
    """Another server removed ``key`` from the shared tier: a session only that tier held
    here leaves the index (never deleted again: the key may be published anew). Family
    snapshots stay: one turning out gone is a miss, and its sessions wait as orphans."""
    cache = stack.cache
    e = cache.entry(key)
    if e is None:
        stack._forget_orphan(key)
        return False
    if e.kind != "session" or e.state is not SessionState.COLD:
        return False
    if (stack.warm is not None and stack.warm.contains(key)) or (e.pending is not None and not e.pending.done()):
        return False
    cache.forget_entry(e)
    e.state = SessionState.DROPPED
    return True


def publish(stack: "TierStack", e: CacheEntry, seq: int | None) -> None:
    """Shared tier: write ``e`` to it now, though it stays hot here, so other servers can
    use it: a family snapshot (once; ``seq`` its sequence, unified layout), or an idle
    session (``cache.publish_idle``; its delta past the family snapshot, which goes first)."""
    if not stack.shared:
        return
    if e.kind == "snapshot":
        before = e.pending
        stack._persist_snapshot(e)
        if e.pending is not None and e.pending is not before:
            stack.metrics.tier_published.labels("snapshot").inc()
        return
    if not stack.publish_idle or seq is None or stack.cache is None:
        return
    if stack.spill_blob(e, stack.cache.backend.seq_state_get(seq), to_cold=True):
        stack.metrics.tier_published.labels("session").inc()
