"""Entry point of the ``tier_redis`` plugin: registers the tier ``redis``, its settings and
its config group (``conf/tier/redis.yaml``: ``kv3d serve tier=redis tier.url=redis://host:6379/0``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kv3d_core import hookimpl


@dataclass
class RedisSettings:
    """The ``tier`` node of ``tier=redis`` (each documented in ``conf/tier/redis.yaml``)."""

    url: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    cluster: bool = False
    username: Optional[str] = None
    password: Optional[str] = None
    tls: bool = False
    tls_ca_file: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    tls_verify: bool = True
    prefix: str = "kv3d"
    capacity_mb: float = 4096
    ttl_s: float = 604800
    chunk_kb: int = 1024
    checksum: str = "xxh3"
    connect_timeout_s: float = 0.5
    timeout_s: float = 0.5
    retries: int = 0
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    feed_len: int = 10000


@hookimpl
def register_tiers(register):
    from kv3d_tier_redis.tier import RedisTier

    register("redis", RedisTier, settings=RedisSettings)


@hookimpl
def config_dir():
    return str(Path(__file__).parent / "conf")
