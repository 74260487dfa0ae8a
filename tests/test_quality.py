"""`kv3d quality` (kv3d_tools.quality): the real CLI with the lossless `none` codec
must measure no difference at all; injected faults (a lossy or a broken codec) must
show up as KL > 0 or as fallbacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kv3d_core.contracts.codec import DeltaCodec, KVArrays
from kv3d_core.errors import ConfigError
from kv3d_tools import quality
from kv3d_core.kv.codec_none import NoneCodec
from kv3d_core.plugins import make_plugin_manager
from conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KV3D_USER_CONFIG="none")
    return subprocess.run([sys.executable, "-m", "kv3d_core.cli", "quality", *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def test_prompt_set_is_complete():
    cases = quality.load_prompts()
    assert len(cases) >= 50
    assert all(c.messages[0]["role"] == "system" and c.messages[-1]["role"] == "user" for c in cases)
    assert sum(len(c.messages) >= 4 for c in cases) >= 10  # multi-turn
    assert sum(sum(len(m["content"]) for m in c.messages[1:]) > 700 for c in cases) >= 10  # long deltas
    assert all(len(c.continuation.split()) >= 30 for c in cases)
    assert len({c.id for c in cases}) == len(cases)
    picked = quality.order_cases(cases, 5)
    assert len({json.dumps(c.messages[0]) for c in picked}) == 5  # round-robin over system prompts


def test_none_codec_through_the_cli_is_exact():
    proc = run_cli("+codec=none", "server.threads=1", "quality.limit=3", "+quality.max_positions=24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "next-token top-1" in proc.stdout and "kv3d quality: codec=none" in lines[0]
    assert result["codec"] == "none" and result["model"] == "SmolLM2-135M-Instruct-Q4_1"
    assert result["n_prompts"] == 3 and result["n_positions"] == 3 * 24 and result["fallbacks"] == 0
    assert result["mean_kl"] == 0.0 and result["max_kl"] == 0.0
    assert result["top1_agreement"] == 1.0 and result["ppl_change"] == 0.0
    assert 0.99 < result["ratio"] <= 1.0
    for key in ("seconds", "ppl_live", "delta_tokens", "targets_met"):
        assert key in result


def test_bad_options_are_refused():
    with pytest.raises(ConfigError):
        quality.split_args(["quality.limt=3"])
    with pytest.raises(ConfigError):
        quality.split_args(["quality.floor=maybe"])
    assert quality.split_args(["quality.floor=true"])[1]["floor"] is True
    with pytest.raises(ConfigError):
        quality.split_args(["quality.limit=many"])
    overrides, opts = quality.split_args(["+codec=none", "+quality.limit=4", "quality.max_positions=0"])
    assert overrides == ["+codec=none"] and opts["limit"] == 4 and opts["max_positions"] == 0
    proc = run_cli("quality.limt=3")
    assert proc.returncode == 1 and "quality.limt" in proc.stderr


class LossyCodec(NoneCodec):
    """Fault injection: f16 values rounded to 4 mantissa bits on decode."""

    def decode(self, data: bytes) -> KVArrays:
        a = super().decode(data)
        coarse = [(x.view(np.uint16) & np.uint16(0xFFC0)).view(np.float16) for x in a.k + a.v]
        return KVArrays(a.positions, coarse[:a.n_layer], coarse[a.n_layer:], a.head_dim_k, a.head_dim_v, a.extra)


class LayoutLosingCodec(NoneCodec):
    """Fault injection: a codec that drops the state-layout facts it must carry."""

    def decode(self, data: bytes) -> KVArrays:
        a = super().decode(data)
        return KVArrays(a.positions, a.k, a.v, a.head_dim_k, a.head_dim_v, {})


@pytest.fixture(scope="module")
def backend():
    b = make_plugin_manager().create("backend", "llamacpp", n_ctx=2048, n_seq_max=4, n_threads=1)
    yield b
    b.close()


@pytest.mark.parametrize("codec,lossy", [(LossyCodec(), True), (LayoutLosingCodec(), False)])
def test_faults_are_measured(backend, codec: DeltaCodec, lossy: bool):
    cases = quality.order_cases(quality.load_prompts(), 2)
    totals, families = quality.run(backend, codec, cases, 256, max_positions=16, floor=lossy)
    result = quality.summarize(totals)
    assert families == 2
    if lossy:
        assert sum(totals.fallbacks.values()) == 0 and result["n_positions"] == 32
        assert result["mean_kl"] > 1e-6 and result["max_kl"] >= result["mean_kl"]
        assert result["ppl_change"] > 0
        # the noise-floor sequence: a 1-ulp change in 0.1% of the values already shows
        assert result["floor_mean_kl"] > 0 and 0 < result["floor_top1_agreement"] <= 1
    else:
        assert totals.fallbacks == {"state_layout": 2} and result["mean_kl"] is None
