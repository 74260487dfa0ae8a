"""Prometheus text exposition: samples, and quantiles of a histogram from its
cumulative buckets (linear interpolation inside the bucket, as PromQL's
``histogram_quantile`` does)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append(Sample(m.group(1), labels, value))
    return out


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``; None if none."""
    vals = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(vals) if vals else None


def histogram_quantile(samples: list[Sample], name: str, q: float, **labels: str) -> float | None:
    """The ``q`` quantile of histogram ``name`` (``name_bucket`` samples) restricted
    to ``labels``; None when it has no observations."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name != name + "_bucket" or not all(s.labels.get(k) == v for k, v in labels.items()):
            continue
        le = float(s.labels["le"].replace("+Inf", "inf"))
        buckets[le] = buckets.get(le, 0.0) + s.value
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):          # in the +Inf bucket: the highest finite bound, as PromQL
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return prev_bound
