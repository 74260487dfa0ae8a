"""The storage tier on Valkey or Redis: one store shared by every kv3d server that
uses it (warm or cold level), under one byte budget, least recently used out first.

Contract (``kv3d_core.contracts.tier.StorageTier``) and how it is met here (key
names and the manifest: :mod:`kv3d_tier_redis.layout`; the atomic steps:
:mod:`kv3d_tier_redis.scripts`):

- An entry's bytes are an SSD tier entry file (:mod:`kv3d_tier_ssd.fileformat`:
  versioned header with model fingerprint and codec id/version, xxh3 digests),
  cut into chunks of ``chunk_kb``. :meth:`RedisTier.put` writes the chunks under
  a fresh write id, then one script publishes the manifest, indexes the key,
  places it last in the LRU order, counts its bytes and evicts least recently
  used entries (of any server and model using the store) past the budget; the
  manifests of the entries it evicted come back, and those of this model go to
  ``on_evict`` (read and verified like a get) before their chunks are deleted.
- :meth:`RedisTier.get`: one script finds the manifest and refreshes the entry's
  recency and TTL, one pipeline fetches the chunks; the assembled bytes are
  decoded with every check of a file read (header digest, exact size, format
  version, payload digest) and must name this key, this model fingerprint and
  the namespace its key names. Any failure is a miss: the entry is removed (if
  no newer put replaced it meanwhile) and ``on_error(reason)`` counts it, reason
  one of ``"missing"`` (a chunk gone), ``"truncated"``, ``"format"``,
  ``"checksum"``, ``"version"``, ``"model"``, ``"namespace"``, ``"codec"``,
  ``"meta"``. It never raises.
- Budget: ``capacity_mb`` bounds the bytes of every entry under ``prefix``, all
  servers and models together (:attr:`used_bytes` is that total); ``ttl_s`` (idle
  time; a use renews it) is a second bound. Entries whose TTL ran out leave the
  index when next met (a lookup, ``entries()``, or the eviction loop).
- The store failing (refused, lost, slow past ``timeout_s``, AUTH refused, out of
  memory; on a cluster any master, or the slot map unreadable): ``get`` is a miss,
  ``put`` a dropped write (``on_dropped("io_error")``, ``"disk_full"`` when the
  server is out of memory), and for a backoff
  (:mod:`kv3d_tier_redis.breaker`) neither touches the network; :meth:`check`
  pings (every master of a cluster) and says why it fails. The client reconnects by
  itself. At load, refused credentials or a server certificate that does not verify are a
  ``ConfigError``; a store that does not answer is not (the tier starts degraded).
- :meth:`entries` lists what the store holds for the bound model, least recently
  used first (from the manifests: a restart, or another server, sees them).
- :meth:`follow` (the tier is :attr:`shared`): what other servers published or removed
  since the last call, read from the feed stream the scripts announce every put and
  removal on (:mod:`kv3d_tier_redis.feed`; ``feed_len`` entries kept); when this reader
  fell behind the trimmed stream, or the store restarted, a full listing (a rescan).
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any, Callable, Iterable

from kv3d_core.contracts.tier import EntryMeta, Evicted, Followed, StorageTier, TierEntry
from kv3d_core.errors import ConfigError
from kv3d_tier_ssd import fileformat as ff

from kv3d_tier_redis import feed, layout, scripts
from kv3d_tier_redis.breaker import Breaker
from kv3d_tier_redis.connect import Conn, check_conn, check_prefix, make_client
from kv3d_tier_redis.layout import Keys

log = logging.getLogger("kv3d.tier.redis")

PENDING_TTL_MS = 600_000
"""Chunks are written with this TTL until their manifest is published (without ``ttl_s``): a
put cut off half way leaves nothing behind for longer."""
CHUNK_GRACE_MS = 60_000
"""With ``ttl_s``, chunks outlive their manifest by this much (a reader holding the manifest
still finds them)."""


class _StoreDown(Exception):
    """The store failed a command (connection, timeout, server error)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class RedisTier(StorageTier):
    """Storage tier on Valkey or Redis. Settings: ``conf/tier/redis.yaml`` of this package."""

    name = "redis"
    persistent = True
    shared = True

    level = "cold"

    def __init__(self, *, prefix: str = "kv3d", capacity_mb: float = 4096, ttl_s: float = 0,
                 chunk_kb: int = 1024, checksum: str = "xxh3", backoff_s: float = 0.5, backoff_max_s: float = 10.0,
                 feed_len: int = 10000, **conn: Any) -> None:
        try:
            self.conn = Conn(**conn)
        except TypeError as exc:
            raise TypeError(f"tier redis: {exc}") from exc
        check_conn(self.conn)
        self._check_own(capacity_mb, ttl_s, chunk_kb, backoff_s, backoff_max_s)
        if isinstance(feed_len, bool) or not isinstance(feed_len, int) or feed_len < 0:
            raise ConfigError(f"tier redis: feed_len must be an integer >= 0, got {feed_len!r}")
        try:
            self._checksum = ff.checksum_by_name(checksum)
        except ValueError as exc:
            raise ConfigError(f"tier redis: {exc}") from exc
        self.keys = Keys(check_prefix(prefix))
        self._capacity = int(float(capacity_mb) * 1024 * 1024)
        self._ttl_ms = int(float(ttl_s) * 1000)
        self._chunk = int(chunk_kb) * 1024
        self.breaker = Breaker(float(backoff_s), float(backoff_max_s))
        self.model_fingerprint = ""
        self._fp = ""
        self.on_evict = None
        self.on_error = None
        self.on_dropped = None
        self._lock = threading.Lock()
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._used = 0
        self._closed = False
        self._feed_len = feed_len
        self._src = secrets.token_hex(8)          # this server's id on the feed: its own puts are passed over
        self._cursor: feed.Cursor | None = None   # where follow() reads on; None: rescan first
        self._first_contact()

    @staticmethod
    def _check_own(capacity_mb: Any, ttl_s: Any, chunk_kb: Any, backoff_s: Any, backoff_max_s: Any) -> None:
        for name, value, low in (("capacity_mb", capacity_mb, 0.0), ("ttl_s", ttl_s, 0.0),
                                 ("backoff_s", backoff_s, 0.001)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ConfigError(f"tier redis: {name} must be a number >= {low:g}, got {value!r}")
        if isinstance(backoff_max_s, bool) or not isinstance(backoff_max_s, (int, float)) or backoff_max_s < backoff_s:
            raise ConfigError(f"tier redis: backoff_max_s must be a number >= backoff_s, got {backoff_max_s!r}")
        if isinstance(chunk_kb, bool) or not isinstance(chunk_kb, int) or not 16 <= chunk_kb <= 256 * 1024:
            raise ConfigError(f"tier redis: chunk_kb must be an integer in [16, 262144], got {chunk_kb!r}")

    def _first_contact(self) -> None:
        """Ping once at load: refused credentials, a server certificate the CA does not vouch
        for, or TLS asked of a server that does not speak it are configuration errors; an
        unreachable store is not (the tier starts degraded and recovers when it answers)."""
        try:
            self._call(self._ping)
        except _StoreDown as exc:
            why = _misconfigured(exc)
            if why is not None:
                raise ConfigError(f"tier redis: {self.conn.where} {why}") from None
            hint = ""
            if not (self.conn.tls or (self.conn.url or "").startswith("rediss://")) and "reset by peer" in str(exc):
                hint = " (a TLS port? then tls: true or a rediss:// url)"
            log.warning("tier redis: %s unreachable at start-up (%s)%s; entries are misses until it answers",
                        self.conn.where, exc, hint)

    # -- the client -------------------------------------------------------------------------------
    def _ensure_client(self) -> Any:
        with self._lock:
            if self._client is None:
                client = make_client(self.conn)     # a cluster client reads the slot map here
                self._scripts = {name: client.register_script(getattr(scripts, name))
                                 for name in ("PUBLISH", "LOOKUP", "REMOVE", "TRIM", "FORGET")}
                self._client = client
            return self._client

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)``; any failure of the store becomes :class:`_StoreDown` (and starts the
        breaker's backoff), a success resets the breaker."""
        import redis.exceptions as rx

        try:
            out = fn(self._ensure_client())
        except rx.RedisClusterException as exc:
            # a cluster client that cannot read the slot map (no node answers) or finds a slot
            # uncovered: not a RedisError, but the store failing all the same
            self.breaker.failed(f"{type(exc).__name__}: {exc}")
            self._reset_client()
            raise _StoreDown("io_error", f"{type(exc).__name__}: {exc}") from exc
        except rx.ResponseError as exc:
            text = str(exc)
            reason = "disk_full" if text.startswith("OOM") else "io_error"
            self.breaker.failed(text)
            raise _StoreDown(reason, text) from exc
        except (rx.RedisError, OSError) as exc:
            self.breaker.failed(f"{type(exc).__name__}: {exc}")
            if self.conn.cluster:
                self._reset_client()        # the slot map is read again on the next try
            raise _StoreDown("io_error", f"{type(exc).__name__}: {exc}") from exc
        self.breaker.succeeded()
        return out

    def _ping(self, c: Any) -> Any:
        """PING the store; on a cluster every master (one down is the store failing: its
        slots' entries are misses), not just the node the client picks."""
        if self.conn.cluster:
            return c.ping(target_nodes=c.PRIMARIES)
        return c.ping()

    def _reset_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:       # noqa: BLE001 - closing a broken client
                pass

    def _script(self, name: str, *args: Any) -> Any:
        return self._call(lambda c: self._scripts[name](keys=[self.keys.base], args=list(args), client=c))

    def _pipeline(self, build: Callable[[Any], None]) -> list[Any]:
        def run(c: Any) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            build(pipe)
            return pipe.execute()
        return self._call(run)

    # -- binding -----------------------------------------------------------------------------------
    def bind(self, *, model_fingerprint: str, on_evict: Evicted | None = None,
             on_error: Callable[[str], None] | None = None,
             on_dropped: Callable[[str], None] | None = None) -> None:
        """Entries of ``model_fingerprint`` only, from now on; then evict down to the budget
        (a smaller ``capacity_mb`` than the store holds)."""
        super().bind(model_fingerprint=model_fingerprint, on_evict=on_evict, on_error=on_error,
                     on_dropped=on_dropped)
        self._fp = layout.digest16(model_fingerprint)
        if self.breaker.blocked():
            return
        try:
            if self._feed_len:
                self._cursor = feed.tail(self._call, self.keys.feed)   # before the core lists entries()
            victims = self._script("TRIM", self._capacity, self._src, self._feed_len)
        except _StoreDown as exc:
            log.warning("tier redis: %s: cannot trim to the budget now: %s", self.conn.where, exc)
            return
        self._hand_over(victims)

    # -- the contract ---------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of every entry under the prefix (all servers); the last known value while the
        store does not answer."""
        if not self._closed and not self.breaker.blocked():
            try:
                self._used = max(0, int(self._call(lambda c: c.get(self.keys.bytes)) or 0))
            except (_StoreDown, ValueError):
                pass
        return self._used

    def put(self, entry: TierEntry) -> bool:
        meta = entry.meta
        if not ff.valid_key(meta.key):
            log.warning("tier redis: refused an entry with invalid key %r", str(meta.key)[:80])
            return self._drop("bad_key")
        if meta.model_fingerprint != self.model_fingerprint:
            return self._drop("model")
        try:
            enc = ff.encode(meta, entry.payload, self._checksum)
        except ValueError as exc:
            log.warning("tier redis: refused entry %s: %s", meta.key, exc)
            return self._drop("bad_meta")
        size = self._charge(enc)
        if size > self._capacity:
            return self._drop("too_large")
        if self._closed:
            return False
        if self.breaker.blocked():
            return self._drop("io_error")
        try:
            self._publish(enc, size)
        except _StoreDown as exc:
            log.warning("tier redis: write of %s dropped (%s): %s", meta.key, exc.reason, exc)
            return self._drop(exc.reason)
        return True

    @staticmethod
    def _charge(enc: ff.Encoded) -> int:
        """Bytes an entry counts against the budget: its chunks and its manifest."""
        return enc.size + len(enc.head) + 36

    def _publish(self, enc: ff.Encoded, size: int) -> None:
        meta = enc.meta
        member = self.keys.member(self._fp, layout.digest16(meta.namespace), meta.key)
        wid = secrets.token_hex(8)
        data = memoryview(b"".join((enc.head, enc.payload, enc.trailer)))
        n = max(1, -(-data.nbytes // self._chunk))
        names = self.keys.chunks(member, wid, n)
        chunk_ttl = self._ttl_ms + CHUNK_GRACE_MS if self._ttl_ms else PENDING_TTL_MS

        def write(pipe: Any) -> None:
            for i, name in enumerate(names):
                pipe.set(name, data[i * self._chunk:(i + 1) * self._chunk], px=chunk_ttl)
        self._pipeline(write)
        try:
            out = self._script("PUBLISH", self._fp, member, meta.key, layout.make_manifest(wid, n, enc), size,
                               self._ttl_ms, self._capacity, self._src, self._feed_len)
        except _StoreDown:
            self._delete_chunks(names)
            raise
        if not self._ttl_ms:
            try:
                self._pipeline(lambda pipe: [pipe.persist(name) for name in names])
            except _StoreDown as exc:      # published: the entry reads as missing once they expire
                log.warning("tier redis: chunks of %s keep their pending TTL: %s", meta.key, exc)
        old_member, old_manifest = out[0], out[1]
        if old_member:
            self._drop_chunks(old_member.decode() if isinstance(old_member, bytes) else old_member, old_manifest)
        self._hand_over(out[2:])

    def get(self, key: str) -> TierEntry | None:
        if not ff.valid_key(key) or self._closed or not self._fp or self.breaker.blocked():
            return None
        try:
            for _ in range(3):      # again only when a concurrent put replaced the entry mid-read
                found, entry = self._get_once(key)
                if found:
                    return entry
            return None
        except _StoreDown as exc:
            log.debug("tier redis: get of %s is a miss: the store failed (%s)", key, exc)
            return None
        except Exception:  # the contract: never raise from get
            log.exception("tier redis: unexpected failure reading %s", key)
            return None

    def _get_once(self, key: str) -> tuple[bool, TierEntry | None]:
        """``(settled, entry)``: settled is False when the entry changed under the read."""
        got = self._script("LOOKUP", self._fp, key, self._ttl_ms, 1)
        if not got:
            return True, None
        member, raw = _text(got[0]), bytes(got[1])
        try:
            man = layout.read_manifest(raw)
        except ff.FormatError as exc:
            return self._damaged(key, member, None, exc.reason)
        chunks = self._fetch(member, man, refresh=True)
        if any(c is None for c in chunks):
            return self._damaged(key, member, man.wid, "missing")
        try:
            header, payload = ff.decode(b"".join(chunks))
        except ff.FormatError as exc:
            return self._damaged(key, member, man.wid, exc.reason)
        reason = self._mismatch(key, member, header.meta, man.header.meta)
        if reason is not None:
            return self._damaged(key, member, man.wid, reason)
        return True, TierEntry(header.meta, payload)

    def _mismatch(self, key: str, member: str, got: EntryMeta, indexed: EntryMeta) -> str | None:
        if got.key != key:
            return "format"
        if got.model_fingerprint != self.model_fingerprint:
            return "model"
        if layout.split_member(member)[1] != layout.digest16(got.namespace):
            return "namespace"
        return ff.mismatch(indexed, got)

    def _fetch(self, member: str, man: layout.Manifest, refresh: bool) -> list[bytes | None]:
        names = self.keys.chunks(member, man.wid, man.n_chunks)
        ttl = self._ttl_ms + CHUNK_GRACE_MS if (refresh and self._ttl_ms) else 0

        def read(pipe: Any) -> None:
            for name in names:
                pipe.get(name)
                if ttl:
                    pipe.pexpire(name, ttl)
        out = self._pipeline(read)
        return out[::2] if ttl else out

    def _damaged(self, key: str, member: str, wid: str | None, reason: str) -> tuple[bool, None]:
        """Remove the damaged entry and count it -- unless a newer put replaced it meanwhile
        (then the read is tried again)."""
        removed = self._script("REMOVE", self._fp, key, self._src, self._feed_len, member, wid or "")
        if not removed:
            return False, None
        log.warning("tier redis: entry %s damaged (%s), removed", key, reason)
        self._drop_chunks(member, removed[1])
        self._report(reason)
        return True, None

    def contains(self, key: str) -> bool:
        if not ff.valid_key(key) or self._closed or not self._fp or self.breaker.blocked():
            return False
        try:
            return bool(self._script("LOOKUP", self._fp, key, self._ttl_ms, 0))
        except _StoreDown:
            return False

    def touch(self, key: str) -> bool:
        if not ff.valid_key(key) or self._closed or not self._fp or self.breaker.blocked():
            return False
        try:
            got = self._script("LOOKUP", self._fp, key, self._ttl_ms, 1)
            if got and self._ttl_ms:
                man = layout.read_manifest(bytes(got[1]))
                names = self.keys.chunks(_text(got[0]), man.wid, man.n_chunks)
                self._pipeline(lambda pipe: [pipe.pexpire(n, self._ttl_ms + CHUNK_GRACE_MS) for n in names])
        except (_StoreDown, ff.FormatError):
            return False
        return bool(got)

    def delete(self, key: str) -> None:
        if not ff.valid_key(key) or self._closed or not self._fp:
            return
        try:
            removed = self._script("REMOVE", self._fp, key, self._src, self._feed_len)
            if removed:
                self._drop_chunks(_text(removed[0]), removed[1])
        except _StoreDown as exc:
            log.warning("tier redis: delete of %s failed: %s", key, exc)

    def entries(self) -> Iterable[EntryMeta]:
        """Metadata of this model's entries in the store, least recently used first; [] while
        the store does not answer."""
        if self._closed or not self._fp:
            return []
        try:
            return self._entries()
        except _StoreDown as exc:
            log.warning("tier redis: cannot list entries of %s: %s", self.conn.where, exc)
            return []

    def _entries(self) -> list[EntryMeta]:
        where = self._call(lambda c: c.hgetall(self.keys.where(self._fp)))
        pairs = sorted((_text(k), _text(m)) for k, m in where.items())
        found: list[tuple[float, EntryMeta]] = []
        gone: list[str] = []
        for start in range(0, len(pairs), 256):
            batch = pairs[start:start + 256]

            def read(pipe: Any, batch=batch) -> None:
                for _, member in batch:
                    pipe.get(self.keys.manifest(member))
                    pipe.zscore(self.keys.lru, member)
            out = self._pipeline(read)
            for (key, member), raw, score in zip(batch, out[::2], out[1::2]):
                if raw is None:
                    gone.append(member)
                    continue
                try:
                    meta = layout.read_manifest(bytes(raw)).header.meta
                except ff.FormatError as exc:
                    self._damaged(key, member, None, exc.reason)
                    continue
                if meta.key != key or meta.model_fingerprint != self.model_fingerprint:
                    self._damaged(key, member, None, "format" if meta.key != key else "model")
                    continue
                found.append((float(score or 0), meta))
        if gone:
            self._script("FORGET", *gone)
        found.sort(key=lambda f: f[0])
        return [m for _, m in found]

    def follow(self) -> Followed | None:
        """What other servers published or removed since the last call (this model's entries
        only); a rescan when the feed lost track. None while the store does not answer, or
        with ``feed_len`` 0."""
        if self._closed or not self._fp or not self._feed_len or self.breaker.blocked():
            return None
        try:
            if self._cursor is not None:
                events, cursor, gap = feed.read(self._call, self.keys.feed, self._cursor, self._src)
                if not gap:
                    self._cursor = cursor
                    return self._followed(events)
                log.info("tier redis: the feed of %s moved on past this server: listing every entry",
                         self.conn.where)
            cursor = feed.tail(self._call, self.keys.feed)
            metas = self._entries()
            self._cursor = cursor
            return Followed(added=tuple(metas), rescan=True)
        except _StoreDown as exc:
            log.debug("tier redis: cannot read the feed now: %s", exc)
            return None
        except Exception:  # noqa: BLE001 - the contract: never raise
            log.exception("tier redis: unexpected failure reading the feed")
            return None

    def _followed(self, events: list[tuple[str, str]]) -> Followed:
        """This model's puts and removals among ``events``; the metadata of the puts read from
        their manifests (an entry removed meanwhile is left out, a damaged one removed)."""
        puts: dict[str, str] = {}
        removed: dict[str, None] = {}
        for op, member in events:
            try:
                fp, _, key = layout.split_member(member)
            except ValueError:
                continue
            if fp != self._fp:
                continue
            if op == "put":
                puts[key] = member
                removed.pop(key, None)
            elif op == "del":
                puts.pop(key, None)
                removed[key] = None
        added: list[EntryMeta] = []
        pairs = list(puts.items())
        for start in range(0, len(pairs), 256):
            batch = pairs[start:start + 256]
            out = self._pipeline(lambda pipe, b=batch: [pipe.get(self.keys.manifest(m)) for _, m in b])
            for (key, member), raw in zip(batch, out):
                meta = self._indexed_meta(key, member, raw)
                if meta is not None:
                    added.append(meta)
        return Followed(added=tuple(added), removed=tuple(removed))

    def _indexed_meta(self, key: str, member: str, raw: Any) -> EntryMeta | None:
        """The metadata in the manifest ``raw`` of ``key``; None when gone, or damaged (removed,
        counted)."""
        if raw is None:
            return None
        try:
            meta = layout.read_manifest(bytes(raw)).header.meta
        except ff.FormatError as exc:
            self._damaged(key, member, None, exc.reason)
            return None
        if meta.key != key or meta.model_fingerprint != self.model_fingerprint:
            self._damaged(key, member, None, "format" if meta.key != key else "model")
            return None
        if layout.split_member(member)[1] != layout.digest16(meta.namespace):
            self._damaged(key, member, None, "namespace")
            return None
        return meta

    def __len__(self) -> int:
        if self._closed or not self._fp or self.breaker.blocked():
            return 0
        try:
            return int(self._call(lambda c: c.hlen(self.keys.where(self._fp))))
        except _StoreDown:
            return 0

    def check(self) -> str | None:
        """None once the store answers a PING (every master of a cluster; resetting the
        backoff), else why not."""
        if self._closed:
            return "the redis tier is closed"
        try:
            self._call(self._ping)
            return None
        except _StoreDown as exc:
            return f"redis tier store {self.conn.where} does not answer: {exc}"
        except Exception as exc:  # noqa: BLE001 - the contract: never raise
            return f"redis tier store {self.conn.where}: check failed ({type(exc).__name__}: {exc})"

    def close(self) -> None:
        """Release the connections; the entries stay in the store. Afterwards ``put`` returns
        False and ``get`` None."""
        self._closed = True
        self._reset_client()

    # -- helpers -----------------------------------------------------------------------------------------
    def _hand_over(self, flat: list[Any]) -> None:
        """Evicted ``[member, manifest, ...]``: this model's go to ``on_evict`` (verified like
        a get); the chunks of all are deleted."""
        for i in range(0, len(flat), 2):
            member, raw = _text(flat[i]), bytes(flat[i + 1])
            try:
                man = layout.read_manifest(raw)
            except ff.FormatError as exc:
                self._report(exc.reason)
                continue
            try:
                if self.on_evict is not None and layout.split_member(member)[0] == self._fp:
                    self._evicted(member, man)
            finally:
                self._delete_chunks(self.keys.chunks(member, man.wid, man.n_chunks))

    def _evicted(self, member: str, man: layout.Manifest) -> None:
        try:
            chunks = self._fetch(member, man, refresh=False)
        except _StoreDown:
            return
        if any(c is None for c in chunks):
            self._report("missing")
            return
        try:
            header, payload = ff.decode(b"".join(chunks))
        except ff.FormatError as exc:
            self._report(exc.reason)
            return
        reason = self._mismatch(header.meta.key, member, header.meta, man.header.meta)
        if reason is not None:
            self._report(reason)
            return
        assert self.on_evict is not None
        self.on_evict(TierEntry(header.meta, payload))

    def _drop_chunks(self, member: str, raw: Any) -> None:
        """Delete the chunks an unlinked manifest names (nothing if it is unreadable: they expire)."""
        if not raw:
            return
        try:
            man = layout.read_manifest(bytes(raw))
        except ff.FormatError:
            return
        self._delete_chunks(self.keys.chunks(member, man.wid, man.n_chunks))

    def _delete_chunks(self, names: list[str]) -> None:
        try:
            self._pipeline(lambda pipe: [pipe.unlink(n) for n in names])
        except _StoreDown as exc:
            log.debug("tier redis: chunks left to expire: %s", exc)

    def _report(self, reason: str) -> None:
        if self.on_error is not None:
            self.on_error(reason)

    def _drop(self, reason: str) -> bool:
        if self.on_dropped is not None:
            self.on_dropped(reason)
        return False


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _misconfigured(exc: BaseException) -> str | None:
    """What in the settings made the store refuse the first contact (``exc`` and its causes:
    a cluster client wraps the node's error), or None when it may just be down."""
    import ssl

    import redis.exceptions as rx

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, rx.AuthenticationError) or (
                isinstance(e, rx.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS", "NOPERM"))):
            return f"refused the credentials (username/password): {e}"
        # redis-py turns ssl errors into a ConnectionError carrying their text (not always chained)
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            return ("presented a TLS certificate that does not verify (tls_ca_file, tls_verify, "
                    f"the host name): {e}")
        if (isinstance(e, ssl.SSLError) and "WRONG_VERSION_NUMBER" in text.upper()) or \
                "wrong version number" in text:
            return f"does not speak TLS on that port (tls is on): {e}"
        if "certificate required" in text.lower() or "TLSV13_ALERT_CERTIFICATE_REQUIRED" in text.upper():
            return f"requires a client certificate (tls_cert_file, tls_key_file): {e}"
        e = e.__cause__ or e.__context__
    return None
