"""kv3d: an inference server that pays for a shared prompt prefix's KV cache once.

Layers (top to bottom), each a sub-package:

- ``kv3d_core.api``       OpenAI-compatible HTTP API (FastAPI), errors, metrics endpoint
- ``kv3d_core.engine``    sessions and the continuous-batching scheduler
- ``kv3d_core.prefix``    prefix families: detection, radix index, shared snapshots
- ``kv3d_core.kv``        KV compression: llama.cpp state reader/writer, delta codecs
- ``kv3d_core.tiers``     storage tiers: hot (llama.cpp cells), warm (RAM), cold (plugins)
- ``kv3d_core.contracts`` the typed contract of each plugin kind (backend, detector, codec, tier)

Plugins (execution backends, detectors, codecs, tiers) are registered through
pluggy; see :mod:`kv3d_core.hookspecs` and :mod:`kv3d_core.plugins`.
"""

__version__ = "0.1.0"

from kv3d_core.hookspecs import hookimpl  # noqa: E402  (re-exported for plugin authors)

__all__ = ["hookimpl", "__version__"]
