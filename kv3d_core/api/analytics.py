"""``GET /v1/kv3d/analytics``: the workload analytics the dashboard (``/dashboard``) shows,
as JSON for scripts too (docs/ANALYTICS.md documents every field).

Every figure comes from the engine's state (read on the scheduler thread,
:mod:`kv3d_core.engine.analytics`) or from its Prometheus metrics -- the very samples
``/metrics`` serves. Windowed figures (latency quantiles, rates) are the growth of those
cumulative metrics over the last ``analytics.window_s``, sampled at each call, computed as
Prometheus' ``rate()`` and ``histogram_quantile()`` would. Estimates say how in a
``method`` field: the what-if curve, memory without sharing, device-seconds saved, costs.
"""

from __future__ import annotations

import asyncio
import math
import time

from kv3d_core.analytics.mrc import interpolate
from kv3d_core.analytics.settings import AnalyticsSettings
from kv3d_core.analytics.window import MetricWindow, Sample, flatten, histogram_quantile
from kv3d_core.api.errors import APIError

GIB = 2 ** 30
FACTORS = (0.5, 1, 2, 4, 8)


def _sum(values: dict[Sample, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def _by_label(values: dict[Sample, float], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, ls), v in values.items():
        if n == name:
            key = dict(ls).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def _quantiles(values: dict[Sample, float], name: str, **labels: str) -> dict:
    buckets: dict[float, float] = {}
    for (n, ls), v in values.items():
        d = dict(ls)
        if n == name + "_bucket" and all(d.get(k) == w for k, w in labels.items()):
            buckets[float(d["le"])] = buckets.get(float(d["le"]), 0.0) + v
    count = _sum(values, name + "_count", **labels)
    return {"p50_s": histogram_quantile(0.5, buckets), "p95_s": histogram_quantile(0.95, buckets),
            "count": int(count)}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


class Analytics:
    """The endpoint's state: the settings and the window of metric samples."""

    def __init__(self, engine, settings: AnalyticsSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.window = MetricWindow(settings.window_s)
        self.window.add(time.monotonic(), {})          # the start: every counter was 0

    async def handle(self, request) -> dict:
        params = dict(request.query_params)
        top = self.settings.top_families
        for key, value in params.items():
            if key != "top":
                raise APIError(400, f"Unknown query parameter '{key}' (this endpoint takes 'top')",
                               param=key, code="unknown_parameter")
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise APIError(400, "'top' must be an integer within 1..1000", param="top", code="invalid_value")
            top = int(value)
        return await asyncio.to_thread(self.report, request.scope.get("kv3d.tenant"), top)

    def report(self, tenant: str | None, top: int) -> dict:
        s = self.settings
        state = self.engine.analytics_state(tenant, top, s.previews, s.preview_words)
        now = flatten(self.engine.metrics.registry.collect())
        self.window.add(time.monotonic(), now)
        span, delta = self.window.delta()
        memory = _memory(state, now)
        return {
            "object": "kv3d.analytics", "created": int(time.time()), "model": self.engine.model_id,
            "refresh_s": s.refresh_s,
            "families": {"top": state["families"], "total": state["families_total"],
                         "other_tenants": state["families_other_tenants"],
                         "previews": s.previews, "preview_words": s.preview_words},
            "hit_rate": {"requests": int(_sum(now, "kv3d_prefix_requests_total")),
                         "hits": int(_sum(now, "kv3d_prefix_hits_total")),
                         "value": _sum(now, "kv3d_prefix_hit_rate"),
                         "metric": "kv3d_prefix_hit_rate"},
            "memory": memory,
            "latency": _latency(delta, span),
            "health": _health(now, self.engine),
            "what_if": _what_if(state, memory),
            "roi": _roi(now, s.gpu_hour_price, self.engine.info.gpu_layers != 0),
        }


def _memory(state: dict, now: dict[Sample, float]) -> dict:
    stats = state["stats"]
    tiers = {}
    for tier in ("hot", "host", "warm", "cold"):
        if tier in stats or tier == "hot":
            t = stats.get(tier, {})
            tiers[tier] = {"bytes": _sum(now, "kv3d_kv_bytes", tier=tier),
                           "sessions": int(_sum(now, "kv3d_sessions", tier=tier)),
                           "snapshots": t.get("snapshots"), "capacity_bytes": t.get("capacity_bytes")}
    held = sum(t["bytes"] for t in tiers.values())
    n = state["sessions_held"]
    unshared = state["session_tokens"] * state["bytes_per_token"]
    codec = stats.get("codec")
    return {
        "tiers": tiers, "bytes_held": held, "sessions_held": n,
        "sessions_per_gib": _ratio(n, held / GIB),
        "sessions_per_gib_without_reuse": _ratio(n, unshared / GIB),
        "bytes_without_reuse": unshared,
        "memory_saved_bytes": unshared - held if n else 0,
        "method": "now: the KV bytes every tier holds (kv3d_kv_bytes), running requests and family snapshots "
                  "included, over the sessions held; without reuse: every held session's whole token count "
                  "(its family prefix included) x the model's f16 KV bytes per token, uncompressed, no snapshots",
        "compression": ([{"codec": codec["name"], "ratio": codec["ratio"], "f16_bytes": codec["f16_bytes"],
                          "stored_bytes": codec["stored_bytes"]}] if codec else []),
    }


def _latency(delta: dict[Sample, float], span: float) -> dict:
    restores = {tier: _quantiles(delta, "kv3d_restore_seconds", tier=tier)
                for tier in sorted(_by_label(delta, "kv3d_restore_seconds_count", "tier"))}
    return {
        "window_s": round(span, 3),
        "ttft": {"hit": _quantiles(delta, "kv3d_time_to_first_token_seconds", cache="hit"),
                 "miss": _quantiles(delta, "kv3d_time_to_first_token_seconds", cache="miss")},
        "restore": restores,
        "prefill_tokens_avoided_per_s": _ratio(_sum(delta, "kv3d_prefix_cached_tokens_total"), span),
        "method": "the growth of the cumulative metrics over the window (sampled at each call of this "
                  "endpoint); quantiles as Prometheus' histogram_quantile: linear within a bucket",
    }


def _health(now: dict[Sample, float], engine) -> dict:
    return {
        "status": engine.health().get("status"),
        "safe_mode": bool(_sum(now, "kv3d_safe_mode")),
        "fallbacks": _by_label(now, "kv3d_fallbacks_total", "reason"),
        "tier_errors": _by_label(now, "kv3d_tier_errors_total", "tier"),
        "queue": {"waiting": int(_sum(now, "kv3d_requests_waiting")),
                  "running": int(_sum(now, "kv3d_requests_running"))},
        "http_503": int(_sum(now, "kv3d_http_requests_total", status="503")),
        "rejected": _by_label(now, "kv3d_rejected_total", "reason"),
    }


def _what_if(state: dict, memory: dict) -> dict:
    mrc, stats = state["mrc"], state["stats"]
    curve = mrc["curve"]
    ratio = (stats.get("codec") or {}).get("ratio") or 1.0
    bpt = state["bytes_per_token"]
    # each tier's capacity in the curve's unit (f16 KV bytes); warm and cold hold encoded bytes
    capacities = [("hot", stats["hot"]["cells_total"] * bpt + stats.get("host", {}).get("capacity_bytes", 0))]
    for tier in ("warm", "cold"):
        if tier in stats:
            capacities.append((tier, stats[tier]["capacity_bytes"] * ratio))
    below, tiers = 0.0, []
    for tier, cap in capacities:
        points = [{"factor": f, "bytes": below + f * cap, "hit_ratio": interpolate(curve, below + f * cap)}
                  for f in FACTORS]
        tiers.append({"tier": tier, "capacity_f16_bytes": cap, "points": points})
        below += cap
    # the part of the curve that rises: from the last size hitting nothing to the first hitting all it will
    first = next((i for i, (_, y) in enumerate(curve) if y > 0), len(curve))
    last = next((i for i, (_, y) in enumerate(curve) if y >= curve[-1][1]), len(curve) - 1)
    shown = curve[max(0, first - 2):last + 3]
    return {
        "curve": [{"bytes": x, "hit_ratio": y} for x, y in shown],
        "tiers": tiers, "accesses": mrc["accesses"], "sampled": mrc["sampled"],
        "sample_rate": mrc["rate"], "snapshot_sample_rate": mrc["snapshot_rate"], "objects_tracked": mrc["tracked"],
        "method": "SHARDS (spatially sampled, fixed-size) byte-weighted LRU stack distances of the cache's "
                  "objects: each request touches its family snapshot and its conversation; the hit ratio of "
                  "an LRU cache of each size (docs/ANALYTICS.md)",
        "assumptions": ["tiers act as one LRU cache: a tier's point counts hits in it or in the tiers above",
                        "objects are sized in f16 KV bytes; warm and cold capacities are scaled by the "
                        "measured codec ratio", "hot capacity: every cell of the context plus the host "
                        "memory for family prefixes"],
    }


def prefill_token_seconds(now: dict[Sample, float]) -> tuple[float | None, str]:
    """What computing one prompt token costs, from the scheduler's steps by kind: the time of
    steps holding prefill tokens, less what the same number of decode-only steps took on
    average, per prefill token. ``(seconds, how)``; ``how`` is ``"marginal"``, or
    ``"upper bound"`` when no decode-only step was seen yet (the whole prefill steps' time)."""
    steps_p = _sum(now, "kv3d_llama_steps_total", kind="prefill")
    steps_d = _sum(now, "kv3d_llama_steps_total", kind="decode")
    secs_p = _sum(now, "kv3d_llama_step_seconds_total", kind="prefill")
    secs_d = _sum(now, "kv3d_llama_step_seconds_total", kind="decode")
    tokens = _sum(now, "kv3d_prefill_tokens_total")
    if not tokens:
        return None, "no prefill yet"
    if not steps_d:
        return secs_p / tokens, "upper bound"
    return max(0.0, secs_p - steps_p * secs_d / steps_d) / tokens, "marginal"


def _roi(now: dict[Sample, float], price: float, gpu: bool) -> dict:
    saved_tokens = _sum(now, "kv3d_prefix_cached_tokens_total")
    busy_s = _sum(now, "kv3d_step_seconds_total")
    per_token, how = prefill_token_seconds(now)
    saved_s = saved_tokens * per_token if per_token is not None else None
    requests = _sum(now, "kv3d_prefix_requests_total")

    def per_10k(seconds: float | None) -> float | None:
        if seconds is None or not requests:
            return None
        return seconds / requests * 10_000 * price / 3600

    return {
        "prefill_tokens_saved": int(saved_tokens),
        "device": "gpu" if gpu else "cpu",
        "device_seconds_saved": saved_s,
        "device_seconds_busy": busy_s,
        "seconds_per_prefill_token": per_token,
        "seconds_per_prefill_token_estimate": how,
        "requests": int(requests),
        "price_per_device_hour": price,
        "cost_per_10k_requests": per_10k(busy_s),
        "cost_per_10k_requests_without_reuse": per_10k(busy_s + saved_s if saved_s is not None else None),
        "method": "saved: prompt tokens served from cache (kv3d_prefix_cached_tokens) x what one prompt "
                  "token costs to compute: the time of steps holding prefill tokens less the mean "
                  "decode-only step's time for as many steps, per prefill token (kv3d_llama_step_seconds, "
                  "kv3d_llama_steps, kv3d_prefill_tokens; the whole prefill steps' time per token, an upper "
                  "bound, until a decode-only step was seen); cost: the scheduler's busy time "
                  "(kv3d_step_seconds) per request x 10k x analytics.gpu_hour_price / 3600, without reuse "
                  "adding the saved seconds",
    }


def finite(obj):
    """``obj`` with non-finite floats as None (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj
