"""What the prefix cache's lookups tell about the workload, for the analytics dashboard
(``/v1/kv3d/analytics``): requests and hits per prefix family, and the access stream of a
miss-ratio curve (:class:`~kv3d_core.analytics.mrc.ShardsMRC`).

Each counted request is two accesses of that curve, as a tier holds them:

- its family's **snapshot** (when the family is long enough to get one,
  ``cache.min_snapshot_tokens``): ``family length x KV bytes per token``, sampling class 1
  (few objects many requests touch: all sampled while the tracked set has room);
- its **conversation**: the tokens past the snapshot ``x KV bytes per token``. A request
  continues a conversation when it holds all but at most the last token of that
  conversation's previous prompt (the rule the cache uses, ``_same_conversation``), found in
  a token trie of its own that outlives the cache's entries -- so a conversation whose state
  the server dropped is still recognised, and a larger cache's hit counted.

Only the scheduler thread calls it (from :meth:`PrefixCache.acquire`). Memory is bounded:
``FAMILIES_MAX`` families and ``CONVERSATIONS_MAX`` conversations, least recently seen out.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from kv3d_core.analytics.mrc import ShardsMRC
from kv3d_core.contracts.detector import FamilyKey, PromptView
from kv3d_core.prefix.radix import RadixIndex

FAMILIES_MAX = 4096
CONVERSATIONS_MAX = 8192
PREVIEW_TOKENS = 48


@dataclass
class FamilyStats:
    length: int
    preview: tuple[int, ...]            # the first tokens of the prefix (never sent to another tenant)
    requests: int = 0
    hits: int = 0
    namespaces: set[str] = field(default_factory=set)
    tenants: set[str | None] = field(default_factory=set)


@dataclass(eq=False)
class _Conversation:
    namespace: str
    tokens: np.ndarray                   # its last prompt
    id: int

    def __hash__(self) -> int:
        return id(self)


class WorkloadRecorder:
    def __init__(self, bytes_per_token: int, *, sample_rate: float = 0.1, max_objects: int = 8192,
                 min_snapshot_tokens: int = 32) -> None:
        self.bytes_per_token = int(bytes_per_token)
        self.min_snapshot_tokens = int(min_snapshot_tokens)
        self.mrc = ShardsMRC(sample_rate, max_objects, class_rates=(1.0,))
        self.families: OrderedDict[tuple[str, str], FamilyStats] = OrderedDict()
        self._convs: OrderedDict[_Conversation, None] = OrderedDict()
        self._index: RadixIndex[_Conversation] = RadixIndex()
        self._ids = itertools.count()

    def record(self, prompt: PromptView, family: FamilyKey, n_cached: int) -> None:
        """One request looked up in the cache, reusing ``n_cached`` tokens."""
        snapshot = family.length >= self.min_snapshot_tokens
        if family.length > 0:
            self._count_family(prompt, family, n_cached > 0)
        if snapshot:
            self.mrc.access(f"s:{family.scope}:{family.digest}", family.length * self.bytes_per_token, 1)
        own = len(prompt.tokens) - (family.length if snapshot else 0)
        conv = self._conversation(prompt)
        self.mrc.access(f"c:{conv}", max(0, own) * self.bytes_per_token, 0)

    def _count_family(self, prompt: PromptView, family: FamilyKey, hit: bool) -> None:
        key = (family.scope, family.digest)
        st = self.families.get(key)
        if st is None:
            st = FamilyStats(family.length, tuple(int(t) for t in prompt.tokens[:min(family.length, PREVIEW_TOKENS)]))
            self.families[key] = st
            while len(self.families) > FAMILIES_MAX:
                self.families.popitem(last=False)
        else:
            self.families.move_to_end(key)
        st.requests += 1
        st.hits += int(hit)
        st.namespaces.add(family.namespace)
        st.tenants.add(prompt.tenant)

    def _conversation(self, prompt: PromptView) -> int:
        """The id of the conversation ``prompt`` continues (a new one when none)."""
        tokens = np.asarray(prompt.tokens, dtype=np.int32)
        found = None
        for lcp, convs in self._index.match(prompt.namespace, tokens):
            found = next((c for c in convs if lcp >= len(c.tokens) - 1), None)
            if found is not None:
                break
        if found is None:
            found = _Conversation(prompt.namespace, tokens, next(self._ids))
        else:
            self._index.remove(found)
            self._convs.pop(found, None)
            found.tokens = tokens
        self._index.insert(found)
        self._convs[found] = None
        while len(self._convs) > CONVERSATIONS_MAX:
            old, _ = self._convs.popitem(last=False)
            self._index.remove(old)
        return found.id

    def visible_families(self, tenant: str | None) -> tuple[list[tuple[tuple[str, str], FamilyStats]], int]:
        """The families ``tenant`` sent requests in (most requested first), and how many
        others there are: a tenant learns nothing of another's families beyond that count."""
        mine, others = [], 0
        for key, st in self.families.items():
            if tenant in st.tenants:
                mine.append((key, st))
            else:
                others += 1
        mine.sort(key=lambda kv: -kv[1].requests)
        return mine, others
