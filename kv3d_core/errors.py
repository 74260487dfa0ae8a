"""Exceptions shared by the core and the plugins.

Every error a plugin may raise through its contract derives from :class:`Kv3dError`.
Cache-path errors (:class:`CacheFault` and subclasses) are never shown to a client:
the engine falls back to recomputation and counts them.
"""

from __future__ import annotations


class Kv3dError(Exception):
    """Base class of kv3d errors."""


class PluginError(Kv3dError):
    """A configured plugin is missing, broken, or registered twice."""


class ConfigError(Kv3dError):
    """The configuration is invalid; the message says which key and how to fix it."""


class BackendError(Kv3dError):
    """The execution backend failed in a way the request cannot recover from."""


class ModelLoadError(BackendError):
    """The model file could not be found or loaded."""


class TokenizerMissing(BackendError, ValueError):
    """The model has no tokenizer; prompts must be given as token ids (a 400 for clients)."""


class KVCacheFullError(BackendError):
    """The backend found no free KV cells for a batch (llama_decode returned 1).

    The batch left no trace in the KV cache; the caller may free cells and retry.
    """


class CacheFault(Kv3dError):
    """Something in the cache path failed; the request is served by recompute instead.

    ``reason`` labels ``kv3d_fallbacks_total``; ``component`` is what the failure
    implicates (``codec``, ``warm``, ``cold``, ``restore``; see :mod:`kv3d_core.safety`).
    """

    reason = "cache_fault"
    component = "restore"


class StateFormatError(CacheFault):
    """A llama.cpp sequence-state blob had a layout the reader does not understand."""

    reason = "state_layout"
    component = "codec"


class StateRestoreError(CacheFault):
    """The backend refused a sequence state (llama_state_seq_set_data returned 0)."""

    reason = "set_data"


class NoFreeCells(StateRestoreError):
    """The backend had too few free cells for a sequence state. A capacity shortfall,
    not a broken component: the caller may free cells and retry; it is counted as a
    fallback but never switches restoring off."""

    reason = "no_free_cells"
    component = "capacity"


class CodecError(CacheFault):
    """A codec could not encode or decode a payload (wrong id, version, length, ...)."""

    reason = "codec"
    component = "codec"


class QualityGuardTripped(CodecError):
    """A sampled restore's next-token distribution was too far from a recompute's."""

    reason = "quality_guard"


class TierError(CacheFault):
    """A storage tier failed to read or write an entry (I/O, checksum, format)."""

    reason = "tier_io"

    def __init__(self, message: str, component: str = "cold") -> None:
        super().__init__(message)
        self.component = component
