"""The record of one cached sequence, in whichever tier holds it.

The prefix cache (:mod:`kv3d_core.prefix.cache`) indexes these entries and decides
what a request reuses; the tier stack (:mod:`kv3d_core.tiers.stack`) spills them to
the storage tiers, restores them and re-indexes them from a persistent tier at
start-up. Both work on this one record, so it lives in the lower of the two layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kv3d_core.contracts.session import SessionState


@dataclass(eq=False)
class CacheEntry:
    """A cached sequence: a family snapshot or an idle session."""

    key: str
    kind: str                      # "snapshot" | "session"
    namespace: str
    family: str
    tokens: np.ndarray             # int32, the positions its KV covers
    n_prefix: int = 0              # leading tokens shared with its family snapshot
    state: SessionState = SessionState.IDLE
    seq: int | None = None         # hot only
    snapshot: "CacheEntry | None" = None
    refs: int = 0                  # snapshots: hot sequences sharing its cells
    last_used: float = field(default_factory=time.monotonic)
    idle_since: float = field(default_factory=time.monotonic)  # when it last became evictable
    pending: object | None = None  # the spill in flight (a Future), if any
    blob: np.ndarray | None = None  # snapshots, KV stream per sequence: the prefix's state in host memory
    n_prompt: int = 0              # sessions: tokens of the prompt its last request sent (0: unknown); the
                                   # rest of ``tokens`` is what that request generated

    @property
    def hot(self) -> bool:
        return self.state is SessionState.IDLE and (self.seq is not None or self.blob is not None)

    def __hash__(self) -> int:
        return id(self)
