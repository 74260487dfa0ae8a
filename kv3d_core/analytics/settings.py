"""The ``analytics`` settings (configs/config.yaml, documented there): one typed schema that the
configuration validates and the analytics endpoint takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AnalyticsSettings:
    previews: bool = True
    preview_words: int = 6
    top_families: int = 20
    window_s: float = 300
    refresh_s: float = 3
    gpu_hour_price: float = 2.0
    mrc_sample_rate: float = 0.1
    mrc_max_objects: int = 8192
