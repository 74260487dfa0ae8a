"""The tiers below the hot one -- warm (RAM) then cold (a plugin, e.g. SSD) -- and
the moves between them.

Spill (an idle entry leaves the context), on the scheduler thread only as far
as it must touch the context::

    seq_state_get(seq)                       scheduler thread (~1 ms per 10 MB)
      -> parse -> delta (cells >= n_prefix)  writer thread
      -> codec.encode -> warm.put            writer thread
           warm evicts LRU -> cold.put       writer thread (fsync'd files)

Restore (a request resumes the entry), scheduler thread::

    warm.get or cold.get -> codec.decode_into the blob's K/V rows (state_format.allocate)
      unified layout:    -> seq_state_set(seq) -> seq_cp(snapshot seq, seq, 0, n_prefix)
                                                     (the family prefix is shared, not stored)
      a stream per seq:  the blob holds the family prefix's rows (copied from the snapshot's
                         host copy) then the delta's -> one seq_state_set(seq)

A session's stored state is a reference to its family snapshot plus its delta;
the snapshot is stored once per family in every tier. A state whose layout the
reader does not understand is stored whole as an opaque zstd blob (counted).
Any failure on restore raises :class:`~kv3d_core.errors.CacheFault`; the prefix
cache then serves the request by recompute.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from kv3d_core.config import plugin_settings
from kv3d_core.contracts.backend import ModelInfo
from kv3d_core.contracts.codec import DeltaCodec, KVArrays
from kv3d_core.contracts.tier import EntryMeta, StorageTier, TierEntry
from kv3d_core.engine.session import SessionState
from kv3d_core.errors import (CacheFault, CodecError, PluginError, StateFormatError, StateRestoreError,
                              TierError)
from kv3d_core.kv import framing, opaque, state_format
from kv3d_core.metrics import Metrics

if TYPE_CHECKING:  # pragma: no cover
    from kv3d_core.plugins import PluginManager
    from kv3d_core.safety import FailureMonitor
    from kv3d_core.prefix.cache import CacheEntry, PrefixCache

log = logging.getLogger("kv3d.tiers")


class TierMiss(CacheFault):
    """The entry is no longer in any tier (evicted): a plain miss, not a fault."""

    reason = "tier_miss"


class TierStack:
    def __init__(self, warm: StorageTier | None, cold: StorageTier | None, codec: DeltaCodec,
                 info: ModelInfo, metrics: Metrics, *, max_pending_mb: float = 256,
                 monitor: "FailureMonitor | None" = None) -> None:
        if warm is None and cold is None:
            raise ValueError("a tier stack needs at least one tier")
        self.warm = warm
        self.cold = cold
        self.codec = codec
        self.info = info
        self.metrics = metrics
        self.max_pending = int(max_pending_mb * 1024 * 1024)
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv3d-spill")
        self._gone: queue.SimpleQueue[str] = queue.SimpleQueue()    # keys no tier holds any more
        self._f16 = 0
        self._stored = 0
        self.cache: PrefixCache | None = None
        self.monitor = monitor
        self.disabled_codecs: set[str] = set()
        self._to_disable: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._live = False                 # tier errors count as failures once serving has begun
        self._restores = 0
        for tier, on_evict in ((warm, self._warm_evicted), (cold, self._cold_evicted)):
            if tier is not None:
                level = tier.level
                tier.bind(model_fingerprint=info.fingerprint, on_evict=on_evict,
                          on_error=lambda reason, _l=level: self._tier_error(_l, reason),
                          on_dropped=lambda reason, _l=level: self._dropped(_l, reason))
        if monitor is not None:
            for component in ("codec", "warm", "cold"):
                monitor.on_disable(component, lambda c=component: self._to_disable.put(c))

    # -- wiring ---------------------------------------------------------------------------
    def attach(self, cache: "PrefixCache") -> None:
        """Called by the prefix cache; re-indexes what a persistent tier kept across a restart."""
        self.cache = cache
        if self.cold is not None and self.cold.persistent:
            self._reindex(self.cold, SessionState.COLD)
        self._live = True

    def _reindex(self, tier: StorageTier, state: SessionState) -> None:
        from kv3d_core.prefix.cache import CacheEntry

        assert self.cache is not None
        metas = [m for m in tier.entries() if m.model_fingerprint == self.info.fingerprint]
        snaps: dict[tuple[str, str], CacheEntry] = {}
        by_family: dict[str, CacheEntry] = {}   # snapshots shared across tenants live in another namespace
        for m in metas:
            if m.kind == "snapshot":
                e = CacheEntry(key=m.key, kind="snapshot", namespace=m.namespace, family=m.family,
                               tokens=np.asarray(m.tokens, np.int32), state=state)
                snaps[(m.namespace, m.family)] = e
                by_family[m.family] = e
                self.cache._add(e)
        n = len(snaps)
        for m in metas:
            if m.kind != "session":
                continue
            snap = (snaps.get((m.namespace, m.family)) or by_family.get(m.family)) if m.n_prefix > 0 else None
            if m.n_prefix > 0 and (snap is None or len(snap.tokens) != m.n_prefix):
                tier.delete(m.key)               # its family prefix is gone: the delta cannot be used
                continue
            e = CacheEntry(key=m.key, kind="session", namespace=m.namespace, family=m.family,
                           tokens=np.asarray(m.tokens, np.int32), n_prefix=m.n_prefix, state=state, snapshot=snap)
            self.cache._add(e)
            n += 1
        if n:
            log.info("re-indexed %d entries from the %s tier", n, tier.name)

    def _dropped(self, level: str, reason: str) -> None:
        self.metrics.tier_dropped_writes.labels(level, reason).inc()

    def _tier_error(self, level: str, reason: str) -> None:
        self.metrics.tier_errors.labels(level, reason).inc()
        if self._live and self.monitor is not None:
            self.monitor.failure(level, f"tier_{reason}", f"{level} tier entry unreadable ({reason})")

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
                self.codec = NoneCodec()
            elif component in ("warm", "cold"):
                tier = self.warm if component == "warm" else self.cold
                if tier is None:
                    continue
                state = SessionState.WARM if component == "warm" else SessionState.COLD
                if component == "warm":
                    self.warm = None
                else:
                    self.cold = None
                log.error("%s tier %s switched off: its entries are dropped", component, tier.name)
                for e in [e for e in self.cache._by_key.values() if e.state is state]:
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
        if self.cold is not None and self.cold.put(entry):
            self.metrics.spills.labels("cold").inc()
            self._set_state(entry.meta.key, SessionState.COLD)
        else:
            self._gone.put(entry.meta.key)

    def _cold_evicted(self, entry: TierEntry) -> None:
        self.metrics.evictions.labels("cold").inc()
        self._gone.put(entry.meta.key)

    def _set_state(self, key: str, state: SessionState) -> None:
        cache = self.cache
        e = cache._by_key.get(key) if cache is not None else None
        if e is not None and e.state in (SessionState.WARM, SessionState.COLD):
            e.state = state

    def drain_gone(self) -> None:
        """Forget entries no tier holds any more (scheduler thread)."""
        assert self.cache is not None
        while True:
            try:
                key = self._gone.get_nowait()
            except queue.Empty:
                return
            e = self.cache._by_key.get(key)
            if e is not None and e.state in (SessionState.WARM, SessionState.COLD):
                self.cache._drop_entry(e)

    # -- spill (scheduler thread, then writer thread) -------------------------------------
    def spill(self, e: "CacheEntry", seq: int) -> bool:
        return self.spill_blob(e, self.cache.backend.seq_state_get(seq))

    def spill_blob(self, e: "CacheEntry", blob) -> bool:
        """Store ``e`` from its state blob (a sequence's, or a snapshot's host copy)."""
        with self._pending_lock:
            if self._pending_bytes + len(blob) > self.max_pending:
                self._dropped("warm", "backlog")
                return False
            self._pending_bytes += len(blob)
        n_prefix = len(e.snapshot.tokens) if (e.kind == "session" and e.snapshot is not None) else 0
        if n_prefix and self.cache.streams and self.info.sliding_window:
            # a sliding-window model's state has a second section holding only a window of
            # cells, which a prefix + delta blob cannot rebuild: store such sessions whole
            n_prefix = 0
        e.n_prefix = n_prefix
        meta_base = dict(key=e.key, kind=e.kind, namespace=e.namespace, family=e.family,
                         tokens=np.asarray(e.tokens, np.int32).copy(), model_fingerprint=self.info.fingerprint)
        e.pending = self._writer.submit(self._encode_and_store, blob, n_prefix, meta_base)
        self.metrics.spills.labels("warm" if self.warm is not None else "cold").inc()
        return True

    def _encode_and_store(self, blob, n_prefix: int, meta_base: dict) -> bool:
        try:
            try:
                arrays = state_format.parse(blob, head_dim_k=self.info.head_dim_k, head_dim_v=self.info.head_dim_v,
                                             n_layer=self.info.n_layer)
                if n_prefix:
                    arrays = state_format.select(arrays, n_prefix)
                if arrays.n_cells != len(meta_base["tokens"]) - n_prefix:
                    raise StateFormatError(f"state holds {arrays.n_cells} cells, expected "
                                           f"{len(meta_base['tokens']) - n_prefix}")
                payload = self.codec.encode(arrays)
                codec_id, version, f16 = self.codec.codec_id, self.codec.version, arrays.f16_bytes()
            except StateFormatError as exc:
                log.debug("state layout not understood (%s): storing the opaque blob", exc)
                self.metrics.codec_fallback.inc()
                payload = opaque.encode(blob)
                codec_id, version, f16, n_prefix = opaque.CODEC_ID, opaque.VERSION, len(blob), 0
            entry = TierEntry(EntryMeta(**meta_base, n_prefix=n_prefix, codec_id=codec_id, codec_version=version,
                                        f16_bytes=f16), payload)
            self._f16 += f16
            self._stored += len(payload)
            if self._stored:
                self.metrics.codec_ratio.labels(self.codec.codec_id).set(self._f16 / self._stored)
            first = self.warm if self.warm is not None else self.cold
            ok = first.put(entry)
            if not ok and first is self.warm and self.cold is not None:
                ok = self.cold.put(entry)         # too large for RAM: straight to the cold tier
                if ok:
                    self._set_state(entry.meta.key, SessionState.COLD)
            if not ok:
                self._gone.put(entry.meta.key)
            return ok
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
    def _fetch(self, e: "CacheEntry") -> tuple[TierEntry, str]:
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
                    raise CacheFault(f"{e.key[:8]} belongs to another model")
                if not np.array_equal(got.meta.tokens, e.tokens):
                    tier.delete(e.key)
                    self.metrics.tier_errors.labels(tier.level, "tokens").inc()
                    raise CacheFault(f"{e.key[:8]}: stored tokens differ from the index")
                return got, tier.level
        raise TierMiss(f"{e.key[:8]} is in no tier")

    def restore(self, e: "CacheEntry", seq: int) -> "CacheEntry | None":
        """Load ``e`` into the empty sequence ``seq``; returns the snapshot whose cells
        it now shares (None when it holds all its cells itself)."""
        assert self.cache is not None
        cache = self.cache
        t0 = time.perf_counter()
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
        n_prefix = got.meta.n_prefix if snap is not None else 0
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

    def load_blob(self, e: "CacheEntry") -> np.ndarray:
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

    def _decode(self, e: "CacheEntry", got: TierEntry,
                joined: bool = False) -> tuple[bytes | memoryview, "CacheEntry | None"]:
        """The blob to load for ``e`` and the snapshot whose prefix it needs. ``joined``: the
        blob holds the prefix's rows too (a KV stream per sequence cannot share them)."""
        cache = self.cache
        meta = got.meta
        snap = None
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
            head = None
            if meta.n_prefix:
                snap = e.snapshot
                if snap is None or len(snap.tokens) != meta.n_prefix:
                    raise TierMiss(f"{e.key[:8]}: its family snapshot is gone")
                if not cache.ensure_hot_snapshot(snap, exclude=[e]):
                    raise TierMiss(f"{e.key[:8]}: no room to restore its family snapshot")
                if joined:
                    head = cache.snapshot_arrays(snap)
            writer = self._decode_to_blob(e, got, head)
            blob = writer.finish()
        return blob, snap

    def _decode_to_blob(self, e: "CacheEntry", got: TierEntry,
                        head: KVArrays | None = None) -> state_format.BlobWriter:
        """The codec decodes the delta straight into the K/V rows of the blob for
        ``seq_state_set`` (:func:`state_format.allocate`): no separate build copy. With
        ``head`` (the family prefix's cells), the blob holds the prefix's rows first, copied
        in, and the codec decodes into the rows after them."""
        expected = len(e.tokens) - got.meta.n_prefix
        writers: list[state_format.BlobWriter] = []
        given: list[KVArrays] = []

        def alloc(template: KVArrays) -> KVArrays:
            if writers:
                raise CodecError(f"{e.key[:8]}: codec {self.codec.codec_id} asked for its output arrays twice")
            if template.n_cells != expected:
                raise CodecError(f"{e.key[:8]} decodes to {template.n_cells} cells, expected {expected}")
            if head is None:
                writers.append(state_format.allocate(template, self.cache.backend.state_buffer))
                given.append(writers[0].arrays)
                return given[0]
            try:
                joined = state_format.concat_layout(head, template)
            except StateFormatError as exc:
                raise CodecError(f"{e.key[:8]}: its delta does not join its family prefix: {exc}") from exc
            w = state_format.allocate(joined, self.cache.backend.state_buffer)
            p = head.n_cells
            for dst, src in zip([*w.arrays.k, *w.arrays.v], [*head.k, *head.v]):
                dst[:p] = src
            writers.append(w)
            given.append(KVArrays(w.arrays.positions[p:], [a[p:] for a in w.arrays.k], [a[p:] for a in w.arrays.v],
                                  template.head_dim_k, template.head_dim_v, w.arrays.extra))
            return given[0]

        arrays = self.codec.decode_into(got.payload, alloc)
        if not writers or arrays is not given[0]:
            raise CodecError(f"{e.key[:8]}: codec {self.codec.codec_id} did not decode into the arrays it was given")
        return writers[0]

    def discard(self, e: "CacheEntry") -> None:
        """Remove an entry's stored copies (it was resumed, or is gone)."""
        pending = getattr(e, "pending", None)
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _f, k=e.key: self._delete(k))
        self._delete(e.key)

    def _delete(self, key: str) -> None:
        for tier in (self.warm, self.cold):
            if tier is not None:
                tier.delete(key)

    def holds(self, e: "CacheEntry") -> bool:
        pending = getattr(e, "pending", None)
        if pending is not None and not pending.done():
            return True
        return any(t is not None and t.contains(e.key) for t in (self.warm, self.cold))

    # -- introspection -------------------------------------------------------------------------
    def _tier_stats(self, tier: StorageTier | None, state: SessionState) -> dict | None:
        if tier is None:
            return None
        entries = [e for e in self.cache._by_key.values() if e.state is state] if self.cache else []
        return {"name": tier.name, "bytes": tier.used_bytes, "capacity_bytes": tier.capacity_bytes,
                "sessions": sum(1 for e in entries if e.kind == "session"),
                "snapshots": sum(1 for e in entries if e.kind == "snapshot")}

    def stats(self) -> dict:
        out = {}
        for key, tier, state in (("warm", self.warm, SessionState.WARM), ("cold", self.cold, SessionState.COLD)):
            s = self._tier_stats(tier, state)
            if s is not None:
                out[key] = s
        out["codec"] = {"name": self.codec.codec_id, "f16_bytes": self._f16, "stored_bytes": self._stored,
                        "ratio": (self._f16 / self._stored) if self._stored else None}
        return out

    def update_gauges(self) -> None:
        for key, tier, state in (("warm", self.warm, SessionState.WARM), ("cold", self.cold, SessionState.COLD)):
            s = self._tier_stats(tier, state)
            if s is not None:
                self.metrics.kv_bytes.labels(key).set(s["bytes"])
                self.metrics.sessions.labels(key).set(s["sessions"])

    @property
    def persistent(self) -> bool:
        return self.cold is not None and self.cold.persistent

    def persist(self) -> int:
        """Write every warm entry to the persistent tier too (shutdown)."""
        self.flush()
        if not self.persistent or self.warm is None:
            return 0
        n = 0
        for meta in list(self.warm.entries()):
            entry = self.warm.get(meta.key)
            if entry is not None and not self.cold.contains(meta.key) and self.cold.put(entry):
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
        self._writer.shutdown(wait=True)
        for tier in (self.warm, self.cold):
            if tier is not None:
                tier.close()


def build_tier_stack(cfg: DictConfig, plugins: "PluginManager", info: ModelInfo, metrics: Metrics,
                     monitor: "FailureMonitor | None" = None) -> TierStack | None:
    """The tiers a configuration asks for: RAM (``cache.ram_warm_mb`` > 0), then the
    ``tier`` plugin when it is not ``ram``; None when there are none."""
    codec_name, codec_settings = plugin_settings(cfg.codec)
    codec = plugins.create("codec", codec_name, **codec_settings)
    if not isinstance(codec, DeltaCodec):
        raise PluginError(f"codec plugin {codec_name!r} did not return a DeltaCodec")
    tier_name, tier_settings = plugin_settings(cfg.tier)
    warm = None
    if cfg.cache.ram_warm_mb > 0:
        warm = plugins.create("tier", "ram", capacity_mb=cfg.cache.ram_warm_mb)
    cold = None
    if tier_name != "ram":
        cold = plugins.create("tier", tier_name, **tier_settings)
    if warm is None and cold is None:
        return None
    return TierStack(warm, cold, codec, info, metrics, monitor=monitor)
