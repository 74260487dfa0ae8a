"""The ``redis`` tier against the storage tier contract (``kv3d_core.testing``), on a real
``redis-server``, each test under its own key prefix: a plain server, a TLS-only one
(certificate verified against the test CA, client certificate required), a real
three-master Redis Cluster, and that cluster over TLS (:mod:`kv3d_tier_redis.testing`)."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from kv3d_core.testing import TierContract
from kv3d_tier_redis import layout
from kv3d_tier_redis.connect import make_client
from kv3d_tier_redis.tier import RedisTier

from test_redis_tier import start_store


@pytest.fixture(scope="module", params=["plain", "tls", "cluster", "tls-cluster"])
def store(request, tmp_path_factory):
    srv = start_store(request.param, tmp_path_factory.mktemp(request.param))
    yield srv
    srv.stop()


def flip_a_chunk_byte(tier: RedisTier, key: str) -> None:
    """Flip one byte in the middle of the first chunk of entry ``key``, behind the tier's back."""
    r = make_client(dataclasses.replace(tier.conn, timeout_s=10, connect_timeout_s=10))
    member = r.hget(tier.keys.where(tier._fp), key).decode()
    man = layout.read_manifest(r.get(tier.keys.manifest(member)))
    name = tier.keys.chunks(member, man.wid, man.n_chunks)[0]
    data = bytearray(r.get(name))
    data[len(data) // 2] ^= 0x01
    r.set(name, bytes(data), keepttl=True)
    r.close()


def same_store(tier: RedisTier) -> dict:
    """The connection settings of ``tier`` (url, cluster, TLS files...)."""
    return dataclasses.asdict(tier.conn)


class TestRedisTier(TierContract):
    @pytest.fixture
    def tier(self, store):
        return RedisTier(**store.settings, prefix=f"t-{uuid.uuid4().hex[:12]}", capacity_mb=0.25, chunk_kb=16)

    def reopen(self, tier):
        return RedisTier(**same_store(tier), prefix=tier.keys.prefix, capacity_mb=tier.capacity_bytes / 2**20,
                         chunk_kb=16)

    def damage(self, tier, key):
        flip_a_chunk_byte(tier, key)

    def peer(self, tier):
        return self.reopen(tier)


class TestRedisTierBlake2bTtl(TestRedisTier):
    """The other checksum, one chunk per entry, and a TTL (long enough not to expire here)."""

    @pytest.fixture
    def tier(self, store):
        return RedisTier(**store.settings, prefix=f"t-{uuid.uuid4().hex[:12]}", capacity_mb=0.25,
                         checksum="blake2b", ttl_s=600)

    def reopen(self, tier):
        return RedisTier(**same_store(tier), prefix=tier.keys.prefix, capacity_mb=tier.capacity_bytes / 2**20,
                         checksum="blake2b", ttl_s=600)
