"""The ``redis`` tier against the storage tier contract (``kv3d_core.testing``), on a real
``redis-server``; each test under its own key prefix."""

from __future__ import annotations

import uuid

import pytest
import redis

from kv3d_core.testing import TierContract
from kv3d_tier_redis import layout
from kv3d_tier_redis.testing import RedisServer
from kv3d_tier_redis.tier import RedisTier


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


def flip_a_chunk_byte(tier: RedisTier, key: str) -> None:
    """Flip one byte in the middle of the first chunk of entry ``key``, behind the tier's back."""
    r = redis.Redis.from_url(tier.conn.url)
    member = r.hget(tier.keys.where(tier._fp), key).decode()
    man = layout.read_manifest(r.get(tier.keys.manifest(member)))
    name = tier.keys.chunks(member, man.wid, man.n_chunks)[0]
    data = bytearray(r.get(name))
    data[len(data) // 2] ^= 0x01
    r.set(name, bytes(data), keepttl=True)
    r.close()


class TestRedisTier(TierContract):
    @pytest.fixture
    def tier(self, store):
        return RedisTier(url=store.url, prefix=f"t-{uuid.uuid4().hex[:12]}", capacity_mb=0.25, chunk_kb=16)

    def reopen(self, tier):
        return RedisTier(url=tier.conn.url, prefix=tier.keys.prefix, capacity_mb=tier.capacity_bytes / 2**20,
                         chunk_kb=16)

    def damage(self, tier, key):
        flip_a_chunk_byte(tier, key)

    def peer(self, tier):
        return self.reopen(tier)


class TestRedisTierBlake2bTtl(TestRedisTier):
    """The other checksum, one chunk per entry, and a TTL (long enough not to expire here)."""

    @pytest.fixture
    def tier(self, store):
        return RedisTier(url=store.url, prefix=f"t-{uuid.uuid4().hex[:12]}", capacity_mb=0.25, checksum="blake2b",
                         ttl_s=600)

    def reopen(self, tier):
        return RedisTier(url=tier.conn.url, prefix=tier.keys.prefix, capacity_mb=tier.capacity_bytes / 2**20,
                         checksum="blake2b", ttl_s=600)
