"""`kv3d bench`: the seeded workload, the metric arithmetic, and small real runs
through the real CLI (real `kv3d serve` subprocesses, the real default model,
llama-cpp-python's own server as the peer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kv3d_core.bench import prom, report
from kv3d_core.bench.workload import WorkloadSpec, generate

REPO = Path(__file__).resolve().parent.parent

# Tiny sizes for a shared 2-core machine. 48-token system prompts stay above
# cache.min_snapshot_tokens (32), so families get shared snapshots.
SMALL = ["requests=8", "concurrency=2", "families=2", "system_prompt_tokens=48", "unique_tokens=8",
         "max_tokens=2", "turns=0.25", "followup_gap=2", "server.threads=1", "quality=false", "progress=false",
         "cache.gpu_hot_mb=64", "scheduler.n_seq_max=16"]


def _peer_import_error() -> str | None:
    try:
        import llama_cpp.server.app  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def bench(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kv3d_core.cli", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "KV3D_USER_CONFIG": "none"})
    assert proc.returncode == 0, f"kv3d bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# -- workload -------------------------------------------------------------------------------------
def test_workload_is_deterministic_respects_shared_ratio_and_chains_history():
    spec = WorkloadSpec(requests=400, shared_ratio=0.8, families=4, system_prompt_tokens=64, unique_tokens=16,
                        turns=0.3, seed=7, max_turns=3, followup_gap=5)
    a, b = generate(spec), generate(spec)
    assert [(r.session, r.turn, r.family, r.user, r.parent) for r in a.requests] == \
           [(r.session, r.turn, r.family, r.user, r.parent) for r in b.requests]
    assert a.session_prompts == b.session_prompts
    other = generate(WorkloadSpec(**{**spec.__dict__, "seed": 8}))
    assert [r.user for r in other.requests] != [r.user for r in a.requests]

    # shared ratio: exact over sessions, close over requests (follow-ups inherit their session's prompt)
    sessions = a.session_family
    assert sum(f is not None for f in sessions.values()) == round(0.8 * len(sessions))
    assert abs(a.summary()["shared_share"] - 0.8) < 0.06
    assert len(set(a.family_prompts)) == 4
    unique = [a.session_prompts[s] for s, f in sessions.items() if f is None]
    assert len(set(unique)) == len(unique) and not set(unique) & set(a.family_prompts)
    assert abs(sum(r.turn > 0 for r in a.requests) - 0.3 * 400) <= 5

    replies = {r.index: f"reply to request {r.index}" for r in a.requests}
    followups = [r for r in a.requests if r.turn > 0]
    assert followups
    for r in followups:
        parent = a.requests[r.parent]
        assert parent.session == r.session and parent.turn == r.turn - 1 and r.turn < spec.max_turns
        assert parent.index < r.index - spec.followup_gap
        before, now = a.messages(parent, replies), a.messages(r, replies)
        assert now[:len(before)] == before                       # the whole earlier history, resent
        assert now[len(before)] == {"role": "assistant", "content": replies[parent.index]}
        assert now[-1] == {"role": "user", "content": r.user} and len(now) == len(before) + 2
        assert r.reusable
    # the first request of each family is not reusable, later ones are
    first: dict[int, int] = {}
    for r in a.requests:
        if r.family is not None and r.turn == 0:
            assert r.reusable == (r.family in first)
            first.setdefault(r.family, r.index)
    with pytest.raises(KeyError, match="has no reply"):
        a.messages(followups[0], {})


def test_workload_texts_fit_token_targets_with_the_model_tokenizer():
    from kv3d_core.bench.run import token_counter
    from kv3d_backend_llamacpp.model_files import default_model_path

    count = token_counter(str(default_model_path()))
    wl = generate(WorkloadSpec(requests=30, system_prompt_tokens=300, unique_tokens=40, seed=3), count)
    for p in set(wl.session_prompts.values()):
        assert 300 * 0.9 <= count(p) <= 300 * 1.1
    sizes = [count(r.user) for r in wl.requests]
    assert all(40 * 0.8 <= n <= 40 * 1.2 for n in sizes), sizes


# -- arithmetic ------------------------------------------------------------------------------------
def test_histogram_quantile_interpolates_like_promql():
    text = "\n".join([
        "# TYPE kv3d_restore_seconds histogram",
        'kv3d_restore_seconds_bucket{le="0.001",tier="warm"} 2.0',
        'kv3d_restore_seconds_bucket{le="0.01",tier="warm"} 6.0',
        'kv3d_restore_seconds_bucket{le="0.1",tier="warm"} 10.0',
        'kv3d_restore_seconds_bucket{le="+Inf",tier="warm"} 10.0',
        'kv3d_restore_seconds_count{tier="warm"} 10.0',
        'kv3d_restore_seconds_bucket{le="0.001",tier="cold"} 0.0',
        'kv3d_restore_seconds_bucket{le="+Inf",tier="cold"} 0.0',
    ])
    s = prom.parse(text)
    # rank 0.95*10 = 9.5 lies in (0.01, 0.1] holding ranks 6..10: 0.01 + 0.09 * 3.5/4
    assert prom.histogram_quantile(s, "kv3d_restore_seconds", 0.95, tier="warm") == pytest.approx(0.08875)
    assert prom.histogram_quantile(s, "kv3d_restore_seconds", 0.5, tier="warm") == pytest.approx(0.001 + 0.009 * 3 / 4)
    assert prom.histogram_quantile(s, "kv3d_restore_seconds", 0.95, tier="cold") is None
    assert prom.histogram_quantile(s, "kv3d_nothing", 0.95) is None


def test_targets_report_met_and_missed_with_reasons():
    wl = {"shared_share": 0.8}
    kv = {"sessions_per_gb": 900.0, "kv_bytes_per_session": 1.2e6, "tokens_per_s": 40.0, "ttft_p50_s": 0.2,
          "ttft_p50_hit_s": 0.05, "ttft_p50_miss_s": 1.0, "uncached_prompt_tokens_mean_hit": 150.0,
          "prompt_tokens_mean_miss": 1200.0, "kv_by_tier": {"hot": {"bytes_per_session": 1.2e6, "sessions": 10}},
          "config": {"codec": "none", "threads": 2}, "batch_sequences_mean": 6.0}
    peer = {"sessions_per_gb": 40.0, "kv_bytes_per_session": 2.6e7, "held_bytes_per_session": 1.2e8,
            "tokens_per_s": 20.0, "ttft_p50_s": 2.0}
    targets, ratios = report.targets_and_ratios({"kv3d": kv, "llamacpp_peer": peer}, wl, concurrency=8)
    assert ratios == pytest.approx({"sessions_per_gb": 22.5, "tokens_per_s": 2.0, "ttft_p50": 0.1})
    assert targets["sessions_per_gb"]["met"] is True
    assert targets["ttft_hit_vs_miss"]["met"] is True and targets["ttft_hit_vs_miss"]["value"] == pytest.approx(0.05)
    assert targets["tokens_per_s"]["met"] is False and "2.00x" in targets["tokens_per_s"]["why"]

    kv_slow = {**kv, "ttft_p50_hit_s": 0.5, "sessions_per_gb": 100.0}
    targets, _ = report.targets_and_ratios({"kv3d": kv_slow, "llamacpp_peer": peer}, wl, concurrency=4)
    assert targets["sessions_per_gb"]["met"] is False and "2.5x < 8x" in targets["sessions_per_gb"]["why"]
    assert targets["ttft_hit_vs_miss"]["met"] is False and "8x" in targets["ttft_hit_vs_miss"]["why"]
    assert "concurrency 4" in targets["tokens_per_s"]["why"]

    targets, ratios = report.targets_and_ratios({"kv3d": kv}, wl, concurrency=8)
    assert ratios["sessions_per_gb"] is None
    assert targets["sessions_per_gb"]["met"] is None and "llamacpp_peer" in targets["sessions_per_gb"]["why"]


# -- real runs through the CLI -----------------------------------------------------------------------
def test_bench_run_kv3d_against_safe_mode(tmp_path):
    """Two rounds (the systems in turn, twice): the report's figures are those of the median
    round (no peer: by kv3d's tokens/s, the lower of two), and ``rounds`` lists both rounds of
    both systems."""
    out = tmp_path / "run"
    bench([*SMALL, "systems=[kv3d,kv3d_safe]", "rounds=2", f"hydra.run.dir={out}"])
    rep = json.loads((out / "report.json").read_text())
    for key in report.REPORT_KEYS:
        assert key in rep
    assert set(rep["ratios"]) == {"sessions_per_gb", "tokens_per_s", "ttft_p50"}
    assert set(rep["targets"]) == {"sessions_per_gb", "ttft_hit_vs_miss", "tokens_per_s"}
    systems = {s["name"]: s for s in rep["systems"]}
    assert list(systems) == ["kv3d", "kv3d_safe"]
    for s in systems.values():
        for key in report.STABLE_SYSTEM_KEYS:
            assert key in s, (s["name"], key)
        assert s["errors"] == 0 and s["requests"] == 8
        assert s["tokens_per_s"] > 0 and s["requests_per_s"] > 0 and s["ttft_p95_s"] > 0
        assert s["rss_bytes"] > 50 * 2**20
    kv, safe = systems["kv3d"], systems["kv3d_safe"]
    assert kv["hit_rate"] > 0 and kv["ttft_p50_hit_s"] > 0 and kv["ttft_p50_miss_s"] > 0
    assert safe["hit_rate"] == 0 and safe["ttft_p50_hit_s"] is None
    assert kv["kv_bytes_per_session"] > 0 and kv["sessions_per_gb"] > 0
    assert kv["kv_by_tier"]["hot"]["sessions"] >= 1
    assert safe["sessions_per_gb"] == 0 and safe["kv_bytes_per_session"] is None
    assert kv["config"]["codec"] == "none" and safe["config"]["safe_mode"] is True
    assert rep["workload"]["requests"] == 8 and rep["workload"]["followups"] >= 1
    assert rep["machine"]["cpu_count"] and rep["machine"]["versions"]["llama_cpp_python"]
    assert rep["targets"]["sessions_per_gb"]["met"] is None       # the peer was not run
    for png in ("ttft.png", "memory_per_session.png", "sessions_per_gb.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| kv3d |" in md and "| kv3d_safe |" in md and "## Targets" in md
    rounds = rep["rounds"]
    assert rounds["count"] == 2
    assert rounds["chosen"] == min(rounds["systems"]["kv3d"], key=lambda x: x["tokens_per_s"])["round"]
    for name, s in systems.items():
        per = rounds["systems"][name]
        assert [x["round"] for x in per] == [0, 1] and all(x["tokens_per_s"] > 0 for x in per)
        assert s["round"] == rounds["chosen"] and s["tokens_per_s"] == per[s["round"]]["tokens_per_s"]
    assert len(rounds["ratios"]) == 2 and "## Rounds" in md
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 32 and {x["system"] for x in lines} == {"kv3d", "kv3d_safe"}
    assert sorted({x["round"] for x in lines}) == [0, 1]
    assert any(x["hit"] for x in lines if x["system"] == "kv3d")
    # follow-ups resent their history: their prompts are longer than their first turn's
    kv_lines = {x["index"]: x for x in lines if x["system"] == "kv3d" and x["round"] == 0}
    for x in kv_lines.values():
        if x["turn"] > 0:
            first = next(y for y in kv_lines.values() if y["session"] == x["session"] and y["turn"] == 0)
            assert x["prompt_tokens"] > first["prompt_tokens"] + 8


def test_bench_multirun_writes_one_combined_summary(tmp_path):
    sweep = tmp_path / "sweep"
    bench(["-m", *SMALL, "requests=6", "systems=[kv3d]", "detector=exact,radix", f"hydra.sweep.dir={sweep}"])
    summary = json.loads((sweep / "summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["+detector=exact", "+detector=radix"]
    assert summary["failed"] == []
    for r in summary["runs"]:
        assert (sweep / r["job"] / "report.json").is_file()
        assert r["systems"][0]["name"] == "kv3d" and r["systems"][0]["requests_per_s"] > 0
    reports = [json.loads((sweep / r["job"] / "report.json").read_text()) for r in summary["runs"]]
    assert [rep["config"]["detector"]["name"] for rep in reports] == ["exact", "radix"]
    md = (sweep / "summary.md").read_text()
    assert "| +detector=exact | kv3d |" in md and "| +detector=radix | kv3d |" in md
    assert (sweep / "sessions_per_gb.png").is_file() and (sweep / "memory_per_session.png").is_file()


@pytest.mark.skipif(_peer_import_error() is not None,
                    reason=f"llama_cpp.server does not import: {_peer_import_error()}")
def test_bench_against_llamacpp_peer(tmp_path):
    out = tmp_path / "run"
    bench([*SMALL, "requests=6", "systems=[kv3d,llamacpp_peer]", "peer.cache_mb=64", f"hydra.run.dir={out}"])
    rep = json.loads((out / "report.json").read_text())
    peer = next(s for s in rep["systems"] if s["name"] == "llamacpp_peer")
    for key in report.STABLE_SYSTEM_KEYS:
        assert key in peer
    assert peer["errors"] == 0 and peer["tokens_per_s"] > 0
    assert peer["hit_rate"] is None                      # it sends no usage in streams
    m = peer["state_measurement"]
    assert m["entries"] and all(e["llama_state_bytes"] > 0 for e in m["entries"])
    # its state holds every token's KV: at least the model's f16 KV bytes per token
    assert peer["kv_bytes_per_session"] >= 23040 * m["tokens_per_session"]
    assert peer["held_bytes_per_session"] > peer["kv_bytes_per_session"]
    assert peer["sessions_per_gb"] == pytest.approx(2**30 / peer["kv_bytes_per_session"])
    assert all(v is not None for v in rep["ratios"].values())
    assert rep["targets"]["sessions_per_gb"]["met"] in (True, False)
    assert rep["targets"]["tokens_per_s"]["met"] in (True, False) and rep["targets"]["tokens_per_s"]["why"]
    assert peer["config"]["cache_bytes"] == 64 * 2**20 and peer["config"]["logits_all"] is False
