"""kv3d-codec-mine: an example kv3d delta codec (docs/PLUGINS.md)."""

__version__ = "0.1.0"
