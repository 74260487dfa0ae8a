"""Contract of the prefix detector plugin kind.

A detector decides, for each request, (1) which *prefix family* it belongs to --
the canonical key of its shared leading part (system/developer messages and tool
definitions, as rendered into tokens) -- and (2) how much of a cached sequence the
request may reuse. The core owns the data structures (the radix index of cached
sequences, the family snapshots); a detector is pure policy and holds no state
that must survive a restart.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def namespace_of(model_id: str, cache_salt: str | None, tenant: str | None = None) -> str:
    """The core's namespace digest: equal only for equal model id, tenant and cache salt.
    Computed by the core (:attr:`PromptView.namespace`), never by a detector: tenants'
    isolation (``cache_salt``, API keys) must not depend on a plugin."""
    h = hashlib.blake2b(digest_size=16, person=b"kv3d-namespace")
    h.update(model_id.encode("utf-8"))
    h.update(b"\x00")
    if tenant is not None:                       # length-prefixed, before the client's salt
        t = tenant.encode("utf-8")
        h.update(b"\x02" + len(t).to_bytes(4, "little") + t)
    if cache_salt is not None:
        h.update(b"\x01")
        h.update(cache_salt.encode("utf-8"))
    return h.hexdigest()


def family_digest(namespace: str, tokens: Sequence[int]) -> str:
    """Digest of a prefix's token ids within a namespace (what the built-in detectors use
    as :attr:`FamilyKey.digest`; the core names implicit families with it too)."""
    h = hashlib.blake2b(digest_size=16, person=b"kv3d-family")
    h.update(namespace.encode("ascii"))
    h.update(np.asarray(tokens, dtype="<i4").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PromptView:
    """A request's prompt as the model sees it."""

    tokens: Sequence[int]
    """All prompt tokens."""
    family_len: int
    """Tokens of the leading system/developer messages and tool definitions
    (0 when there are none). ``tokens[:family_len]`` is what a family shares."""
    model_id: str
    cache_salt: str | None = None
    tenant: str | None = None
    """Who sent it: the tenant of the API key used (``None`` on a server without keys).
    Each tenant is a namespace of its own; ``cache_salt`` divides a tenant further."""
    namespace: str = field(init=False)
    """The request's namespace, computed by the core from ``model_id``, ``tenant`` and
    ``cache_salt`` (:func:`namespace_of`). A detector keys its families in it; the core
    replaces whatever namespace a :class:`FamilyKey` from a detector carries with it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "namespace", namespace_of(self.model_id, self.cache_salt, self.tenant))


@dataclass(frozen=True)
class FamilyKey:
    """The identity of a prefix family.

    ``namespace`` separates models, tenants and cache salts: the core never matches a
    request against a cached sequence of another namespace. It is the prompt's
    :attr:`PromptView.namespace`, which the core computes (and enforces on every key a
    detector returns). ``digest`` names the
    family inside its namespace; ``length`` is the number of prefix tokens the
    family's shared snapshot holds. A digest match is always confirmed by
    comparing token ids, so a hash collision can never serve another prefix.

    ``snapshot_namespace`` is where the family's shared snapshot lives when it is
    not ``namespace``: the core sets it (never a detector) when the operator lets
    tenants share the snapshots of identical system prompts
    (``cache.share_families``). Conversation state always stays in ``namespace``.
    """

    namespace: str
    digest: str
    length: int
    snapshot_namespace: str | None = None

    @property
    def scope(self) -> str:
        """The namespace holding this family's snapshot."""
        return self.snapshot_namespace or self.namespace


@dataclass(frozen=True)
class Candidate:
    """A cached sequence the index found for a request.

    ``lcp`` is the exact number of leading tokens it shares with the request
    (computed by comparing token ids). ``kind`` is ``"snapshot"`` (a family's
    shared prefix) or ``"session"`` (a finished conversation turn).
    """

    family: str
    lcp: int
    n_tokens: int
    kind: str


class PrefixDetector(abc.ABC):
    """Names prefix families and decides what a request may reuse.

    Requirements:

    - :meth:`family` is deterministic and depends only on the tokens the model
      sees and the prompt's namespace: two prompts whose first ``family_len``
      tokens are equal (same namespace) get the same key; prompts with different
      such tokens get different keys (up to hash collisions, which the core
      catches by comparing tokens). The key's ``namespace`` is
      ``prompt.namespace``: the core computes it (model, tenant, cache salt) and
      replaces any other a detector returns -- tenant isolation never depends on
      a plugin.
    - :meth:`reusable` returns how many leading tokens of ``candidate`` the
      request may reuse, between 0 and ``candidate.lcp``. It never sees other
      namespaces' candidates. Returning more than ``lcp`` is a contract violation
      the core clamps.
    - Both are called on the API's worker threads and must be thread-safe.
    """

    name: str = "?"

    @abc.abstractmethod
    def family(self, prompt: PromptView) -> FamilyKey:
        """The family of ``prompt``."""

    @abc.abstractmethod
    def reusable(self, prompt: PromptView, family: FamilyKey, candidate: Candidate) -> int:
        """How many leading tokens of ``candidate`` the request may reuse."""
