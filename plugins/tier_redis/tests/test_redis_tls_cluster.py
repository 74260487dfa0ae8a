"""What TLS and a cluster add, on real servers (:mod:`kv3d_tier_redis.testing`): a TLS setting
that cannot work is an error at load naming it, or misses within the timeouts, never a hang;
on a three-master Redis Cluster the keys the scripts touch share one slot (the ``{prefix}``
hash tag) while chunks spread over the nodes, and a node or the whole cluster going away
costs misses, then the tier comes back by itself."""

from __future__ import annotations

import time
import uuid

import pytest

from kv3d_core.config import compose
from kv3d_core.errors import ConfigError
from kv3d_core.plugins import make_plugin_manager, plugin_settings
from kv3d_tier_redis.tier import RedisTier
from kv3d_tier_redis.testing import RedisClusterServers, RedisServer, cli_missing, make_certs, tls_missing

from test_redis_tier import FP, entry, key, open_tier

needs_tls = pytest.mark.skipif(tls_missing() is not None, reason=tls_missing() or "")
needs_cli = pytest.mark.skipif(cli_missing() is not None, reason=cli_missing() or "")
FAST = dict(timeout_s=0.3, connect_timeout_s=0.3, backoff_s=0.2, backoff_max_s=0.4)


@pytest.fixture
def prefix() -> str:
    return f"x-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if tls_missing():
        pytest.skip(tls_missing())
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("other"), "other-ca")


@pytest.fixture(scope="module")
def tls_store(tmp_path_factory, certs):
    """TLS only, client certificates required."""
    srv = RedisServer(tmp_path_factory.mktemp("tls"), tls=certs, tls_auth_clients=True).start()
    yield srv
    srv.stop()


# -- TLS ---------------------------------------------------------------------------------------------------
@needs_tls
def test_tls_round_trip_by_host_and_port_through_the_config(tls_store, certs, prefix):
    """tier.tls=true with host/port (no url), as conf/tier/redis.yaml documents it; and a
    url naming localhost (the certificate's other name)."""
    pm = make_plugin_manager()
    cfg = compose(["tier=redis", "tier.host=127.0.0.1", f"tier.port={tls_store.port}", "tier.tls=true",
                   f"tier.tls_ca_file={certs.ca}", f"tier.tls_cert_file={certs.client_cert}",
                   f"tier.tls_key_file={certs.client_key}", f"tier.prefix={prefix}"])
    tier = pm.create("tier", *plugin_settings(cfg.tier)[:1], **plugin_settings(cfg.tier)[1])
    tier.bind(model_fingerprint=FP)
    assert tier.conn.where.startswith("rediss://") and tier.check() is None
    assert tier.put(entry(1)) and tier.get(key(1)).payload == entry(1).payload
    tier.close()
    by_name, events = open_tier(f"rediss://localhost:{tls_store.port}/0", prefix, tls_ca_file=str(certs.ca),
                                tls_cert_file=str(certs.client_cert), tls_key_file=str(certs.client_key))
    assert by_name.get(key(1)).payload == entry(1).payload and events.errors == []
    by_name.close()


@needs_tls
def test_a_certificate_of_another_ca_is_an_error_at_load(tls_store, certs, other_ca, prefix):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="does not verify.*tls_ca_file"):
        open_tier(tls_store, prefix, tls_ca_file=str(other_ca.ca))
    assert time.monotonic() - t0 < 5
    # the system's CAs (no tls_ca_file) do not know the test CA either
    with pytest.raises(ConfigError, match="does not verify"):
        open_tier(tls_store.url, prefix, tls_cert_file=str(certs.client_cert), tls_key_file=str(certs.client_key))
    # tls_verify false: encrypted, not authenticated -- it connects
    tier, events = open_tier(tls_store, prefix, tls_ca_file=str(other_ca.ca), tls_verify=False)
    assert tier.put(entry(1)) and tier.get(key(1)) is not None and events.errors == []
    tier.close()


@needs_tls
def test_plain_tcp_to_the_tls_port_is_a_miss_not_a_hang(tls_store, prefix):
    t0 = time.monotonic()
    tier, events = open_tier(f"redis://127.0.0.1:{tls_store.port}/0", prefix, **FAST)
    try:
        assert tier.get(key(1)) is None and tier.put(entry(1)) is False
        assert events.dropped == ["io_error"]
        assert "does not answer" in tier.check()
        assert time.monotonic() - t0 < 5, "plain TCP to a TLS port hung"
    finally:
        tier.close()


@needs_tls
def test_tls_to_a_plain_port_or_without_the_client_certificate_is_a_miss_not_a_hang(tmp_path, tls_store, certs,
                                                                                   prefix):
    plain = RedisServer(tmp_path / "plain").start()
    try:
        for where, extra in ((f"rediss://127.0.0.1:{plain.port}/0", {}), (tls_store.url, {})):
            t0 = time.monotonic()
            try:
                tier, events = open_tier(where, prefix, tls_ca_file=str(certs.ca), **FAST, **extra)
            except ConfigError as exc:           # told at load: as good as a miss
                assert "TLS" in str(exc) or "certificate" in str(exc)
                continue
            assert tier.get(key(1)) is None and tier.put(entry(1)) is False
            assert tier.check() is not None and events.dropped == ["io_error"]
            assert time.monotonic() - t0 < 5, f"{where}: TLS set-up hung"
            tier.close()
    finally:
        plain.stop()


# -- cluster -------------------------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path):
    if cli_missing():
        pytest.skip(cli_missing())
    c = RedisClusterServers(tmp_path / "cluster").start()
    yield c
    c.stop()


def node_keys(cluster: RedisClusterServers, prefix: str) -> list[tuple[int, str]]:
    """(node index, key) of every key under ``prefix``, read from each node itself."""
    out = []
    for i, node in enumerate(cluster.nodes):
        for pattern in (f"{{{prefix}}}:*", f"{prefix}:*"):
            out += [(i, k) for k in node.cli("--scan", "--pattern", pattern).split()]
    return out


@needs_cli
def test_cluster_layout_one_slot_for_what_the_scripts_touch(cluster, prefix):
    a, ev_a = open_tier(cluster, prefix, chunk_kb=16, capacity_mb=1)
    b, ev_b = open_tier(cluster, prefix, chunk_kb=16, capacity_mb=1)
    for i in range(8):                                   # puts, LRU evictions (1 MiB), feed, lookups
        assert a.put(entry(i, 200_000))
    assert b.get(key(7)).payload == entry(7, 200_000).payload
    a.delete(key(6))
    assert b.follow() is not None and len(b.entries()) == len(b)
    found = node_keys(cluster, prefix)
    tagged = [(i, k) for i, k in found if k.startswith("{")]
    chunks = [(i, k) for i, k in found if not k.startswith("{")]
    assert {k.split(":")[1] for _, k in tagged} >= {"lru", "size", "bytes", "clock", "feed", "feedn", "w", "m"}
    slot = cluster.keyslot("{" + prefix + "}")
    assert {cluster.keyslot(k) for _, k in tagged} == {slot}, "a script's keys are in more than one slot"
    assert len({i for i, _ in tagged}) == 1
    assert all(k.startswith(f"{prefix}:c:") for _, k in chunks)
    assert len({i for i, _ in chunks}) == 3, "the chunks did not spread over the three masters"
    assert ev_a.errors == ev_b.errors == [] and ev_a.dropped == ev_b.dropped == []
    a.close()
    b.close()


@needs_cli
def test_cluster_node_down_is_a_miss_then_the_tier_recovers(cluster, prefix):
    tier, events = open_tier(cluster, prefix, chunk_kb=16, **FAST)
    try:
        assert tier.put(entry(1, 100_000))
        cluster.nodes[1].stop()
        t0 = time.monotonic()
        assert tier.get(key(1)) is None                   # its chunks span the three nodes
        assert time.monotonic() - t0 < 2.0, "a get waited longer than the timeouts"
        assert tier.put(entry(2, 100_000)) is False and events.dropped and events.dropped[-1] == "io_error"
        assert tier.check() is not None
        cluster.nodes[1].start()                          # same node file: same slots, no keys
        cluster.wait_ok()
        deadline = time.monotonic() + 10
        while tier.check() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tier.check() is None, "the tier did not find the cluster again"
        assert tier.put(entry(3, 100_000)) and tier.get(key(3)).payload == entry(3, 100_000).payload
        got = tier.get(key(1))                            # chunks lost with the node: a counted miss
        assert got is None or got.payload == entry(1, 100_000).payload
        assert set(events.errors) <= {"missing"}
    finally:
        tier.close()


@needs_cli
def test_a_stalled_cluster_is_a_miss_within_the_timeout(cluster, prefix):
    tier, events = open_tier(cluster, prefix, chunk_kb=16, timeout_s=0.3, backoff_s=5, backoff_max_s=5)
    try:
        assert tier.put(entry(1, 100_000))
        for node in cluster.nodes:
            node.proc.send_signal(19)                     # SIGSTOP: connected, answering nothing
        t0 = time.monotonic()
        assert tier.get(key(1)) is None
        assert time.monotonic() - t0 < 1.0, "a get waited longer than the timeout"
        assert tier.put(entry(2)) is False and events.dropped == ["io_error"]
        for node in cluster.nodes:
            node.proc.send_signal(18)                     # SIGCONT
        assert tier.check() is None and tier.get(key(1)).payload == entry(1, 100_000).payload
    finally:
        for node in cluster.nodes:
            if node.proc is not None:
                node.proc.send_signal(18)
        tier.close()


@needs_cli
def test_cluster_down_at_start_is_not_fatal(tmp_path, prefix):
    cluster = RedisClusterServers(tmp_path / "cluster")
    try:
        t0 = time.monotonic()
        tier, events = open_tier(cluster, prefix, backoff_s=0.1, backoff_max_s=0.1)
        assert tier.get(key(1)) is None and tier.put(entry(1)) is False and tier.check() is not None
        assert time.monotonic() - t0 < 5
        cluster.start()
        assert tier.check() is None and tier.put(entry(1)) and tier.get(key(1)) is not None
        tier.close()
    finally:
        cluster.stop()


@needs_cli
def test_cluster_auth(tmp_path, prefix):
    cluster = RedisClusterServers(tmp_path / "cluster", password="cl-pw").start()
    try:
        tier, _ = open_tier(cluster, prefix)
        assert tier.put(entry(1)) and tier.get(key(1)) is not None
        tier.close()
        plain = f"redis://127.0.0.1:{cluster.nodes[2].port}/0"
        with pytest.raises(ConfigError, match="credentials") as exc:
            RedisTier(url=plain, cluster=True, password="wrong", prefix=prefix)
        assert "wrong" not in str(exc.value)
    finally:
        cluster.stop()

