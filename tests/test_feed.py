"""Replicas sharing a cold tier index each other's entries while they run
(:mod:`kv3d_core.tiers.feed`): the prefix cache and tier stack of several "servers", each on
the fake backend (no model), on one real ``redis-server`` through the real ``redis`` tier.
Following is driven by hand (``Follower.poll``) so every step is deterministic."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import redis

from kv3d_core.config import compose
from kv3d_core.contracts import PromptView
from kv3d_core.errors import ConfigError
from kv3d_core.kv.codec_none import NoneCodec
from kv3d_core.metrics import Metrics
from kv3d_core.prefix.cache import PrefixCache
from kv3d_core.prefix.detectors import ExactDetector
from kv3d_core.testing import FakeBackend
from kv3d_core.tiers import feed
from kv3d_core.tiers.ram import RamTier
from kv3d_core.tiers.stack import TierStack

from test_fake_backend import LAYOUTS, SYSTEM, chat, extend_greedy, fill, prefill, run_prompt

RedisServer = pytest.importorskip("kv3d_tier_redis.testing").RedisServer
from kv3d_tier_redis.tier import RedisTier  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


class Replica:
    """One server's cache over the shared store; it reads the feed only when told."""

    def __init__(self, url: str, prefix: str, unified: bool, seed: int = 0, publish_idle: bool = True,
                 write_through: bool = True) -> None:
        self.b = FakeBackend(kv_unified=unified, seed=seed)
        self.metrics = Metrics()
        self.tier = RedisTier(url=url, prefix=prefix, capacity_mb=16)
        self.stack = TierStack(RamTier(capacity_mb=8), self.tier, NoneCodec(), self.b.info, self.metrics,
                               follow_s=3600, publish_idle=publish_idle, write_through=write_through)
        self.cache = PrefixCache(self.b, ExactDetector(), self.metrics, tiers=self.stack)

    def follow(self) -> None:
        """Read the feed, then apply it as the next admission would."""
        assert self.stack._follower is not None and self.stack._follower.poll()
        self.stack.drain_gone()

    def sample(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.stack.close()


@pytest.fixture
def replicas(store):
    prefix = f"feed-{uuid.uuid4().hex[:10]}"
    made: list[Replica] = []

    def make(unified: bool, **kw) -> Replica:
        made.append(Replica(store.url, prefix, unified, **kw))
        return made[-1]
    yield make
    for r in made:
        r.close()


def converse(a: Replica, user: str = "What does the manual say about fuses?"):
    """A first turn on ``a``, kept as an idle session: (its context, family, the next turn's view)."""
    view, family = chat(a.b, SYSTEM, user)
    lease, snap, logits = run_prompt(a.cache, a.b, view, family)
    ctx = extend_greedy(a.cache, a.b, lease.seq, list(view.tokens), logits, 4)
    a.cache.release(lease.seq, ctx, len(ctx), family, snap, keep=True, n_prompt=len(view.tokens))
    a.stack.flush()
    more = a.b.tokenize("<|im_end|>\n<|im_start|>user\nAnd cables?<|im_end|>\n<|im_start|>assistant\n")
    return ctx, family, PromptView(ctx + more, family.length, a.b.info.model_id), more


@LAYOUTS
def test_a_conversation_and_a_family_computed_on_one_replica_are_hits_on_others(replicas, unified):
    a, b, c = replicas(unified), replicas(unified), replicas(unified)
    ctx, family, turn2, more = converse(a)
    assert a.sample("kv3d_tier_published_total", kind="session") == 1
    assert a.cache.entry(family.digest).hot, "the family snapshot stays hot on the replica that made it"
    b.follow()
    c.follow()
    assert b.sample("kv3d_tier_feed_total", op="added") == 2
    assert b.sample("kv3d_tier_followed_total", kind="snapshot") == 1
    assert b.sample("kv3d_tier_followed_total", kind="session") == 1

    # the conversation goes on on b: restored from the shared tier, only the new turn computed
    skey = next(e.key for e in c.cache.entries() if e.kind == "session")
    b.b.reset_counters()
    lease = b.cache.acquire(turn2, family)
    assert (lease.source, lease.n_cached) == ("cold", len(ctx))
    _, logits = prefill(b.cache, b.b, lease, turn2, family)
    assert b.b.decoded_tokens == len(more)
    assert np.array_equal(logits, fill(FakeBackend(kv_unified=unified), 0, list(turn2.tokens)))

    # b resumed it whole, so its stored copy went; c, which had indexed it, forgets it
    c.follow()
    assert c.sample("kv3d_tier_followed_total", kind="removed") == 1 and c.cache.entry(skey) is None
    # a family member on c: the prefix a computed is loaded, not computed again
    view3, family3 = chat(c.b, SYSTEM, "And what about cables?")
    assert family3 == family
    c.b.reset_counters()
    lease3, _, logits3 = run_prompt(c.cache, c.b, view3, family3)
    assert lease3.n_cached == family.length and c.sample("kv3d_restores_total", tier="cold") == 1
    assert c.b.decoded_tokens == len(view3.tokens) - family.length
    assert np.array_equal(logits3, fill(FakeBackend(kv_unified=unified), 0, list(view3.tokens)))

    # another tenant (cache salt) on b finds none of it
    salted = PromptView(list(turn2.tokens), family.length, b.b.info.model_id, cache_salt="tenant-b")
    other = ExactDetector().family(salted)
    assert b.cache.plan(salted, other) == (None, 0)
    # a's own publications never come back to it as followed entries
    a.follow()
    assert a.sample("kv3d_tier_followed_total", kind="session") == 0
    assert a.sample("kv3d_tier_followed_total", kind="snapshot") == 0


def test_a_damaged_followed_entry_is_a_counted_miss(replicas, store):
    a, b = replicas(False), replicas(False)
    ctx, family, turn2, more = converse(a)
    b.follow()
    session = next(e for e in b.cache.entries() if e.kind == "session")
    r = redis.Redis.from_url(store.url)
    member = r.hget(b.tier.keys.where(b.tier._fp), session.key).decode()
    chunk = sorted(r.keys(f"{b.tier.keys.prefix}:c:{member}:*"))[0]
    data = bytearray(r.get(chunk))
    data[-10] ^= 0x40
    r.set(chunk, bytes(data))
    lease = b.cache.acquire(turn2, family)
    assert (lease.source, lease.n_cached) == ("cold", family.length)   # the next best: the family snapshot
    _, logits = prefill(b.cache, b.b, lease, turn2, family)
    assert np.array_equal(logits, fill(FakeBackend(kv_unified=False), 0, list(turn2.tokens)))
    assert b.sample("kv3d_tier_errors_total", tier="cold", reason="checksum") == 1


def test_another_models_entries_are_never_followed(replicas):
    a, b = replicas(False, seed=1), replicas(False)
    assert a.b.info.fingerprint != b.b.info.fingerprint
    converse(a)
    assert a.sample("kv3d_tier_published_total", kind="session") == 1
    b.follow()
    assert b.sample("kv3d_tier_feed_total", op="added") == 0 and b.cache.entries() == []


def test_sessions_wait_for_a_family_snapshot_published_later(replicas, store):
    """A session followed before its family snapshot (another server's order, or the
    snapshot evicted and computed again) waits as an orphan and is adopted when it comes."""
    a, b = replicas(False), replicas(False)
    ctx, family, turn2, more = converse(a)
    r = redis.Redis.from_url(store.url)
    snap_meta = next(m for m in b.tier.entries() if m.kind == "snapshot")
    b.tier.delete(snap_meta.key)                      # b reads the session only
    raw_before = r.xlen(b.tier.keys.feed)
    b.follow()
    assert b.sample("kv3d_tier_followed_total", kind="orphan") == 1 and b.stack._n_orphans() == 1
    a.stack._persist_snapshot(a.cache.entry(family.digest))   # a stores its family snapshot again
    a.stack.flush()
    assert r.xlen(b.tier.keys.feed) > raw_before
    b.follow()
    lease = b.cache.acquire(turn2, family)             # admission adopts the orphan, then restores it
    assert (lease.source, lease.n_cached) == ("cold", len(ctx))
    assert b.sample("kv3d_tier_orphans_adopted_total") == 1


@LAYOUTS
def test_family_snapshots_reach_a_shared_tier_without_write_through(replicas, unified):
    a, b = replicas(unified, write_through=False, publish_idle=False), replicas(unified)
    view, family = chat(a.b, SYSTEM, "What does the manual say about fuses?")
    lease, snap, _ = run_prompt(a.cache, a.b, view, family)
    a.stack.flush()
    assert snap is not None and snap.hot and a.tier.contains(family.digest)
    b.follow()
    assert [e.key for e in b.cache.entries()] == [family.digest]


def test_publishing_idle_sessions_can_be_off(replicas):
    a, b = replicas(False, publish_idle=False), replicas(False)
    ctx, family, turn2, more = converse(a)
    assert a.sample("kv3d_tier_published_total", kind="session") == 0
    b.follow()
    assert b.sample("kv3d_tier_followed_total", kind="snapshot") == 1       # the family snapshot: always
    assert b.sample("kv3d_tier_followed_total", kind="session") == 0



def test_the_follow_thread_reads_the_feed_by_itself(store):
    prefix = f"feed-{uuid.uuid4().hex[:10]}"
    a = Replica(store.url, prefix, False)
    b = FakeBackend(kv_unified=False)
    metrics = Metrics()
    stack = TierStack(None, RedisTier(url=store.url, prefix=prefix, capacity_mb=16), NoneCodec(), b.info, metrics,
                      follow_s=0.05)
    try:
        cache = PrefixCache(b, ExactDetector(), metrics, tiers=stack)
        assert any(t.name == "kv3d-tier-follow" for t in threading.enumerate())
        converse(a)
        deadline = time.monotonic() + 10
        while (metrics.registry.get_sample_value("kv3d_tier_feed_total", {"op": "added"}) or 0) < 2:
            assert time.monotonic() < deadline, "the follow thread read nothing"
            time.sleep(0.02)
        stack.drain_gone()
        assert sorted(e.kind for e in cache.entries()) == ["session", "snapshot"]
    finally:
        stack.close()
        a.close()
    assert not any(t.name == "kv3d-tier-follow" and t.is_alive() for t in threading.enumerate())


def test_a_feed_nobody_takes_is_replaced_by_one_listing(replicas, monkeypatch):
    a, b = replicas(False), replicas(False)
    monkeypatch.setattr(feed, "MAX_PENDING", 1)
    converse(a)                                       # two entries: more than the follower may hold
    assert b.stack._follower.poll()
    held = b.stack._follower.take()
    assert len(held) == 1 and held[0].rescan and len(held[0].added) == 2
    assert b.sample("kv3d_tier_feed_rescans_total") == 1


@pytest.mark.parametrize("bad", ["cache.follow_s=-1", "cache.follow_s=soon"])
def test_bad_follow_setting(bad):
    with pytest.raises(ConfigError, match="follow_s"):
        compose([bad])


def test_following_stops_when_the_shared_tier_is_switched_off(replicas):
    a, b = replicas(False), replicas(False)
    follower, tier = b.stack._follower, b.stack.cold
    b.stack.cold = None                               # what apply_disables does to a tier breaking its contract
    converse(a)
    assert follower.poll()
    b.stack.drain_gone()
    assert b.stack._follower is None and follower._stop.is_set() and b.cache.entries() == []
    tier.close()
