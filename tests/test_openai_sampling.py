"""logit_bias, logprobs, n > 1, echo and several prompts, over HTTP with the official client
on the default model."""

from __future__ import annotations

import math

import pytest

from conftest import MODEL_ID
from kv3d_core.plugins import make_plugin_manager

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok():
    """The model's tokenizer (a backend in this process), for token ids."""
    b = make_plugin_manager().create("backend", "llamacpp", n_ctx=256, n_seq_max=1, n_threads=1)
    yield lambda text: b.tokenize(text, parse_special=False)
    b.close()


def _single(tok, text: str) -> int:
    ids = tok(text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_logit_bias_completions(client, tok):
    def first(**kw) -> str:
        r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1, **kw)
        return r.choices[0].logprobs.tokens[0]

    greedy = first(extra_body={"cache_salt": "lb-0"})
    banned = first(logit_bias={str(_single(tok, greedy)): -100}, extra_body={"cache_salt": "lb-1"})
    assert banned != greedy
    forced_id = _single(tok, " banana")
    assert first(logit_bias={str(forced_id): 100}, extra_body={"cache_salt": "lb-2"}) == " banana"


def test_logit_bias_chat(client, tok):
    def first(**kw):
        r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=1, temperature=0,
                                           logprobs=True, **kw)
        return r.choices[0].logprobs.content[0].token

    greedy = first()
    assert first(logit_bias={str(_single(tok, greedy)): -100}) != greedy
    assert first(logit_bias={str(_single(tok, "Rome")): 100}) == "Rome"
    # -100 bans outright: banning the top 5 never yields any of them
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=1, temperature=0, logprobs=True,
                                       top_logprobs=5)
    top5 = [t.token for t in r.choices[0].logprobs.content[0].top_logprobs]
    bias = {str(_single(tok, t)): -100 for t in top5 if len(tok(t)) == 1}
    assert first(logit_bias=bias) not in [t for t in top5 if len(tok(t)) == 1]


def _check_entry(entry, chosen_in_top: bool) -> None:
    assert entry.logprob <= 0
    lps = [t.logprob for t in entry.top_logprobs]
    assert lps == sorted(lps, reverse=True) and all(v <= 0 for v in lps)
    assert sum(math.exp(v) for v in lps) <= 1.0 + 1e-6
    if chosen_in_top:
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].bytes == entry.bytes
    assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or entry.token.startswith("bytes:")


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"cache_salt": "lp-chat"})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3
        _check_entry(e, chosen_in_top=True)      # greedy: the chosen token is the most likely
    # streamed: the same entries, chunk by chunk
    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True, extra_body={"cache_salt": "lp-chat-s"})
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]
    # logprobs without top_logprobs: no alternatives
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=3, temperature=0.8, seed=3,
                                       logprobs=True)
    for e in r.choices[0].logprobs.content:
        assert e.top_logprobs == [] and e.logprob <= 0
    # not asked: none
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=2, temperature=0)
    assert r.choices[0].logprobs is None


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"cache_salt": "lp-compl"})
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for tok_, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0 and 2 <= len(top) <= 3 and top[tok_] == pytest.approx(v)
        assert max(top.values()) == pytest.approx(v)      # greedy
    stream = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                       stream=True, extra_body={"cache_salt": "lp-compl-s"})
    toks = [t for c in stream if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert toks == lp.tokens


def test_n_choices_share_one_prefill(server, client):
    """n=3: three choices of one prompt. The prompt is counted once (kv3d_prompt_tokens_total),
    and decoded once: the tokens the model processed are the prompt plus each choice's own."""
    before = server.metrics()
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=12, temperature=1.0, seed=11, n=3,
                                       extra_body={"cache_salt": "n3"})
    after = server.metrics()
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1, "each choice samples with its own seed"
    assert after["kv3d_prompt_tokens_total"] - before["kv3d_prompt_tokens_total"] == r.usage.prompt_tokens
    # every sampled token but a choice's last is decoded; the prompt only once
    decoded = after["kv3d_batch_tokens_sum"] - before["kv3d_batch_tokens_sum"]
    assert decoded == r.usage.prompt_tokens + r.usage.completion_tokens - 3
    assert after["kv3d_generated_tokens_total"] - before["kv3d_generated_tokens_total"] == r.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streamed: every choice's chunks, each with its index, each with its end
    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=6, temperature=1.0, n=3,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ends = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert ends == [0, 1, 2]
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_n_with_a_seed_is_reproducible(client):
    def run(salt):
        r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0.9,
                                      seed=5, n=2, extra_body={"cache_salt": salt})
        return [c.text for c in r.choices]
    a = run("seed-a")
    assert a == run("seed-b") and a[0] != a[1]


def test_echo_and_several_prompts(client, tok):
    r = client.completions.create(model=MODEL_ID, prompt=[PROMPT, "One, two, three,"], max_tokens=3, temperature=0,
                                  n=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith(PROMPT) and r.choices[2].text.startswith("One, two, three,")
    assert r.choices[0].text == r.choices[1].text            # greedy
    single = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].text == PROMPT + single.choices[0].text
    assert r.usage.prompt_tokens == single.usage.prompt_tokens + 6     # each prompt once
    # token-id prompts, echoed as text; streamed with the prompt first
    ids = [tok(PROMPT)]
    e = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=2, temperature=0, echo=True)
    stream = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=2, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream) == e.choices[0].text
    assert e.choices[0].text.startswith(PROMPT)


def test_ignore_eos_generates_to_the_limit(client):
    """kv3d's (and vLLM's, llama-server's) ``ignore_eos``: the reply goes on past the model's
    end-of-generation token, to max_tokens; without it the same greedy reply stops early."""
    ask = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Say hi."}], max_tokens=96, temperature=0)
    plain = client.chat.completions.create(**ask)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 96
    forced = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 96
    assert forced.choices[0].message.content.startswith(plain.choices[0].message.content.rstrip()[:20])
