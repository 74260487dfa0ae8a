"""Built-in prefix detectors, registered as a plugin like any other.

Namespaces (model, tenant, cache salt) are the core's: a detector keys its families in
``prompt.namespace`` (:func:`kv3d_core.contracts.detector.namespace_of`).

``exact`` (default) -- the seed's system-prompt detector. A family is the exact
token sequence of the leading system/developer messages and tool definitions.
A request reuses cached KV only from its own family, and there the longest
cached prefix wins: the family snapshot, a previous turn of the same
conversation (resume), or any branch of it (a regenerated or edited turn).
Prompts with no such structure (raw completions) form one family per namespace;
when two of them are found to share a prefix of ``cache.min_snapshot_tokens`` or
more, the core snapshots that prefix (an implicit family) and they may load it.

``radix`` -- reuse across families at token granularity: any cached sequence of
the same namespace sharing at least ``min_match_tokens`` leading tokens with the
request, as SGLang's RadixAttention does. It finds more reuse (e.g. requests
without a system prompt that share a long document), at the cost of hits that
cannot be explained by a family (the hit metric then counts any shared prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

from kv3d_core.contracts.detector import Candidate, FamilyKey, PrefixDetector, PromptView, family_digest
from kv3d_core.hookspecs import hookimpl


class ExactDetector(PrefixDetector):
    """Family = the exact leading system/developer/tools tokens; reuse only within it."""

    name = "exact"

    def __init__(self, min_family_tokens: int = 1, **_: object) -> None:
        self.min_family_tokens = int(min_family_tokens)

    def family(self, prompt: PromptView) -> FamilyKey:
        ns = prompt.namespace                   # computed by the core, never here
        n = prompt.family_len if prompt.family_len >= self.min_family_tokens else 0
        return FamilyKey(ns, family_digest(ns, prompt.tokens[:n]), n)

    def reusable(self, prompt: PromptView, family: FamilyKey, candidate: Candidate) -> int:
        if candidate.family == family.digest and candidate.lcp >= family.length:
            return candidate.lcp
        if family.length == 0 and candidate.kind == "snapshot" and candidate.lcp >= candidate.n_tokens:
            # a prompt with no family of its own (a raw completion) may load a prefix that other
            # such prompts were found to share (an implicit family), when it holds all of it
            return candidate.lcp
        return 0


class RadixDetector(ExactDetector):
    """Families as in ``exact`` (snapshots), but reuse any shared prefix of enough tokens."""

    name = "radix"

    def __init__(self, min_match_tokens: int = 16, **kw: object) -> None:
        super().__init__(**kw)
        self.min_match_tokens = int(min_match_tokens)

    def reusable(self, prompt: PromptView, family: FamilyKey, candidate: Candidate) -> int:
        return candidate.lcp if candidate.lcp >= self.min_match_tokens else 0


@dataclass
class ExactSettings:
    """The ``detector`` node of ``detector=exact`` (``configs/detector/exact.yaml``)."""

    min_family_tokens: int = 1


@dataclass
class RadixSettings(ExactSettings):
    """The ``detector`` node of ``detector=radix`` (``configs/detector/radix.yaml``)."""

    min_match_tokens: int = 16


@hookimpl
def register_detectors(register):
    register("exact", ExactDetector, settings=ExactSettings)
    register("radix", RadixDetector, settings=RadixSettings)
