"""The OpenAI-compatible API on the real default model, over real HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import MODEL_ID, running_server

SYSTEM = "You are a concise assistant. Answer in one short sentence."
# A well-conditioned prompt (no near-ties in its greedy continuation) for exact-equality checks:
# llama.cpp's CPU attention sums in an order that depends on where cells sit in the shared cache,
# so a near-tie can flip between otherwise identical runs.
STORY = "Write a short story about a brave knight and a dragon."


def chat(client, user: str, **kw):
    return client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        **{"max_tokens": 24, "temperature": 0, **kw},
    )


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "service": "kv3d-engine"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_chat_completion(client):
    r = chat(client, "What is the capital of France?")
    assert r.object == "chat.completion" and r.model == MODEL_ID
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10 and u.completion_tokens >= 1
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_greedy_is_deterministic(client):
    a = chat(client, STORY, max_tokens=32, extra_body={"cache_salt": "det-a"}).choices[0].message.content
    b = chat(client, STORY, max_tokens=32, extra_body={"cache_salt": "det-b"}).choices[0].message.content
    assert a == b and a
    # served again from cached KV, the first token is the same (later ones may part: batch numerics)
    c = chat(client, STORY, max_tokens=32, extra_body={"cache_salt": "det-a"}).choices[0].message.content
    assert c.split()[:1] == a.split()[:1]


def test_max_tokens_gives_length(client):
    r = chat(client, "Write a long story about a dragon.", max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_stop_string(client):
    free = chat(client, "Describe the sea.", max_tokens=40).choices[0].message.content
    words = free.split()
    assert len(words) > 4
    stop = " " + words[3]                      # a stop string the free text contains
    cut = free.index(stop)
    stopped = chat(client, "Describe the sea.", max_tokens=40, stop=["@@never@@", stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == free[:cut]


def test_streaming_with_openai_client(client):
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": STORY}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"cache_salt": "stream-a"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    # the same request without streaming gives the same text (own salts: no KV reuse, same batches)
    whole = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": STORY}],
                                           max_tokens=16, temperature=0, extra_body={"cache_salt": "stream-b"})
    assert whole.choices[0].message.content == text


def test_streaming_wire_format(server):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert any(json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[1:-1])


def test_completions(client):
    r = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  extra_body={"cache_salt": "compl-a"})
    assert r.object == "text_completion"
    assert "Paris" in r.choices[0].text
    assert r.usage.prompt_tokens == 5
    stream = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=6,
                                       temperature=0, stream=True, extra_body={"cache_salt": "compl-b"})
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_sampling_parameters_accepted(client):
    kw = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, presence_penalty=0.5, frequency_penalty=0.2)
    # distinct cache salts: no KV reuse, so both runs compute the same batches and the same
    # seed must give the same text
    r = chat(client, "Tell me a word.", extra_body={"top_k": 40, "min_p": 0.05, "cache_salt": "seed-a"}, **kw)
    again = chat(client, "Tell me a word.", extra_body={"top_k": 40, "min_p": 0.05, "cache_salt": "seed-b"}, **kw)
    assert r.choices[0].message.content and again.choices[0].message.content == r.choices[0].message.content
    other = [chat(client, "Tell me a word.", extra_body={"cache_salt": f"s{i}"}, **{**kw, "seed": 100 + i})
             for i in range(3)]
    assert len({o.choices[0].message.content for o in other + [r]}) > 1, "another seed samples differently"


def test_metrics_endpoint(server, client):
    chat(client, "ping", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in ("kv3d_http_requests_total", "kv3d_request_duration_seconds_bucket", "kv3d_generated_tokens_total",
                 "kv3d_prompt_tokens_total", "kv3d_time_to_first_token_seconds_bucket", "kv3d_requests_running",
                 "kv3d_requests_waiting", "kv3d_batch_tokens_bucket"):
        assert name in text, name
    m = server.metrics()
    assert m['kv3d_http_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1


GOOD = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_BODIES = [
    ("malformed json", b"{not json", 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("missing messages", {"model": MODEL_ID}, 400, "missing_required_parameter"),
    ("missing model", {"messages": GOOD["messages"]}, 400, "missing_required_parameter"),
    ("messages not a list", {**GOOD, "messages": "hi"}, 400, "invalid_type"),
    ("empty messages", {**GOOD, "messages": []}, 400, "invalid_value"),
    ("unknown role", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ("content wrong type", {**GOOD, "messages": [{"role": "user", "content": 42}]}, 400, "invalid_type"),
    ("max_tokens string", {**GOOD, "max_tokens": "ten"}, 400, "invalid_type"),
    ("max_tokens negative", {**GOOD, "max_tokens": -5}, 400, "invalid_value"),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, 400, "invalid_value"),
    ("max_tokens absurd", {**GOOD, "max_tokens": 10**12}, 400, "invalid_value"),
    ("max_tokens past context", {**GOOD, "max_tokens": 100000}, 400, "context_length_exceeded"),
    ("temperature too high", {**GOOD, "temperature": 7}, 400, "invalid_value"),
    ("top_p zero", {**GOOD, "top_p": 0}, 400, "invalid_value"),
    ("stream not bool", {**GOOD, "stream": "yes"}, 400, "invalid_type"),
    ("n too large", {**GOOD, "n": 17}, 400, "invalid_value"),
    ("too many stops", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
    ("logprobs not a bool", {**GOOD, "logprobs": "yes"}, 400, "invalid_type"),
    ("unknown field", {**GOOD, "frobnicate": 1}, 400, "unsupported_parameter"),
    ("unknown model", {**GOOD, "model": "gpt-9"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("name,body,status,code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_clean_error(server, name, body, status, code):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]
    ok = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=60)
    assert ok.status_code == 200, "the server must keep serving after a bad request"


def test_prompt_longer_than_context(server):
    long_text = "lorem ipsum dolor sit amet " * 2200   # ~11k tokens > 8192
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL_ID, "messages": [{"role": "user", "content": long_text}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=60).status_code == 200


def test_completions_bad_input(server):
    for body, code in (({"model": MODEL_ID, "prompt": ""}, "invalid_value"),
                       ({"model": MODEL_ID, "prompt": [10**9]}, "invalid_value"),
                       ({"model": MODEL_ID, "prompt": "x", "suffix": "y"}, "unsupported_parameter")):
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_unknown_route_and_method(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.delete(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key(tmp_path):
    with running_server(tmp_path, ["server.api_key=s3cret"]) as srv:
        url = srv.url + "/v1/chat/completions"
        assert httpx.post(url, json=GOOD).status_code == 401
        r = httpx.post(url, json=GOOD, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/health").status_code == 200      # health stays open
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**GOOD).choices[0].message.content is not None
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_health_is_a_503_once_the_scheduler_stopped():
    """A replica that can serve nothing says so in /health's status code too (routers that read
    only the code: Kubernetes probes, vllm-router), not only in its body (deploy/router's HAProxy
    check reads both). In process, on the real model."""
    from starlette.testclient import TestClient

    from kv3d_core.api.app import create_app
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    with Engine(compose(["server.threads=1", "cache.stream_ctx=256", "scheduler.n_seq_max=2"])) as eng:
        client = TestClient(create_app(eng))
        ok = client.get("/health")
        assert ok.status_code == 200 and ok.json()["status"] == "ok", ok.text
        eng.scheduler.stop()
        down = client.get("/health")
        assert down.status_code == 503, down.text
        assert down.json() == {"status": "error", "service": "kv3d-engine",
                               "reason": "the scheduler thread is not running"}
