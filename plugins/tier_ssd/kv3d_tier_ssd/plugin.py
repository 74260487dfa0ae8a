"""Entry point of the ``tier_ssd`` plugin: registers the tier ``ssd``, its settings and
its config group (``conf/tier/ssd.yaml``: ``kv3d serve tier=ssd``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kv3d_core import hookimpl


@dataclass
class SsdSettings:
    """The ``tier`` node of ``tier=ssd`` (documented in ``conf/tier/ssd.yaml``, whose
    ``path`` and ``capacity_mb`` default to ``cache.ssd_cold_path`` and ``cache.ssd_cold_mb``)."""

    path: str = "~/.cache/kv3d/cold"
    capacity_mb: float = 4096
    fsync: bool = True
    checksum: str = "xxh3"
    remove_foreign: bool = False


@hookimpl
def register_tiers(register):
    from kv3d_tier_ssd.tier import SsdTier

    register("ssd", SsdTier, settings=SsdSettings)


@hookimpl
def config_dir():
    return str(Path(__file__).parent / "conf")
