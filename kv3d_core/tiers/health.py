"""Systemic faults of the tiers below the hot one, and their recovery.

Two kinds of failure reach the tier stack, and they are handled apart:

- **An entry is damaged** (checksum, truncation, a file that is not one, ...): that
  entry is a miss -- removed and counted in ``kv3d_tier_errors_total{tier,reason}``
  -- and nothing else changes. Any number of damaged entries never switches a
  tier off.
- **The store fails** -- a write dropped for an I/O error or a full disk
  (``on_dropped("io_error" | "disk_full")``: a read-only or deleted directory, a
  full disk): the tier is *down*. Writes to it are skipped and counted
  (``kv3d_tier_dropped_writes_total{reason="tier_down"}``), reads go on (each
  missing entry a miss), ``/health`` says ``degraded`` with the reason, and
  ``kv3d_tier_up{tier}`` is 0. :class:`TierWatch` calls the tier's
  :meth:`~kv3d_core.contracts.tier.StorageTier.check` at once, then after
  ``retry_s``, doubling up to ``retry_max_s``; the first check that passes brings
  the tier back up (``kv3d_tier_recoveries_total``), without a restart. A tier
  that fails again soon after coming back keeps its longer delay, so a flapping
  store is not hammered.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from kv3d_core.contracts.tier import StorageTier
from kv3d_core.metrics import Metrics

log = logging.getLogger("kv3d.tiers")

SYSTEMIC = frozenset({"io_error", "disk_full"})
"""``on_dropped`` reasons that mean the store itself fails, not one entry."""


@dataclass
class _State:
    tier: StorageTier
    up: bool = True
    reason: str = ""
    delay: float = 0.0
    due: float = 0.0
    recovered_at: float = float("-inf")


class TierWatch:
    """Up/down state of each tier, and the thread that checks the down ones again."""

    def __init__(self, metrics: Metrics, *, retry_s: float = 1.0, retry_max_s: float = 60.0,
                 on_recovered: Callable[[str], None] | None = None) -> None:
        if not retry_s > 0 or not retry_max_s >= retry_s:
            raise ValueError(f"tier retry delays must satisfy 0 < retry_s <= retry_max_s, got {retry_s}, {retry_max_s}")
        self.metrics = metrics
        self.retry_s = float(retry_s)
        self.retry_max_s = float(retry_max_s)
        self.on_recovered = on_recovered
        self._tiers: dict[str, _State] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, tier: StorageTier) -> None:
        self._tiers[tier.level] = _State(tier)
        self.metrics.tier_up.labels(tier.level).set(1)

    def remove(self, level: str) -> None:
        """The tier is gone for good (switched off): it is no longer reported."""
        with self._cond:
            self._tiers.pop(level, None)
        self.metrics.tier_up.labels(level).set(0)

    def up(self, level: str) -> bool:
        st = self._tiers.get(level)
        return st is None or st.up

    def reasons(self) -> list[str]:
        with self._cond:
            return [st.reason for st in self._tiers.values() if not st.up]

    def fault(self, level: str, reason: str) -> None:
        """A write to ``level`` was dropped for a systemic fault: the tier goes down and
        is checked again right away, then with backoff."""
        with self._cond:
            st = self._tiers.get(level)
            if st is None or self._closed or not st.up:
                return
            now = time.monotonic()
            recent = now - st.recovered_at < self.retry_max_s
            if not (recent and st.delay):           # failing again soon after recovering: keep backing off
                st.delay = self.retry_s
            st.up, st.due = False, now               # first check at once: it names the cause
            st.reason = f"{level} tier {st.tier.name}: writes fail ({reason.replace('_', ' ')})"
            self._start()
            self._cond.notify_all()
        self.metrics.tier_faults.labels(level, reason).inc()
        self.metrics.tier_up.labels(level).set(0)
        log.error("DEGRADED: %s; skipping its writes, checking it again with backoff", self._tiers[level].reason)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kv3d-tier-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    down = [st for st in self._tiers.values() if not st.up]
                    now = time.monotonic()
                    due = [st for st in down if st.due <= now]
                    if due:
                        break
                    self._cond.wait(min((st.due for st in down), default=now + 3600) - now)
            for st in due:
                self._check(st)

    def _check(self, st: _State) -> None:
        try:
            problem = st.tier.check()
        except Exception as exc:                    # the contract says check never raises
            problem = f"{st.tier.level} tier {st.tier.name}: check raised {type(exc).__name__}: {exc}"
        level = st.tier.level
        with self._cond:
            if self._closed or self._tiers.get(level) is not st:
                return
            now = time.monotonic()
            if problem is None:
                st.up, st.reason, st.recovered_at = True, "", now
            else:
                st.reason = problem
                st.due = now + st.delay
                st.delay = min(st.delay * 2, self.retry_max_s)
        if problem is None:
            self.metrics.tier_up.labels(level).set(1)
            self.metrics.tier_recoveries.labels(level).inc()
            log.warning("tier %s (%s) takes writes again: back on", st.tier.name, level)
            if self.on_recovered is not None:
                self.on_recovered(level)
        else:
            log.warning("%s; next check in %.1f s", problem, st.due - time.monotonic())

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
