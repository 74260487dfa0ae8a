"""Figures over a recent window from cumulative metrics (Prometheus counters and
histograms), computed the way Prometheus computes ``rate()`` and ``histogram_quantile()``:
the difference between the newest sample and the oldest one inside the window, and
quantiles interpolated linearly within the bucket they fall in."""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Iterable, Mapping

Sample = tuple[str, tuple[tuple[str, str], ...]]      # (name, sorted labels)


def flatten(families: Iterable) -> dict[Sample, float]:
    """Every sample of a prometheus_client ``registry.collect()`` as ``{(name, labels): value}``."""
    out: dict[Sample, float] = {}
    for fam in families:
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


class MetricWindow:
    """Timestamped samples of cumulative values; :meth:`delta` is what they grew by over the
    last ``window_s`` (or since the first sample while the window is not full yet)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = float(window_s)
        self._samples: deque[tuple[float, dict[Sample, float]]] = deque()
        self._lock = threading.Lock()     # the endpoint's requests add and read from worker threads

    def add(self, t: float, values: dict[Sample, float]) -> None:
        with self._lock:
            if self._samples and t < self._samples[-1][0]:
                return          # taken before one another request added: older than what is there
            self._samples.append((t, values))
            # keep the newest sample at or before the window's start, so the delta spans the window
            while len(self._samples) > 2 and self._samples[1][0] <= t - self.window_s:
                self._samples.popleft()

    def delta(self) -> tuple[float, dict[Sample, float]]:
        """``(seconds spanned, {sample: growth})``."""
        with self._lock:
            if not self._samples:
                return 0.0, {}
            (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        return t1 - t0, {k: v - first.get(k, 0.0) for k, v in last.items()}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a histogram given as ``{le: cumulative count}`` (``+Inf``
    included), as Prometheus' ``histogram_quantile``: linear within the bucket it falls in;
    the upper bound of the last finite bucket when it falls in ``+Inf``. None when empty."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return None
    rank = q * buckets[les[-1]]
    prev_le, prev_count = 0.0, 0.0
    for le in les:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le
