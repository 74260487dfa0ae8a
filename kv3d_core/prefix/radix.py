"""A compressed token trie (radix tree) over cached sequences.

One tree per namespace (model + cache salt). Every cached entry -- a family
snapshot or an idle session, whatever tier holds it -- is inserted with its
token ids. :meth:`RadixIndex.match` walks a request's tokens down the tree and
returns, deepest first, the entries sharing each matched depth, so the caller
can take the longest reusable one. Matching compares token ids, never hashes,
so a hash collision elsewhere can never serve another prefix.
"""

from __future__ import annotations

from typing import Generic, Hashable, Iterator, Protocol, Sequence, TypeVar

import numpy as np


class Indexed(Protocol, Hashable):
    namespace: str
    tokens: np.ndarray


E = TypeVar("E", bound=Indexed)


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """Number of equal leading elements of two int arrays."""
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    neq = np.flatnonzero(a[:n] != b[:n])
    return int(neq[0]) if neq.size else n


class _Node(Generic[E]):
    __slots__ = ("edge", "children", "entries")

    def __init__(self, edge: np.ndarray) -> None:
        self.edge = edge                      # tokens from the parent to this node
        self.children: dict[int, _Node[E]] = {}
        self.entries: set[E] = set()          # entries whose tokens pass through this node


class RadixIndex(Generic[E]):
    def __init__(self) -> None:
        self._roots: dict[str, _Node[E]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def insert(self, entry: E) -> None:
        tokens = np.asarray(entry.tokens, dtype=np.int32)
        node = self._roots.setdefault(entry.namespace, _Node(np.empty(0, np.int32)))
        if entry in node.entries:
            return
        node.entries.add(entry)
        d = 0
        n = tokens.shape[0]
        while d < n:
            child = node.children.get(int(tokens[d]))
            if child is None:
                leaf: _Node[E] = _Node(tokens[d:].copy())
                leaf.entries.add(entry)
                node.children[int(tokens[d])] = leaf
                break
            m = common_prefix_len(child.edge, tokens[d:])
            if m < child.edge.shape[0]:      # split the edge at m
                mid: _Node[E] = _Node(child.edge[:m].copy())
                mid.entries = set(child.entries)
                child.edge = child.edge[m:].copy()
                mid.children[int(child.edge[0])] = child
                node.children[int(tokens[d])] = mid
                child = mid
            child.entries.add(entry)
            node = child
            d += m
        self._count += 1

    def remove(self, entry: E) -> None:
        root = self._roots.get(entry.namespace)
        if root is None or entry not in root.entries:
            return
        tokens = np.asarray(entry.tokens, dtype=np.int32)
        path = [root]
        node = root
        d = 0
        while d < tokens.shape[0]:
            child = node.children.get(int(tokens[d]))
            if child is None or entry not in child.entries:
                break
            path.append(child)
            node = child
            d += child.edge.shape[0]
        for nd in path:
            nd.entries.discard(entry)
        # prune nodes no entry passes through any more
        for parent, child in zip(reversed(path[:-1]), reversed(path[1:])):
            if not child.entries:
                parent.children.pop(int(child.edge[0]), None)
        if not root.entries:
            del self._roots[entry.namespace]
        self._count -= 1

    def match(self, namespace: str, tokens: Sequence[int] | np.ndarray) -> Iterator[tuple[int, set[E]]]:
        """Yield ``(lcp, entries)`` deepest first.

        Every entry in a yielded set shares exactly ``lcp`` leading tokens with
        ``tokens`` -- except entries already yielded at a greater depth, which
        the caller should skip (they also appear in shallower sets).
        """
        root = self._roots.get(namespace)
        if root is None:
            return
        toks = np.asarray(tokens, dtype=np.int32)
        path: list[tuple[int, _Node[E]]] = [(0, root)]
        node, d = root, 0
        n = toks.shape[0]
        while d < n:
            child = node.children.get(int(toks[d]))
            if child is None:
                break
            m = common_prefix_len(child.edge, toks[d:])
            if m < child.edge.shape[0]:
                path.append((d + m, child))   # stopped inside the edge
                break
            d += m
            path.append((d, child))
            node = child
        for depth, nd in reversed(path):
            if nd.entries:
                yield depth, nd.entries

    def entries(self, namespace: str | None = None) -> Iterator[E]:
        roots = [self._roots.get(namespace)] if namespace is not None else list(self._roots.values())
        for r in roots:
            if r is not None:
                yield from list(r.entries)
