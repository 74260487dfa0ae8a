"""Prefix families: detection, the shared snapshot, session resume, cache_salt,
metrics, and correctness of reuse against a cold (safe-mode) server."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from conftest import MODEL_ID, running_server

SYSTEM = ("You are the support assistant of Northwind Outfitters, a store for hiking and camping gear. "
          "Answer politely, in at most two sentences, and never invent prices or stock levels. "
          "If a customer asks about returns, explain that unused items can be returned within 30 days "
          "with a receipt. Opening hours are 9 to 18 on weekdays and 10 to 16 on Saturdays.")


def post_chat(url: str, messages, **kw) -> dict:
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 12, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def cached(resp: dict) -> int:
    return resp["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("prefix")) as srv:
        yield srv


def test_seed_demo_hit_rate(fresh):
    """The seed README's demo: a fresh server, two requests sharing a system prompt."""
    post_chat(fresh.url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you sell tents?"}])
    post_chat(fresh.url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When are you open?"}])
    lines = [l for l in httpx.get(fresh.url + "/metrics").text.splitlines() if "hit_rate" in l and not l.startswith("#")]
    assert lines == ["kv3d_prefix_hit_rate 0.5"]


def test_family_snapshot_and_resume(server):
    sys_msg = {"role": "system", "content": SYSTEM + " Family A."}
    first = post_chat(server.url, [sys_msg, {"role": "user", "content": "Do you sell stoves?"}])
    assert cached(first) == 0
    second = post_chat(server.url, [sys_msg, {"role": "user", "content": "Can I return boots?"}])
    fam = cached(second)
    assert fam > 60, "the family prefix (system prompt) comes from the shared snapshot"
    assert fam < second["usage"]["prompt_tokens"]
    # next turn: the history is resent; only the new tokens are decoded
    history = [sys_msg, {"role": "user", "content": "Can I return boots?"},
               {"role": "assistant", "content": second["choices"][0]["message"]["content"]},
               {"role": "user", "content": "Thanks. And tents?"}]
    third = post_chat(server.url, history)
    assert cached(third) >= second["usage"]["prompt_tokens"]
    assert third["usage"]["prompt_tokens"] - cached(third) < 30


def test_canonical_forms_share_a_family(server):
    base = SYSTEM + " Family B."
    post_chat(server.url, [{"role": "system", "content": base}, {"role": "user", "content": "hello"}])
    as_parts = [{"role": "system", "content": [{"type": "text", "text": base}]}, {"role": "user", "content": "hi!"}]
    r = post_chat(server.url, as_parts)
    assert cached(r) > 60, "a one-part text array is the same system prompt as a string"
    # key order in the JSON body does not matter either
    raw = ('{"temperature": 0, "max_tokens": 4, "messages": [{"content": %s, "role": "system"}, '
           '{"content": "hey", "role": "user"}], "model": "%s"}') % (json.dumps(base), MODEL_ID)
    r2 = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                    timeout=120).json()
    assert cached(r2) > 60
    # a different system prompt (one word changed) is another family: no reuse under `exact`
    other = post_chat(server.url, [{"role": "system", "content": base.replace("politely", "briefly")},
                                   {"role": "user", "content": "hello"}])
    assert cached(other) == 0


def test_cache_salt_isolates_tenants(server):
    sys_msg = {"role": "system", "content": SYSTEM + " Family C."}
    post_chat(server.url, [sys_msg, {"role": "user", "content": "a"}], cache_salt="tenant-1")
    same = post_chat(server.url, [sys_msg, {"role": "user", "content": "b"}], cache_salt="tenant-1")
    assert cached(same) > 60
    other = post_chat(server.url, [sys_msg, {"role": "user", "content": "c"}], cache_salt="tenant-2")
    assert cached(other) == 0
    unsalted = post_chat(server.url, [sys_msg, {"role": "user", "content": "d"}])
    assert cached(unsalted) == 0


def test_prefix_metrics(server):
    sys_msg = {"role": "system", "content": SYSTEM + " Family D."}
    before = server.metrics()
    post_chat(server.url, [sys_msg, {"role": "user", "content": "one"}])
    post_chat(server.url, [sys_msg, {"role": "user", "content": "two"}])
    after = server.metrics()
    d = lambda k: after.get(k, 0) - before.get(k, 0)  # noqa: E731
    assert d("kv3d_prefix_requests_total") == 2
    assert d("kv3d_prefix_hits_total") == 1
    assert d("kv3d_prefix_cached_tokens_total") > 60
    assert after["kv3d_prefix_families"] >= 1
    assert 0 < after["kv3d_prefix_hit_rate"] <= 1
    assert after['kv3d_time_to_first_token_seconds_count{cache="hit"}'] >= 1
    assert after['kv3d_time_to_first_token_seconds_count{cache="miss"}'] >= 1


def test_radix_detector_reuses_across_families(tmp_path):
    doc = ("Reference document. " + SYSTEM) * 2
    with running_server(tmp_path, ["+detector=radix"]) as srv:
        post_chat(srv.url, [{"role": "system", "content": doc + " Answer in English."}, {"role": "user", "content": "x"}])
        r = post_chat(srv.url, [{"role": "system", "content": doc + " Answer in French."}, {"role": "user", "content": "y"}])
        assert cached(r) > 100, "radix reuses the shared start of two different system prompts"


# -- correctness of reuse ----------------------------------------------------------------------

SYSTEMS = [
    SYSTEM,
    "You are a patient math tutor. Explain each step of a calculation and check the result at the end. "
    "Use plain words, no formulas in LaTeX, and keep answers under five sentences.",
    "You are a travel agent for trips in Europe. Suggest itineraries with train connections, give rough "
    "travel times, and mention one local dish for each city. Be enthusiastic but factual.",
    "You are a code reviewer. Point out bugs, unclear names and missing tests in the code you are shown. "
    "Answer with a short bullet list ordered from most to least important.",
]
USERS = [
    ["Do you have waterproof jackets?", "Can I return a used tent?", "What time do you open on Saturday?"],
    ["What is 17 times 23?", "How do I add 2/3 and 3/4?", "Is 91 a prime number?"],
    ["Plan two days in Vienna.", "How do I get from Paris to Lyon?", "What should I eat in Bologna?"],
    ["def add(a, b): return a - b", "for i in range(10): print(i) if i % 2 else None",
     "x = [1,2,3]; y = x; y.append(4)"],
]
FOLLOW_UPS = ["Can you say that more briefly?", "Thanks! One more question: why?"]


def _cases() -> list[list[dict]]:
    cases = []
    for sys_text, users in zip(SYSTEMS, USERS):
        for u in users:
            cases.append([{"role": "system", "content": sys_text}, {"role": "user", "content": u}])
    return cases  # 12 single-turn cases; multi-turn cases are built from their replies below


def _first_token_and_text(url: str, messages) -> tuple[str, str, int]:
    """The first generated token, the whole streamed text and ``cached_tokens``. The first
    token is read from the per-token ``logprobs`` entries, not from the first chunk: a
    stream may carry several tokens in one chunk when they are ready together, and how
    many depends on timing, not on the KV."""
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 32, "temperature": 0, "stream": True,
            "logprobs": True, "stream_options": {"include_usage": True}}
    pieces, tokens, raw, usage = [], [], b"", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=180) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    pieces.append(c["delta"]["content"])
                for t in (c.get("logprobs") or {}).get("content") or []:
                    tokens.append(t["token"])
                    raw += bytes(t["bytes"])
    text = "".join(pieces)
    # (a reply cut inside a UTF-8 character ends either way, with U+FFFD or without it)
    assert text in (raw.decode("utf-8", "replace"), raw.decode("utf-8", "ignore")), \
        "the logprobs entries spell the streamed text"
    return (tokens[0] if tokens else ""), text, usage["prompt_tokens_details"]["cached_tokens"]


def test_reuse_matches_cold_computation(tmp_path, capsys):
    """On 24 prompts (12 single-turn, 12 multi-turn), the first greedy token with
    cached KV equals a cold run's; report how many 32-token continuations match."""
    cases = _cases()
    with running_server(tmp_path, ["safe_mode=true"]) as cold, running_server(tmp_path, []) as warm:
        # warm every family with an unrelated question so each case below is a family hit
        for sys_text in SYSTEMS:
            post_chat(warm.url, [{"role": "system", "content": sys_text}, {"role": "user", "content": "Hello!"}])
        results = []
        for msgs in cases:
            c_first, c_text, c_cached = _first_token_and_text(cold.url, msgs)
            w_first, w_text, w_cached = _first_token_and_text(warm.url, msgs)
            assert c_cached == 0 and w_cached > 0
            results.append(("single", msgs[-1]["content"], c_first, w_first, c_text, w_text))
            for follow in FOLLOW_UPS[:1]:
                turn2 = msgs + [{"role": "assistant", "content": w_text}, {"role": "user", "content": follow}]
                c_first2, c_text2, _ = _first_token_and_text(cold.url, turn2)
                w_first2, w_text2, w_cached2 = _first_token_and_text(warm.url, turn2)
                assert w_cached2 > w_cached, "the second turn resumes the first turn's session"
                results.append(("multi", follow, c_first2, w_first2, c_text2, w_text2))
    assert len(results) >= 20
    first_equal = sum(r[2] == r[3] for r in results)
    text_equal = sum(r[4] == r[5] for r in results)
    with capsys.disabled():
        print(f"\n[prefix correctness] {len(results)} prompts: first token equal {first_equal}/{len(results)}, "
              f"32-token continuation identical {text_equal}/{len(results)}")
        for r in results:
            if r[4] != r[5]:
                print(f"  differs ({r[0]}: {r[1][:30]!r}): cold={r[4][:60]!r} cached={r[5][:60]!r}")
    assert first_equal == len(results), [r for r in results if r[2] != r[3]]


def test_hash_collision_never_serves_another_prefix(monkeypatch):
    """Fault injection: every family gets the same digest; token comparison must still
    keep two different system prompts apart."""
    from kv3d_core.config import compose
    from kv3d_core.contracts import SamplingParams
    from kv3d_core.engine.engine import Engine
    from kv3d_core.engine.events import Done, Failed
    from kv3d_core.prefix import detectors

    monkeypatch.setattr(detectors, "family_digest", lambda ns, toks: "0" * 32)
    import queue

    cfg = compose(["server.threads=2", "cache.gpu_hot_mb=48", "scheduler.n_seq_max=8"])
    with Engine(cfg) as eng:
        def run(system: str) -> dict:
            p = eng.prepare_chat([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
            q: queue.Queue = queue.Queue()
            eng.submit(p, SamplingParams(temperature=0), 2, [], q.put)
            while True:
                ev = q.get(timeout=120)
                if isinstance(ev, Done):
                    return ev.usage
                assert not isinstance(ev, Failed), ev

        assert run(SYSTEMS[1])["cached_tokens"] == 0
        u = run(SYSTEMS[2])          # same (forged) digest, different tokens
        assert u["cached_tokens"] == 0, "a digest match is confirmed by token ids"
