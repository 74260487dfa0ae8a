"""No request field is accepted and ignored: each field kv3d used to ignore, sent invalid, is a
400 naming it, and so are unknown fields and OpenAI fields kv3d cannot honour. Also the
seed's command line (`kv3d serve --model ...`, `--help`) and CORS for browser clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID, REPO, free_port

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL_ID, "messages": MSGS, "max_tokens": 2}
COMPL = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# (endpoint body, the field the 400 must name)
INVALID = [
    # fields that were accepted and ignored before
    ({**CHAT, "response_format": {"type": "sound"}}, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema.type"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools.0.function"),
    ({**CHAT, "tools": "all of them"}, "tools"),
    ({**CHAT, "tools": [TOOL], "tool_choice": "bogus"}, "tool_choice"),
    ({**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({**CHAT, "logit_bias": {"hello": 5}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"42": 150}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"999999": 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": [1, 2]}, "logit_bias"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**CHAT, "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({**CHAT, "stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({**CHAT, "user": 42}, "user"),
    ({**COMPL, "logit_bias": {"-1": 1}}, "logit_bias"),
    ({**COMPL, "stream_options": {"include_usage": True}}, "stream_options"),
    # refused before, supported now: invalid values
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "n": 100}, "n"),
    ({**CHAT, "logprobs": 1}, "logprobs"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({**COMPL, "logprobs": True}, "logprobs"),
    ({**COMPL, "logprobs": 21}, "logprobs"),
    ({**COMPL, "echo": "yes"}, "echo"),
    ({**COMPL, "prompt": ["a", ""]}, "prompt"),
    ({**COMPL, "prompt": ["a"] * 33}, "prompt"),
    ({**COMPL, "prompt": [[1, 2], [10**9]]}, "prompt.1"),
    ({**COMPL, "echo": True, "logprobs": 1}, "echo"),
    ({**CHAT, "ignore_eos": True, "response_format": {"type": "json_object"}}, "ignore_eos"),
    # fields kv3d does not know, or cannot honour
    ({**CHAT, "frobnicate": True}, "frobnicate"),
    ({**CHAT, "messages": [{"role": "user", "content": "hi", "mood": "happy"}]}, "messages.0.mood"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({**CHAT, "store": True}, "store"),
    ({**CHAT, "metadata": {"a": "b"}}, "metadata"),
    ({**CHAT, "service_tier": "flex"}, "service_tier"),
    ({**CHAT, "modalities": ["text", "audio"]}, "modalities"),
    ({**CHAT, "audio": {"voice": "alloy"}}, "audio"),
    ({**CHAT, "prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
    ({**CHAT, "web_search_options": {}}, "web_search_options"),
    ({**CHAT, "function_call": "auto"}, "function_call"),
    ({**COMPL, "suffix": "end"}, "suffix"),
    ({**COMPL, "best_of": 3}, "best_of"),
    ({**COMPL, "frobnicate": 1}, "frobnicate"),
]


@pytest.mark.parametrize("body,param", INVALID, ids=[f"{'chat' if 'messages' in b else 'completions'}-{p}-{i}"
                                                    for i, (b, p) in enumerate(INVALID)])
def test_invalid_field_is_a_400_naming_it(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert err["message"] and err["type"] == "invalid_request_error"


def test_no_op_values_are_accepted(server):
    """OpenAI fields at their no-op value ask for nothing kv3d cannot do."""
    for extra in ({"store": False}, {"service_tier": "auto"}, {"modalities": ["text"]}, {"metadata": None},
                  {"tools": [TOOL], "parallel_tool_calls": True}, {"tool_choice": "none"}, {"n": 1},
                  {"logprobs": False}, {"response_format": {"type": "text"}}, {"user": "u-1"}):
        r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, **extra}, timeout=120)
        assert r.status_code == 200, (extra, r.text)
    r = httpx.post(server.url + "/v1/completions", json={**COMPL, "best_of": 1, "suffix": None}, timeout=120)
    assert r.status_code == 200, r.text


def test_unknown_field_with_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2, extra_body={"top_a": 0.5})
    assert e.value.body["param"] == "top_a" and "top_a" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2, stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"


# -- the command line ---------------------------------------------------------------------------------

def _kv3d(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kv3d_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=dict(os.environ, KV3D_USER_CONFIG="none"))


def test_help_prints_usage():
    top = _kv3d("--help")
    assert top.returncode == 0
    for cmd in ("serve", "config", "doctor", "plugins", "quality", "bench", "synth-model"):
        assert f"\n  {cmd} " in top.stdout, cmd
    assert "``" not in top.stdout and "usage: kv3d <command>" in top.stdout
    serve = _kv3d("serve", "--help")
    assert serve.returncode == 0
    for flag in ("--model PATH", "--port N", "--host H", "--api-key K", "--threads N", "cache.gpu_hot_mb",
                 "codec=int8", "server.cors_origins"):
        assert flag in serve.stdout, flag
    bad = _kv3d("serve", "--modle", "x.gguf")
    assert bad.returncode == 2 and "--modle" in bad.stderr and "usage: kv3d serve" in bad.stderr
    assert _kv3d("serve", "--port", "eighty").returncode == 2
    assert _kv3d().returncode == 2


def test_flags_map_to_hydra_keys_and_mix_with_overrides():
    out = _kv3d("config", "--model", "/m/it's a model.gguf", "--port=9001", "--host", "0.0.0.0", "--threads", "3",
                "server.port=9002", "cache.gpu_hot_mb=64").stdout
    assert "path: /m/it's a model.gguf" in out
    assert "port: 9002" in out                       # the later setting wins
    assert "host: 0.0.0.0" in out and "threads: 3" in out and "gpu_hot_mb: 64" in out
    # any value reads back exactly: no Hydra quoting left, no OmegaConf interpolation
    from kv3d_core.cli import serve_overrides
    from kv3d_core.config import compose
    for key in ("k${x}'\\", "a b=c", "[1, 2]", "null", "\\'"):
        assert compose(serve_overrides(["--api-key", key]), user_config=False).server.api_key == key


def _default_model_path() -> str:
    from kv3d_backend_llamacpp.model_files import default_model_path
    return str(default_model_path())


def test_serve_with_the_seeds_flags_and_cors(tmp_path):
    """`kv3d serve --model PATH --port N --host H --api-key K --threads N` plus overrides, with
    CORS on: a preflight is answered before the key is checked; answers carry the headers."""
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kv3d_core.cli", "serve", "--model", _default_model_path(), "--port", str(port),
         "--host", "127.0.0.1", "--api-key", "s3cret", "--threads", "2", "cache.gpu_hot_mb=32",
         "scheduler.n_seq_max=4", "server.log_level=warning", 'server.cors_origins=["https://app.example"]'],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, KV3D_USER_CONFIG="none"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        # the model file given with --model, served under its file name
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
        # the key given with --api-key
        assert httpx.get(url + "/v1/models").status_code == 401
        # preflight: no key, answered with the allowed origin, methods and headers
        pre = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        # another origin's preflight is refused, in OpenAI's error shape
        other = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and other.json()["error"]["code"] == "cors_refused"
        # the actual request, and even a 401, carry the header a browser needs to read them
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=120,
                               default_headers={"Origin": "https://app.example"})
        raw = client.chat.completions.with_raw_response.create(model="SmolLM2-135M-Instruct.Q4_1", messages=MSGS,
                                                               max_tokens=2)
        assert raw.headers["access-control-allow-origin"] == "https://app.example"
        assert raw.parse().choices[0].message.content is not None
        denied = httpx.get(url + "/v1/models", headers={"Origin": "https://app.example"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_no_cors_by_default(server):
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers
