"""The contract of every plugin kind, one module per kind.

- :mod:`.backend`  -- :class:`ExecutionBackend`: runs the model over many sequences of one KV cache
- :mod:`.detector` -- :class:`PrefixDetector`: names a prompt's prefix family and what may be reused
- :mod:`.codec`    -- :class:`DeltaCodec`: turns a session's own KV cells into bytes and back
- :mod:`.tier`     -- :class:`StorageTier`: keeps encoded KV entries under a byte budget
- :mod:`.state`    -- :class:`StateLayout`: a backend's state blobs as K/V arrays (part of the
  backend kind: :attr:`ExecutionBackend.state_layout`)

The docstring of each class is the specification an implementation must meet.

:mod:`.session` is no plugin kind: it is the session life cycle (:class:`SessionState`),
vocabulary shared by the engine, the prefix cache and the storage tiers, so it lives
at the bottom of the layers where every one of them may import it.
"""

from kv3d_core.contracts.backend import (
    BatchEntry,
    ExecutionBackend,
    ModelInfo,
    Sampler,
    SamplingParams,
    TokenLogprob,
)
from kv3d_core.contracts.codec import BlockCodec, DeltaCodec, KVArrays
from kv3d_core.contracts.detector import Candidate, FamilyKey, PrefixDetector, PromptView
from kv3d_core.contracts.state import StateLayout, StateWriter
from kv3d_core.contracts.tier import EntryMeta, Followed, StorageTier, TierEntry

KINDS = ("backend", "detector", "codec", "tier")

__all__ = [
    "KINDS",
    "BatchEntry",
    "Candidate",
    "BlockCodec",
    "DeltaCodec",
    "EntryMeta",
    "ExecutionBackend",
    "FamilyKey",
    "Followed",
    "KVArrays",
    "ModelInfo",
    "PrefixDetector",
    "PromptView",
    "Sampler",
    "SamplingParams",
    "StateLayout",
    "StateWriter",
    "StorageTier",
    "TierEntry",
    "TokenLogprob",
]
