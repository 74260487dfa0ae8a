"""Prometheus metrics of one engine, in a registry of its own (no globals), so
several engines -- tests, benchmarks -- can live in one process."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

try:  # no *_created samples: they double the output and confuse `grep`
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # pragma: no cover
    pass

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RESTORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # API
        self.http_requests = Counter("kv3d_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("kv3d_request_duration_seconds", "Request latency (until the last byte)", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        # scheduler
        self.running = Gauge("kv3d_requests_running", "Requests holding a sequence (prefill or decode)", registry=r)
        self.waiting = Gauge("kv3d_requests_waiting", "Requests queued for a sequence", registry=r)
        self.batch_tokens = Histogram("kv3d_batch_tokens", "Tokens per llama_decode batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seqs = Histogram("kv3d_batch_sequences", "Sequences per llama_decode batch", buckets=BATCH_BUCKETS, registry=r)
        self.step_microbatches = Histogram(
            "kv3d_step_microbatches", "Micro-batches (passes of the model) per llama_decode batch, as the backend "
            "splits it (a KV stream per sequence: runs of consecutive sequence ids, equal tokens each)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.generated_tokens = Counter("kv3d_generated_tokens", "Completion tokens generated", registry=r)
        self.derived_families = Counter("kv3d_prefix_derived_families", "Implicit families: prefixes that "
                                        "prompts without a family of their own were found to share, snapshotted",
                                        registry=r)
        self.step_seconds = Counter("kv3d_step_seconds", "Scheduler time by part of a step: llama_decode (decode), "
                                    "sampling every sequence (sample), admitting requests (admit: their "
                                    "restores and prefix copies), the rest (batching, text, events: other)", ["part"], registry=r)
        self.prompt_tokens = Counter("kv3d_prompt_tokens", "Prompt tokens received", registry=r)
        self.llama_steps = Counter("kv3d_llama_steps", "llama_decode steps by kind: with prefill tokens (prefill) "
                                   "or decoding only (decode)", ["kind"], registry=r)
        self.llama_step_seconds = Counter("kv3d_llama_step_seconds", "Time of those steps: llama_decode plus the "
                                          "sampling that waits for the device", ["kind"], registry=r)
        self.prefill_tokens = Counter("kv3d_prefill_tokens", "Prompt tokens computed (prefill chunks)", registry=r)
        self.rejected = Counter("kv3d_rejected", "Requests refused by the scheduler", ["reason"], registry=r)
        self.preemptions = Counter("kv3d_preemptions", "Running requests preempted (recomputed later) for lack of KV cells", registry=r)
        self.queue_seconds = Histogram("kv3d_queue_seconds", "Time a request waited for a sequence (submit to "
                                       "admission)", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("kv3d_time_to_first_token_seconds", "Time to first token", ["cache"], buckets=LATENCY_BUCKETS, registry=r)
        # prefix families
        self.prefix_requests = Counter("kv3d_prefix_requests", "Requests looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("kv3d_prefix_hits", "Requests that reused cached KV", registry=r)
        self.prefix_hit_rate = Gauge("kv3d_prefix_hit_rate", "Prefix hits / prefix requests", registry=r)
        self.prefix_cached_tokens = Counter("kv3d_prefix_cached_tokens", "Prompt tokens served from cache", registry=r)
        self.prefix_families = Gauge("kv3d_prefix_families", "Prefix families with a shared snapshot", registry=r)
        # KV memory and tiers
        self.kv_bytes = Gauge("kv3d_kv_bytes", "KV bytes held per tier", ["tier"], registry=r)
        self.sessions = Gauge("kv3d_sessions", "Resumable sessions per tier", ["tier"], registry=r)
        self.restores = Counter("kv3d_restores", "Sessions or snapshots restored from a tier", ["tier"], registry=r)
        self.restore_retries = Counter("kv3d_restore_retries", "Restores the backend refused for lack of free cells, retried after evicting idle entries", registry=r)
        self.restore_seconds = Histogram("kv3d_restore_seconds", "Time to restore KV from a tier into a sequence", ["tier"], buckets=RESTORE_BUCKETS, registry=r)
        self.snapshot_adoptions = Counter("kv3d_snapshot_adoptions", "Requests that were computing a family prefix when another request finished it, and loaded its snapshot instead", registry=r)
        self.restores_prepared = Counter("kv3d_restores_prepared", "Restores decoded off the scheduler thread while their request waited (started), and those admission loaded as prepared (used)", ["outcome"], registry=r)
        self.spills = Counter("kv3d_spills", "Entries written to a tier", ["tier"], registry=r)
        self.evictions = Counter("kv3d_evictions", "Entries evicted from a tier", ["tier"], registry=r)
        self.idle_spills = Counter("kv3d_hot_idle_spills", "Hot entries spilled for being idle longer than cache.hot_idle_s", ["kind"], registry=r)
        self.codec_ratio = Gauge("kv3d_codec_ratio", "f16 bytes / stored bytes of encoded KV", ["codec"], registry=r)
        self.codec_fallback = Counter("kv3d_codec_fallback", "Sequences stored as opaque zstd blobs (unknown state layout)", registry=r)
        self.tier_errors = Counter("kv3d_tier_errors", "Tier entries found damaged or unreadable", ["tier", "reason"], registry=r)
        self.tier_dropped_writes = Counter("kv3d_tier_dropped_writes", "Tier writes dropped (disk full, I/O error, too large, tier down)", ["tier", "reason"], registry=r)
        self.tier_up = Gauge("kv3d_tier_up", "1 while the tier takes writes, 0 while it is down for a systemic fault (see /health)", ["tier"], registry=r)
        self.tier_faults = Counter("kv3d_tier_faults", "Systemic tier faults (a write failed for an I/O error or a full disk): the tier went down", ["tier", "reason"], registry=r)
        self.tier_recoveries = Counter("kv3d_tier_recoveries", "Tiers back up after a systemic fault (a check passed)", ["tier"], registry=r)
        self.tier_reindexed = Counter("kv3d_tier_reindexed", "Stored entries re-indexed at start-up (orphan: a session waiting for its family snapshot to be recomputed)", ["tier", "kind"], registry=r)
        self.tier_entries_dropped = Counter("kv3d_tier_entries_dropped", "Intact stored entries dropped as unusable, by reason (damaged ones are kv3d_tier_errors)", ["tier", "reason"], registry=r)
        self.tier_orphans = Gauge("kv3d_tier_orphans", "Stored sessions waiting for their family snapshot (lost or damaged) to be recomputed", registry=r)
        self.tier_orphans_adopted = Counter("kv3d_tier_orphans_adopted", "Orphaned sessions resumable again: a request recomputed their family snapshot", registry=r)
        # a shared tier (tiers/feed.py)
        self.tier_feed = Counter("kv3d_tier_feed", "Entries other servers published (added) or removed, read from a shared tier's feed", ["op"], registry=r)
        self.tier_feed_rescans = Counter("kv3d_tier_feed_rescans", "Full listings of a shared tier after its feed lost track (trimmed, store restarted)", registry=r)
        self.tier_followed = Counter("kv3d_tier_followed", "Entries other servers published, added to the index (orphan: a session waiting for its family snapshot); removed: their sessions forgotten", ["kind"], registry=r)
        self.tier_published = Counter("kv3d_tier_published", "Entries written to a shared tier while they stay hot, so other servers can use them: idle sessions when their request ends, unified-layout family snapshots when made (the streams layout stores every snapshot when made: kv3d_spills_total)", ["kind"], registry=r)
        # safety
        self.safe_mode = Gauge("kv3d_safe_mode", "1 while the cache path is off or degraded", registry=r)
        self.fallbacks = Counter("kv3d_fallbacks", "Requests served by recompute after a cache fault", ["reason"], registry=r)
        self.quality_checks = Counter("kv3d_quality_checks", "Sampled restores compared with a recompute (quality guard)", registry=r)
        self._lock = threading.Lock()
        self._prefix_req = 0
        self._prefix_hit = 0

    def record_prefix(self, hit: bool, cached_tokens: int) -> None:
        with self._lock:
            self._prefix_req += 1
            self._prefix_hit += int(hit)
            self.prefix_requests.inc()
            if hit:
                self.prefix_hits.inc()
                self.prefix_cached_tokens.inc(cached_tokens)
            self.prefix_hit_rate.set(self._prefix_hit / self._prefix_req)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
