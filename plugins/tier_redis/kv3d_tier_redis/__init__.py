"""kv3d storage tier on Valkey or Redis (``tier=redis``), shared by every server that uses the store.

- :mod:`kv3d_tier_redis.layout` -- key names and the manifest that publishes an entry.
- :mod:`kv3d_tier_redis.scripts` -- the Lua scripts that keep the index, LRU order and byte budget atomic.
- :mod:`kv3d_tier_redis.connect` -- settings checked at load, and the client they make.
- :mod:`kv3d_tier_redis.breaker` -- failures degrade to misses; backoff before the store is tried again.
- :mod:`kv3d_tier_redis.tier` -- :class:`RedisTier`, the ``StorageTier``.
- :mod:`kv3d_tier_redis.testing` -- real stores for tests on loopback: a ``redis-server`` (plain or TLS-only,
  with a test CA), a three-master Redis Cluster.
- :mod:`kv3d_tier_redis.plugin` -- the pluggy entry point.
"""

__version__ = "0.1.0"
