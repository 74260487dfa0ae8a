"""The ``redis`` tier's feed (``StorageTier.follow``) on a real ``redis-server``: what one
server publishes or removes, another sees while it runs; its own writes, other models' and
damaged entries never; a trimmed feed or a restarted store falls back to a full listing.
The tests taking ``store`` run on a plain server, a TLS one and a three-master cluster."""

from __future__ import annotations

import uuid

import pytest

from kv3d_core.errors import ConfigError
from kv3d_tier_redis.testing import RedisServer
from kv3d_tier_redis.tier import RedisTier

from test_redis_tier import FP, OTHER_FP, entry, key, open_tier, raw, stored
from test_redis_tier import store  # noqa: F401  (the same module-scoped store fixture: one store per kind, per module)


@pytest.fixture
def prefix() -> str:
    return f"f-{uuid.uuid4().hex[:12]}"


def keys_of(metas) -> list[str]:
    return [m.key for m in metas]


def test_a_peer_sees_what_another_server_publishes_and_removes(store, prefix):
    a, _ = open_tier(store, prefix)
    assert a.put(entry(0))                           # before b binds: b lists it, the feed does not repeat it
    b, events = open_tier(store, prefix)
    other, _ = open_tier(store, prefix, OTHER_FP)
    got = b.follow()
    assert a.shared and b.shared and got.added == () and got.removed == () and not got.rescan
    assert a.put(entry(1)) and a.put(entry(2, ns="tenant-b")) and other.put(entry(3, fp=OTHER_FP))
    assert b.put(entry(4))                           # its own put: not reported back to it
    got = b.follow()
    assert keys_of(got.added) == [key(1), key(2)] and got.removed == () and not got.rescan
    assert [m.namespace for m in got.added] == ["tenant-a", "tenant-b"]
    assert got.added[0].tokens.tolist() == entry(1).meta.tokens.tolist() and got.added[0].model_fingerprint == FP
    assert keys_of(a.follow().added) == [key(4)]     # a sees b's put
    a.delete(key(1))
    assert a.put(entry(5)) and a.put(entry(6))
    a.delete(key(6))                                 # published then removed before b read: neither
    got = b.follow()
    assert keys_of(got.added) == [key(5)] and got.removed == (key(1), key(6))
    assert b.follow().added == () and events.errors == []
    for t in (a, b, other):
        t.close()


def test_evictions_of_a_peer_are_removals(store, prefix):
    a, _ = open_tier(store, prefix, capacity_mb=0.05)
    b, _ = open_tier(store, prefix, capacity_mb=0.05)
    for i in range(4):
        assert a.put(entry(i, 20_000))               # 0.05 MiB holds two
    got = b.follow()
    assert set(got.removed) == {key(0), key(1)} and keys_of(got.added) == [key(2), key(3)]
    a.close()
    b.close()


def test_a_reader_behind_the_trimmed_feed_lists_everything(store, prefix):
    a, _ = open_tier(store, prefix)
    b, _ = open_tier(store, prefix)
    for i in range(5):
        assert a.put(entry(i))
    raw(store).xtrim(a.keys.feed, maxlen=2, approximate=False)   # b missed the first three
    got = b.follow()
    assert got.rescan and sorted(keys_of(got.added)) == sorted(key(i) for i in range(5))
    assert a.put(entry(9))
    got = b.follow()
    assert not got.rescan and keys_of(got.added) == [key(9)]
    a.close()
    b.close()


def test_a_restarted_store_is_listed_again(tmp_path, prefix):
    srv = RedisServer(tmp_path / "redis").start()
    try:
        a, _ = open_tier(srv.url, prefix, backoff_s=0.01, backoff_max_s=0.01)
        b, _ = open_tier(srv.url, prefix, backoff_s=0.01, backoff_max_s=0.01)
        assert a.put(entry(1)) and a.put(entry(2))
        assert keys_of(b.follow().added) == [key(1), key(2)]
        srv.stop()
        assert b.follow() is None                    # the store does not answer: nothing, no exception
        srv.start()                                  # empty; its feed numbers start again
        assert a.check() is None and b.check() is None
        assert a.put(entry(3))
        got = b.follow()
        assert got.rescan and keys_of(got.added) == [key(3)]
        a.close()
        b.close()
    finally:
        srv.stop()


def test_a_damaged_manifest_on_the_feed_is_a_counted_miss(store, prefix):
    a, _ = open_tier(store, prefix)
    b, events = open_tier(store, prefix)
    assert a.put(entry(1)) and a.put(entry(2))
    r = raw(store)
    member, _ = stored(a, r, key(1))
    data = bytearray(r.get(a.keys.manifest(member)))
    data[60] ^= 0x01
    r.set(a.keys.manifest(member), bytes(data))
    got = b.follow()
    assert keys_of(got.added) == [key(2)] and events.errors == ["checksum"]
    assert not b.contains(key(1))
    a.close()
    b.close()


def test_feed_off(store, prefix):
    a, _ = open_tier(store, prefix, feed_len=0)
    b, _ = open_tier(store, prefix, feed_len=0)
    assert a.put(entry(1)) and b.follow() is None
    assert not raw(store).exists(a.keys.feed)
    assert keys_of(b.entries()) == [key(1)]          # a restart still finds it
    a.close()
    b.close()


def test_the_feed_is_bounded(store, prefix):
    a, _ = open_tier(store, prefix, feed_len=100)
    for i in range(600):
        assert a.put(entry(i, 100))
    assert raw(store).xlen(a.keys.feed) < 300        # MAXLEN ~ trims whole nodes of the stream
    a.close()


@pytest.mark.parametrize("bad", [-1, 1.5, "x", True])
def test_bad_feed_len(bad):
    with pytest.raises(ConfigError, match="feed_len"):
        RedisTier(feed_len=bad)


def test_tier_of_another_kind_has_no_feed():
    from kv3d_core.tiers.ram import RamTier

    ram = RamTier(capacity_mb=1)
    assert not ram.shared and ram.follow() is None
