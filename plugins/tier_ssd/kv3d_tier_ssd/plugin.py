"""Entry point of the ``tier_ssd`` plugin: registers the tier ``ssd``."""

from kv3d_core import hookimpl


@hookimpl
def register_tiers(register):
    from kv3d_tier_ssd.tier import SsdTier

    register("ssd", SsdTier)
