"""kv3d cold storage tier on local disk (``tier=ssd``).

- :mod:`kv3d_tier_ssd.fileformat` -- the on-disk format of one entry file.
- :mod:`kv3d_tier_ssd.tier` -- :class:`SsdTier`, the byte-budgeted store.
- :mod:`kv3d_tier_ssd.plugin` -- the pluggy entry point.
"""

__version__ = "0.1.0"
