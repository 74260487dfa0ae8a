"""kv3d execution backend on llama.cpp."""

__version__ = "0.1.0"
