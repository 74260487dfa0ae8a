"""Safe mode and automatic fallback: every cache fault is served by recompute with
the right answer; a component that keeps failing is switched off without a
restart, visibly (/health degraded, kv3d_safe_mode, kv3d_fallbacks_total).

Fault injection uses fake plugins and patched calls, next to the real path that
the other tests exercise."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from conftest import MODEL_ID, engine_chat as run, running_server
from kv3d_core import hookimpl
from kv3d_core.config import compose
from kv3d_core.contracts import KVArrays
from kv3d_core.engine.engine import Engine
from kv3d_core.errors import NoFreeCells, StateRestoreError
from kv3d_core.kv.codec_none import NoneCodec
from kv3d_core.plugins import make_plugin_manager

SYSTEM = ("You are the front desk of a small hotel by the lake. You answer questions about rooms, "
          "breakfast (7 to 10), parking (free), pets (welcome) and the sauna. Be brief and warm.")
QUESTIONS = ["Is breakfast included?", "Can I bring my dog?", "Where do I park?", "Is there a sauna?",
             "Do you have a room with a lake view?", "What time is check-out?", "Is there wifi?", "Can I pay by card?"]

# A hot tier of 256 cells and 4 sequences: sessions of this family spill after three or so.
SMALL = ["server.threads=2", "cache.gpu_hot_mb=8", "scheduler.n_seq_max=4", "scheduler.max_running=1"]


class RaisingCodec(NoneCodec):
    """Encodes fine; decoding raises an exception type no contract allows."""

    codec_id = "raising"

    def decode(self, data: bytes) -> KVArrays:
        raise RuntimeError("injected codec failure")


class ZeroCodec(NoneCodec):
    """Returns well-formed arrays full of zeros: only the quality guard can tell."""

    codec_id = "zeros"

    def decode(self, data: bytes) -> KVArrays:
        a = super().decode(data)
        return KVArrays(a.positions, [np.zeros_like(x) for x in a.k], [np.zeros_like(x) for x in a.v],
                        a.head_dim_k, a.head_dim_v, a.extra)


class FaultyCodecs:
    @hookimpl
    def register_codecs(self, register):
        register("raising", RaisingCodec)
        register("zeros", ZeroCodec)


def engine(overrides: list[str]) -> Engine:
    return Engine(compose(SMALL + overrides), make_plugin_manager(extra=[("faulty", FaultyCodecs())]))


def first(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (guest {i})"}]


def second(i: int, reply: str) -> list[dict]:
    return first(i) + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Thank you. Anything else?"}]


@pytest.fixture(scope="module")
def reference():
    """Cold (safe-mode) answers to compare with."""
    with Engine(compose(["server.threads=2", "safe_mode=true"])) as eng:
        cache: dict = {}

        def answer(messages: list[dict]) -> str:
            key = repr(messages)
            if key not in cache:
                cache[key] = run(eng, messages)[0]
            return cache[key]

        yield answer


def conversations(eng: Engine, ids: range) -> list[tuple[int, str, str, dict]]:
    firsts = {i: run(eng, first(i))[0] for i in ids}
    out = []
    for i in ids:
        text, usage = run(eng, second(i, firsts[i]))
        out.append((i, firsts[i], text, usage))
    return out


def same_first_word(a: str, b: str) -> bool:
    return a.split()[:1] == b.split()[:1]


def test_raising_codec_plugin_falls_back_then_is_switched_off(reference):
    with engine(["codec.name=raising", "safety.max_failures=2", "safety.quality_sample_every=0"]) as eng:
        results = conversations(eng, range(0, 6))
        for i, r1, r2, usage in results:             # every reply is still correct
            assert same_first_word(r2, reference(second(i, r1)))
        assert "codec" in eng.monitor.disabled
        health = eng.health()
        assert health["status"] == "degraded" and "codec" in health["reason"]
        assert eng.metrics.safe_mode._value.get() == 1
        assert eng.metrics.fallbacks.labels("codec")._value.get() >= 2
        # the codec is now `none`: new sessions spill and resume again
        restores = eng.metrics.restores.labels("warm")._value.get()
        later = conversations(eng, range(10, 16))
        assert eng.tiers.codec.codec_id == "none"
        assert eng.metrics.restores.labels("warm")._value.get() > restores
        for i, r1, r2, usage in later:
            assert same_first_word(r2, reference(second(i, r1)))


def test_set_data_failure_falls_back_then_restores_are_switched_off(reference, monkeypatch):
    with engine(["cache.layout=unified", "safety.max_failures=2", "safety.quality_sample_every=0"]) as eng:
        def refuse(seq, blob):
            raise StateRestoreError("injected: llama_state_seq_set_data returned 0")

        monkeypatch.setattr(eng.backend, "seq_state_set", refuse)
        results = conversations(eng, range(0, 6))
        for i, r1, r2, usage in results:
            assert same_first_word(r2, reference(second(i, r1)))
        assert "restore" in eng.monitor.disabled
        assert eng.health()["status"] == "degraded"
        assert eng.metrics.fallbacks.labels("set_data")._value.get() >= 2
        # hot-tier reuse keeps working: a family hit still shares the snapshot
        _, usage = run(eng, first(20))
        assert eng.cache.tiers is None and usage["cached_tokens"] > 0


def test_streams_set_data_failure_falls_back_then_prefix_loads_stop(reference, monkeypatch):
    """Streams: family prefixes and resumed sessions both reach a stream through set_data. When
    it keeps failing, requests are served by recompute, restoring is switched off, and no
    prefix is loaded any more (no fault per request); a session still in its stream keeps
    being continued in place."""
    with engine(["cache.layout=streams", "cache.hot_sessions=1", "safety.max_failures=2",
                 "safety.quality_sample_every=0"]) as eng:
        def refuse(seq, blob):
            raise StateRestoreError("injected: llama_state_seq_set_data returned 0")

        monkeypatch.setattr(eng.backend, "seq_state_set", refuse)
        results = conversations(eng, range(0, 6))
        for i, r1, r2, usage in results:
            assert same_first_word(r2, reference(second(i, r1)))
        assert "restore" in eng.monitor.disabled and eng.health()["status"] == "degraded"
        faults = eng.metrics.fallbacks.labels("set_data")._value.get()
        assert faults >= 2
        r1, usage = run(eng, first(20))
        assert usage["cached_tokens"] == 0, "no prefix is loaded into a stream any more"
        _, usage = run(eng, second(20, r1))
        assert usage["cached_tokens"] > 0, "the session still in its stream is continued in place"
        assert eng.metrics.fallbacks.labels("set_data")._value.get() == faults


def test_tripped_quality_guard_falls_back_and_switches_the_codec_off(reference):
    with engine(["codec.name=zeros", "safety.max_failures=2", "safety.quality_sample_every=1"]) as eng:
        results = conversations(eng, range(0, 6))
        for i, r1, r2, usage in results:
            assert same_first_word(r2, reference(second(i, r1)))
        assert eng.metrics.fallbacks.labels("quality_guard")._value.get() >= 2
        assert eng.metrics.quality_checks._value.get() >= 2
        assert "codec" in eng.monitor.disabled and eng.tiers.codec.codec_id == "none"


def test_quality_guard_passes_a_good_codec():
    with engine(["+codec=int8", "safety.quality_sample_every=1"]) as eng:
        conversations(eng, range(0, 6))
        assert eng.metrics.quality_checks._value.get() >= 1
        assert eng.metrics.fallbacks.labels("quality_guard")._value.get() == 0
        assert not eng.monitor.disabled and eng.health()["status"] == "ok"


def test_safe_mode_serves_without_any_reuse(tmp_path):
    with running_server(tmp_path, ["safe_mode=true"]) as srv:
        body = {"model": MODEL_ID, "messages": [{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": "hi"}], "max_tokens": 4}
        for _ in range(2):
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).json()
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "service": "kv3d-engine", "mode": "safe"}
        assert srv.metrics()["kv3d_safe_mode"] == 1


def test_a_refused_restore_is_retried_after_making_room(reference, monkeypatch):
    # when llama.cpp finds too few free cells for a state (the ledger thought there were
    # enough), the prefix cache makes room and retries: not a fault (the unified pool: a KV
    # stream of its own always has room for what fits a request)
    with engine(["cache.layout=unified", "safety.max_failures=2", "safety.quality_sample_every=0"]) as eng:
        real = eng.backend.seq_state_set
        calls = [0]

        def refuse_once(seq, blob):       # every first attempt refused, every retry accepted
            calls[0] += 1
            if calls[0] % 2:
                raise NoFreeCells("injected: too few free KV cells")
            return real(seq, blob)

        monkeypatch.setattr(eng.backend, "seq_state_set", refuse_once)
        results = conversations(eng, range(0, 6))
        for i, r1, r2, usage in results:
            assert same_first_word(r2, reference(second(i, r1)))
        retries = eng.metrics.restore_retries._value.get()
        assert retries >= 2 and eng.metrics.restores.labels("warm")._value.get() >= retries
        assert sum(u["cached_tokens"] > 0 for *_, u in results) == len(results), "every second turn resumed"
        assert eng.metrics.fallbacks.labels("no_free_cells")._value.get() == 0
        assert not eng.monitor.disabled and eng.health()["status"] == "ok"


def test_no_free_cells_never_switches_restoring_off(reference, monkeypatch):
    # a capacity shortfall that making room does not cure is served by recompute each
    # time, but it is not a broken component: restoring stays on
    with engine(["safety.max_failures=2", "safety.quality_sample_every=0"]) as eng:
        def no_room(seq, blob):
            raise NoFreeCells("injected: too few free KV cells")

        monkeypatch.setattr(eng.backend, "seq_state_set", no_room)
        results = conversations(eng, range(0, 6))
        for i, r1, r2, usage in results:
            assert same_first_word(r2, reference(second(i, r1)))
        assert eng.metrics.fallbacks.labels("no_free_cells")._value.get() >= 2
        assert not eng.monitor.disabled and eng.cache.tiers is not None
