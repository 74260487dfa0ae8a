"""What the ``redis`` tier adds to the contract, on a real ``redis-server``: chunking,
integrity of what another writer planted, tenants kept apart, the budget shared by
servers, TTL, the store going away and coming back, AUTH, settings.

The tests taking ``store`` run three times: on a plain server, on a TLS-only server that
requires a client certificate (verified against the test CA), and on a real three-master
Redis Cluster (:mod:`kv3d_tier_redis.testing`)."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import replace

import numpy as np
import pytest
import redis

from kv3d_core.config import compose
from kv3d_core.contracts.tier import EntryMeta, TierEntry
from kv3d_core.errors import ConfigError
from kv3d_core.plugins import make_plugin_manager, plugin_settings
from kv3d_core.testing.tier import Events
from kv3d_tier_redis import layout
from kv3d_tier_redis.connect import Conn, make_client
from kv3d_tier_redis.testing import RedisClusterServers, RedisServer, cli_missing, make_certs, tls_missing
from kv3d_tier_redis.tier import RedisTier

FP = "model-a-fingerprint"
OTHER_FP = "model-b-fingerprint"
MiB = 1 << 20


def key(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()


def entry(i: int, size: int = 10_000, *, ns: str = "tenant-a", fp: str = FP, seed: int = 0) -> TierEntry:
    payload = np.random.default_rng([i, seed]).integers(0, 256, size, dtype=np.uint8).tobytes()
    meta = EntryMeta(key=key(i), kind="session", namespace=ns, family="f" * 32,
                     tokens=np.arange(i, i + 40, dtype=np.int32), n_prefix=8, codec_id="int8", codec_version=1,
                     model_fingerprint=fp, f16_bytes=2 * size)
    return TierEntry(meta, payload)


STORES = ["plain", "tls", "cluster"]
"""The kinds of store the tests taking ``store`` run on (see :func:`start_store`)."""


def start_store(kind: str, tmp) -> RedisServer | RedisClusterServers:
    """A running store of ``kind``: ``plain``, ``tls`` (TLS only, client certificate required),
    ``cluster`` (three masters) or ``tls-cluster``; skipped only where this ``redis-server``
    has no TLS or there is no ``redis-cli`` to form a cluster."""
    if "tls" in kind and tls_missing():
        pytest.skip(tls_missing())
    if "cluster" in kind and cli_missing():
        pytest.skip(cli_missing())
    certs = make_certs(tmp) if "tls" in kind else None
    if "cluster" in kind:
        return RedisClusterServers(tmp / "cluster", tls=certs, tls_auth_clients=certs is not None).start()
    return RedisServer(tmp / "redis", tls=certs, tls_auth_clients=certs is not None).start()


@pytest.fixture(scope="module", params=STORES)
def store(request, tmp_path_factory):
    srv = start_store(request.param, tmp_path_factory.mktemp(request.param))
    yield srv
    srv.stop()


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def open_tier(where, prefix: str, fp: str = FP, **settings) -> tuple[RedisTier, Events]:
    """A bound tier on ``where``: a url, or a store of :func:`start_store` (its settings)."""
    events = Events()
    conn = {"url": where} if isinstance(where, str) else where.settings
    tier = RedisTier(prefix=prefix, **{**conn, "capacity_mb": 16, **settings})
    events.bind(tier, fp)
    return tier, events


def raw(store) -> redis.Redis:
    """A client of the store behind the tier's back (a cluster client on a cluster)."""
    return make_client(Conn(**store.settings, timeout_s=10, connect_timeout_s=10))


def stored(tier: RedisTier, r: redis.Redis, k: str) -> tuple[str, layout.Manifest]:
    member = r.hget(tier.keys.where(tier._fp), k).decode()
    return member, layout.read_manifest(r.get(tier.keys.manifest(member)))


# -- chunks ----------------------------------------------------------------------------------------
def test_large_entry_round_trips_in_chunks(store, prefix):
    tier, events = open_tier(store, prefix, chunk_kb=64)
    big = entry(1, 3 * MiB + 12345)
    assert tier.put(big)
    r = raw(store)
    member, man = stored(tier, r, key(1))
    assert man.n_chunks == -(-man.size // (64 * 1024)) and man.n_chunks >= 48
    names = tier.keys.chunks(member, man.wid, man.n_chunks)
    assert all(len(r.get(n)) == 64 * 1024 for n in names[:-1])
    got = tier.get(key(1))
    assert got is not None and got.payload == big.payload and np.array_equal(got.meta.tokens, big.meta.tokens)
    # a new put of the key writes new chunks and removes the old ones
    assert tier.put(entry(1, 100_000, seed=1))
    assert r.exists(*names) == 0
    assert tier.get(key(1)).payload == entry(1, 100_000, seed=1).payload
    assert events.errors == [] and events.dropped == []
    tier.close()


@pytest.mark.parametrize("how, reason", [("flip", "checksum"), ("drop", "missing"), ("cut", "truncated")])
def test_damaged_chunk_is_a_counted_miss(store, prefix, how, reason):
    tier, events = open_tier(store, prefix, chunk_kb=16)
    assert tier.put(entry(1, 100_000)) and tier.put(entry(2, 100_000))
    r = raw(store)
    member, man = stored(tier, r, key(1))
    names = tier.keys.chunks(member, man.wid, man.n_chunks)
    if how == "flip":
        data = bytearray(r.get(names[3]))
        data[100] ^= 0x40
        r.set(names[3], bytes(data))
    elif how == "drop":
        r.delete(names[2])
    else:
        r.set(names[-1], r.get(names[-1])[:-5])
    used = tier.used_bytes
    assert tier.get(key(1)) is None
    assert events.errors == [reason]
    assert not tier.contains(key(1)) and tier.used_bytes < used
    assert r.exists(*names) == 0, "the damaged entry's chunks were not removed"
    assert tier.get(key(2)).payload == entry(2, 100_000).payload
    tier.close()


def test_damaged_manifest_is_a_counted_miss(store, prefix):
    tier, events = open_tier(store, prefix)
    assert tier.put(entry(1))
    r = raw(store)
    member, _ = stored(tier, r, key(1))
    data = bytearray(r.get(tier.keys.manifest(member)))
    data[60] ^= 0x01                                    # inside the head: its digest fails
    r.set(tier.keys.manifest(member), bytes(data))
    assert tier.get(key(1)) is None and events.errors == ["checksum"] and not tier.contains(key(1))
    tier.close()


def plant(tier: RedisTier, r: redis.Redis, src_key: str, dst_fp: str, dst_ns: str, dst_key: str) -> None:
    """Copy a stored entry (manifest and chunks, bytes unchanged) under another model's or
    namespace's key names, as a confused or hostile writer could."""
    member, man = stored(tier, r, src_key)
    dst = tier.keys.member(dst_fp, dst_ns, dst_key)
    r.set(tier.keys.manifest(dst), r.get(tier.keys.manifest(member)))
    for a, b in zip(tier.keys.chunks(member, man.wid, man.n_chunks), tier.keys.chunks(dst, man.wid, man.n_chunks)):
        r.set(b, r.get(a))
    r.hset(tier.keys.where(dst_fp), dst_key, dst)
    r.zadd(tier.keys.lru, {dst: 0})


def test_entry_of_another_model_is_a_counted_miss(store, prefix):
    other, _ = open_tier(store, prefix, OTHER_FP)
    assert other.put(entry(1, fp=OTHER_FP))
    mine, events = open_tier(store, prefix, FP)
    assert mine.get(key(1)) is None and events.errors == [], "another model's entry is simply not there"
    assert mine.put(entry(1)) is True
    assert other.get(key(1)).meta.model_fingerprint == OTHER_FP, "the models' entries do not collide"
    assert mine.put(entry(1, fp=OTHER_FP)) is False and events.dropped == ["model"]
    plant(other, raw(store), key(1), mine._fp, layout.digest16("tenant-a"), key(7))
    assert mine.get(key(7)) is None and events.errors == ["format"]      # its header names key 1
    plant(other, raw(store), key(1), mine._fp, layout.digest16("tenant-a"), key(1))
    assert mine.get(key(1)) is None and events.errors == ["format", "model"]
    assert [m.key for m in mine.entries()] == []
    other.close()
    mine.close()


def test_namespaces_never_share_entries(store, prefix):
    """Tenants (namespaces) have their own key names; bytes of one tenant's entry planted
    under another's names are refused."""
    tier, events = open_tier(store, prefix)
    a, b = entry(1, ns="tenant-a"), entry(2, ns="tenant-b")
    assert tier.put(a) and tier.put(b)
    r = raw(store)
    ma, _ = stored(tier, r, key(1))
    mb, _ = stored(tier, r, key(2))
    assert layout.split_member(ma)[1] == layout.digest16("tenant-a") != layout.split_member(mb)[1]
    assert tier.get(key(1)).meta.namespace == "tenant-a" and tier.get(key(2)).meta.namespace == "tenant-b"
    plant(tier, r, key(1), tier._fp, layout.digest16("tenant-b"), key(1))   # tenant a's bytes, b's names
    assert tier.get(key(1)) is None and events.errors == ["namespace"]
    assert tier.get(key(2)).meta.namespace == "tenant-b"
    tier.close()


# -- budget, LRU, TTL ----------------------------------------------------------------------------------
def test_servers_sharing_a_store_share_the_budget_and_lru(store, prefix):
    one, ev1 = open_tier(store, prefix, capacity_mb=1)
    two, ev2 = open_tier(store, prefix, capacity_mb=1)
    size = 300_000
    assert one.put(entry(1, size)) and two.put(entry(2, size)) and one.put(entry(3, size))
    assert two.get(key(1)) is not None          # a use by the other server refreshes it: 2 is now oldest
    assert two.put(entry(4, size))
    assert [e.meta.key for e in ev2.evicted] == [key(2)] and ev1.evicted == []
    assert ev2.evicted[0].payload == entry(2, size).payload
    assert one.used_bytes == two.used_bytes <= MiB
    assert {m.key for m in one.entries()} == {key(1), key(3), key(4)}
    assert one.get(key(2)) is None and ev1.errors == [] and ev2.errors == []
    one.close()
    two.close()


def test_smaller_budget_at_start_evicts_lru(store, prefix):
    big, _ = open_tier(store, prefix, capacity_mb=4)
    for i in range(6):
        assert big.put(entry(i, 300_000))
    big.close()
    small, events = open_tier(store, prefix, capacity_mb=1)
    assert small.used_bytes <= MiB
    assert [e.meta.key for e in events.evicted] == [key(i) for i in range(len(events.evicted))]
    assert len(events.evicted) == 3
    small.close()


def test_ttl_expiry_is_a_plain_miss(store, prefix):
    tier, events = open_tier(store, prefix, ttl_s=1)
    assert tier.put(entry(1)) and tier.put(entry(2))
    time.sleep(0.6)
    assert tier.touch(key(2)) and tier.get(key(2)) is not None     # a use renews the TTL
    time.sleep(0.7)
    assert tier.get(key(1)) is None and not tier.contains(key(1))
    assert tier.get(key(2)) is not None
    assert [m.key for m in tier.entries()] == [key(2)]
    assert events.errors == []
    r = raw(store)
    member = stored(tier, r, key(2))[0]
    assert tier.used_bytes == int(r.hget(tier.keys.base + ":size", member)), "the expired entry is still counted"
    ttl = r.pttl(tier.keys.manifest(member))
    assert 0 < ttl <= 1000
    tier.close()


# -- the store failing -------------------------------------------------------------------------------
def test_store_stopped_then_back(tmp_path, prefix):
    srv = RedisServer(tmp_path / "redis").start()
    tier, events = open_tier(srv.url, prefix, timeout_s=0.3, connect_timeout_s=0.3, backoff_s=0.2, backoff_max_s=0.4)
    try:
        assert tier.put(entry(1)) and tier.get(key(1)) is not None
        srv.stop()
        t0 = time.monotonic()
        assert tier.get(key(1)) is None
        assert time.monotonic() - t0 < 1.0, "a get waited longer than the timeouts"
        assert tier.put(entry(2)) is False and events.dropped == ["io_error"]
        t0 = time.monotonic()
        for i in range(20):                      # during the backoff: no network at all
            assert tier.get(key(1)) is None and tier.put(entry(3)) is False
        assert time.monotonic() - t0 < 0.5
        why = tier.check()
        assert why and srv.url.split("@")[-1].split("/")[0] in why
        assert tier.entries() == [] and not tier.contains(key(1))
        srv.start()                              # same port, empty (it saves nothing)
        time.sleep(0.5)                          # the backoff runs out; nothing else is done
        assert tier.put(entry(4)), "the tier did not come back by itself"
        assert tier.get(key(4)).payload == entry(4).payload
        assert tier.check() is None and events.errors == []
    finally:
        tier.close()
        srv.stop()


def test_slow_store_is_a_miss_within_the_timeout(tmp_path, prefix):
    srv = RedisServer(tmp_path / "redis").start()
    tier, events = open_tier(srv.url, prefix, timeout_s=0.3, backoff_s=5, backoff_max_s=5)
    try:
        assert tier.put(entry(1))
        srv.proc.send_signal(19)                 # SIGSTOP: connected, but it answers nothing
        t0 = time.monotonic()
        assert tier.get(key(1)) is None
        assert time.monotonic() - t0 < 1.0
        assert tier.put(entry(2)) is False
        srv.proc.send_signal(18)                 # SIGCONT
        assert tier.check() is None
        assert tier.get(key(1)).payload == entry(1).payload
    finally:
        if srv.proc is not None:
            srv.proc.send_signal(18)
        tier.close()
        srv.stop()


def test_store_down_at_start_is_not_fatal(tmp_path, prefix):
    srv = RedisServer(tmp_path / "redis")
    tier, events = open_tier(srv.url, prefix, backoff_s=0.1, backoff_max_s=0.1)
    try:
        assert tier.get(key(1)) is None and tier.check() is not None
        srv.start()
        assert tier.check() is None and tier.put(entry(1)) and tier.get(key(1)) is not None
    finally:
        tier.close()
        srv.stop()


# -- AUTH, settings, config --------------------------------------------------------------------------------
def test_auth(tmp_path, prefix):
    srv = RedisServer(tmp_path / "redis", password="s3cret-pw").start()
    try:
        tier, events = open_tier(srv.url, prefix)
        assert tier.put(entry(1)) and tier.get(key(1)) is not None
        tier.close()
        plain = f"redis://127.0.0.1:{srv.port}/0"
        ok = RedisTier(url=plain, password="s3cret-pw", prefix=prefix)
        ok.bind(model_fingerprint=FP)
        assert ok.get(key(1)) is not None
        ok.close()
        with pytest.raises(ConfigError, match="credentials") as exc:
            RedisTier(url=plain, password="wrong", prefix=prefix)
        assert "wrong" not in str(exc.value)
        with pytest.raises(ConfigError, match="credentials"):
            RedisTier(url=plain, prefix=prefix)
    finally:
        srv.stop()


@pytest.mark.parametrize("bad", [{"capacity_mb": -1}, {"ttl_s": "x"}, {"chunk_kb": 1}, {"chunk_kb": 1.5},
                                 {"checksum": "md5"}, {"prefix": "a b"}, {"prefix": "{x}"}, {"port": 0},
                                 {"url": "http://x"}, {"timeout_s": 0}, {"retries": -1},
                                 {"backoff_max_s": 0.1, "backoff_s": 1}, {"tls_ca_file": "/nonexistent/ca.pem"},
                                 {"tls_cert_file": __file__}, {"cluster": True, "db": 2},
                                 {"tls": True, "url": "redis://127.0.0.1:1/0"}])
def test_bad_settings(bad):
    with pytest.raises(ConfigError):
        RedisTier(**bad)


def test_unknown_setting():
    with pytest.raises(TypeError, match="bogus"):
        RedisTier(bogus=1)


def test_plugin_manager_and_config(store, prefix):
    pm = make_plugin_manager()
    assert "redis" in pm.names("tier")
    conn = [f"tier.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in store.settings.items()]
    cfg = compose(["tier=redis", *conn, f"tier.prefix={prefix}", "tier.capacity_mb=2"])
    name, settings = plugin_settings(cfg.tier)
    assert name == "redis" and settings["capacity_mb"] == 2 and settings["ttl_s"] == 604800
    tier = pm.create("tier", name, **settings)
    assert isinstance(tier, RedisTier) and tier.level == "cold" and tier.persistent
    assert tier.capacity_bytes == 2 * MiB
    tier.bind(model_fingerprint=FP)
    assert tier.put(entry(1)) and tier.get(key(1)).payload == entry(1).payload
    tier.close()
    name, settings = plugin_settings(compose(["tier=redis"]).tier)
    assert settings["host"] == "127.0.0.1" and settings["port"] == 6379 and settings["url"] is None


def test_meta_round_trip_exact(store, prefix):
    tier, _ = open_tier(store, prefix)
    e = entry(1)
    e = TierEntry(replace(e.meta, tokens=np.array([0, 2**31 - 1, -2**31], np.int32), f16_bytes=2**40 + 3,
                          namespace="ns-é", kind="snapshot", n_prefix=0), b"")
    assert tier.put(e)
    got = tier.get(key(1))
    assert got.payload == b"" and got.meta.namespace == "ns-é" and got.meta.f16_bytes == 2**40 + 3
    assert np.array_equal(got.meta.tokens, e.meta.tokens)
    tier.close()
