"""`kv3d bench`: the seeded workload, the metric arithmetic, and small real runs
through the real CLI (real `kv3d serve` subprocesses, the real default model,
llama-cpp-python's own server as the peer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kv3d_tools.bench import prom, report
from kv3d_tools.bench.workload import WorkloadSpec, generate

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


def kv3d(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kv3d_core.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "KV3D_USER_CONFIG": "none"})


# -- the tools are a plugin: kv3d-tools ---------------------------------------------------------------
TOOLS = ("bench", "quality", "synth-model", "scale-sim")


def test_the_tools_are_plugin_commands_of_kv3d_tools():
    """bench, quality, synth-model and scale-sim are no commands of the core: kv3d-tools registers them
    (register_commands), with the doctor's llama-server row, and `kv3d --help` lists them as plugin
    commands."""
    from kv3d_core import cli
    from kv3d_core.plugins import BUILTIN_COMMANDS, make_plugin_manager

    pm = make_plugin_manager()
    for name in TOOLS:
        assert name not in cli.COMMANDS and name not in BUILTIN_COMMANDS
        assert pm.commands()[name].source.distribution == "kv3d-tools"
    assert any(c.name == "llama-server" and c.source.distribution == "kv3d-tools" for c in pm.doctor_checks())
    top = kv3d("--help")
    assert top.returncode == 0, top.stderr
    builtin, _, rest = top.stdout.partition("\nplugin commands:\n")
    listed = rest.partition("\n\n")[0]
    for name in TOOLS:
        assert f"\n  {name} " not in builtin
        assert any(line.startswith(f"  {name} ") and line.endswith("[kv3d-tools]") for line in listed.splitlines())
    assert "pip install kv3d[bench]" in top.stdout


def test_bench_help_and_config_through_the_plugin_path():
    """`kv3d bench` runs through the plugin command; Hydra finds bench.yaml in kv3d-tools' conf/
    and composes it over the core's config.yaml, the overrides (and the older +codec=) applied,
    every installed plugin's options listed."""
    help_ = kv3d("bench", "--help")
    assert help_.returncode == 0, help_.stderr
    head = help_.stdout.split("== Config ==")[0]              # the config groups and their options
    groups = {line.split(":", 1)[0].strip(): {o.strip() for o in line.split(":", 1)[1].split(",")}
              for line in head.splitlines() if line.startswith(("codec:", "tier:"))}
    assert {"block", "int8", "none"} <= groups["codec"] and {"ram", "ssd"} <= groups["tier"], groups
    assert "\nrequests: 1000\n" in help_.stdout and "\nserver:\n" in help_.stdout
    job = kv3d("bench", "--cfg", "job", "requests=5", "+codec=int8", "server.port=9001")
    assert job.returncode == 0, job.stderr
    assert "\nrequests: 5\n" in job.stdout and "\n  name: int8\n" in job.stdout and "zstd_level: 3" in job.stdout
    assert "\n  port: 9001\n" in job.stdout
    hydra = kv3d("bench", "--cfg", "hydra")
    assert "_target_: kv3d_tools.bench.summary.SweepSummary" in hydra.stdout and "config_name: bench" in hydra.stdout


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


def test_branching_workload_regenerates_edits_and_forks_earlier_histories():
    spec = WorkloadSpec(requests=400, shared_ratio=0.8, families=4, system_prompt_tokens=64, unique_tokens=16,
                        turns=0.3, seed=7, max_turns=3, followup_gap=5, branch_regenerate=0.3, branch_fork=0.2)
    a = generate(spec)
    assert [(r.session, r.turn, r.user, r.parent, r.branch) for r in a.requests] == \
           [(r.session, r.turn, r.user, r.parent, r.branch) for r in generate(spec).requests]
    counts = a.summary()["branches"]
    assert abs(counts["regenerate"] + counts["edit"] - 0.3 * 400) <= 30 and abs(counts["fork"] - 0.2 * 400) <= 30
    assert min(counts.values()) > 0
    replies = {r.index: f"reply to request {r.index}" for r in a.requests}
    seen: set[int] = set()
    for r in a.requests:
        if r.branch is None:
            continue
        assert r.session not in seen and r.reusable    # the first request of a new session
        seen.add(r.session)
        # the request it branches from: the latest turn of another session, followup_gap back or more
        src = next(q for q in a.requests if q.index < r.index - spec.followup_gap and q.session != r.session
                   and (q.index == r.parent if r.branch == "fork" else q.parent == r.parent
                        and a.session_prompts[q.session] == a.session_prompts[r.session]
                        and (r.branch == "edit" or q.user == r.user)))
        assert a.session_prompts[r.session] == a.session_prompts[src.session]
        assert a.session_family[r.session] == a.session_family[src.session]
        now = a.messages(r, replies)
        if r.branch == "fork":                         # the whole history, its reply, a new message
            before = a.messages(src, replies)
            assert now[:len(before)] == before and now[len(before)]["content"] == replies[src.index]
        else:                                          # the history before its last message, then that
            before = a.messages(src, replies)          # message again (regenerate) or another (edit)
            assert now[:-1] == before[:-1]
            assert (now[-1] == before[-1]) == (r.branch == "regenerate")
    plain = generate(WorkloadSpec(**{**spec.__dict__, "branch_regenerate": 0.0, "branch_fork": 0.0}))
    assert not any(r.branch for r in plain.requests) and set(plain.summary()["branches"].values()) == {0}
    with pytest.raises(ValueError, match="branch"):
        WorkloadSpec(turns=0.5, branch_regenerate=0.3, branch_fork=0.2)


def test_branches_from_sessions_of_several_turns_repeat_a_whole_earlier_exchange():
    base = dict(requests=400, shared_ratio=0.8, families=4, system_prompt_tokens=64, unique_tokens=16, turns=0.3,
                seed=7, max_turns=4, followup_gap=5, branch_regenerate=0.3, branch_fork=0.2)
    any_turns = generate(WorkloadSpec(**base))
    assert [(r.session, r.turn, r.parent, r.branch) for r in any_turns.requests] == \
           [(r.session, r.turn, r.parent, r.branch) for r in generate(WorkloadSpec(**base, branch_min_turns=1)).requests]
    assert any(r.branch and r.parent is None for r in any_turns.requests)     # 1: branches of one-turn sessions
    two = generate(WorkloadSpec(**base, branch_min_turns=2))
    branches = [r for r in two.requests if r.branch]
    assert len(branches) > 20 and {r.branch for r in branches} == {"regenerate", "edit", "fork"}
    replies = {r.index: f"reply to request {r.index}" for r in two.requests}
    for r in branches:
        # retry/edit: the source's latest turn is its second or later; fork: it had two turns or more
        assert r.turn >= (1 if r.branch != "fork" else 2) and r.parent is not None
        history = two.messages(r, replies)
        assert sum(m["role"] == "assistant" for m in history) >= (1 if r.branch != "fork" else 2)
    with pytest.raises(ValueError, match="branch_min_turns"):
        WorkloadSpec(**{**base, "branch_min_turns": 0})


def test_side_by_side_workload_new_sessions_first_then_token_id_resumes():
    spec = WorkloadSpec(requests=30, shared_ratio=0.8, families=1, system_prompt_tokens=64, unique_tokens=8,
                        turns=1 / 3, seed=3, max_turns=2, followup_gap=0, followups_last=True)
    wl = generate(spec, texts=False)
    new, later = wl.requests[:20], wl.requests[20:]
    assert all(r.turn == 0 for r in new) and all(r.turn == 1 for r in later)
    assert len({r.session for r in later}) == 10               # each resumes a different session
    shared = [r for r in new if r.family is not None]
    assert len(shared) == 16
    a, b = (wl.token_prompt(r, 1000) for r in shared[:2])
    assert a[:64] == b[:64] and a[64:] != b[64:] and len(a) == 72
    own = next(r for r in new if r.family is None)
    assert wl.token_prompt(own, 1000)[:64] != a[:64]
    for r in later:                                             # the earlier prompt, then new ids
        first = wl.token_prompt(wl.requests[r.parent], 1000)
        p = wl.token_prompt(r, 1000)
        assert p[:len(first)] == first and len(p) == len(first) + 8
    assert all(100 <= t < 1000 for t in a)
    assert wl.token_prompt(shared[0], 1000) == generate(spec, texts=False).token_prompt(shared[0], 1000)


def test_workload_texts_fit_token_targets_with_the_model_tokenizer():
    from kv3d_tools.bench.run import token_counter
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
    ls = {"sessions_per_gb": 100.0, "kv_bytes_per_session": 1.1e7, "tokens_per_s": 50.0, "ttft_p50_s": 0.5,
          "llama_server_memory": {"slots": 8, "slots_used": 8, "slot_kv_bytes": 8e7, "ram_cache_prompts": 3,
                                  "ram_cache_bytes": 4e7}}
    peer = {"sessions_per_gb": 40.0, "kv_bytes_per_session": 2.6e7, "tokens_per_s": 20.0, "ttft_p50_s": 2.0}
    systems = {"kv3d": kv, "llama_server": ls, "llamacpp_peer": peer}
    assert report.baseline_of(systems) == "llama_server"
    targets, ratios = report.targets_and_ratios(systems, wl, concurrency=8)
    assert ratios == pytest.approx({"sessions_per_gb": 9.0, "tokens_per_s": 0.8, "ttft_p50": 0.4})
    assert targets["sessions_per_gb"]["met"] is True and targets["sessions_per_gb"]["against"] == "llama_server"
    assert targets["ttft_p50"]["met"] is True
    assert targets["tokens_per_s"]["met"] is False and "0.80x" in targets["tokens_per_s"]["why"]
    assert targets["ttft_hit_vs_miss"]["met"] is True and targets["ttft_hit_vs_miss"]["value"] == pytest.approx(0.05)

    kv_slow = {**kv, "ttft_p50_hit_s": 0.5, "sessions_per_gb": 300.0, "ttft_p50_s": 0.4}
    targets, _ = report.targets_and_ratios({"kv3d": kv_slow, "llama_server": ls}, wl, concurrency=4)
    assert targets["sessions_per_gb"]["met"] is False and targets["sessions_per_gb"]["why"].startswith("3.00x")
    assert targets["ttft_p50"]["met"] is False
    assert targets["ttft_hit_vs_miss"]["met"] is False and "8x" in targets["ttft_hit_vs_miss"]["why"]

    # without llama_server, ratios fall back to the next peer run but its targets are not evaluated
    targets, ratios = report.targets_and_ratios({"kv3d": kv, "llamacpp_peer": peer}, wl, concurrency=8)
    assert ratios["sessions_per_gb"] == pytest.approx(22.5)
    assert targets["sessions_per_gb"]["met"] is None and "llama_server" in targets["sessions_per_gb"]["why"]
    targets, ratios = report.targets_and_ratios({"kv3d": kv}, wl, concurrency=8)
    assert ratios["sessions_per_gb"] is None and targets["tokens_per_s"]["met"] is None


def test_llama_server_log_and_memory_figures():
    from kv3d_tools.bench import llama_server as ls

    log = ("srv  update:  - cache state: 1 prompts, 2.500 MiB (limits: 64.000 MiB, 0 tokens, 0 est)\n"
           "srv  update:  - cache state: 3 prompts, 7.500 MiB (limits: 64.000 MiB, 0 tokens, 0 est)\n")
    assert ls.cache_state(log) == (3, 7.5) and ls.cache_state("nothing") is None
    assert ls.refused_requests(log) == 0
    assert ls.refused_requests(log + "slot x: Context size has been exceeded.\n") == 1
    st = ls.LlamaServerSettings(parallel=2, ctx_per_slot=1024, threads=2, n_batch=512, n_ubatch=512,
                                cache_ram_mb=64, unified=False, n_gpu_layers=0, flash_attn="auto")
    slots = [{"id": 0, "n_ctx": 1024, "id_task": 5}, {"id": 1, "n_ctx": 1024}]
    m = ls.memory_figures(slots, log, 23040, st)
    assert m["resident_sessions"] == 1 + 3
    assert m["kv_bytes_per_session"] == pytest.approx((2048 * 23040 + 7.5 * 2**20) / 4)
    argv = st.argv("/bin/llama-server", "/m.gguf", "m", 1234)
    assert "--no-kv-unified" in argv and argv[argv.index("--ctx-size") + 1] == "2048"
    assert "--cache-idle-slots" in argv and argv[argv.index("--parallel") + 1] == "2"


def test_build_script_is_idempotent(tmp_path):
    """The second run of scripts/build_llama.sh builds nothing: it prints the cached build's folder at
    once and leaves the wheel and the server as they were."""
    import os
    import time

    t = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "build_llama.sh")], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    wheel = next(folder.glob("llama_cpp_python-*.whl"))
    server = next(folder.glob("llama-server-*/llama-server"))
    before = (wheel.stat().st_mtime_ns, server.stat().st_mtime_ns)
    t = time.monotonic()
    again = subprocess.run(["bash", str(REPO / "scripts" / "build_llama.sh")], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert again.returncode == 0 and again.stdout.strip() == str(folder)
    assert "building" not in again.stderr and time.monotonic() - t < 20
    assert (wheel.stat().st_mtime_ns, server.stat().st_mtime_ns) == before
    info = (server.parent / "BUILD-INFO").read_text()
    import llama_cpp
    assert f"llama_cpp_python={llama_cpp.__version__}" in info and "commit" in info


# -- replicas behind a router (issue 21) --------------------------------------------------------------
def _missing_cluster_parts() -> str | None:
    import shutil

    missing = [b for b in ("haproxy", "redis-server") if shutil.which(b) is None]
    return f"{' and '.join(missing)} not installed (scripts/test.sh installs Debian's)" if missing else None


def test_round_robin_router_config_is_generated_from_the_shipped_one():
    from kv3d_tools.bench.cluster import round_robin_config

    shipped = (REPO / "deploy" / "router" / "haproxy.cfg").read_text()
    rr = round_robin_config(shipped)
    assert "balance roundrobin" in rr and "hash-type" not in rr and "hash-balance-factor" not in rr
    kept = [ln for ln in shipped.splitlines() if not ln.strip().startswith(("balance ", "hash-type ",
                                                                            "hash-balance-factor "))]
    assert [ln for ln in rr.splitlines() if "kv3d bench (kv3d_rr)" not in ln] == kept


@pytest.mark.skipif(_missing_cluster_parts() is not None, reason=str(_missing_cluster_parts()))
def test_bench_two_replica_systems_shared_store_against_round_robin(tmp_path):
    """kv3d_cluster (two real replicas on a real redis-server behind the shipped HAProxy config) and
    kv3d_rr (two replicas, local tiers, HAProxy round robin) on a tiny workload, with X-Session-Id
    per conversation: every request answered through the router, both replicas served, the
    store holds entries under the run's own prefix, and the report has the resume figures, the
    kv3d_cluster / kv3d_rr ratios and issue 21's two targets."""
    out = tmp_path / "run"
    bench([*SMALL, "requests=10", "turns=0.3", "scheduler.n_seq_max=8", "server.cached_tokens=exact",
           "session_header=true", "systems=[kv3d_cluster,kv3d_rr]", f"hydra.run.dir={out}"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["skipped"] == {}
    systems = {s["name"]: s for s in rep["systems"]}
    assert list(systems) == ["kv3d_cluster", "kv3d_rr"]
    for name, s in systems.items():
        for key in report.STABLE_SYSTEM_KEYS:
            assert key in s, (name, key)
        assert s["errors"] == 0 and s["requests"] == 10, s.get("first_errors")
        assert s["tokens_per_s"] > 0 and s["ttft_p50_resume_s"] > 0 and s["n_resume_usage"] >= 2
        assert 0 <= s["resume_state_hit_rate"] <= s["resume_hit_rate"] <= 1 and 0 <= s["hit_rate"] <= 1
        # the router reached both replicas and nothing else answered (the model list is a GET)
        assert len(s["requests_by_replica"]) == 2 and sum(s["requests_by_replica"]) == 10
        assert all(n > 0 for n in s["requests_by_replica"]), s["requests_by_replica"]
        assert s["config"]["replicas"] == 2 and s["config"]["threads"] == 1
        assert all(rc is None for rc in s["replica_exit_codes"])       # still running when measured
    c, rr = systems["kv3d_cluster"], systems["kv3d_rr"]
    assert c["config"]["tier"] == "redis (shared)" and rr["config"]["tier"] == "ram (local)"
    assert c["route_key"].startswith("X-Session-Id") and rr["balance"] == "roundrobin"
    assert c["store_keys"] > 0 and c["store_used_memory_bytes"] > 0 and c["store_prefix"].startswith("kv3d-bench-")
    assert "store_keys" not in rr
    assert set(c["tier_followed"]) <= {"session", "snapshot", "orphan", "removed"} and rr["tier_followed"] == {}
    rr_cfg = (out / "kv3d_rr-haproxy.cfg").read_text()
    assert "balance roundrobin" in rr_cfg and rr_cfg.count("\n    server r") == 2
    ratios = rep["cluster"]["ratios"]
    for key, field in (("ttft_p50_resume", "ttft_p50_resume_s"), ("tokens_per_s", "tokens_per_s")):
        assert ratios[key] == pytest.approx(c[field] / rr[field])
    for key in ("cluster_resume_hit_rate", "cluster_resume_ttft"):
        t = rep["targets"][key]
        assert t["met"] in (True, False) and t["value"] is not None and t["why"], t
    assert rep["targets"]["cluster_resume_ttft"]["value"] == pytest.approx(ratios["ttft_p50_resume"])
    md = (out / "report.md").read_text()
    assert "## Replicas behind a router" in md and "| kv3d_cluster | 2 | redis (shared) |" in md
    assert "Ratios kv3d_cluster / kv3d_rr" in md and "**cluster_resume_ttft**" in md
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert {x["system"] for x in lines} == {"kv3d_cluster", "kv3d_rr"} and not any(x["error"] for x in lines)


def test_resumes_by_turn_and_their_ratios():
    """Resume figures by the conversation's length (turn): count, TTFT p50, tokens computed p50
    (prompt less cached), the share with their session's state; and kv3d_cluster / kv3d_rr by turn."""
    from types import SimpleNamespace as NS

    from kv3d_tools.bench import cluster

    def res(index, session, turn, ttft, prompt, cached):
        return NS(index=index, session=session, turn=turn, ttft_s=ttft, prompt_tokens=prompt,
                  cached_tokens=cached, hit=cached > 0, error=None)

    plan = [NS(parent=None), NS(parent=None), NS(parent=0), NS(parent=1), NS(parent=2)]
    routed = [res(0, 0, 0, 9.0, 1100, 0), res(1, 1, 0, 9.0, 1100, 1000), res(2, 0, 1, 2.0, 1300, 1100),
              res(3, 1, 1, 4.0, 1300, 1100), res(4, 0, 2, 3.0, 1500, 1300)]
    rr = [res(0, 0, 0, 9.0, 1100, 0), res(1, 1, 0, 9.0, 1100, 1000), res(2, 0, 1, 6.0, 1300, 1000),
          res(3, 1, 1, 2.0, 1300, 1100), res(4, 0, 2, 12.0, 1500, 1000)]
    figs = {}
    for name, results in (("kv3d_cluster", routed), ("kv3d_rr", rr)):
        run = NS(results=results, ok=results)
        figs[name] = cluster.resume_figures(run, NS(requests=plan))
    c = figs["kv3d_cluster"]
    assert c["resume_by_turn"] == {
        "1": {"n": 2, "ttft_p50_s": 3.0, "prompt_tokens_p50": 1300.0, "uncached_tokens_p50": 200.0,
              "state_hit_rate": 1.0},
        "2": {"n": 1, "ttft_p50_s": 3.0, "prompt_tokens_p50": 1500.0, "uncached_tokens_p50": 200.0,
              "state_hit_rate": 1.0}}
    assert c["resume_uncached_tokens_p50"] == 200.0
    r = figs["kv3d_rr"]["resume_by_turn"]
    assert r["1"]["uncached_tokens_p50"] == 250.0 and r["1"]["state_hit_rate"] == 0.5
    assert r["2"]["ttft_p50_s"] == 12.0 and r["2"]["state_hit_rate"] == 0.0
    for name in figs:
        figs[name].update(name=name, ttft_p50_resume_s=3.0 if name == "kv3d_cluster" else 6.0)
    comp = cluster.comparison(figs)
    assert comp["resume_by_turn"]["1"] == {"ttft_p50": 0.75, "uncached_tokens_p50": 0.8}
    assert comp["resume_by_turn"]["2"] == {"ttft_p50": 0.25, "uncached_tokens_p50": 0.4}
    assert comp["ratios"]["resume_uncached_tokens_p50"] == pytest.approx(200 / 300)
    md = "\n".join(cluster.markdown({"cluster": comp, "skipped": {}, "systems": list(figs.values())}))
    assert "- kv3d_cluster: turn 1: 2, 3000 ms, 200 tok, 1.00; turn 2: 1, 3000 ms, 200 tok, 1.00" in md
    assert "By turn, TTFT p50 of resumes (tokens computed p50): turn 1 0.75x (0.80x), turn 2 0.25x (0.40x)" in md
    t = cluster.targets(figs)["cluster_resume_ttft"]
    assert t["value"] == 0.5 and t["met"] is False and "tokens computed p50 200 vs 300" in t["why"]


def test_a_replica_system_whose_parts_are_missing_is_skipped_and_the_report_says_why():
    from omegaconf import OmegaConf

    from kv3d_tools.bench import cluster

    cfg = OmegaConf.create({"cluster": {"router_dir": None, "haproxy": "/nonexistent/haproxy",
                                        "redis_server": "/nonexistent/redis-server"}})
    for name in cluster.SYSTEMS:
        assert "haproxy is not installed at /nonexistent/haproxy" in cluster.unavailable(name, cfg)
    cfg.cluster.haproxy = None
    if _missing_cluster_parts() is None:
        assert cluster.unavailable("kv3d_rr", cfg) is None
        assert "redis-server is not installed" in cluster.unavailable("kv3d_cluster", cfg)
    skipped = {"kv3d_cluster": "redis-server is not installed at /nonexistent/redis-server"}
    rr = {"name": "kv3d_rr", "ttft_p50_resume_s": 0.5, "resume_state_hit_rate": 0.5, "config": {}}
    targets = cluster.targets({"kv3d_rr": rr}, skipped)
    assert all(t["met"] is None and t["why"] == skipped["kv3d_cluster"] for t in targets.values())
    md = cluster.markdown({"cluster": cluster.comparison({"kv3d_rr": rr}), "skipped": skipped, "systems": [rr]})
    assert "**kv3d_cluster skipped**: redis-server is not installed" in "\n".join(md)
    assert cluster.targets({"kv3d": {}}) == {} and cluster.markdown({"systems": [], "skipped": {}}) == []


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
    assert set(rep["targets"]) == {"sessions_per_gb", "ttft_hit_vs_miss", "tokens_per_s", "ttft_p50"}
    systems = {s["name"]: s for s in rep["systems"]}
    assert list(systems) == ["kv3d", "kv3d_safe"]
    for s in systems.values():
        for key in report.STABLE_SYSTEM_KEYS:
            assert key in s, (s["name"], key)
        assert s["errors"] == 0 and s["requests"] == 8
        assert s["tokens_per_s"] > 0 and s["requests_per_s"] > 0 and s["ttft_p95_s"] > 0
        assert s["rss_bytes"] > 50 * 2**20
        # the machine billed for the run's time at the dashboard's price setting (2.0 by default)
        assert s["price_per_device_hour"] == 2.0
        assert s["cost_per_10k_requests"] == pytest.approx(10_000 / s["requests_per_s"] * 2.0 / 3600)
    assert "cost / 10k req" in (out / "report.md").read_text()
    kv, safe = systems["kv3d"], systems["kv3d_safe"]
    assert kv["hit_rate"] > 0 and kv["ttft_p50_hit_s"] > 0 and kv["ttft_p50_miss_s"] > 0
    assert safe["hit_rate"] == 0 and safe["ttft_p50_hit_s"] is None
    assert kv["kv_bytes_per_session"] > 0 and kv["sessions_per_gb"] > 0
    assert kv["kv_by_tier"]["hot"]["sessions"] >= 1
    assert safe["sessions_per_gb"] == 0 and safe["kv_bytes_per_session"] is None
    assert kv["config"]["codec"] == "none" and safe["config"]["safe_mode"] is True
    assert rep["workload"]["requests"] == 8 and rep["workload"]["followups"] >= 1
    assert rep["machine"]["cpu_count"] and rep["machine"]["versions"]["llama_cpp_python"]
    assert rep["targets"]["sessions_per_gb"]["met"] is None       # llama_server was not run
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
    assert [r["label"] for r in summary["runs"]] == ["detector=exact", "detector=radix"]
    assert summary["failed"] == []
    for r in summary["runs"]:
        assert (sweep / r["job"] / "report.json").is_file()
        assert r["systems"][0]["name"] == "kv3d" and r["systems"][0]["requests_per_s"] > 0
    reports = [json.loads((sweep / r["job"] / "report.json").read_text()) for r in summary["runs"]]
    assert [rep["config"]["detector"]["name"] for rep in reports] == ["exact", "radix"]
    md = (sweep / "summary.md").read_text()
    assert "| detector=exact | kv3d |" in md and "| detector=radix | kv3d |" in md
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
    assert rep["baseline"] == "llamacpp_peer" and all(v is not None for v in rep["ratios"].values())
    assert rep["targets"]["tokens_per_s"]["met"] is None          # the targets are against llama_server
    assert peer["config"]["cache_bytes"] == 64 * 2**20 and peer["config"]["logits_all"] is False


def test_bench_against_llama_server(tmp_path):
    """llama.cpp's llama-server (the CPU build scripts/build_llama.sh made) on the default model: the
    baseline of the ratios; no request refused or failed; its memory read from /slots and its log."""
    out = tmp_path / "run"
    bench([*SMALL, "requests=6", "systems=[kv3d,llama_server,llama_server_unified]",
           "llama_server.cache_ram_mb=64", f"hydra.run.dir={out}"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["baseline"] == "llama_server"
    systems = {s["name"]: s for s in rep["systems"]}
    for name in ("llama_server", "llama_server_unified"):
        s = systems[name]
        for key in report.STABLE_SYSTEM_KEYS:
            assert key in s, (name, key)
        assert s["errors"] == 0 and s["requests"] == 6 and s["tokens_per_s"] > 0
        assert s["rss_bytes"] > 50 * 2**20 and s["kv_bytes_per_session"] > 0 and s["sessions_per_gb"] > 0
        assert s["hit_rate"] is not None            # it reports cached_tokens in streamed usage
        cfg = s["config"]
        assert cfg["parallel"] == 2 and cfg["cache_ram_mb"] == 64 and cfg["threads"] == 1
        assert cfg["kv_unified"] is (name == "llama_server_unified")
        mem = s["llama_server_memory"]
        assert mem["slots"] == 2 and mem["slots_used"] >= 1
        assert mem["slot_kv_bytes"] == cfg["ctx_total"] * mem["kv_bytes_per_token"]
        assert "Context size has been exceeded" not in (out / f"{name}.log").read_text()
    assert all(v is not None for v in rep["ratios"].values())
    assert set(rep["ratios_by_system"]) == {"llama_server", "llama_server_unified"}
    for key in ("sessions_per_gb", "tokens_per_s", "ttft_p50"):
        assert rep["targets"][key]["met"] in (True, False) and rep["targets"][key]["why"]
    md = (out / "report.md").read_text()
    assert "| llama_server |" in md and "Ratios (kv3d / llama_server)" in md


def test_bench_token_id_prompts_against_llama_server(tmp_path):
    """The GPU side-by-side workload's shape (token-id prompts on /v1/completions, new sessions
    first, then second turns), small, on the CPU: TTFT by kind for both servers, no failure."""
    out = tmp_path / "run"
    bench([*SMALL, "requests=9", "families=1", "turns=0.34", "followups_last=true", "prompts=token_ids",
           "temperature=0", "systems=[kv3d,llama_server]", "llama_server.cache_ram_mb=64", f"hydra.run.dir={out}"])
    rep = json.loads((out / "report.json").read_text())
    for s in rep["systems"]:
        assert s["errors"] == 0 and s["requests"] == 9 and s["completion_tokens"] > 0, (s["name"], s.get("first_errors"))
        assert s["n_resume"] == 3 and s["n_shared"] + s["n_own"] == 6
        assert s["ttft_p50_resume_s"] > 0 and s["ttft_p95_turn1_s"] > 0
    kv = next(s for s in rep["systems"] if s["name"] == "kv3d")
    assert kv["hit_rate"] > 0


def test_stored_bytes_per_session_are_the_warm_tiers_else_the_cold_tiers():
    from kv3d_tools.bench.metrics import GIB, kv3d_memory

    stats = {"hot": {"bytes": 8_000_000, "sessions": 2},
             "warm": {"bytes": 3_000_000, "sessions": 3, "capacity_bytes": 10**9},
             "cold": {"bytes": 9_000_000, "sessions": 4}}
    m = kv3d_memory(stats)
    assert m["stored_bytes_per_session"] == 1_000_000 and m["stored_sessions_per_gb"] == GIB / 1_000_000
    assert m["kv_bytes_per_session"] == 11_000_000 / 5                # hot + warm, as before
    del stats["warm"]
    assert kv3d_memory(stats)["stored_bytes_per_session"] == 9_000_000 / 4
    assert kv3d_memory({"hot": {"bytes": 1, "sessions": 1}})["stored_bytes_per_session"] is None
