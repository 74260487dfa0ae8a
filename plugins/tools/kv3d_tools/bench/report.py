"""The benchmark report: ``report.json`` (stable keys) and ``report.md``.

``report.json``::

    {"systems":  [{"name", "hit_rate", "ttft_p50_hit_s", "ttft_p50_miss_s", "ttft_p95_s",
                   "requests_per_s", "tokens_per_s", "cost_per_10k_requests", "kv_bytes_per_session", "rss_bytes",
                   "sessions_per_gb", "restore_p95_warm_s", "restore_p95_cold_s", "quality",
                   "config", ...}, ...],
     "baseline": "llama_server",      # what "ratios" divide by (llama_server, else the first other peer run)
     "ratios":   {"sessions_per_gb", "tokens_per_s", "ttft_p50"},   # kv3d / baseline
     "ratios_by_system": {system: {same keys}},                     # kv3d / each other system
     "workload": {...}, "machine": {...},
     "targets":  {"sessions_per_gb" | "tokens_per_s" | "ttft_p50" (each kv3d / llama_server) |
                  "ttft_hit_vs_miss": {"goal", "value", "threshold", "met", "why"}},
     "rounds":   {"count", "chosen": round, "systems": {system: [{"round", "tokens_per_s",
                   "ttft_p50_s", "ttft_p50_hit_s", "ttft_p50_miss_s", "wall_s", "loadavg_1m_start_end"}]},
                  "ratios": [{per-round ratios}], "ratio_range": {ratio: [min, max]}},
     "cluster":  {"ratios": {"ttft_p50_resume", "tokens_per_s", "resume_state_hit_rate", ...},
                  "route_key", "systems"} | null,   # kv3d_cluster / kv3d_rr (bench/cluster.py)
     "skipped":  {system: why},                     # replica systems whose haproxy/redis-server is missing
     "overrides": [...], "out_dir": "..."}

With ``rounds`` > 1 every system runs once per round, in turn; the figures reported are
those of the median round (by kv3d's tokens/s over the peer's of that round; without the
peer, by the first system's tokens/s), and ``rounds`` shows every round and its ratios
(kv3d against the peer of the same round: a noisy machine drifts between rounds).

A ratio or target that cannot be computed (the peer not run, no hits) is null
with the reason in ``why``. Targets are never adjusted to the results: a missed
one says so and why, from the measured figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

STABLE_SYSTEM_KEYS = ("name", "hit_rate", "ttft_p50_hit_s", "ttft_p50_miss_s", "ttft_p95_s", "requests_per_s",
                      "tokens_per_s", "cost_per_10k_requests", "kv_bytes_per_session", "rss_bytes", "sessions_per_gb",
                      "restore_p95_warm_s", "restore_p95_cold_s", "quality", "config")
REPORT_KEYS = ("systems", "ratios", "workload", "machine", "targets")
TARGET_TTFT_HIT_FRACTION = 0.1


def machine_info(model_path: str, model_id: str) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "model": model_id,
        "model_path": model_path,
        "model_bytes": Path(model_path).stat().st_size if Path(model_path).is_file() else None,
        "loadavg_start": load,
        "versions": {d: version(d) for d in ("kv3d", "llama_cpp_python", "openai", "hydra-core", "numpy")},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def _fmt(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB"):
            if abs(x) < 1024 or u == "GiB":
                return f"{x:.1f} {u}" if u != "B" else f"{x:.0f} B"
            x /= 1024
    if unit == "s":
        return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"
    return f"{x:.{digits}g}{unit}"


BASELINES = ("llama_server", "llama_server_unified", "llamacpp_peer")
TARGET_VS_LLAMA_SERVER_TOKENS = 1.0      # tokens/s >= 1.0x llama-server's (issue 15, CPU)
TARGET_VS_LLAMA_SERVER_TTFT = 0.5        # TTFT p50 <= 0.5x llama-server's
TARGET_VS_LLAMA_SERVER_SESSIONS = 4.0    # resumable sessions per GiB >= 4x llama-server's


def baseline_of(systems: dict[str, dict]) -> str | None:
    """The system kv3d's ratios are measured against: llama.cpp's llama-server when it ran."""
    return next((b for b in BASELINES if b in systems), None)


def ratios_against(k: dict | None, other: dict | None) -> dict[str, float | None]:
    return {
        "sessions_per_gb": _ratio(k and k.get("sessions_per_gb"), other and other.get("sessions_per_gb")),
        "tokens_per_s": _ratio(k and k.get("tokens_per_s"), other and other.get("tokens_per_s")),
        "ttft_p50": _ratio(k and k.get("ttft_p50_s"), other and other.get("ttft_p50_s")),
    }


def targets_and_ratios(systems: dict[str, dict], workload: dict, concurrency: int) -> tuple[dict, dict]:
    """Targets and the ratios kv3d / baseline (see :func:`baseline_of`). The speed and memory
    targets are against ``llama_server`` (the server a user would pick instead); they are not
    evaluated when it did not run."""
    k = systems.get("kv3d")
    base_name = baseline_of(systems)
    base = systems.get(base_name) if base_name else None
    ratios = ratios_against(k, base)
    ls = systems.get("llama_server")
    vs_ls = ratios_against(k, ls)
    targets: dict[str, dict[str, Any]] = {}
    no_k = "kv3d was not among the systems run"
    no_ls = "llama_server was not among the systems run"

    def against(key: str, goal: str, threshold: float, higher_is_better: bool, facts: str, miss_why: str) -> None:
        t: dict[str, Any] = {"goal": goal, "threshold": threshold, "value": vs_ls[key], "against": "llama_server"}
        if k is None or ls is None:
            t.update(met=None, why=no_k if k is None else no_ls)
        elif vs_ls[key] is None:
            t.update(met=None, why=f"no {key} figure for kv3d or llama_server")
        else:
            r = vs_ls[key]
            met = r >= threshold if higher_is_better else r <= threshold
            t.update(met=met, why=f"{r:.2f}x: {facts}" + ("" if met else f". {miss_why}"))
        targets[key] = t

    unique = 1.0 - float(workload.get("shared_share", 0.0))
    mem_facts, speed_facts, ttft_facts = _facts(k, ls, concurrency)
    against("sessions_per_gb", f"kv3d sessions_per_gb >= {TARGET_VS_LLAMA_SERVER_SESSIONS:g}x llama_server's",
            TARGET_VS_LLAMA_SERVER_SESSIONS, True, mem_facts,
            f"Only shared system prompts are stored once; the {unique:.0%} of sessions with a prompt of their own "
            "keep it whole in kv3d as well")
    against("tokens_per_s", f"kv3d tokens_per_s >= {TARGET_VS_LLAMA_SERVER_TOKENS:g}x llama_server's",
            TARGET_VS_LLAMA_SERVER_TOKENS, True, speed_facts,
            "Both run the same llama.cpp build on the same cores; kv3d's scheduler and sampling run in Python "
            "between llama_decode calls")
    against("ttft_p50", f"kv3d ttft_p50 <= {TARGET_VS_LLAMA_SERVER_TTFT:g}x llama_server's",
            TARGET_VS_LLAMA_SERVER_TTFT, False, ttft_facts,
            "A hit still prefills everything after the cached prefix, and llama-server reuses shared prefixes "
            "too (LCP slot selection and its RAM prompt cache)")
    targets["ttft_hit_vs_miss"] = _hit_vs_miss_target(k, concurrency)
    return targets, ratios


def _facts(k: dict | None, ls: dict | None, concurrency: int) -> tuple[str, str, str]:
    """The figures behind the memory, speed and TTFT targets' verdicts ("" without both systems)."""
    if k is None or ls is None:
        return "", "", ""
    tiers = k.get("kv_by_tier") or {}
    tier_txt = ", ".join(f"{n} {_fmt(v.get('bytes_per_session'), 'B')}/session x {v.get('sessions')}"
                         for n, v in tiers.items() if v.get("sessions"))
    lm = ls.get("llama_server_memory") or {}
    mem_facts = (f"kv3d holds {_fmt(k.get('kv_bytes_per_session'), 'B')} of KV per resumable session ({tier_txt}; "
                 f"codec {k.get('config', {}).get('codec')}); llama-server "
                 f"{_fmt(ls.get('kv_bytes_per_session'), 'B')} per conversation ({lm.get('slots_used')} slots used "
                 f"of {lm.get('slots')}, {_fmt(lm.get('slot_kv_bytes'), 'B')} of slot KV, "
                 f"{lm.get('ram_cache_prompts')} prompts in {_fmt(lm.get('ram_cache_bytes'), 'B')} of RAM cache)")
    speed_facts = (f"kv3d {_fmt(k.get('tokens_per_s'))} tok/s vs llama_server {_fmt(ls.get('tokens_per_s'))} tok/s "
                   f"at concurrency {concurrency}; kv3d's mean decode batch held "
                   f"{_fmt(k.get('batch_sequences_mean'))} sequences in "
                   f"{_fmt(k.get('step_microbatches_mean'))} passes of the model")
    ttft_facts = (f"TTFT p50 kv3d {_fmt(k.get('ttft_p50_s'), 's')} (hits {_fmt(k.get('ttft_p50_hit_s'), 's')}, "
                  f"misses {_fmt(k.get('ttft_p50_miss_s'), 's')}) vs llama_server {_fmt(ls.get('ttft_p50_s'), 's')}")
    return mem_facts, speed_facts, ttft_facts


def _hit_vs_miss_target(k: dict | None, concurrency: int) -> dict[str, Any]:
    """kv3d's own target: TTFT p50 of hits <= 1/10 of misses'."""
    no_k = "kv3d was not among the systems run"
    t: dict[str, Any] = {"goal": f"kv3d ttft_p50_hit_s <= {TARGET_TTFT_HIT_FRACTION:g} x ttft_p50_miss_s",
                         "threshold": TARGET_TTFT_HIT_FRACTION}
    if k is None:
        t.update(value=None, met=None, why=no_k)
    elif k.get("ttft_p50_hit_s") is None or k.get("ttft_p50_miss_s") is None:
        t.update(value=None, met=None, why=f"need both hits and misses (hits {k.get('n_hit')}, misses {k.get('n_miss')})")
    else:
        h, m = k["ttft_p50_hit_s"], k["ttft_p50_miss_s"]
        frac = h / m if m else None
        t["value"] = frac
        un_h, pm = k.get("uncached_prompt_tokens_mean_hit"), k.get("prompt_tokens_mean_miss")
        facts = (f"hits' p50 {_fmt(h, 's')} vs misses' {_fmt(m, 's')} ({frac:.2f}); hits prefilled "
                 f"{_fmt(un_h, '', 4)} uncached prompt tokens on average, misses {_fmt(pm, '', 4)}")
        if frac is not None and frac <= TARGET_TTFT_HIT_FRACTION:
            t.update(met=True, why=facts)
        else:
            prefill = (pm / un_h) if un_h and pm else None
            t.update(met=False, why=(
                f"{facts}: a hit still prefills everything after the cached prefix, so at these prompt sizes "
                f"the prefill work shrinks only {_fmt(prefill, 'x', 3)}; and at concurrency {concurrency} hits "
                f"share decode steps with misses' prefill chunks, which their first token waits for"))
    return t


def write_json(path: Path, report: dict) -> None:
    missing = [k for k in REPORT_KEYS if k not in report]
    for s in report.get("systems", []):
        missing += [f"systems[{s.get('name')}].{k}" for k in STABLE_SYSTEM_KEYS if k not in s]
    if missing:
        raise ValueError(f"report is missing stable keys: {missing}")
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


ROUND_KEYS = ("tokens_per_s", "ttft_p50_s", "ttft_p50_hit_s", "ttft_p50_miss_s", "wall_s", "loadavg_1m_start_end")


def rounds_summary(round_figures: list[dict[str, dict]], round_ratios: list[dict], chosen: int) -> dict:
    """``report.json``'s ``rounds``: every round's headline figures per system
    (``round_figures[r][system]``), the kv3d/peer ratios of each round and their range,
    and the round whose figures the report gives."""
    systems = list(round_figures[0]) if round_figures else []
    per_system = {n: [{"round": r, **{k: this[n].get(k) for k in ROUND_KEYS}} for r, this in enumerate(round_figures)]
                  for n in systems}
    rng: dict[str, list[float] | None] = {}
    for k in (round_ratios[0] if round_ratios else {}):
        vals = [r[k] for r in round_ratios if r.get(k) is not None]
        rng[k] = [min(vals), max(vals)] if vals else None
    return {"count": len(round_figures), "chosen": chosen, "systems": per_system, "ratios": round_ratios,
            "ratio_range": rng}


def system_table(systems: list[dict], label: str | None = None) -> list[str]:
    head = ("| " + ("run | " if label is not None else "") + "system | hit rate | TTFT p50 hit | TTFT p50 miss | "
            "TTFT p95 | req/s | gen tok/s | cost / 10k req | KV/session | sessions/GiB | stored/session | "
            "stored sessions/GiB | RSS | restore p95 warm | restore p95 cold | quality (mean KL) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in systems:
        q = s.get("quality") or {}
        hit = "n/a" if s.get("hit_rate") is None else f"{s['hit_rate']:.1%}"
        lines.append("| " + (f"{label} | " if label is not None else "") + " | ".join([
            s["name"], hit, _fmt(s.get("ttft_p50_hit_s"), "s"), _fmt(s.get("ttft_p50_miss_s"), "s"),
            _fmt(s.get("ttft_p95_s"), "s"), _fmt(s.get("requests_per_s")), _fmt(s.get("tokens_per_s")),
            _fmt(s.get("cost_per_10k_requests"), "", 3), _fmt(s.get("kv_bytes_per_session"), "B"), _fmt(s.get("sessions_per_gb"), "", 4),
            _fmt(s.get("stored_bytes_per_session"), "B"), _fmt(s.get("stored_sessions_per_gb"), "", 4),
            _fmt(s.get("rss_bytes"), "B"), _fmt(s.get("restore_p95_warm_s"), "s"),
            _fmt(s.get("restore_p95_cold_s"), "s"), _fmt(q.get("mean_kl"), "", 3)]) + " |")
    return lines


def _range_note(report: dict, key: str) -> str:
    rng = (report.get("rounds") or {}).get("ratio_range", {}).get(key)
    if not rng or (report.get("rounds") or {}).get("count", 1) < 2:
        return ""
    return f" (rounds: {_fmt(rng[0], 'x', 3)} to {_fmt(rng[1], 'x', 3)})"


def _rounds_lines(report: dict) -> list[str]:
    """The table of rounds, when there was more than one."""
    rounds = report.get("rounds") or {}
    if rounds.get("count", 1) < 2:
        return []
    names = list(rounds["systems"])
    head = "| round | " + " | ".join(f"{n} tok/s | {n} TTFT p50" for n in names) + " | tokens/s ratio |"
    lines = ["## Rounds", "",
             f"{rounds['count']} rounds, the systems in turn in each; the figures above are those of round "
             f"{rounds['chosen'] + 1}, the median one (by kv3d's tokens/s over the baseline's, else by the first "
             f"system's tokens/s; of an even count, the lower middle one).", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in range(rounds["count"]):
        cells = []
        for n in names:
            x = rounds["systems"][n][r]
            cells += [_fmt(x.get("tokens_per_s")), _fmt(x.get("ttft_p50_s"), "s")]
        ratio = rounds["ratios"][r].get("tokens_per_s") if r < len(rounds["ratios"]) else None
        lines.append(f"| {r + 1} | " + " | ".join(cells) + f" | {_fmt(ratio, 'x', 3)} |")
    return lines + [""]


def _cluster_lines(report: dict) -> list[str]:
    """The replica systems' section (kv3d_cluster / kv3d_rr), when they ran or were skipped."""
    from kv3d_tools.bench import cluster   # it imports the bench's other modules

    return cluster.markdown(report)


def write_markdown(path: Path, report: dict, plots: list[str]) -> None:
    w, m = report["workload"], report["machine"]
    lines = [
        "# kv3d benchmark", "",
        f"Model {m['model']} on {m['cpu_count']} CPU cores ({m['platform']}), python {m['python']}, "
        f"load average at start {m.get('loadavg_start')}.", "",
        f"Workload: {w['requests']} requests at concurrency {report['concurrency']}, {w['families']} shared "
        f"system prompts of ~{w['system_prompt_tokens']} tokens for {w['shared_share']:.0%} of requests, user "
        f"messages of ~{w['unique_tokens']} tokens, {w['followups']} follow-up turns, max_tokens "
        f"{report['max_tokens']}, seed {w['seed']}.", "",
        f"Overrides: `{' '.join(report.get('overrides') or []) or '(none)'}`", "",
        *system_table(report["systems"]), "",
        "1-minute load average at the start and end of each system's run (other processes share the "
        "machine when it exceeds the core count): " + ", ".join(
            f"{s['name']} {s.get('loadavg_1m_start_end')}" for s in report["systems"]) + ".", "",
        "Hit rate: share of requests with `usage.prompt_tokens_details.cached_tokens > 0` (llamacpp_peer reports no "
        "usage in streams: its TTFT is split by the workload's reusable label instead). sessions/GiB: " +
        "; ".join(f"{s['name']}: {s.get('sessions_per_gb_method')}" for s in report["systems"]
                  if s.get("sessions_per_gb_method")) + ". cost / 10k req: the run's wall time per answered "
        "request x 10,000, the machine billed at " + _fmt(next((s.get("price_per_device_hour") for s in
                                                               report["systems"]), None)) +
        " per device-hour (`analytics.gpu_hour_price`; the same machine for every system).", "",
        f"## Ratios (kv3d / {report.get('baseline') or 'n/a'})", "",
        *[f"- {k}: {_fmt(v, 'x', 3)}" + _range_note(report, k) for k, v in report["ratios"].items()], "",
        *[f"kv3d / {n}: " + ", ".join(f"{k} {_fmt(v, 'x', 3)}" for k, v in r.items())
          for n, r in (report.get("ratios_by_system") or {}).items() if n != report.get("baseline")], "",
        *_rounds_lines(report),
        *_cluster_lines(report),
        "## Targets", "",
    ]
    for name, t in report["targets"].items():
        status = {True: "MET", False: "MISSED", None: "not evaluated"}[t.get("met")]
        lines.append(f"- **{name}** ({t['goal']}): {status}. {t.get('why', '')}")
    lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    path.write_text("\n".join(lines))
