"""Safe mode and automatic fallback.

kv3d always has a known-good path: recompute. Every cache fault already serves
its request by recompute (the prefix cache catches :class:`CacheFault`). This
module decides when a component keeps failing and must be switched off, without
a restart:

- ``codec``   (decode errors, a tripped quality guard) -> new spills use the
  lossless ``none`` codec; entries of the disabled codec become misses;
- ``warm`` / ``cold`` (a tier plugin breaking its contract: raising from ``get``)
  -> that tier is skipped;
- ``restore`` (``set_data`` refusing blobs, restored positions that do not add up)
  -> nothing is spilled or restored any more (hot-tier reuse only).

A component is switched off after ``max_failures`` failures within ``window_s``
seconds. Damaged stored entries are *not* component failures: each is a miss,
removed and counted (``kv3d_tier_errors_total{tier,reason}``), and any number of
them leaves the tier on. A tier's systemic faults (writes failing: read-only,
deleted or full storage) take it down only until a check passes
(:mod:`kv3d_core.tiers.health`); they show in ``/health`` too. Every failure
is counted (``kv3d_fallbacks_total{reason}``) and logged; while anything is off,
``/health`` says ``degraded`` with the reason and the ``kv3d_safe_mode`` gauge is
1 (also when ``safe_mode=true`` turned the cache off).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from kv3d_core.metrics import Metrics

log = logging.getLogger("kv3d.safety")

COMPONENTS = ("codec", "warm", "cold", "restore")


@dataclass
class SafetyConfig:
    max_failures: int = 3
    window_s: float = 300.0
    quality_sample_every: int = 50      # 1 in N restores is checked against a recompute; 0 = never
    quality_max_kl: float = 0.05        # KL(recomputed || restored) of the next token above this is a failure
    tier_retry_s: float = 1.0           # a tier down for a systemic fault is checked again after this ...
    tier_retry_max_s: float = 60.0      # ... doubling up to this


class FailureMonitor:
    def __init__(self, metrics: Metrics, config: SafetyConfig | None = None, *, safe_mode: bool = False) -> None:
        self.metrics = metrics
        self.cfg = config or SafetyConfig()
        self.safe_mode = safe_mode
        self._events: dict[str, collections.deque[float]] = {c: collections.deque() for c in COMPONENTS}
        self.disabled: dict[str, str] = {}
        self._handlers: dict[str, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self.metrics.safe_mode.set(1 if safe_mode else 0)

    def on_disable(self, component: str, handler: Callable[[], None]) -> None:
        """``handler`` switches ``component`` off (called once, on the scheduler thread)."""
        self._handlers[component] = handler

    def failure(self, component: str, reason: str, detail: str = "") -> None:
        """Count a failure; switch the component off when it keeps failing."""
        self.metrics.fallbacks.labels(reason).inc()
        log.warning("cache fault (%s, %s): %s -- request served by recompute", component, reason, detail)
        if component not in self._events or component in self.disabled:
            return
        now = time.monotonic()
        with self._lock:
            q = self._events[component]
            q.append(now)
            while q and now - q[0] > self.cfg.window_s:
                q.popleft()
            trip = len(q) >= self.cfg.max_failures
        if trip:
            self.disable(component, f"{component} switched off after {len(q)} failures in "
                                    f"{self.cfg.window_s:g} s (last: {reason}: {detail})"[:300])

    def disable(self, component: str, reason: str) -> None:
        with self._lock:
            if component in self.disabled:
                return
            self.disabled[component] = reason
        log.error("DEGRADED: %s", reason)
        self.metrics.safe_mode.set(1)
        handler = self._handlers.get(component)
        if handler is not None:
            handler()

    @property
    def degraded(self) -> bool:
        return bool(self.disabled)

    def health(self, more: list[str] = ()) -> dict:
        """``/health``: ``degraded`` with every reason (components switched off, and
        ``more``: e.g. tiers down), else ok."""
        reasons = list(self.disabled.values()) + list(more)
        if reasons:
            return {"status": "degraded", "service": "kv3d-engine", "reason": "; ".join(reasons)}
        return {"status": "ok", "service": "kv3d-engine"}
