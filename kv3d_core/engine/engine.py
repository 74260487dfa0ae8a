"""The engine: everything below the HTTP API, wired from a configuration.

backend (plugin) -> prefix cache (detector plugin, hot tier, warm/cold tiers
with the codec plugin) -> scheduler thread. The API layer calls
:meth:`Engine.prepare_chat` / :meth:`Engine.prepare_completion` on worker
threads, then :meth:`Engine.submit`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig

from kv3d_core.contracts.backend import ExecutionBackend, SamplingParams
from kv3d_core.contracts.detector import FamilyKey, PrefixDetector, PromptView
from kv3d_core.engine.prompt import ChatPrompter
from kv3d_core.engine.events import Sink
from kv3d_core.engine.scheduler import Job, JobHandle, Scheduler, SchedulerConfig
from kv3d_core.errors import PluginError
from kv3d_core.metrics import Metrics
from kv3d_core.plugins import PluginManager, make_plugin_manager
from kv3d_core.prefix.cache import PrefixCache
from kv3d_core.prefix.workload import WorkloadRecorder
from kv3d_core.safety import FailureMonitor, SafetyConfig

log = logging.getLogger("kv3d.engine")


@dataclass(frozen=True)
class Prepared:
    """A prompt ready to submit."""

    prompt: PromptView
    family: FamilyKey

    @property
    def n_tokens(self) -> int:
        return len(self.prompt.tokens)


class Engine:
    def __init__(self, cfg: DictConfig, plugins: PluginManager | None = None) -> None:
        self.cfg = cfg
        self.plugins = plugins or make_plugin_manager()
        self.metrics = Metrics()
        self.monitor = FailureMonitor(self.metrics, SafetyConfig(**dict(cfg.safety)), safe_mode=bool(cfg.safe_mode))
        streams = cfg.cache.layout == "streams"
        # what the core computes for the backend, beside the backend node's own settings
        backend_core = dict(
            model_path=cfg.model.path,
            model_id=cfg.model.id,
            hot_mb=cfg.cache.gpu_hot_mb,
            n_seq_max=cfg.scheduler.n_seq_max,
            n_threads=cfg.server.threads,
            kv_unified=not streams,
            n_ctx_seq=cfg.cache.stream_ctx if streams else None,
        )
        # Resolve every configured plugin and check its settings before loading the model: a
        # missing plugin or an unknown setting fails fast.
        self.plugins.settings("backend", cfg.backend)
        if not cfg.safe_mode:
            self.plugins.settings("codec", cfg.codec)
            self.plugins.settings("tier", cfg.tier)
        self.detector: PrefixDetector = self.plugins.configure("detector", cfg.detector)
        self.share_families = bool(cfg.cache.get("share_families", False))
        self.tiers = None
        self.backend: ExecutionBackend = self.plugins.configure("backend", cfg.backend, **backend_core)
        try:
            self.info = self.backend.info
            self.tiers = self._make_tiers(cfg)
            an = cfg.get("analytics", {})
            self.workload = WorkloadRecorder(self.info.kv_bytes_per_token,
                                             sample_rate=float(an.get("mrc_sample_rate", 0.1)),
                                             max_objects=int(an.get("mrc_max_objects", 8192)),
                                             min_snapshot_tokens=cfg.cache.min_snapshot_tokens)
            self.cache = PrefixCache(
                self.backend, self.detector, self.metrics,
                enabled=not cfg.safe_mode,
                min_snapshot_tokens=cfg.cache.min_snapshot_tokens,
                hot_idle_s=cfg.cache.hot_idle_s,
                hot_idle_watermark=cfg.cache.hot_idle_watermark,
                tiers=self.tiers,
                monitor=self.monitor,
                hot_sessions=cfg.cache.hot_sessions,
                free_streams=cfg.cache.free_streams,
                prefix_host_mb=cfg.cache.prefix_host_mb,
                # auto: when the model runs on a GPU, whose decoding leaves the CPU cores free; on a
                # CPU, llama.cpp's threads take every core and a restore decoded beside them waits
                prepare_restores=(cfg.cache.prepare_restores == "on" or (
                    cfg.cache.prepare_restores == "auto" and self.backend.info.gpu_layers != 0)),
                workload=self.workload,
            )
            self.prompter = ChatPrompter.for_backend(self.backend)
            self.scheduler = Scheduler(self.backend, self.cache, self.metrics, SchedulerConfig(
                max_running=cfg.scheduler.max_running,
                max_waiting=cfg.scheduler.max_waiting,
                queue_timeout_s=cfg.scheduler.queue_timeout_s,
                prefill_chunk=cfg.scheduler.prefill_chunk,
                step_tokens=cfg.scheduler.step_tokens,
                prefill_order=cfg.scheduler.prefill_order,
                prefill_aging_s=cfg.scheduler.prefill_aging_s,
                prefill_seqs=self._prefill_seqs(cfg.scheduler.prefill_seqs),
                implicit_families=cfg.scheduler.implicit_families,
                microbatch_tokens=cfg.scheduler.microbatch_tokens,
                finish_first=cfg.scheduler.finish_first,
                admit_budget_ms=cfg.scheduler.admit_budget_ms,
            ))
        except BaseException:
            self.backend.close()
            raise

    def _prefill_seqs(self, setting: int | None) -> int | None:
        """``scheduler.prefill_seqs`` for the scheduler: 0 is no limit; null (auto) is one
        sequence a step on a CPU -- a step's time grows with its tokens there, so prefilling
        the shortest prompt alone first gives it, and every prompt after it, its first token
        sooner (docs/BENCHMARKS.md, "CPU: one prefill a step") -- and no limit on a GPU, where
        a step costs little more for more prompt tokens and a cap lost more in waiting than it
        saved (the H100 A/B)."""
        if setting is None:
            return 1 if self.backend.info.gpu_layers == 0 else None
        return int(setting) or None

    def _make_tiers(self, cfg: DictConfig):
        """The warm (and cold) tiers below the hot one; None in safe mode or with no
        warm budget."""
        if cfg.safe_mode:
            return None
        from kv3d_core.tiers.stack import build_tier_stack

        return build_tier_stack(cfg, self.plugins, self.info, self.metrics, self.monitor)

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> "Engine":
        self.scheduler.start()
        return self

    def close(self) -> None:
        """Stop the scheduler, persist what a persistent tier should keep, free the model.
        Idempotent."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.scheduler.stop()
        if self.tiers is not None:
            try:
                if self.tiers.persistent:
                    n = self.cache.persist()
                    log.info("persisted %d cached entries to the %s tier", n, self.tiers.cold.name)
            finally:
                self.tiers.close()
        self.backend.close()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def model_id(self) -> str:
        return self.info.model_id

    # -- requests (API worker threads) -------------------------------------------------------
    def _family(self, view: PromptView) -> FamilyKey:
        """The detector's family key, in the namespace the core computed for the prompt
        (model, tenant, cache salt): whatever namespace a detector returns is replaced, so
        tenant isolation never depends on a plugin."""
        key = self.detector.family(view)
        if not isinstance(key, FamilyKey):
            raise PluginError(f"detector {self.cfg.detector.name!r} returned {type(key).__name__} from family(), "
                              "not a FamilyKey")
        if key.namespace != view.namespace or key.snapshot_namespace is not None:
            key = replace(key, namespace=view.namespace, snapshot_namespace=None)
        return key

    def _prepared(self, tokens: list[int], family_len: int, cache_salt: str | None, tenant: str | None) -> Prepared:
        view = PromptView(tokens, family_len, self.info.model_id, cache_salt, tenant)
        family = self._family(view)
        if self.share_families and tenant is not None and cache_salt is None:
            # the operator lets tenants share the snapshots of identical system prompts: the
            # family is named in the tenant-free namespace; conversations stay in the tenant's
            tenantless = replace(view, tenant=None)
            shared = self._family(tenantless)
            family = replace(family, digest=shared.digest, snapshot_namespace=tenantless.namespace)
        return Prepared(view, family)

    def prepare_chat(self, messages: list[dict], tools: list | None = None, cache_salt: str | None = None,
                     tenant: str | None = None) -> Prepared:
        r = self.prompter.chat(messages, tools)
        return self._prepared(r.tokens, r.family_len, cache_salt, tenant)

    def prepare_completion(self, prompt: str | list[int], cache_salt: str | None = None,
                           tenant: str | None = None) -> Prepared:
        r = self.prompter.completion(prompt)
        return self._prepared(r.tokens, r.family_len, cache_salt, tenant)

    def submit(self, prepared: Prepared, params: SamplingParams, max_tokens: int, stop: list[str],
               sink: Sink, request_id: str | None = None, *, logprobs: int | None = None,
               forks: list[tuple[SamplingParams, Sink]] = ()) -> JobHandle:
        """Queue a prompt. ``logprobs``: send each token's log-probability and this many
        alternatives with its text. ``forks``: more choices of the same prompt, each with its
        own sampling and sink; the prompt is computed once and its cells shared with them.
        The handle cancels them all."""
        job = Job(request_id or uuid.uuid4().hex, prepared.prompt, prepared.family, params, max_tokens, stop, sink,
                  logprobs=logprobs, forks=list(forks))
        return self.scheduler.submit(job)

    # -- inspection ---------------------------------------------------------------------------
    def health(self) -> dict:
        """``/health``: ok, or why not."""
        if not self.scheduler.alive:
            return {"status": "error", "service": "kv3d-engine", "reason": "the scheduler thread is not running"}
        tiers = self.cache.tiers if self.cache.tiers is not None else self.tiers
        out = self.monitor.health(tiers.health_reasons() if tiers is not None else [])
        if self.cfg.safe_mode:
            out["mode"] = "safe"               # chosen by configuration: no cache reuse at all
        return out

    def stats(self, timeout: float = 10.0) -> dict:
        """Cache and scheduler state, read on the scheduler thread."""
        def read() -> dict:
            out = self.cache.stats()
            out["scheduler"] = dict(self.scheduler.load, steps=self.scheduler.steps,
                                    max_batch_sequences=self.scheduler.max_batch_seqs_seen,
                                    step_seconds=dict(self.scheduler.step_split),
                                    admit_max_s=self.scheduler.admit_max_s,
                                    ttft_split=dict(self.scheduler.ttft_split),
                                    microbatches=dict(self.scheduler.microbatch_plans),
                                    finish_first_deferred=self.scheduler.finish_first_deferred)
            return out
        return self.scheduler.call(read).result(timeout)

    def analytics_state(self, tenant: str | None, top: int, previews: bool, preview_words: int,
                        timeout: float = 10.0) -> dict:
        """What the analytics endpoint shows of the cache, read on the scheduler thread
        (:mod:`kv3d_core.engine.analytics`); ``tenant`` sees only its own families."""
        from kv3d_core.engine.analytics import read_state

        return self.scheduler.call(lambda: read_state(self, tenant, top, previews, preview_words)).result(timeout)
