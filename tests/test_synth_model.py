"""The synthetic GGUF writer (`kv3d synth-model`): the file loads in llama.cpp
with the shape asked for, and a real `kv3d serve` serves it over HTTP with
token-id prompts (usage counts, prefix reuse) and chat (synthetic vocabulary)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("gguf", reason="kv3d synth-model needs the gguf package (pip install gguf)")

from kv3d_core.cli import main as kv3d_main  # noqa: E402
from kv3d_tools.synth_model import EOS, SHAPES, spm_vocab  # noqa: E402

from conftest import running_server  # noqa: E402

TINY = SHAPES["tiny"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny.gguf"
    assert kv3d_main(["synth-model", "--shape", "tiny", "--out", str(out), "--seed", "7"]) == 0
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_gguf: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again.gguf", tmp_path / "other.gguf"
    assert kv3d_main(["synth-model", "--shape", "tiny", "--out", str(again), "--seed", "7"]) == 0
    assert kv3d_main(["synth-model", "--shape", "tiny", "--out", str(other), "--seed", "8"]) == 0
    assert again.read_bytes() == tiny_gguf.read_bytes()
    assert other.stat().st_size == tiny_gguf.stat().st_size
    assert other.read_bytes() != tiny_gguf.read_bytes()
    assert not list(tmp_path.glob("*.part"))


def test_file_holds_the_shape(tiny_gguf: Path) -> None:
    import gguf

    r = gguf.GGUFReader(str(tiny_gguf))
    names = {t.name: t for t in r.tensors}
    assert len(names) == 2 + 9 * TINY.n_layer + (0 if TINY.tied else 1)
    assert tuple(int(x) for x in names["blk.0.attn_k.weight"].shape) == (TINY.n_embd, TINY.n_head_kv * TINY.head_dim)
    assert tuple(int(x) for x in names["token_embd.weight"].shape) == (TINY.n_embd, TINY.n_vocab)
    q = np.asarray(names["blk.1.attn_q.weight"].data, dtype=np.float32)
    assert np.isfinite(q).all() and 0.01 < q.std() < 0.03      # random, std 0.02
    out = np.asarray(names["output.weight"].data)
    assert not out[EOS].any() and out[EOS + 1].any()            # </s> never wins greedy decoding
    tokens, _, types = spm_vocab(TINY.n_vocab)
    assert len(set(tokens)) == TINY.n_vocab and tokens[3] == "<0x00>" and types[3] == 6


def test_backend_loads_it_with_the_shape(tiny_gguf: Path) -> None:
    from kv3d_core.contracts.backend import BatchEntry
    from kv3d_core.plugins import make_plugin_manager

    b = make_plugin_manager().create("backend", "llamacpp", model_path=str(tiny_gguf), hot_mb=4,
                                     n_seq_max=4, n_threads=1)
    try:
        info = b.info
        assert (info.architecture, info.n_layer, info.n_vocab, info.n_head_kv, info.head_dim_k) == (
            "llama", TINY.n_layer, TINY.n_vocab, TINY.n_head_kv, TINY.head_dim)
        assert info.kv_bytes_per_token == TINY.kv_bytes_per_token()
        (out,) = b.decode([BatchEntry(0, list(range(300, 400)), 0, True)])
        logits = b.logits(out)
        assert np.isfinite(logits).all() and logits.std() > 0
        assert logits[EOS] == 0.0 and logits.max() > 0
        assert b.tokenize("hello world")                        # the synthetic vocabulary tokenizes text
    finally:
        b.close()


def _complete(url: str, prompt: list[int], max_tokens: int) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_server_completes_token_ids_and_reuses_a_shared_prefix(tiny_gguf: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prefix = rng.integers(300, TINY.n_vocab, 400).tolist()
    a = prefix + rng.integers(300, TINY.n_vocab, 40).tolist()
    b = prefix + rng.integers(300, TINY.n_vocab, 40).tolist()
    b[len(prefix)] = a[len(prefix)] + 1 if a[len(prefix)] + 1 < TINY.n_vocab else 300   # tails differ at once
    overrides = [f"model.path={tiny_gguf}", "server.threads=1", "cache.gpu_hot_mb=8",
                 "scheduler.n_seq_max=8", f"cache.ssd_cold_path={tmp_path / 'cold'}"]
    with running_server(tmp_path, overrides) as srv:
        first = _complete(srv.url, a, 12)
        assert first["object"] == "text_completion"
        assert first["choices"][0]["finish_reason"] == "length"
        assert isinstance(first["choices"][0]["text"], str) and first["choices"][0]["text"]
        u = first["usage"]
        assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (len(a), 12, len(a) + 12)
        assert u["prompt_tokens_details"]["cached_tokens"] == 0

        second = _complete(srv.url, b, 5)
        u2 = second["usage"]
        assert (u2["prompt_tokens"], u2["completion_tokens"]) == (len(b), 5)
        assert u2["prompt_tokens_details"]["cached_tokens"] == len(prefix)

        # the same prompt again: all of it but the last token (decoded for logits) comes from cache
        third = _complete(srv.url, a, 12)
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == len(a) - 1

        chat = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] == 4
