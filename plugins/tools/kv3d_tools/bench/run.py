"""One benchmark run: generate the workload, run it against every configured
system in turn (same model, same requests), measure, write the report.

Files written to the run's output directory::

    report.json  report.md  ttft.png  memory_per_session.png  sessions_per_gb.png
    requests.jsonl           one line per request and system (timings, tokens, hit, error)
    <system>.log             each server's output
    peer_state.json          the peer's per-conversation state measurement (when it ran)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from kv3d_tools.bench import metrics as figures
from kv3d_tools.bench import cluster, plots, report
from kv3d_tools.bench.driver import DriveResult, drive
from kv3d_tools.bench import llama_server as ls_peer
from kv3d_tools.bench.systems import (KV3D, KV3D_SAFE, LLAMA_SERVER_UNIFIED, LLAMA_SERVERS, PEER, SYSTEMS, BenchError,
                                     kv3d_server, llama_server_process, peer_available, peer_server)
from kv3d_tools.bench.workload import Workload, WorkloadSpec, context_tokens_needed, generate

log = logging.getLogger("kv3d.bench")

#: top-level keys of the serve configuration: overrides of these go to `kv3d serve`
SERVE_ROOTS = ("server", "model", "cache", "scheduler", "backend", "detector", "codec", "tier", "safe_mode")


def override_key(o: str) -> str:
    return o.partition("=")[0].lstrip("+~")


def serve_overrides(overrides: list[str]) -> list[str]:
    """The overrides that configure the kv3d server (everything but bench keys)."""
    return [o for o in overrides if override_key(o).split(".")[0] in SERVE_ROOTS]


def workload_spec(cfg: DictConfig) -> WorkloadSpec:
    return WorkloadSpec(requests=int(cfg.requests), shared_ratio=float(cfg.shared_ratio), families=int(cfg.families),
                        system_prompt_tokens=int(cfg.system_prompt_tokens), unique_tokens=int(cfg.unique_tokens),
                        turns=float(cfg.turns), seed=int(cfg.seed), max_turns=int(cfg.max_turns),
                        followup_gap=int(cfg.followup_gap), followups_last=bool(cfg.followups_last),
                        branch_regenerate=float(cfg.get("branch_regenerate", 0.0)),
                        branch_fork=float(cfg.get("branch_fork", 0.0)),
                        branch_min_turns=int(cfg.get("branch_min_turns", 1)))


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def token_counter(model_path: str) -> Callable[[str], int]:
    """The model's own tokenizer (vocabulary only, no weights)."""
    import llama_cpp

    with _quiet_stderr():   # llama.cpp prints context warnings even with verbose=False
        vocab = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def vocab_size(model_path: str) -> int:
    import llama_cpp

    with _quiet_stderr():
        vocab = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    return int(vocab.n_vocab())


def resolve_model(cfg: DictConfig) -> tuple[str, str]:
    from kv3d_backend_llamacpp.model_files import resolve_model as resolve

    path, model_id = resolve(cfg.model.path, cfg.model.id)
    return str(path), model_id


def _threads(cfg: DictConfig) -> int:
    return int(cfg.server.threads) if cfg.server.threads else (os.cpu_count() or 1)


def kv3d_config(cfg: DictConfig, safe: bool) -> dict[str, Any]:
    return {"codec": cfg.codec.name, "tier": cfg.tier.name, "detector": cfg.detector.name,
            "threads": cfg.server.threads, "gpu_hot_mb": cfg.cache.gpu_hot_mb, "ram_warm_mb": cfg.cache.ram_warm_mb,
            "n_seq_max": cfg.scheduler.n_seq_max, "max_running": cfg.scheduler.max_running,
            "safe_mode": bool(safe or cfg.safe_mode)}


def peer_settings(cfg: DictConfig, spec: WorkloadSpec) -> dict[str, Any]:
    p = cfg.peer
    n_ctx = int(p.n_ctx) if p.n_ctx else context_tokens_needed(spec, int(cfg.max_tokens))
    n_ctx = max(512, -(-n_ctx // 256) * 256)
    cache_mb = float(p.cache_mb) if p.cache_mb else float(cfg.cache.gpu_hot_mb) + float(cfg.cache.ram_warm_mb)
    return {"n_ctx": n_ctx, "n_threads": _threads(cfg), "n_batch": int(p.n_batch), "logits_all": bool(p.logits_all),
            "cache_bytes": int(cache_mb * (1 << 20)), "cache_type": "ram"}


def llama_server_settings(cfg: DictConfig, spec: WorkloadSpec, unified: bool) -> "ls_peer.LlamaServerSettings":
    """llama-server's best settings for this workload: a slot per client, a per-slot context that
    fits the longest conversation, its RAM prompt cache sized to kv3d's warm budget, kv3d's
    threads and batch sizes, the same GPU offload."""
    c = cfg.llama_server
    per_slot = int(c.ctx_per_slot) if c.ctx_per_slot else context_tokens_needed(spec, int(cfg.max_tokens))
    return ls_peer.LlamaServerSettings(
        parallel=int(c.parallel) if c.parallel else int(cfg.concurrency),
        ctx_per_slot=max(512, -(-per_slot // 256) * 256),
        threads=_threads(cfg),
        n_batch=int(cfg.backend.n_batch), n_ubatch=int(cfg.backend.n_ubatch),
        cache_ram_mb=int(c.cache_ram_mb) if c.cache_ram_mb is not None else int(cfg.cache.ram_warm_mb),
        unified=unified,
        n_gpu_layers=_gpu_layers(cfg), flash_attn=str(cfg.backend.flash_attn),
        extra_args=tuple(str(a) for a in (c.extra_args or [])))


def _gpu_layers(cfg: DictConfig) -> int:
    """``backend.n_gpu_layers`` as kv3d's backend resolves it, for llama-server's ``--n-gpu-layers``."""
    from kv3d_backend_llamacpp.backend import resolve_gpu_layers

    return resolve_gpu_layers(cfg.backend.n_gpu_layers)


def _kv_bytes_per_token(model_path: str, cfg: DictConfig) -> int:
    from kv3d_backend_llamacpp.gguf_meta import kv_bytes_per_token, read_gguf

    return kv_bytes_per_token(read_gguf(model_path, tensors=False), str(cfg.backend.type_k), str(cfg.backend.type_v))


def _write_requests(path: Path, name: str, run: DriveResult, round_: int = 0) -> None:
    with path.open("a", encoding="utf-8") as f:
        for r in run.results:
            f.write(json.dumps({"system": name, "round": round_, "index": r.index, "session": r.session, "turn": r.turn,
                                "family": r.family, "reusable": r.reusable, "start_s": r.start_s, "ttft_s": r.ttft_s,
                                "latency_s": r.latency_s, "prompt_tokens": r.prompt_tokens,
                                "completion_tokens": r.completion_tokens, "cached_tokens": r.cached_tokens,
                                "hit": r.hit, "finish_reason": r.finish_reason, "error": r.error}) + "\n")


def _typical_conversations(run: DriveResult, n: int = 3) -> list[list[dict]]:
    """Messages of the ``n`` successful requests closest to the median prompt size."""
    ok = [r for r in run.ok if r.index in run.messages]
    if not ok:
        return []
    size = {r.index: sum(len(m["content"]) for m in run.messages[r.index]) for r in ok}
    med = statistics.median(size.values())
    chosen = sorted(ok, key=lambda r: (abs(size[r.index] - med), r.index))[:n]
    return [run.messages[r.index] for r in chosen]


def measure_peer_state(out: Path, model_path: str, run: DriveResult, settings: dict, cfg: DictConfig) -> dict:
    spec = {"model_path": model_path, "conversations": _typical_conversations(run),
            "n_ctx": settings["n_ctx"], "n_batch": settings["n_batch"], "n_threads": settings["n_threads"],
            "logits_all": settings["logits_all"], "max_tokens": int(cfg.max_tokens),
            "temperature": float(cfg.temperature), "seed": int(cfg.seed)}
    if not spec["conversations"]:
        return {"error": "no successful peer request to measure"}
    spec_path = out / "peer_state_spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "kv3d_tools.bench.peer_state", str(spec_path)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise BenchError(f"measuring the peer's cache state failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    (out / "peer_state.json").write_text(json.dumps(state, indent=2))
    spec_path.unlink()
    return state


def quality(cfg: DictConfig, overrides: list[str], cache_dir: Path | None) -> tuple[dict | None, str | None]:
    """``kv3d quality codec=<codec>``'s last stdout line (JSON), or None and why."""
    codec = str(cfg.codec.name)
    if not cfg.quality:
        return None, "quality=false"
    passed = [o for o in overrides if override_key(o).split(".")[0] in ("model", "codec", "backend")
              or override_key(o) == "server.threads"]
    passed = [o for o in passed if override_key(o) != "codec"] + [f"codec={codec}"]
    cache_file = None
    if cache_dir is not None:
        key = "_".join(sorted(passed)).replace("/", "_").replace("+", "").replace("=", "-")
        cache_file = cache_dir / f"quality-{key}.json"
        if cache_file.is_file():
            return json.loads(cache_file.read_text()), None
    argv = [sys.executable, "-m", "kv3d_core.cli", "quality", *passed, *list(cfg.quality_args or [])]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=float(cfg.quality_timeout_s),
                              env={**os.environ, "KV3D_USER_CONFIG": "none"})
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(argv[2:])}` ran past {cfg.quality_timeout_s}s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return None, f"`{' '.join(argv[2:])}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None, f"`{' '.join(argv[2:])}`: last stdout line is not JSON: {lines[-1][:200]}"
    if cache_file is not None:
        cache_file.write_text(json.dumps(result))
    return result, None


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _run_system(name: str, cfg: DictConfig, wl: Workload, out: Path, overrides: list[str], model_path: str,
                model_id: str, peer: dict, spec: WorkloadSpec, n_vocab: int) -> tuple[dict, DriveResult]:
    ls_settings = None
    if name == PEER:
        srv = peer_server(model_path, model_id, n_ctx=peer["n_ctx"], n_threads=peer["n_threads"],
                          n_batch=peer["n_batch"], cache_bytes=peer["cache_bytes"], logits_all=peer["logits_all"],
                          log_path=out / f"{name}.log")
    elif name in LLAMA_SERVERS:
        binary, why = ls_peer.find_binary(cfg.llama_server.binary)
        if binary is None:
            raise BenchError(f"{name} cannot run: {why}")
        ls_settings = llama_server_settings(cfg, spec, unified=name == LLAMA_SERVER_UNIFIED)
        srv = llama_server_process(name, binary, ls_settings, model_path, model_id, out / f"{name}.log")
    elif name in cluster.SYSTEMS:
        srv = cluster.Cluster(name, cfg, serve_overrides(overrides), out)
    else:
        srv = kv3d_server(name, serve_overrides(overrides), out / f"{name}.log")
    log.info("starting %s: %s", name, " ".join(srv.argv))
    with srv.start(timeout_s=float(cfg.start_timeout_s)):
        served = srv.get_json("/v1/models")["data"][0]["id"] if name != PEER else model_id
        load_start = _loadavg()
        run = drive(srv.url, served, wl, concurrency=int(cfg.concurrency), max_tokens=int(cfg.max_tokens),
                    temperature=float(cfg.temperature), seed=int(cfg.seed), usage_in_stream=name != PEER,
                    timeout_s=float(cfg.request_timeout_s), progress_desc=name if cfg.progress else None,
                    sampling=OmegaConf.to_container(cfg.sampling) if cfg.get("sampling") else None,
                    token_ids_vocab=n_vocab if cfg.prompts == "token_ids" else None,
                    session_header=cluster.SESSION_HEADER if cfg.session_header else None)
        sys_report: dict[str, Any] = {"name": name, **figures.request_figures(run)}
        sys_report.update(figures.cost_figures(sys_report, float(cfg.analytics.gpu_hour_price)))
        # the machine may be shared: its load while this system ran puts the timings in context
        sys_report["loadavg_1m_start_end"] = [load_start, _loadavg()]
        sys_report["rss_bytes"] = srv.rss()
        if name in LLAMA_SERVERS:
            text = srv.log_path.read_text(errors="replace")
            refused = ls_peer.refused_requests(text)
            if refused:
                raise BenchError(f"{name} refused {refused} request(s) for its context size (see {srv.log_path}): a "
                                 "refused request is a failed run; raise llama_server.ctx_per_slot")
            sys_report.update(ls_peer.memory_figures(srv.get_json("/slots"), text, _kv_bytes_per_token(model_path, cfg),
                                                     ls_settings))
        elif name in cluster.SYSTEMS:
            sys_report.update(srv.figures(run, wl, cluster.cached_tokens_rounding(cfg)))
        elif name != PEER:
            stats = srv.get_json("/debug/stats")
            sys_report.update(figures.kv3d_memory(stats))
            sys_report.update(figures.kv3d_counters(srv.get_text("/metrics")))
            sys_report["server_stats"] = stats
        sys_report["rss_peak_bytes"] = srv.rss_peak
    if srv.proc is not None and srv.proc.returncode not in (0, -15, None):
        log.warning("%s exited with %s; see %s", name, srv.proc.returncode, srv.log_path)
    if ls_settings is not None:
        sys_report["ls_settings"] = ls_settings.as_dict()
    return sys_report, run


def run_bench(cfg: DictConfig, out: Path, overrides: list[str], quality_cache_dir: Path | None = None) -> dict:
    """Run the benchmark ``cfg`` describes; write and return the report."""
    from kv3d_core.config import validated

    validated(cfg)   # the serve part, exactly as `kv3d serve` would check it
    systems = list(cfg.systems)
    _check_systems(cfg, systems)
    skipped = {n: why for n in systems if n in cluster.SYSTEMS and (why := cluster.unavailable(n, cfg))}
    for n, why in skipped.items():
        log.warning("%s skipped: %s", n, why)
    systems = [n for n in systems if n not in skipped]
    if not systems:
        raise BenchError(f"every system was skipped: {skipped}")
    out.mkdir(parents=True, exist_ok=True)
    model_path, model_id = resolve_model(cfg)
    machine = report.machine_info(model_path, model_id)
    spec = workload_spec(cfg)
    if cfg.prompts not in ("chat", "token_ids"):
        raise BenchError(f"prompts={cfg.prompts!r}: use chat or token_ids")
    t = time.perf_counter()
    n_vocab = vocab_size(model_path)
    wl = generate(spec, token_counter(model_path)) if cfg.prompts == "chat" else generate(spec, texts=False)
    log.info("workload: %s (generated in %.1fs)", wl.summary(), time.perf_counter() - t)
    peer = peer_settings(cfg, spec)
    (out / "requests.jsonl").unlink(missing_ok=True)

    rounds = int(cfg.rounds)
    if rounds < 1:
        raise BenchError(f"rounds={rounds}: run at least one round")
    by_round = [_run_round(r, rounds, systems, cfg, wl, out, overrides, model_path, model_id, peer, spec, n_vocab)
                for r in range(rounds)]
    median_round = _median_round(by_round, systems)
    results = {name: by_round[median_round][name][0] for name in systems}
    chosen_run = {name: by_round[median_round][name][1] for name in systems}

    peer_memory: dict[str, Any] = {}
    if PEER in chosen_run:
        state = measure_peer_state(out, model_path, chosen_run[PEER], peer, cfg)
        peer_memory = figures.peer_memory(state)
        results[PEER].update(peer_memory)
    _add_quality(results, cfg, overrides, quality_cache_dir)

    workload = wl.summary()
    targets, ratios = report.targets_and_ratios(results, workload, int(cfg.concurrency))
    targets.update(cluster.targets(results, skipped))
    round_ratios = []
    for this in by_round:              # kv3d against the peer of the same round
        figs = {n: ({**rep_, **peer_memory} if n == PEER else rep_) for n, (rep_, _) in this.items()}
        round_ratios.append(report.targets_and_ratios(figs, workload, int(cfg.concurrency))[1])
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    rep = {
        "systems": [results[n] for n in systems],
        "baseline": report.baseline_of(results),
        "ratios": ratios,
        "ratios_by_system": {n: report.ratios_against(results.get(KV3D), results[n]) for n in systems
                             if n != KV3D and KV3D in results},
        "cluster": cluster.comparison(results),
        "skipped": skipped,
        "rounds": report.rounds_summary([{n: rep_ for n, (rep_, _) in this.items()} for this in by_round],
                                        round_ratios, median_round),
        "workload": workload,
        "machine": machine,
        "targets": targets,
        "concurrency": int(cfg.concurrency),
        "max_tokens": int(cfg.max_tokens),
        "temperature": float(cfg.temperature),
        "overrides": list(overrides),
        "out_dir": str(out),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    report.write_json(out / "report.json", rep)
    names = plots.run_plots(rep, out)
    report.write_markdown(out / "report.md", rep, names)
    log.info("report: %s", out / "report.md")
    return rep


def _check_systems(cfg: DictConfig, systems: list[str]) -> None:
    """Every system named exists and can run here (its peer server installed or built)."""
    unknown = [s for s in systems if s not in (*SYSTEMS, *cluster.SYSTEMS)]
    if unknown or not systems:
        raise BenchError(f"systems={systems}: each must be one of {[*SYSTEMS, *cluster.SYSTEMS]}")
    if PEER in systems and (why := peer_available()) is not None:
        raise BenchError(f"{PEER} cannot run: {why} (or leave it out: systems=[kv3d,kv3d_safe])")
    for name in LLAMA_SERVERS:
        if name in systems and (why := ls_peer.find_binary(cfg.llama_server.binary)[1]) is not None:
            raise BenchError(f"{name} cannot run: {why}")


def _run_round(r: int, rounds: int, systems: list[str], cfg: DictConfig, wl, out: Path, overrides: list[str],
               model_path: str, model_id: str, peer: dict, spec, n_vocab: int) -> dict[str, tuple[dict, DriveResult]]:
    """Round ``r``: the systems in turn (a machine whose speed drifts slows each alike), each
    system's report (with the configuration it ran) and its run."""
    this: dict[str, tuple[dict, DriveResult]] = {}
    for name in systems:
        sys_report, run = _run_system(name, cfg, wl, out, overrides, model_path, model_id, peer, spec, n_vocab)
        _write_requests(out / "requests.jsonl", name, run, r)
        sys_report["round"] = r
        if name == PEER:
            sys_report["config"] = dict(peer)
        elif name in LLAMA_SERVERS:
            sys_report["config"] = sys_report.pop("ls_settings")
        else:
            sys_report["config"] = kv3d_config(cfg, safe=name == KV3D_SAFE)
        if name in cluster.SYSTEMS:
            sys_report["config"].update(sys_report.pop("cluster_config"))
        this[name] = (sys_report, run)
        log.info("%s%s: %d requests in %.1fs, hit rate %s, %s tok/s", name,
                 f" (round {r + 1}/{rounds})" if rounds > 1 else "", sys_report["requests"], run.wall_s,
                 sys_report.get("hit_rate"), sys_report.get("tokens_per_s"))
    return this


def _median_round(by_round: list[dict[str, tuple[dict, DriveResult]]], systems: list[str]) -> int:
    """The round whose figures are reported: the median by kv3d's tokens/s over the baseline's
    of the same round (else by the first system's tokens/s), so the report's ratios are one
    round's; of an even count, the lower middle one."""
    base = report.baseline_of({n: {} for n in systems})

    def rank(i: int) -> float:
        this = by_round[i]
        if KV3D in this and base in this:
            return (this[KV3D][0].get("tokens_per_s") or 0.0) / (this[base][0].get("tokens_per_s") or float("inf"))
        return this[systems[0]][0].get("tokens_per_s") or 0.0

    return sorted(range(len(by_round)), key=rank)[(len(by_round) - 1) // 2]


def _add_quality(results: dict[str, dict], cfg: DictConfig, overrides: list[str],
                 quality_cache_dir: Path | None) -> None:
    """kv3d's codec quality (``kv3d quality``) into its report, and the keys every system's
    report carries, None where a system has no such figure."""
    q, q_why = quality(cfg, overrides, quality_cache_dir) if KV3D in results else (None, None)
    for name, s in results.items():
        s.setdefault("kv_bytes_per_session", None)
        s.setdefault("sessions_per_gb", None)
        s.setdefault("restore_p95_warm_s", None)
        s.setdefault("restore_p95_cold_s", None)
        s["quality"] = q if name == KV3D else None
        if name == KV3D and q is None:
            s["quality_note"] = q_why
