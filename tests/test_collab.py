"""Sessions sharing KV blocks (``codec=collab``, :mod:`kv3d_core.tiers.blocks`): the prefix
cache and the tier stack on the fake backend (the real logic, a synthetic model whose K/V are a
function of the token history, so a restored cell can be compared exactly), then the real
llama.cpp backend on the default model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kv3d_core.contracts import FamilyKey, PromptView
from kv3d_core.metrics import Metrics
from kv3d_core.prefix.cache import PrefixCache
from kv3d_core.prefix.detectors import ExactDetector
from kv3d_core.testing import FakeBackend
from kv3d_core.tiers.blocks import KIND as BLOCK, chain_keys
from kv3d_core.tiers.ram import RamTier
from kv3d_core.tiers.stack import TierStack
from test_fake_backend import LAYOUTS, SYSTEM, chat, fill, prefill, run_prompt

collab = pytest.importorskip("kv3d_codec_collab.codec")

B = 8   # cells per block in these tests


def force(cache: PrefixCache, b: FakeBackend, lease, view: PromptView, family: FamilyKey, reply: list[int]):
    """Prefill ``view`` on ``lease``, then decode the forced ``reply``; the whole context."""
    prefill(cache, b, lease, view, family)
    ctx = list(view.tokens)
    for t in reply:
        ctx.append(t)
        from kv3d_core.contracts import BatchEntry
        b.decode([BatchEntry(lease.seq, [t], len(ctx) - 1, True)])
        cache.note_decoded(lease.seq, 1)
    return ctx


def spill_all(cache: PrefixCache, stack: TierStack) -> None:
    for e in [e for e in cache.entries() if e.kind == "session" and e.seq is not None]:
        cache.evict(e)
    stack.flush()


def session(cache: PrefixCache, b: FakeBackend, view: PromptView, family: FamilyKey, reply: list[int]) -> list[int]:
    """One request: ``view`` (reusing what the cache has), the forced ``reply``, released and spilled."""
    lease = cache.acquire(view, family)
    assert lease is not None
    ctx = force(cache, b, lease, view, family, reply)
    cache.release(lease.seq, ctx, len(ctx), family, lease.snapshot or cache.snapshot_entry(family), keep=True,
                  n_prompt=len(view.tokens))
    return ctx


def make(unified: bool, inner: str = "none", warm_mb: float = 8, cold=None):
    b = FakeBackend(kv_unified=unified)
    metrics = Metrics()
    stack = TierStack(RamTier(capacity_mb=warm_mb) if warm_mb else None, cold,
                      collab.CollabCodec(block_tokens=B, inner=inner), b.info, metrics)
    cache = PrefixCache(b, ExactDetector(), metrics, tiers=stack, hot_sessions=0)
    return b, stack, cache


def stored_sessions(cache: PrefixCache) -> dict[tuple, object]:
    return {tuple(e.tokens.tolist()): e for e in cache.entries() if e.kind == "session" and e.seq is None}


def restore_kv(cache: PrefixCache, b: FakeBackend, ctx: list[int], family: FamilyKey):
    """Resume the stored session ``ctx`` (one more token asked for); its restored cells."""
    view = PromptView(ctx + [7], family.length, b.info.model_id)
    lease = cache.acquire(view, family)
    assert lease is not None
    return lease, b.seq_kv(lease.seq)


def branch_pair(cache, b, stack):
    """Session A, then B regenerating A's reply (same prompt, another reply): two stored sessions."""
    view, family = chat(b, SYSTEM, "Please list every fuse rating the manual gives, one per line, and why.")
    a = session(cache, b, view, family, [11, 12, 13, 14, 15])
    spill_all(cache, stack)
    b_ctx = session(cache, b, view, family, [21, 22, 23])        # restored from A up to the prompt, then its own
    spill_all(cache, stack)
    return family, view, a, b_ctx


@LAYOUTS
def test_a_regenerated_reply_shares_its_blocks_and_both_sessions_restore_exactly(unified):
    b, stack, cache = make(unified)
    try:
        family, view, a, b_ctx = branch_pair(cache, b, stack)
        L = family.length
        shared = (len(view.tokens) - L) // B                      # whole blocks inside the common prompt
        assert shared >= 2
        blocks = stack.stats()["blocks"]
        assert blocks["references"] - blocks["blocks"] == shared  # each shared block stored once, listed twice
        held = [m for m in stack.warm.entries() if m.kind == BLOCK]
        assert len(held) == blocks["blocks"] == (len(a) - L) // B + (len(b_ctx) - L) // B - shared
        for ctx in (a, b_ctx):
            ref = FakeBackend(kv_unified=unified)
            fill(ref, 0, ctx)
            lease, (pos, kv) = restore_kv(cache, b, ctx, family)
            assert lease.source == "warm" and lease.n_cached == len(ctx)
            assert pos.tolist() == list(range(len(ctx)))
            assert np.array_equal(kv, ref.seq_kv(0)[1])           # exact: the inner codec is lossless
            cache.release(lease.seq, ctx, len(ctx), family, lease.snapshot, keep=False)
    finally:
        stack.close()


@LAYOUTS
def test_blocks_no_session_lists_are_deleted_and_shared_ones_kept(unified):
    b, stack, cache = make(unified)
    try:
        family, view, a, b_ctx = branch_pair(cache, b, stack)
        n_before = stack.stats()["blocks"]["blocks"]
        lease, _ = restore_kv(cache, b, a, family)                 # A resumes: its stored copy is stale
        stack.flush()
        stack.drain_gone()
        stack.flush()
        blocks = stack.stats()["blocks"]
        assert blocks["references"] == blocks["blocks"] == (len(b_ctx) - family.length) // B
        assert blocks["blocks"] < n_before
        assert sum(m.kind == BLOCK for m in stack.warm.entries()) == blocks["blocks"]
        ref = FakeBackend(kv_unified=unified)
        fill(ref, 0, b_ctx)
        cache.release(lease.seq, a, len(a), family, lease.snapshot, keep=False)
        lease_b, (_, kv) = restore_kv(cache, b, b_ctx, family)
        assert lease_b.source == "warm" and np.array_equal(kv, ref.seq_kv(0)[1])
    finally:
        stack.close()


@LAYOUTS
def test_a_damaged_shared_block_is_a_miss_for_every_session_listing_it(unified):
    b, stack, cache = make(unified)
    try:
        family, view, a, b_ctx = branch_pair(cache, b, stack)
        keys = chain_keys(stack.blocks.codec, view.namespace, b.info.fingerprint, np.asarray(a, np.int32), family.length)
        first = stack.warm.get(keys[0])
        bad = bytearray(first.payload)
        bad[len(bad) // 2] ^= 0xFF
        first.payload = bytes(bad)                                # the RAM tier's checksum no longer matches
        for ctx in (a, b_ctx):
            lease, (pos, kv) = restore_kv(cache, b, ctx, family)
            assert lease.source != "warm" and lease.n_cached <= family.length   # recompute past the family prefix
            cache.release(lease.seq, ctx, 0, family, lease.snapshot, keep=False)
        assert not stored_sessions(cache)
        assert stack.metrics.tier_errors.labels("warm", "checksum")._value.get() == 1
    finally:
        stack.close()


@LAYOUTS
def test_a_block_keeps_its_whole_chain_and_one_with_another_history_is_a_miss(unified):
    """A block's K and V depend on every token before it: its entry keeps the whole chain up to
    its end, and a block stored under a session's key for another history -- its own ids the
    same, one token before them different (what a collision of the keys would serve) -- is a
    miss for every session listing it, never its cells."""
    b, stack, cache = make(unified)
    try:
        family, view, a, b_ctx = branch_pair(cache, b, stack)
        keys = chain_keys(stack.blocks.codec, view.namespace, b.info.fingerprint, np.asarray(a, np.int32), family.length)
        for i, key in enumerate(keys):                # the chain up to its end, and its first position
            m = stack.warm.get(key).meta
            start = family.length + i * B
            assert m.n_prefix == start and m.tokens.tolist() == a[:start + B]
        first = stack.warm.get(keys[0])
        other = first.meta.tokens.copy()
        other[family.length - 1] += 1                 # the same block ids after another history
        first.meta = dataclasses.replace(first.meta, tokens=other)
        for ctx in (a, b_ctx):                        # both list it: a miss for each, never its cells
            lease, _ = restore_kv(cache, b, ctx, family)
            assert lease.source != "warm" and lease.n_cached <= family.length
            cache.release(lease.seq, ctx, 0, family, lease.snapshot, keep=False)
        assert not stored_sessions(cache) and not stack.warm.contains(keys[0])
    finally:
        stack.close()


@LAYOUTS
def test_when_the_codec_is_switched_off_collab_sessions_are_misses_and_spills_use_none(unified):
    from kv3d_core.safety import FailureMonitor

    b = FakeBackend(kv_unified=unified)
    metrics = Metrics()
    monitor = FailureMonitor(metrics)
    stack = TierStack(RamTier(capacity_mb=8), None, collab.CollabCodec(block_tokens=B, inner="none"), b.info, metrics,
                      monitor=monitor)
    cache = PrefixCache(b, ExactDetector(), metrics, tiers=stack, monitor=monitor, hot_sessions=0)
    try:
        family, view, a, b_ctx = branch_pair(cache, b, stack)
        monitor.disable("codec", "switched off by the test")
        lease, _ = restore_kv(cache, b, a, family)              # the collab manifest is not restored
        assert lease.source != "warm" and lease.n_cached <= family.length
        ctx = force(cache, b, lease, PromptView(a + [7], family.length, b.info.model_id), family, [41, 42])
        cache.release(lease.seq, ctx, len(ctx), family, lease.snapshot or cache.snapshot_entry(family), keep=True)
        spill_all(cache, stack)
        assert stack.codec.codec_id == "none"
        stored = {m.key: m for m in stack.warm.entries() if m.kind == "session"}
        new = [m for m in stored.values() if len(m.tokens) == len(ctx)]
        assert len(new) == 1 and new[0].codec_id == "none"    # stored whole by the lossless codec, no blocks
        assert not any(tuple(stack.blocks.refs.keys_of(k)) for k in stored if stored[k].codec_id == "none")
    finally:
        stack.close()


def test_two_tenants_never_share_a_block():
    b, stack, cache = make(True)
    try:
        reply = [31, 32, 33]
        text = "Please list every fuse rating the manual gives, one per line, and why."
        for tenant in ("alice", "bob"):
            v, _ = chat(b, SYSTEM, text)
            view = PromptView(v.tokens, v.family_len, b.info.model_id, tenant=tenant)
            session(cache, b, view, ExactDetector().family(view), reply)
            spill_all(cache, stack)
        blocks = stack.stats()["blocks"]
        assert blocks["blocks"] == blocks["references"] > 0       # the same tokens, stored once per tenant
        spaces = {m.namespace for m in stack.warm.entries() if m.kind == BLOCK}
        assert len(spaces) == 2
    finally:
        stack.close()


def test_chain_keys_name_the_tokens_up_to_each_block_end():
    codec = collab.CollabCodec(block_tokens=4)
    t = np.arange(20, dtype=np.int32)
    keys = chain_keys(codec, "ns", "fp", t, 6)
    assert len(keys) == 3 and len(set(keys)) == 3 and all(len(k) == 40 for k in keys)
    assert chain_keys(codec, "ns", "fp", t[:15], 6) == keys[:2]           # a shorter session: the same first blocks
    other = t.copy()
    other[2] = 99                                                          # an earlier token differs: every key
    assert not set(chain_keys(codec, "ns", "fp", other, 6)) & set(keys)
    other = t.copy()
    other[12] = 99
    assert chain_keys(codec, "ns", "fp", other, 6)[:1] == keys[:1]        # only the blocks from the change differ
    assert chain_keys(codec, "ns", "fp", other, 6)[1] != keys[1]
    assert not set(chain_keys(codec, "other-tenant", "fp", t, 6)) & set(keys)
    assert not set(chain_keys(codec, "ns", "other-model", t, 6)) & set(keys)
    assert not set(chain_keys(collab.CollabCodec(block_tokens=4, inner="none"), "ns", "fp", t, 6)) & set(keys)
    assert not set(chain_keys(collab.CollabCodec(block_tokens=5), "ns", "fp", t, 6)) & set(keys)


def ssd_stack(unified: bool, path, warm_mb: float, write_through: bool):
    from kv3d_tier_ssd.tier import SsdTier

    b = FakeBackend(kv_unified=unified)
    metrics = Metrics()
    stack = TierStack(RamTier(capacity_mb=warm_mb), SsdTier(path=str(path), capacity_mb=64),
                      collab.CollabCodec(block_tokens=B, inner="none"), b.info, metrics, write_through=write_through)
    cache = PrefixCache(b, ExactDetector(), metrics, tiers=stack, hot_sessions=0)
    return b, stack, cache


def cold_blocks(stack: TierStack) -> set[str]:
    return {m.key for m in stack.cold.entries() if m.kind == BLOCK}


@LAYOUTS
def test_block_references_survive_eviction_to_the_ssd_tier_and_a_restart(unified, tmp_path):
    pytest.importorskip("kv3d_tier_ssd")
    # a warm tier of 5 KB holds a few blocks only: the rest reach the SSD tier by eviction
    b, stack, cache = ssd_stack(unified, tmp_path, warm_mb=0.005, write_through=False)
    family, view, a, b_ctx = branch_pair(cache, b, stack)
    assert stack.metrics.evictions.labels("warm")._value.get() > 0
    before = stack.stats()["blocks"]
    assert before["references"] > before["blocks"]
    cache.persist()                                    # a graceful shutdown: warm entries to the SSD tier
    stack.close()

    b, stack, cache = ssd_stack(unified, tmp_path, warm_mb=8, write_through=True)    # restart
    try:
        assert stack.stats()["blocks"] == before       # counted again from the stored sessions
        assert len(cold_blocks(stack)) == before["blocks"]
        lease, _ = restore_kv(cache, b, a, family)     # A resumes from the SSD tier: its own blocks are freed
        assert lease.source == "cold"
        cache.release(lease.seq, a, len(a), family, lease.snapshot, keep=False)
        stack.flush()
        stack.drain_gone()
        stack.flush()
        left = cold_blocks(stack)
        assert len(left) == (len(b_ctx) - family.length) // B == stack.stats()["blocks"]["blocks"]
        stack.close()

        b, stack, cache = ssd_stack(unified, tmp_path, warm_mb=8, write_through=True)    # and again
        assert cold_blocks(stack) == left
        ref = FakeBackend(kv_unified=unified)
        fill(ref, 0, b_ctx)
        lease, (pos, kv) = restore_kv(cache, b, b_ctx, family)
        assert lease.source == "cold" and np.array_equal(kv, ref.seq_kv(0)[1])
    finally:
        stack.close()


# -- the real llama.cpp backend, default model ------------------------------------------------------
LIBRARY = ("You are the librarian of a small town library. You help visitors find books, explain the "
           "borrowing rules (three weeks, two renewals, no fines for children) and suggest authors. "
           "Keep every answer short and friendly.")


def branching_replies(codec: list[str]) -> tuple[list[str], dict]:
    """Four conversations, each: a first turn, a second turn, the second turn edited (a branch
    of the stored conversation: its first turn, past the family prefix, is more than one block of
    the default 64 cells), and a third turn on the branch -- in a hot tier of four
    sequences, so every resume comes from the warm tier. The replies (greedy) and the stats."""
    from conftest import engine_chat
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    cfg = compose(["server.threads=2", "cache.gpu_hot_mb=8", "scheduler.n_seq_max=4", "scheduler.max_running=1",
                   *codec])
    replies: list[str] = []
    with Engine(cfg) as eng:
        def ask(messages):
            text, _ = engine_chat(eng, messages, max_tokens=12)
            replies.append(text)
            return text

        first = [[{"role": "system", "content": LIBRARY},
                  {"role": "user", "content": f"Visitor {i} here. Can you suggest a good book about the sea, "
                                              f"number {i}? I read slowly and like long chapters. Last summer I "
                                              "read two novels about sailors and one about a lighthouse keeper, "
                                              "and my daughter wants something with whales in it for the trip."}]
                 for i in range(4)]
        r1 = [ask(m) for m in first]
        turn1 = [m + [{"role": "assistant", "content": r}] for m, r in zip(first, r1)]
        for t in turn1:
            ask(t + [{"role": "user", "content": "Thanks! How long can I keep it?"}])
        edited = [t + [{"role": "user", "content": "Thanks! Which author would you read next?"}] for t in turn1]
        r3 = [ask(m) for m in edited]
        for m, r in zip(edited, r3):
            ask(m + [{"role": "assistant", "content": r}, {"role": "user", "content": "And after that one?"}])
        eng.tiers.flush()
        stats = eng.tiers.stats()
        stats["restores"] = eng.metrics.restores.labels("warm")._value.get()
    return replies, stats


@pytest.mark.parametrize("inner", ["none", "int8"])
def test_sessions_restored_from_shared_blocks_answer_as_the_per_session_codec(inner):
    """Dedup is exact: collab with the lossless inner coding answers as ``none`` does, with int8
    blocks as ``int8`` does (the same codes: int8 scales per token and KV head), greedy, token for
    token -- while the edited branches share their conversation's blocks."""
    base = [] if inner == "none" else ["codec=int8"]
    expected, _ = branching_replies(base)
    got, stats = branching_replies(["codec=collab", f"codec.inner={inner}"])
    assert stats["restores"] >= 8, "the conversations were resumed from the warm tier"
    assert stats["blocks"]["references"] > stats["blocks"]["blocks"] > 0, "the branches share blocks"
    assert got == expected


def test_a_block_no_tier_takes_leaves_the_session_unstored_without_a_codec_failure():
    from kv3d_core.safety import FailureMonitor

    b = FakeBackend(kv_unified=True)
    metrics = Metrics()
    monitor = FailureMonitor(metrics)
    # 1 KB of RAM: a manifest fits, a block (~1.5 KB here) does not
    stack = TierStack(RamTier(capacity_mb=1 / 1024), None, collab.CollabCodec(block_tokens=B, inner="none"), b.info,
                      metrics, monitor=monitor)
    cache = PrefixCache(b, ExactDetector(), metrics, tiers=stack, monitor=monitor, hot_sessions=0)
    try:
        view, family = chat(b, SYSTEM, "Please list every fuse rating the manual gives, one per line, and why.")
        session(cache, b, view, family, [11, 12, 13])
        spill_all(cache, stack)
        stack.drain_gone()
        assert not stored_sessions(cache) and not any(m.kind == "session" for m in stack.warm.entries())
        assert metrics.registry.get_sample_value("kv3d_fallbacks_total", {"reason": "encode"}) is None
        assert not monitor.disabled
    finally:
        stack.close()
