"""Per-system figures of one benchmark run, from the measured requests and the
server's own counters.

* latency and throughput from :class:`~kv3d_tools.bench.driver.DriveResult`;
* KV memory per resumable session from kv3d's ``/debug/stats`` (``hot``, and
  ``warm``/``cold`` when tiers are configured): ``sessions_per_gb`` counts the
  sessions held in memory (hot + warm) per GiB of the KV bytes those tiers hold
  (family snapshots included, so their cost is amortized over the sessions
  sharing them); the cold tier is on disk and reported apart; ``stored_bytes_per_session``
  (and ``stored_sessions_per_gb``): the warm tier's bytes (the cold tier's without one) per
  session it holds -- what the codec decides, blocks shared across sessions included;
* restore latency quantiles from the ``kv3d_restore_seconds`` histogram;
* for the peer, the per-conversation state measured by
  :mod:`kv3d_tools.bench.peer_state`.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from kv3d_tools.bench import prom
from kv3d_tools.bench.driver import DriveResult

GIB = 1 << 30


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def cost_figures(fig: dict[str, Any], price_per_hour: float) -> dict[str, Any]:
    """What 10,000 requests of this workload cost on the machine the system ran on, billed
    by the hour at ``price_per_hour`` (``analytics.gpu_hour_price``, the dashboard's setting):
    the run's wall time per answered request x 10,000 x price / 3600. Every system is billed
    the same machine for the time it took, so the ratio between systems is that of their
    request rates."""
    rate = fig.get("requests_per_s")
    return {"cost_per_10k_requests": 10_000 / rate * price_per_hour / 3600 if rate else None,
            "price_per_device_hour": price_per_hour}


def request_figures(run: DriveResult) -> dict[str, Any]:
    """Hit rate, TTFT quantiles (all, hits, misses), throughput."""
    ok = run.ok
    out: dict[str, Any] = {"requests": len(run.results), "errors": len(run.results) - len(ok),
                           "wall_s": run.wall_s}
    if run.usage_reported:
        hits = [r for r in ok if r.hit]
        misses = [r for r in ok if not r.hit]
        out["hit_rate"] = len(hits) / len(ok) if ok else None
        out["hit_source"] = "usage.prompt_tokens_details.cached_tokens > 0"
    else:   # no usage in the stream: split by what the workload makes reusable
        hits = [r for r in ok if r.reusable]
        misses = [r for r in ok if not r.reusable]
        out["hit_rate"] = None
        out["hit_source"] = "not reported by the server; TTFT split by the workload's reusable label"
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    ttft_hit = [r.ttft_s for r in hits if r.ttft_s is not None]
    ttft_miss = [r.ttft_s for r in misses if r.ttft_s is not None]
    out.update(
        ttft_p50_s=_pct(ttft, 50), ttft_p95_s=_pct(ttft, 95),
        ttft_p50_hit_s=_pct(ttft_hit, 50), ttft_p95_hit_s=_pct(ttft_hit, 95),
        ttft_p50_miss_s=_pct(ttft_miss, 50), ttft_p95_miss_s=_pct(ttft_miss, 95),
        n_hit=len(ttft_hit), n_miss=len(ttft_miss),
        latency_p50_s=_pct([r.latency_s for r in ok if r.latency_s is not None], 50),
        requests_per_s=len(ok) / run.wall_s if run.wall_s > 0 else None,
        completion_tokens=sum(r.completion_tokens for r in ok),
        tokens_per_s=sum(r.completion_tokens for r in ok) / run.wall_s if run.wall_s > 0 else None,
        tokens_source="usage.completion_tokens" if run.usage_reported else "streamed content chunks",
    )
    # by what the workload made each request, whatever the server reported: a new session of a
    # shared family after its first one, a new session with a prefix of its own, a later turn
    kinds = {"shared": [r for r in ok if r.turn == 0 and r.family is not None and r.reusable],
             "own": [r for r in ok if r.turn == 0 and (r.family is None or not r.reusable)],
             "resume": [r for r in ok if r.turn > 0]}
    for kind, rs in kinds.items():
        t = [r.ttft_s for r in rs if r.ttft_s is not None]
        out[f"ttft_p50_{kind}_s"], out[f"ttft_p95_{kind}_s"], out[f"n_{kind}"] = _pct(t, 50), _pct(t, 95), len(t)
    first = [r.ttft_s for r in ok if r.turn == 0 and r.ttft_s is not None]
    out["ttft_p95_turn1_s"] = _pct(first, 95)
    with_usage = [r for r in ok if r.prompt_tokens is not None]
    if with_usage:
        out["prompt_tokens_mean"] = statistics.fmean(r.prompt_tokens for r in with_usage)
        h = [r.prompt_tokens - (r.cached_tokens or 0) for r in with_usage if r.hit]
        m = [r.prompt_tokens for r in with_usage if not r.hit]
        out["uncached_prompt_tokens_mean_hit"] = statistics.fmean(h) if h else None
        out["prompt_tokens_mean_miss"] = statistics.fmean(m) if m else None
    if len(ok) < len(run.results):
        out["first_errors"] = sorted({r.error for r in run.results if r.error})[:5]
    return out


def kv3d_memory(stats: dict) -> dict[str, Any]:
    """KV bytes and resumable sessions per tier, and sessions per GiB of KV memory."""
    by_tier: dict[str, dict[str, Any]] = {}
    for tier in ("hot", "warm", "cold"):
        t = stats.get(tier)
        if not isinstance(t, dict) or "bytes" not in t:
            continue
        sessions = int(t.get("sessions", 0) or 0)
        b = int(t.get("bytes", 0) or 0)
        by_tier[tier] = {"bytes": b, "sessions": sessions, "snapshots": t.get("snapshots"),
                         "capacity_bytes": t.get("capacity_bytes"),
                         "bytes_per_session": b / sessions if sessions else None}
    mem = [by_tier[t] for t in ("hot", "warm") if t in by_tier]
    mem_bytes = sum(t["bytes"] for t in mem)
    mem_sessions = sum(t["sessions"] for t in mem)
    per = mem_bytes / mem_sessions if mem_sessions else None
    out: dict[str, Any] = {
        "kv_bytes_per_session": per,
        "sessions_per_gb": (GIB / per) if per else (0.0 if stats.get("enabled") is False else None),
        "resident_sessions": mem_sessions,
        "kv_memory_bytes": mem_bytes,
        "kv_by_tier": by_tier,
        "sessions_per_gb_method": ("resumable sessions in hot+warm tiers per GiB of the KV bytes they hold "
                                   "(family snapshots included), from /debug/stats at the end of the run"),
    }
    # the codec's part: the stored (warm, else cold) tier's bytes -- session entries, family snapshots
    # and shared blocks -- per session it can resume
    stored = by_tier.get("warm") or by_tier.get("cold")
    per_stored = stored["bytes_per_session"] if stored else None
    out["stored_bytes_per_session"] = per_stored
    out["stored_sessions_per_gb"] = GIB / per_stored if per_stored else None
    if "cold" in by_tier:
        c = by_tier["cold"]
        out["cold_sessions_per_gb_disk"] = GIB / c["bytes_per_session"] if c["bytes_per_session"] else None
    if isinstance(stats.get("codec"), dict):
        out["codec_stats"] = stats["codec"]
    return out


def kv3d_counters(metrics_text: str) -> dict[str, Any]:
    """Restore latency quantiles and scheduler batch sizes from ``/metrics``."""
    s = prom.parse(metrics_text)

    def mean(name: str, **labels: str) -> float | None:
        total, count = prom.value(s, name + "_sum", **labels), prom.value(s, name + "_count", **labels)
        return total / count if total is not None and count else None

    return {
        "restore_p95_warm_s": prom.histogram_quantile(s, "kv3d_restore_seconds", 0.95, tier="warm"),
        "restore_p95_cold_s": prom.histogram_quantile(s, "kv3d_restore_seconds", 0.95, tier="cold"),
        "restore_p50_warm_s": prom.histogram_quantile(s, "kv3d_restore_seconds", 0.50, tier="warm"),
        "restore_p50_cold_s": prom.histogram_quantile(s, "kv3d_restore_seconds", 0.50, tier="cold"),
        "restores": {t: prom.value(s, "kv3d_restores_total", tier=t) for t in ("warm", "cold")},
        "batch_sequences_mean": mean("kv3d_batch_sequences"),
        "batch_tokens_mean": mean("kv3d_batch_tokens"),
        "step_microbatches_mean": mean("kv3d_step_microbatches"),
        "preemptions": prom.value(s, "kv3d_preemptions_total"),
        "fallbacks": prom.value(s, "kv3d_fallbacks_total"),
        "evictions": {t: prom.value(s, "kv3d_evictions_total", tier=t) for t in ("hot", "warm", "cold")},
    }


def peer_memory(state: dict) -> dict[str, Any]:
    per = state.get("kv_bytes_per_session")
    return {
        "kv_bytes_per_session": per,
        "held_bytes_per_session": state.get("held_bytes_per_session"),
        "sessions_per_gb": GIB / per if per else None,
        "sessions_per_gb_method": ("GiB / mean LlamaState.llama_state_size of its RAM prompt cache per "
                                   "conversation (what its --cache_size budget counts; the numpy scores copy "
                                   "kept beside each entry is reported as held_bytes_per_session)"),
        "state_measurement": state,
    }
