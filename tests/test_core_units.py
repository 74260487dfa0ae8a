"""Unit tests of the core's data structures (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from kv3d_core.contracts.session import InvalidTransition, SessionState as S, check_transition
from kv3d_core.engine.textstream import TextStream
from kv3d_core.prefix.radix import RadixIndex
from kv3d_core.tiers.hot import CellLedger, SeqPool


def test_textstream_reassembles_utf8_and_streams():
    ts = TextStream()
    data = "héllo ✓".encode()
    out = "".join(ts.push(data[i:i + 1]) for i in range(len(data))) + ts.flush()
    assert out == "héllo ✓"


def test_textstream_stop_string_is_never_streamed():
    ts = TextStream(["STOP"])
    outs = [ts.push(p) for p in (b"abc S", b"TO", b"P tail")]
    assert "".join(outs) == "abc " and ts.stopped
    assert ts.push(b"more") == "" and ts.flush() == ""


def test_textstream_holds_back_only_possible_stop_prefixes():
    ts = TextStream(["xyz"])
    assert ts.push(b"abx") == "ab"
    assert ts.push(b"q") == "xq"
    assert ts.flush() == ""


class E:
    def __init__(self, ns, toks):
        self.namespace, self.tokens = ns, np.asarray(toks, np.int32)


def best(index, ns, toks):
    for lcp, entries in index.match(ns, toks):
        return lcp, entries
    return 0, set()


def test_radix_longest_match_and_removal():
    idx = RadixIndex()
    a, b, c = E("n", [1, 2, 3, 4, 5]), E("n", [1, 2, 3, 9]), E("other", [1, 2, 3, 4, 5])
    for e in (a, b, c):
        idx.insert(e)
    lcp, ents = best(idx, "n", [1, 2, 3, 4, 7])
    assert lcp == 4 and ents == {a}
    depths = [(d, set(es)) for d, es in idx.match("n", [1, 2, 3, 9, 9])]
    assert depths[0] == (4, {b}) and depths[1][0] == 3 and depths[1][1] == {a, b}
    assert best(idx, "missing", [1])[0] == 0
    idx.remove(b)
    assert best(idx, "n", [1, 2, 3, 9])[0] == 3
    idx.remove(a)
    assert best(idx, "n", [1, 2, 3])[0] == 0 and len(idx) == 1


def test_radix_prefix_entry_splits_edges():
    idx = RadixIndex()
    long, short = E("n", list(range(100))), E("n", list(range(10)))
    idx.insert(long)
    idx.insert(short)
    lcp, ents = best(idx, "n", list(range(10)) + [999])
    assert lcp == 10 and ents == {long, short}


def test_cell_ledger_shares_prefix_cells():
    led = CellLedger(1000)
    led.extend(0, 100)                 # seq 0 decodes 100 tokens
    assert led.used == 100
    led.share_prefix(0, 1, 60)         # seq 1 shares 60 of them (seq_cp)
    assert led.used == 100
    led.extend(1, 10)                  # seq 1 decodes 10 of its own
    assert led.used == 110 and led.own_cells(1) == 10 and led.own_cells(0) == 40
    led.drop(0)
    assert led.used == 70              # the 60 shared cells live on in seq 1
    led.truncate(1, 30)
    assert led.used == 30
    led.drop(1)
    assert led.used == 0 and led.free == 1000


def test_cell_ledger_counts_cells_freed_by_several_sequences_together():
    led = CellLedger(1000)
    led.extend(0, 100)                 # a family snapshot
    led.share_prefix(0, 1, 100)        # two sessions on it
    led.extend(1, 10)
    led.share_prefix(0, 2, 100)
    led.extend(2, 20)
    assert led.used == 130
    assert led.own_cells(0) == 0 and led.own_cells(1) == 10
    assert led.freed_by([1, 2]) == 30              # the snapshot keeps the shared cells
    assert led.freed_by([0, 1]) == 10              # seq 2 still holds them
    assert led.freed_by([0, 1, 2]) == 130 == led.used
    led.drop(0), led.drop(1), led.drop(2)
    assert led.used == 0


def test_cell_ledger_truncate_then_extend_makes_new_cells():
    led = CellLedger(100)
    led.extend(0, 20)
    led.share_prefix(0, 1, 20)
    led.truncate(0, 10)
    led.extend(0, 5)                   # positions 10..14 of seq 0 are new cells
    assert led.used == 25


def test_seq_pool():
    pool = SeqPool(2)
    a, b = pool.alloc(), pool.alloc()
    assert {a, b} == {0, 1} and pool.alloc() is None
    pool.release(a)
    with pytest.raises(ValueError):
        pool.release(a)


def test_session_state_machine():
    assert check_transition(S.QUEUED, S.PREFILL) is S.PREFILL
    assert check_transition(S.IDLE, S.WARM) is S.WARM
    with pytest.raises(InvalidTransition):
        check_transition(S.DROPPED, S.PREFILL)
    with pytest.raises(InvalidTransition):
        check_transition(S.QUEUED, S.IDLE)


def test_namespaces_separate_models_salts_and_tenants():
    """The core computes a prompt's namespace (never a detector): every (model, cache salt,
    tenant) its own, including values that differ only in which field holds a string."""
    import itertools

    from kv3d_core.contracts.detector import PromptView, namespace_of

    combos = list(itertools.product(["model-a", "model-b"], [None, "s1", "s2"], [None, "t1", "t2"]))
    combos += [("model-a", "t1", None), ("model-a", None, "s1"), ("model-as1", None, None),
               ("model-a", "t1s1", None), ("model-a", "1", "t1s"), ("model-a", "s1", "t"), ("model-a", "", None),
               ("model-a", None, "")]
    spaces: dict[str, list] = {}
    for model_id, salt, tenant in dict.fromkeys(combos):
        ns = PromptView([1, 2], 1, model_id, salt, tenant).namespace
        assert ns == namespace_of(model_id, salt, tenant)
        spaces.setdefault(ns, []).append((model_id, salt, tenant))
    assert all(len(v) == 1 for v in spaces.values()), [v for v in spaces.values() if len(v) > 1]


def test_the_core_keeps_a_detectors_family_in_the_prompts_namespace():
    """A detector returning another namespace (or a snapshot namespace) cannot move a
    request out of its tenant's namespace: the engine puts the key back in it."""
    from dataclasses import replace
    from types import SimpleNamespace

    from kv3d_core.contracts.detector import FamilyKey, PromptView
    from kv3d_core.engine.engine import Engine
    from kv3d_core.errors import PluginError
    from kv3d_core.prefix.detectors import ExactDetector

    class Leaky(ExactDetector):
        def family(self, prompt):
            return replace(super().family(prompt), namespace="everyone", snapshot_namespace="everyone")

    view = PromptView(list(range(40)), 16, "m", "salt", "alice")
    eng = SimpleNamespace(detector=Leaky(), cfg=SimpleNamespace(detector=SimpleNamespace(name="leaky")))
    key = Engine._family(eng, view)
    assert key.namespace == view.namespace and key.snapshot_namespace is None
    assert key.digest == ExactDetector().family(view).digest and key.length == 16
    eng.detector = SimpleNamespace(family=lambda p: ("not", "a", "key"))
    with pytest.raises(PluginError, match="not a FamilyKey"):
        Engine._family(eng, view)
    assert isinstance(Engine._family(SimpleNamespace(detector=ExactDetector(), cfg=None), view), FamilyKey)


@pytest.mark.parametrize("order, expected", [
    ("shortest", ["short", "shorter", "long"]),
    ("fair", ["long", "short", "shorter"]),
    ("fifo", ["short", "long", "shorter"]),
])
def test_prefill_order(order, expected):
    """Which pending prefill a step fills first: ``shortest`` puts the long miss last (only
    ``prefill_aging_s`` saves it), ``fair`` gives the oldest prefill the step's first chunk and
    the rest shortest first, ``fifo`` keeps admission order."""
    from types import SimpleNamespace

    from kv3d_core.contracts.backend import SamplingParams
    from kv3d_core.contracts.detector import FamilyKey, PromptView
    from kv3d_core.engine.scheduler import Job, Scheduler, SchedulerConfig

    def job(name: str, n: int, t: float) -> Job:
        j = Job(name, PromptView(list(range(n)), 0, "m"), FamilyKey("ns", "", 0), SamplingParams(), 1, [],
                lambda ev: None, t_submit=t, state=S.PREFILL)
        j.context = list(range(n))
        return j

    import time
    now = time.monotonic()
    running = [job("short", 140, now - 0.5), job("long", 1152, now - 2.0), job("shorter", 150, now - 0.1)]
    sched = SimpleNamespace(cfg=SchedulerConfig(prefill_order=order, prefill_aging_s=30.0), _running=running)
    assert [j.id for j in Scheduler._prefill_order(sched)] == expected


def test_a_failure_maps_to_its_http_answer():
    """The scheduler says what went wrong; the API alone picks status, code and Retry-After."""
    from kv3d_core.api.run import error_of
    from kv3d_core.engine.events import Failed, FailureKind

    e = error_of(Failed(FailureKind.QUEUE_TIMEOUT, "no sequence became free", 7))
    assert (e.status, e.code, e.etype, e.headers) == (503, "queue_timeout", "server_error", {"Retry-After": "7"})
    e = error_of(Failed(FailureKind.KV_CACHE_FULL, "full"))
    assert (e.status, e.code, e.headers) == (503, "kv_cache_full", {"Retry-After": "2"})
    e = error_of(Failed(FailureKind.SHUTTING_DOWN, "bye", 5))
    assert (e.status, e.code, e.headers) == (503, "shutting_down", {"Retry-After": "5"})
    for kind in (FailureKind.MODEL, FailureKind.INTERNAL):
        e = error_of(Failed(kind, "broken"))
        assert (e.status, e.code, e.headers) == (500, None, None)
        assert e.body() == {"error": {"message": "broken", "type": "server_error", "param": None, "code": None}}


@pytest.mark.parametrize("limit, prefilled", [(None, ["short", "long", "shorter"]), (1, ["short"]), (2, ["short", "long"])])
def test_prefill_seqs_caps_the_sequences_a_step_prefills(limit, prefilled):
    """``scheduler.prefill_seqs``: a step takes one token of every decoding sequence, then
    prefill chunks of at most that many sequences (in prefill order), within its budget."""
    from types import SimpleNamespace

    from kv3d_core.contracts.backend import SamplingParams
    from kv3d_core.contracts.detector import FamilyKey, PromptView
    from kv3d_core.engine.scheduler import Job, Scheduler, SchedulerConfig

    def job(name: str, n: int, state, seq: int) -> Job:
        j = Job(name, PromptView(list(range(n)), 0, "m"), FamilyKey("ns", "", 0), SamplingParams(), 1, [],
                lambda ev: None, state=state, seq=seq)
        j.context = list(range(n))
        return j

    decoding = [job(f"d{i}", 10, S.DECODE, i) for i in range(3)]
    for j in decoding:
        j.n_past = 9
    prefills = [job("short", 100, S.PREFILL, 3), job("long", 1152, S.PREFILL, 4), job("shorter", 90, S.PREFILL, 5)]
    sched = SimpleNamespace(cfg=SchedulerConfig(prefill_seqs=limit, prefill_chunk=256), _running=decoding + prefills,
                            backend=SimpleNamespace(max_batch_tokens=512), _prefill_order=lambda: prefills,
                            _share_prefixes=lambda: set(), ttft_split={"parked": 0}, _microbatch_tokens=0)
    sched._chunk = lambda job, budget: Scheduler._chunk(sched, job, budget)
    plan = Scheduler._build_batch(sched)
    assert [j.id for j, _ in plan[:3]] == ["d0", "d1", "d2"] and all(len(e.tokens) == 1 for _, e in plan[:3])
    assert [j.id for j, _ in plan[3:]] == prefilled
    assert sum(len(e.tokens) for _, e in plan) <= 512


def test_the_scheduler_overhead_benchmark_runs_its_requests_to_the_end():
    """``benchmarks/scheduler_overhead.py`` (the scheduler's own CPU time a step): four
    requests of eight tokens decode together in eight steps after their prefill step."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scheduler_overhead.py"
    spec = importlib.util.spec_from_file_location("scheduler_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.run(4, 8)
    assert out["generated"] == 32 and out["steps"] == 8 and out["cpu_s"] >= 0


def test_the_serving_overhead_benchmark_serves_its_streams_over_http(monkeypatch, tmp_path):
    """``benchmarks/serving_overhead.py`` (what the HTTP side adds to a decode step): the
    stand-in backend runs the real scheduler alone and under a real ``kv3d serve`` child
    process with streaming clients; every token arrives, and a step takes at least the
    stand-in's sleep in both runs."""
    import argparse
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    mod = importlib.import_module("serving_overhead")
    a = argparse.Namespace(step_ms=2.0, gen=8, prompt_tokens=8, pin=False, set=[])
    alone = mod.alone(a, 4)
    assert alone["steps"] >= 8 and alone["split_ms"]["decode"] >= 2.0
    served = mod.served(a, 4, tmp_path / "server.log")
    assert served["generated"] == 32 and served["steps"] >= 8
    assert served["step_ms"] >= 2.0 and served["split_ms"]["decode"] >= 2.0


def test_the_collab_channels_benchmark_codes_int8s_codes_exactly():
    """``benchmarks/collab_channels.py`` (issue 20: coding int8's codes with per-channel
    statistics a family shares), on real KV of the default model: its centred code decodes to
    exactly int8's codes, and every figure is a bit count a byte can hold."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    out = subprocess.run([sys.executable, "collab_channels.py", "--sessions", "2", "--system-tokens", "64",
                          "--user-tokens", "40", "--block", "16", "--classes", "1,4", "--threads", "1"],
                         cwd=bench, capture_output=True, text=True, timeout=300, check=True).stdout
    res = json.loads(out)
    assert res["centred_codes_decode_exactly"] is True
    bits = res["bits_per_value_codes"]
    assert {"int8", "per-channel model", "centred, 4 classes, 16-cell pieces"} <= set(bits)
    assert all(0 < v <= 8.1 for v in bits.values())
    assert res["int8_over_with_scales"]["int8"] == 1.0
