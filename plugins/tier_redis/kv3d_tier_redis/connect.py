"""The tier's settings, checked at load (a :class:`~kv3d_core.errors.ConfigError` naming
the setting), and the ``redis`` client they make: standalone or cluster, AUTH, TLS,
short timeouts and a bounded retry."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kv3d_core.errors import ConfigError

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Conn:
    """Where and how to connect (the settings that are not about entries)."""

    url: str | None = None
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    cluster: bool = False
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    connect_timeout_s: float = 0.5
    timeout_s: float = 0.5
    retries: int = 0

    @property
    def where(self) -> str:
        """The store's address for messages (never the password)."""
        if self.url:
            u = urlsplit(self.url)
            return f"{u.scheme}://{u.hostname or ''}{':' + str(u.port) if u.port else ''}{u.path or ''}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def _number(name: str, value: Any, *, low: float, high: float | None = None, integer: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"tier redis: {name} must be {'an integer' if integer else 'a number'} {span}, got {value!r}")


def check_conn(c: Conn) -> None:
    """ConfigError for a setting that cannot work."""
    if c.url is not None:
        scheme = urlsplit(str(c.url)).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"tier redis: url must start with redis://, rediss:// or unix://, got {c.url!r}")
        if c.tls and scheme != "rediss":
            raise ConfigError(f"tier redis: tls is on but url {c.where} is not rediss://")
        if c.cluster and scheme == "unix":
            raise ConfigError("tier redis: a cluster is reached over TCP, not a unix socket url")
    elif not isinstance(c.host, str) or not c.host:
        raise ConfigError(f"tier redis: host must be a host name or address, got {c.host!r}")
    _number("port", c.port, low=1, high=65535, integer=True)
    _number("db", c.db, low=0, high=1 << 20, integer=True)
    if c.cluster and c.db != 0:
        raise ConfigError("tier redis: a cluster has only db 0")
    _number("connect_timeout_s", c.connect_timeout_s, low=0.001, high=60)
    _number("timeout_s", c.timeout_s, low=0.001, high=60)
    _number("retries", c.retries, low=0, high=10, integer=True)
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(c, name)
        if path is not None and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"tier redis: {name} {path!r} is not a readable file")
    if (c.tls_cert_file is None) != (c.tls_key_file is None):
        raise ConfigError("tier redis: tls_cert_file and tls_key_file go together (a client certificate and its key)")
    if c.password is not None and not isinstance(c.password, str):
        raise ConfigError("tier redis: password must be a string")


def check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(f"tier redis: prefix must be 1-64 letters, digits, '_', '.' or '-', got {prefix!r}")
    return prefix


def client_options(c: Conn) -> dict[str, Any]:
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    opts: dict[str, Any] = dict(socket_timeout=c.timeout_s, socket_connect_timeout=c.connect_timeout_s,
                                retry=Retry(ExponentialBackoff(cap=c.timeout_s, base=0.01), c.retries),
                                username=c.username, password=c.password, client_name="kv3d-tier")
    if c.tls or (c.url or "").startswith("rediss://"):
        if not c.url:
            opts["ssl"] = True                      # a rediss:// url says so itself
        opts.update(ssl_cert_reqs="required" if c.tls_verify else "none",
                    ssl_check_hostname=bool(c.tls_verify))
        for opt, name in (("ssl_ca_certs", "tls_ca_file"), ("ssl_certfile", "tls_cert_file"),
                          ("ssl_keyfile", "tls_key_file")):
            if getattr(c, name):
                opts[opt] = os.path.expanduser(getattr(c, name))
    return opts


def make_client(c: Conn):
    """A ``redis.Redis`` (or ``redis.cluster.RedisCluster``); it connects lazily, except that
    a cluster client reads the slot map at once (and raises if it cannot)."""
    import redis
    from redis.cluster import RedisCluster

    opts = client_options(c)
    if c.cluster:
        if c.url:
            return RedisCluster.from_url(c.url, **opts)
        return RedisCluster(host=c.host, port=c.port, **opts)
    if c.url:
        return redis.Redis.from_url(c.url, **opts)
    return redis.Redis(host=c.host, port=c.port, db=c.db, **opts)
