"""The ``redis`` tier end to end: a real ``kv3d serve`` with ``tier=redis`` on a real
``redis-server``; a conversation resumes from the store after a restart, tenants
(``cache_salt``) never share entries, and the store stopped mid-run only costs misses."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import redis

from conftest import MODEL_ID, running_server
from kv3d_tier_redis.testing import RedisServer

SYSTEM = ("You are the librarian of a small town library. You help visitors find books, explain the "
          "borrowing rules (three weeks, two renewals, no fines for children) and suggest authors. "
          "Keep every answer short and friendly.")


def chat(url: str, messages, **kw) -> dict:
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 10, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def cached(r: dict) -> int:
    return r["usage"]["prompt_tokens_details"]["cached_tokens"]


def first_turn() -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Can you suggest a good book about the sea?"}]


def second_turn(reply: str) -> list[dict]:
    return first_turn() + [{"role": "assistant", "content": reply},
                           {"role": "user", "content": "Thanks! How long can I keep it?"}]


def test_conversation_resumes_from_redis_and_tenants_stay_apart(tmp_path):
    store = RedisServer(tmp_path / "redis").start()
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    overrides = ["tier=redis", f"tier.url={store.url}", f"tier.prefix={prefix}", "tier.capacity_mb=256"]
    try:
        with running_server(tmp_path, overrides) as srv:
            first = chat(srv.url, first_turn(), cache_salt="tenant-a")
        r = redis.Redis.from_url(store.url)
        assert len(r.keys(f"{{{prefix}}}:m:*")) >= 2, "the session delta and its family snapshot were stored"
        with running_server(tmp_path, overrides) as srv:
            reply = first["choices"][0]["message"]["content"]
            other = chat(srv.url, second_turn(reply), cache_salt="tenant-b")
            assert cached(other) == 0, "another tenant was served tenant a's stored entries"
            second = chat(srv.url, second_turn(reply), cache_salt="tenant-a")
            m = srv.metrics()
        assert cached(second) >= first["usage"]["prompt_tokens"]
        assert m.get('kv3d_restores_total{tier="cold"}', 0) >= 1
        assert not any(k.startswith("kv3d_tier_errors_total") and v for k, v in m.items())
    finally:
        store.stop()


def test_store_stopped_mid_run_costs_misses_then_recovers(tmp_path):
    store = RedisServer(tmp_path / "redis").start()
    overrides = ["tier=redis", f"tier.url={store.url}", "tier.backoff_s=0.2", "tier.backoff_max_s=0.5",
                 "safety.tier_retry_s=0.2", "safety.tier_retry_max_s=0.5"]
    try:
        with running_server(tmp_path, overrides) as srv:
            chat(srv.url, first_turn(), cache_salt="before")
            store.stop()
            for i in range(3):                   # every request still succeeds: the tier is only a cache
                t0 = time.monotonic()
                chat(srv.url, first_turn(), cache_salt=f"down-{i}")
                assert time.monotonic() - t0 < 60
            health = httpx.get(srv.url + "/health", timeout=10).json()
            down = srv.metrics()
            assert health["status"] == "degraded" and "redis tier store" in health["reason"], health
            assert down.get('kv3d_tier_up{tier="cold"}') == 0
            assert down.get('kv3d_tier_dropped_writes_total{reason="io_error",tier="cold"}', 0) >= 1
            store.start()                        # same port, empty
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                chat(srv.url, first_turn(), cache_salt=f"back-{time.monotonic_ns()}")
                m = srv.metrics()
                if m.get('kv3d_tier_up{tier="cold"}') == 1 and redis.Redis.from_url(store.url).dbsize() > 0:
                    break
                time.sleep(0.5)
            else:
                raise AssertionError(f"the redis tier did not come back: health was {health}")
    finally:
        store.stop()


def test_conversation_resumes_after_a_restart_from_a_redis_cluster_over_tls(tmp_path):
    """``tier.cluster=true`` on a real three-master Redis Cluster over TLS (the certificate
    verified against the test CA, client certificates required): the session and its family
    snapshot are stored across the masters (index in the ``{prefix}`` slot, chunks spread) and a
    restarted server resumes the conversation from them. (The plain cluster runs the tier
    contract in plugins/tier_redis/tests; one server end to end covers both settings.)"""
    tls = True
    from kv3d_tier_redis.testing import RedisClusterServers, cli_missing, make_certs, tls_missing

    if cli_missing() or (tls and tls_missing()):
        pytest.skip(cli_missing() or tls_missing())
    certs = make_certs(tmp_path) if tls else None
    cluster = RedisClusterServers(tmp_path / "cluster", tls=certs, tls_auth_clients=tls).start()
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    overrides = ["tier=redis", f"tier.url={cluster.url}", "tier.cluster=true", f"tier.prefix={prefix}",
                 "tier.capacity_mb=256", "tier.chunk_kb=64"]
    if tls:
        overrides += ["tier.tls=true", f"tier.tls_ca_file={certs.ca}", f"tier.tls_cert_file={certs.client_cert}",
                      f"tier.tls_key_file={certs.client_key}"]
    try:
        with running_server(tmp_path, overrides) as srv:
            first = chat(srv.url, first_turn(), cache_salt="tenant-a")
        manifests = [k for n in cluster.nodes for k in n.cli("--scan", "--pattern", f"{{{prefix}}}:m:*").split()]
        chunk_nodes = [i for i, n in enumerate(cluster.nodes) if n.cli("--scan", "--pattern", f"{prefix}:c:*").split()]
        assert len(manifests) >= 2, "the session delta and its family snapshot were stored"
        assert len(chunk_nodes) >= 2, "the entries' chunks did not spread over the cluster"
        with running_server(tmp_path, overrides) as srv:
            reply = first["choices"][0]["message"]["content"]
            second = chat(srv.url, second_turn(reply), cache_salt="tenant-a")
            m = srv.metrics()
        assert cached(second) >= first["usage"]["prompt_tokens"]
        assert m.get('kv3d_restores_total{tier="cold"}', 0) >= 1
        assert not any(k.startswith("kv3d_tier_errors_total") and v for k, v in m.items())
        assert not any(k.startswith("kv3d_tier_dropped_writes_total") and v for k, v in m.items())
    finally:
        cluster.stop()
