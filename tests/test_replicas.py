"""Two real ``kv3d serve`` replicas sharing one real ``redis-server`` (``tier=redis``), over
real HTTP on loopback: what one computes -- a conversation, a family prefix -- the other
finds while both run (the tier's feed, ``cache.follow_s``); a published entry damaged in the
store is a counted miss; a replica killed with SIGKILL and started again serves its sessions
from the store; tenants never share entries.

Two model servers on a 2-core machine are slow: the replicas are started once for the
module, requests ask for few tokens, and the SIGKILL test, which replaces replica A,
runs last."""

from __future__ import annotations

import signal
import time
import uuid

import httpx
import pytest
import redis

from conftest import MODEL_ID, Server
from kv3d_tier_redis import layout
from kv3d_tier_redis.testing import RedisServer

SYSTEMS = {
    "library": ("You are the librarian of a small town library. You help visitors find books, explain the "
                "borrowing rules (three weeks, two renewals, no fines for children) and suggest authors. "
                "Keep every answer short and friendly."),
    "garden": ("You are a gardening assistant for a community allotment. You answer questions about "
               "vegetables, watering, compost and pests in a few plain sentences, and you always mention "
               "the season the advice is for."),
    "museum": ("You are the guide of a small railway museum. You answer visitors' questions about the "
               "steam engines on show, the opening hours (ten to five, closed on Mondays) and the cafe, "
               "in two or three sentences."),
    "clinic": ("You are the receptionist of a family doctor's practice. You explain opening hours (eight "
               "to six on weekdays), how to book, repeat prescriptions and vaccinations, and you never give "
               "medical advice yourself."),
    "bakery": ("You answer questions for a village bakery: opening hours are seven to two, bread is baked "
               "twice a day, cakes are ordered two days ahead, and nothing contains nuts. Be brief."),
}


def chat(url: str, messages: list[dict], salt: str, max_tokens: int = 8) -> dict:
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "cache_salt": salt}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def cached(r: dict) -> int:
    return r["usage"]["prompt_tokens_details"]["cached_tokens"]


def reply(r: dict) -> str:
    return r["choices"][0]["message"]["content"]


def turn(system: str, user: str, history: list[dict] = ()) -> list[dict]:
    return [{"role": "system", "content": SYSTEMS[system]}, *history, {"role": "user", "content": user}]


def followed(srv: Server) -> float:
    return srv.metrics().get('kv3d_tier_feed_total{op="added"}', 0.0)


def wait_followed(srv: Server, at_least: float, timeout: float = 30) -> None:
    """Until ``srv`` has read ``at_least`` entries other servers published from the feed."""
    deadline = time.monotonic() + timeout
    while followed(srv) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"{srv.url} read {followed(srv)} published entries, expected {at_least}")
        time.sleep(0.1)


class Cluster:
    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.store = RedisServer(tmp / "redis").start()
        self.prefix = f"r-{uuid.uuid4().hex[:8]}"
        self.overrides = ["tier=redis", f"tier.url={self.store.url}", f"tier.prefix={self.prefix}",
                          "tier.capacity_mb=256", "cache.follow_s=0.2"]
        self.a = self.start("a")
        self.b = self.start("b")

    def start(self, name: str) -> Server:
        return Server(self.overrides, self.tmp / f"replica-{name}-{time.monotonic_ns()}.log").start()

    def close(self) -> None:
        for srv in (self.a, self.b):
            srv.stop()
        self.store.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("replicas"))
    yield c
    c.close()


def test_a_conversation_started_on_a_resumes_on_b(cluster):
    a, b = cluster.a, cluster.b
    before = followed(b)
    first = chat(a.url, turn("library", "Can you suggest a good book about the sea?"), "tenant-1")
    wait_followed(b, before + 2)                       # the family snapshot and the session
    history = [{"role": "user", "content": "Can you suggest a good book about the sea?"},
               {"role": "assistant", "content": reply(first)}]
    messages = turn("library", "How long can I keep it?", history)
    restores = b.metrics().get('kv3d_restores_total{tier="cold"}', 0)
    second = chat(b.url, messages, "tenant-1")
    assert cached(second) >= first["usage"]["prompt_tokens"], second["usage"]
    assert b.metrics().get('kv3d_restores_total{tier="cold"}', 0) > restores
    cold = chat(b.url, messages, f"cold-{uuid.uuid4().hex}")     # a tenant of its own: computed anew
    assert cached(cold) == 0
    assert reply(second) == reply(cold), "a resumed conversation answers as a cold computation does"


def test_a_family_computed_on_a_is_a_hit_on_b(cluster):
    a, b = cluster.a, cluster.b
    before = followed(b)
    chat(a.url, turn("garden", "When should I plant potatoes?"), "tenant-1")
    wait_followed(b, before + 2)
    m0 = b.metrics()
    r = chat(b.url, turn("garden", "How often should I water tomatoes?"), "tenant-1")
    m1 = b.metrics()
    assert cached(r) > 0
    computed = m1["kv3d_prefill_tokens_total"] - m0["kv3d_prefill_tokens_total"]
    assert computed == r["usage"]["prompt_tokens"] - cached(r), "b computed the family prefix again"
    assert m1.get('kv3d_restores_total{tier="cold"}', 0) > m0.get('kv3d_restores_total{tier="cold"}', 0)


def test_tenants_never_share_entries(cluster):
    a, b = cluster.a, cluster.b
    before = followed(b)
    mine = chat(a.url, turn("bakery", "Can I order a birthday cake for tomorrow?"), "tenant-x")
    wait_followed(b, before + 2)
    history = [{"role": "user", "content": "Can I order a birthday cake for tomorrow?"},
               {"role": "assistant", "content": reply(mine)}]
    other = chat(b.url, turn("bakery", "And bread?", history), "tenant-y")
    assert cached(other) == 0, "another tenant was served tenant x's entries"
    same = chat(b.url, turn("bakery", "And bread?", history), "tenant-x")
    assert cached(same) >= mine["usage"]["prompt_tokens"]


def test_a_damaged_published_session_is_a_counted_miss(cluster):
    a, b = cluster.a, cluster.b
    r = redis.Redis.from_url(cluster.store.url)
    pattern = f"{{{cluster.prefix}}}:m:*"
    known = set(r.keys(pattern))
    before = followed(b)
    first = chat(a.url, turn("clinic", "Do I need an appointment for a flu shot?"), "tenant-d")
    wait_followed(b, before + 2)
    new = [(k, layout.read_manifest(r.get(k))) for k in r.keys(pattern) if k not in known]
    family = [man.header.meta.family for _, man in new if man.header.meta.kind == "snapshot"]
    assert len(family) == 1, new                       # (b may still be publishing its own sessions)
    sessions = [(k, man) for k, man in new if man.header.meta.kind == "session" and man.header.meta.family == family[0]]
    assert len(sessions) == 1, new
    key, man = sessions[0]
    member = key.decode().split(":m:", 1)[1]
    chunk = f"{cluster.prefix}:c:{member}:{man.wid}:0"
    data = bytearray(r.get(chunk))
    data[len(data) // 2] ^= 0x01
    r.set(chunk, bytes(data), keepttl=True)
    history = [{"role": "user", "content": "Do I need an appointment for a flu shot?"},
               {"role": "assistant", "content": reply(first)}]
    messages = turn("clinic", "How long does it take?", history)
    errors = b.metrics().get('kv3d_tier_errors_total{reason="checksum",tier="cold"}', 0)
    second = chat(b.url, messages, "tenant-d")
    assert 0 < cached(second) < first["usage"]["prompt_tokens"], "the family snapshot, not the damaged session"
    assert b.metrics().get('kv3d_tier_errors_total{reason="checksum",tier="cold"}', 0) == errors + 1
    cold = chat(b.url, messages, f"cold-{uuid.uuid4().hex}")
    assert reply(second) == reply(cold)


def test_a_replica_killed_and_started_again_serves_its_sessions_from_the_store(cluster):
    a, b = cluster.a, cluster.b
    before = followed(b)
    first = chat(a.url, turn("museum", "Which engine is the oldest?"), "tenant-k")
    wait_followed(b, before + 2)                       # both are in the store: the family snapshot, the session
    a.stop(signal.SIGKILL)
    cluster.a = a = cluster.start("a-again")
    history = [{"role": "user", "content": "Which engine is the oldest?"},
               {"role": "assistant", "content": reply(first)}]
    second = chat(a.url, turn("museum", "Can I ride on it?", history), "tenant-k")
    assert cached(second) >= first["usage"]["prompt_tokens"], second["usage"]
    assert a.metrics().get('kv3d_restores_total{tier="cold"}', 0) >= 1
    assert not any(k.startswith("kv3d_tier_errors_total") and v for k, v in a.metrics().items())
