"""Conformance tests of the storage tier contract, :class:`~kv3d_core.contracts.StorageTier`.

Subclass :class:`TierContract` and provide a ``tier`` fixture; persistent tiers also
implement :meth:`TierContract.reopen`, and tiers whose stored bytes a test can reach
implement :meth:`TierContract.damage`.
"""

from __future__ import annotations

import hashlib
import struct
import threading

import numpy as np
import pytest

from kv3d_core.contracts.tier import EntryMeta, Followed, StorageTier, TierEntry

FINGERPRINT = "kv3d-contract-model-a"
OTHER_FINGERPRINT = "kv3d-contract-model-b"

#: Largest capacity the contract accepts: its entries are a fraction of the capacity.
MAX_CAPACITY = 8 << 20

N_TOKENS = 24


def entry_key(i: int) -> str:
    """The key of test entry ``i``: 32 lowercase hex digits, as the core's keys."""
    return hashlib.blake2b(f"kv3d-contract-entry-{i}".encode(), digest_size=16).hexdigest()


def _hex(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def make_entry(i: int, payload_size: int, *, version: int = 0, fingerprint: str = FINGERPRINT,
               kind: str = "session", n_tokens: int = N_TOKENS) -> TierEntry:
    """Test entry ``i``: its payload starts with ``(i, version)`` and, like its tokens, is a
    function of both, so a reader can tell which put it sees. Entries of equal
    ``payload_size`` and ``n_tokens`` have equal sizes."""
    rng = np.random.default_rng([i, version])
    head = struct.pack("<qq", i, version)
    payload = (head + rng.bytes(max(0, payload_size - len(head))))[:payload_size]
    meta = EntryMeta(
        key=entry_key(i), kind=kind, namespace=_hex("namespace"), family=_hex(f"family-{i % 3}"),
        tokens=rng.integers(0, 50_000, n_tokens, dtype=np.int32),
        n_prefix=0 if kind == "snapshot" else min(8, n_tokens), codec_id="none", codec_version=1,
        model_fingerprint=fingerprint, f16_bytes=2 * payload_size)
    return TierEntry(meta, payload)


def assert_same_entry(want: TierEntry, got: object, what: str) -> None:
    """``got`` is ``want`` exactly: every metadata field, the tokens and the payload bytes."""
    assert isinstance(got, TierEntry), f"{what}: got {type(got).__name__}, not a TierEntry"
    w, g = want.meta, got.meta
    for field in ("key", "kind", "namespace", "family", "n_prefix", "codec_id", "codec_version",
                  "model_fingerprint", "f16_bytes"):
        assert getattr(g, field) == getattr(w, field), \
            f"{what}: meta.{field} is {getattr(g, field)!r}, not {getattr(w, field)!r}"
    assert np.array_equal(np.asarray(g.tokens), np.asarray(w.tokens)), f"{what}: tokens differ"
    assert bytes(got.payload) == bytes(want.payload), f"{what}: payload bytes differ"


class Events:
    """The callbacks given to :meth:`StorageTier.bind`, recorded (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.evicted: list[TierEntry] = []
        self.errors: list[str] = []
        self.dropped: list[str] = []

    def on_evict(self, entry: TierEntry) -> None:
        with self._lock:
            self.evicted.append(entry)

    def on_error(self, reason: str) -> None:
        with self._lock:
            self.errors.append(reason)

    def on_dropped(self, reason: str) -> None:
        with self._lock:
            self.dropped.append(reason)

    def bind(self, tier: StorageTier, fingerprint: str = FINGERPRINT) -> StorageTier:
        tier.bind(model_fingerprint=fingerprint, on_evict=self.on_evict, on_error=self.on_error,
                  on_dropped=self.on_dropped)
        return tier


class TierContract:
    """The :class:`~kv3d_core.contracts.StorageTier` contract, for a tier's own tests.

    Provide the fixture ``tier``: a fresh, empty, *unbound* tier with a small capacity
    (64 KiB to 8 MiB: test entries are fractions of it). The contract binds it (model
    fingerprint and recording callbacks) and closes it afterwards.

    Hooks a subclass overrides where they apply (tests needing one are skipped without it):

    - :meth:`reopen` -- required when ``tier.persistent``: a new unbound instance over the
      same storage and settings, after the contract closed the old one.
    - :meth:`damage` -- alter the stored bytes of one entry behind the tier's back.
    - :meth:`peer` -- shared tiers (``tier.shared``): a second unbound instance over the same
      store, as another server opens it (for :meth:`StorageTier.follow`).

    A tier that keeps the default :meth:`StorageTier.touch` (no recency change) skips the
    touch test.
    """

    @pytest.fixture
    def tier(self) -> StorageTier:
        pytest.fail(f"{type(self).__name__} must define a `tier` fixture returning a fresh, unbound tier")

    def reopen(self, tier: StorageTier) -> StorageTier:
        """A new, unbound instance of ``tier``'s class over the same storage (``tier`` is closed)."""
        raise NotImplementedError

    def damage(self, tier: StorageTier, key: str) -> None:
        """Alter the stored bytes of entry ``key`` (e.g. flip a byte of its file)."""
        raise NotImplementedError

    def peer(self, tier: StorageTier) -> StorageTier:
        """Shared tiers: a new, unbound instance over the same store as ``tier`` (still open)."""
        raise NotImplementedError

    # -- fixtures and helpers -------------------------------------------------------------------------
    @pytest.fixture
    def events(self) -> Events:
        return Events()

    @pytest.fixture
    def bound(self, tier, events):
        """``tier``, bound to :data:`FINGERPRINT` with ``events``' callbacks; closed afterwards."""
        self._open = [events.bind(tier)]
        yield tier
        for t in self._open:
            t.close()

    def _close(self, tier: StorageTier) -> None:
        tier.close()
        self._open = [t for t in self._open if t is not tier]

    def _reopen(self, tier: StorageTier, events: Events, fingerprint: str = FINGERPRINT) -> StorageTier:
        self._close(tier)
        new = self.reopen(tier)
        assert isinstance(new, StorageTier) and new is not tier, "reopen must return a new tier instance"
        self._open.append(new)
        return events.bind(new, fingerprint)

    @staticmethod
    def _capacity(tier: StorageTier) -> int:
        cap = tier.capacity_bytes
        assert 0 < cap <= MAX_CAPACITY, (f"the tier fixture has a capacity of {cap} bytes: give it 64 KiB to "
                                         f"{MAX_CAPACITY >> 20} MiB, the contract's entries are fractions of it")
        return cap

    @staticmethod
    def _put(tier: StorageTier, entry: TierEntry) -> None:
        assert tier.put(entry) is True, f"put of entry {entry.meta.key[:8]} ({entry.nbytes} bytes) refused"
        assert tier.used_bytes <= tier.capacity_bytes, "used_bytes exceeds capacity_bytes after a put"
        assert tier.contains(entry.meta.key), "the entry just put is not held"

    def _fill_until_eviction(self, tier: StorageTier, events: Events) -> tuple[int, int, int]:
        """Put equal-sized entries 0, 1, ... until the first eviction: (size, entries put,
        entries evicted). Those evicted must be the oldest, in order, handed over exactly."""
        size = self._capacity(tier) // 8
        n = 0
        while not events.evicted:
            assert n < 64, "64 puts of 1/8 of the capacity each evicted nothing"
            self._put(tier, make_entry(n, size))
            n += 1
        ev = len(events.evicted)
        assert [e.meta.key for e in events.evicted] == [entry_key(j) for j in range(ev)], \
            "on_evict did not get the least recently used entries, oldest first"
        for j, e in enumerate(events.evicted):
            assert_same_entry(make_entry(j, size), e, f"evicted entry {j}")
            assert not tier.contains(entry_key(j)) and tier.get(entry_key(j)) is None, f"evicted entry {j} still held"
        for j in range(ev, n):
            assert tier.contains(entry_key(j)), f"entry {j} evicted without on_evict"
        return size, n, ev

    def _next_eviction(self, tier: StorageTier, events: Events, size: int, n: int, expect: int, kept: int) -> None:
        before = len(events.evicted)
        self._put(tier, make_entry(n, size))
        got = [e.meta.key for e in events.evicted[before:]]
        assert got == [entry_key(expect)], (f"expected entry {expect} (least recently used) to be evicted, "
                                            f"got {[k[:8] for k in got]}")
        assert tier.contains(entry_key(kept)), f"entry {kept}, just used, was evicted"

    # -- identity -----------------------------------------------------------------------------------
    def test_identity(self, bound):
        assert isinstance(bound, StorageTier)
        assert isinstance(bound.name, str) and bound.name and bound.name != "?"
        assert bound.level in ("warm", "cold")
        assert isinstance(bound.persistent, bool)
        self._capacity(bound)
        assert bound.used_bytes == 0 and len(bound) == 0 and list(bound.entries()) == [], "a fresh tier is not empty"
        assert bound.check() is None, "check() of a healthy tier must return None"

    # -- round trip -------------------------------------------------------------------------------------
    def test_put_get_round_trip(self, bound, events):
        cap = self._capacity(bound)
        entries = [make_entry(0, 1), make_entry(1, cap // 16, kind="snapshot"), make_entry(2, 1000, n_tokens=1),
                   make_entry(3, 4096, n_tokens=300), make_entry(4, 777)]
        for e in entries:
            self._put(bound, e)
        for e in entries:
            assert bound.contains(e.meta.key)
            assert_same_entry(e, bound.get(e.meta.key), f"get of entry {e.meta.key[:8]}")
        assert {m.key for m in bound.entries()} == {e.meta.key for e in entries}
        assert all(isinstance(m, EntryMeta) for m in bound.entries())
        assert len(bound) == len(entries)
        assert 0 < bound.used_bytes <= cap
        assert events.evicted == [] and events.errors == [] and events.dropped == []

    def test_get_of_absent_or_odd_keys_is_none(self, bound):
        """``get`` never raises: absent keys, keys no tier could hold, path-like keys."""
        self._put(bound, make_entry(1, 100))
        odd = [entry_key(2), "", "zz", "../" * 8 + "etc/passwd", "/etc/passwd", entry_key(1).upper(),
               entry_key(1) + ".kv3d", entry_key(1)[:-1], "0" * 4096, "\0" + entry_key(1), "é" * 20, " "]
        for key in odd:
            assert bound.get(key) is None, f"get({key[:40]!r}) returned something"
            assert not bound.contains(key)
            bound.delete(key)                       # absent: nothing to do, no error
        assert_same_entry(make_entry(1, 100), bound.get(entry_key(1)), "entry 1 after odd keys")

    def test_put_replaces_an_entry_of_the_same_key(self, bound):
        self._put(bound, make_entry(1, 500))
        used = bound.used_bytes
        self._put(bound, make_entry(1, 500, version=1))
        assert_same_entry(make_entry(1, 500, version=1), bound.get(entry_key(1)), "the replaced entry")
        assert bound.used_bytes == used, "replacing an entry by one of the same size changed used_bytes"
        assert len(bound) == 1 and [m.key for m in bound.entries()] == [entry_key(1)]

    def test_delete(self, bound):
        a, b = make_entry(1, 300), make_entry(2, 300)
        self._put(bound, a)
        self._put(bound, b)
        used = bound.used_bytes
        bound.delete(a.meta.key)
        assert not bound.contains(a.meta.key) and bound.get(a.meta.key) is None
        assert [m.key for m in bound.entries()] == [b.meta.key] and len(bound) == 1
        assert bound.used_bytes < used
        bound.delete(a.meta.key)                    # twice: no error
        assert_same_entry(b, bound.get(b.meta.key), "the other entry")
        bound.delete(b.meta.key)
        assert bound.used_bytes == 0 and len(bound) == 0 and list(bound.entries()) == []

    # -- budget and LRU ---------------------------------------------------------------------------------
    def test_entry_larger_than_capacity_is_refused(self, bound, events):
        cap = self._capacity(bound)
        small = [make_entry(1, cap // 10), make_entry(2, cap // 10)]
        for e in small:
            self._put(bound, e)
        used = bound.used_bytes
        big = make_entry(3, cap + 1)
        assert bound.put(big) is False, "put of an entry larger than the capacity must return False"
        assert not bound.contains(big.meta.key) and bound.get(big.meta.key) is None
        assert events.evicted == [], "a refused entry evicted others"
        assert bound.used_bytes == used
        for e in small:
            assert_same_entry(e, bound.get(e.meta.key), "an entry held before the refused put")

    def test_lru_eviction_order_and_on_evict(self, bound, events):
        """Puts past the budget evict the least recently used entries first and hand each
        to ``on_evict`` exactly as it was put."""
        self._fill_until_eviction(bound, events)

    def test_get_refreshes_an_entry(self, bound, events):
        size, n, ev = self._fill_until_eviction(bound, events)
        assert_same_entry(make_entry(ev, size), bound.get(entry_key(ev)), "the oldest entry")
        self._next_eviction(bound, events, size, n, expect=ev + 1, kept=ev)

    def test_put_refreshes_an_entry(self, bound, events):
        size, n, ev = self._fill_until_eviction(bound, events)
        self._put(bound, make_entry(ev, size, version=1))
        self._next_eviction(bound, events, size, n, expect=ev + 1, kept=ev)

    def test_touch_refreshes_an_entry(self, bound, events):
        if type(bound).touch is StorageTier.touch:
            pytest.skip("the tier keeps the default touch (no recency change)")
        size, n, ev = self._fill_until_eviction(bound, events)
        assert bound.touch(entry_key(ev)) is True
        assert bound.touch(entry_key(10_000)) is False, "touch of an absent key must return False"
        self._next_eviction(bound, events, size, n, expect=ev + 1, kept=ev)

    def test_used_bytes_stay_within_capacity(self, bound, events):
        """Entries of mixed sizes: the budget holds after every put, the entry just put is
        held, and every held entry reads back exactly."""
        cap = self._capacity(bound)
        rng = np.random.default_rng(21)
        sizes = {}
        for i in range(40):
            sizes[i] = int(rng.integers(cap // 40, cap // 3))
            self._put(bound, make_entry(i, sizes[i]))
        held = [m.key for m in bound.entries()]
        assert entry_key(39) in held and len(held) == len(bound)
        for i, size in sizes.items():
            if entry_key(i) in held:
                assert_same_entry(make_entry(i, size), bound.get(entry_key(i)), f"entry {i}")
        assert len(events.evicted) + len(held) == 40
        assert events.errors == []

    # -- model fingerprint -------------------------------------------------------------------------------
    def test_entries_of_another_model_are_never_returned(self, bound):
        """A tier bound to one model fingerprint refuses or hides another model's entries."""
        other = make_entry(1, 200, fingerprint=OTHER_FINGERPRINT)
        if bound.put(other):
            assert bound.get(other.meta.key) is None, "get returned an entry of another model fingerprint"
        self._put(bound, make_entry(2, 200))
        assert_same_entry(make_entry(2, 200), bound.get(entry_key(2)), "an entry of the bound model")

    # -- damage ------------------------------------------------------------------------------------------
    def test_damaged_entry_is_a_counted_miss(self, bound, events):
        """Damage is a miss: ``get`` returns None (never altered bytes, never raises), the
        entry is removed and ``on_error(reason)`` counts it; other entries are unaffected."""
        if type(self).damage is TierContract.damage:
            pytest.skip("no damage hook: the subclass cannot alter this tier's stored bytes")
        a, b = make_entry(1, 2000), make_entry(2, 2000)
        self._put(bound, a)
        self._put(bound, b)
        used = bound.used_bytes
        self.damage(bound, a.meta.key)
        assert bound.get(a.meta.key) is None, "get returned a damaged entry"
        assert events.errors and all(isinstance(r, str) and r for r in events.errors), \
            f"on_error was not called with a reason: {events.errors!r}"
        assert not bound.contains(a.meta.key), "the damaged entry was not removed"
        assert bound.get(a.meta.key) is None
        assert bound.used_bytes < used
        assert_same_entry(b, bound.get(b.meta.key), "the undamaged entry")

    # -- persistence -------------------------------------------------------------------------------------
    def _persistent(self, tier: StorageTier) -> None:
        if not tier.persistent:
            pytest.skip("the tier is not persistent")
        if type(self).reopen is TierContract.reopen:
            pytest.fail(f"{type(tier).__name__} is persistent: {type(self).__name__} must implement reopen(tier)")

    def test_entries_survive_reopen(self, bound, events):
        self._persistent(bound)
        keep = [make_entry(1, 1500, kind="snapshot"), make_entry(2, 900), make_entry(3, 1)]
        for e in keep + [make_entry(4, 700)]:
            self._put(bound, e)
        bound.delete(entry_key(4))
        again = self._reopen(bound, events)
        assert {m.key for m in again.entries()} == {e.meta.key for e in keep}, "entries() after reopen"
        for e in keep:
            assert again.contains(e.meta.key)
            assert_same_entry(e, again.get(e.meta.key), f"entry {e.meta.key[:8]} after reopen")
        assert again.get(entry_key(4)) is None, "a deleted entry came back after reopen"
        assert 0 < again.used_bytes <= again.capacity_bytes
        self._put(again, make_entry(5, 500))
        assert_same_entry(make_entry(5, 500), again.get(entry_key(5)), "a new entry after reopen")
        assert events.errors == []

    def test_reopen_for_another_model_returns_none_of_its_entries(self, bound, events):
        self._persistent(bound)
        for i in range(3):
            self._put(bound, make_entry(i, 600))
        other = self._reopen(bound, events, OTHER_FINGERPRINT)
        for i in range(3):
            assert other.get(entry_key(i)) is None, "entry of another model fingerprint returned after reopen"
        assert other.used_bytes <= other.capacity_bytes

    # -- threads ---------------------------------------------------------------------------------------
    def test_concurrent_puts_and_gets(self, bound, events):
        """Four threads putting and getting eight shared keys: every get is None or exactly
        one of the entries put under that key (meta and payload of the same put), nothing
        raises, nothing is reported damaged, and the budget holds."""
        cap = self._capacity(bound)
        size = max(64, cap // 64)
        n_keys, n_threads, rounds = 8, 4, 30
        problems: list[str] = []
        barrier = threading.Barrier(n_threads)

        def check(i: int, got: TierEntry | None, where: str) -> None:
            if got is None:
                return
            i2, version = struct.unpack_from("<qq", bytes(got.payload))
            if i2 != i:
                problems.append(f"{where}: entry {i} returned the payload of entry {i2}")
                return
            try:
                assert_same_entry(make_entry(i, size, version=version), got, where)
            except AssertionError as exc:
                problems.append(str(exc))

        def run(t: int) -> None:
            rng = np.random.default_rng(100 + t)
            try:
                barrier.wait(timeout=30)
                for r in range(rounds):
                    i = int(rng.integers(n_keys))
                    if rng.random() < 0.5:
                        if not bound.put(make_entry(i, size, version=1 + t * rounds + r)):
                            problems.append(f"thread {t}: put refused")
                    else:
                        check(i, bound.get(entry_key(i)), f"thread {t} get of entry {i}")
            except BaseException as exc:  # noqa: BLE001 - reported below
                problems.append(f"thread {t}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "a thread hung"
        assert not problems, "\n".join(problems[:10])
        assert events.errors == [], f"concurrent use was reported as damage: {events.errors}"
        assert bound.used_bytes <= cap
        for i in range(n_keys):
            check(i, bound.get(entry_key(i)), f"final get of entry {i}")
        assert not problems, "\n".join(problems[:10])
        self._put(bound, make_entry(0, size, version=10**6))
        assert_same_entry(make_entry(0, size, version=10**6), bound.get(entry_key(0)), "a put after the threads")

    def test_follow_reports_what_other_servers_publish(self, bound, events):
        """A tier that is not shared has no feed; a shared one with a feed reports a peer's
        puts of this model (exact metadata) and maybe its removals, never its own puts nor
        another model's entries."""
        if not bound.shared:
            assert bound.follow() is None, "follow() of a tier that is not shared must be None"
            return
        try:
            peers = [self.peer(bound), self.peer(bound)]
        except NotImplementedError:
            pytest.skip("shared tier without a peer() hook")
        self._open += peers
        peer, other = events.bind(peers[0]), Events().bind(peers[1], OTHER_FINGERPRINT)
        first = bound.follow()
        if first is None:
            pytest.skip("this shared tier offers no feed")
        assert isinstance(first, Followed) and (first.rescan or first.added == ())
        size = self._capacity(bound) // 16
        self._put(peer, make_entry(1, size))
        self._put(other, make_entry(2, size, fingerprint=OTHER_FINGERPRINT))
        self._put(bound, make_entry(3, size))
        got = bound.follow()
        assert isinstance(got, Followed), "follow() answered nothing although the store answers"
        keys = [m.key for m in got.added]
        assert entry_key(2) not in keys, "follow() reported another model's entry"
        if got.rescan:
            assert {entry_key(1), entry_key(3)} <= set(keys)
        else:
            assert keys == [entry_key(1)], f"follow() reported {keys}: not the peer's put alone"
        meta = next(m for m in got.added if m.key == entry_key(1))
        assert_same_entry(make_entry(1, size), TierEntry(meta, make_entry(1, size).payload), "followed entry")
        peer.delete(entry_key(1))
        got = bound.follow()
        assert got is not None and entry_key(1) not in [m.key for m in got.added]
        assert got.removed in ((), (entry_key(1),)), f"removed {got.removed}: not the peer's delete"
