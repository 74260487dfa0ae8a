"""Miss-ratio curves online: what hit ratio an LRU cache of any size would reach on the
accesses seen so far, byte-weighted, in bounded memory.

The estimator is SHARDS (Waldspurger et al., FAST '15) in its fixed-size form:

- **spatial sampling**: an access is sampled when the 64-bit hash of its key is below a
  threshold ``T``; the sampling rate is ``R = T / 2**64``, so every access to a sampled
  object is seen and its reuse distance is exact within the sample;
- **byte-weighted stack distances**: the distance of an access is the bytes of the distinct
  sampled objects used since the previous access to the same key, plus that object's own
  size, divided by ``R``. A cache of ``S`` bytes run as LRU (evicting the least recently
  used until what it holds fits) holds the object then exactly when the distance is at most
  ``S`` (objects whose size only grows, as a conversation's state does, keep this exact);
- **O(log n) per access**: a Fenwick tree over the last-access time slots of the tracked
  objects gives the bytes used since any slot; the slots are renumbered (compacted) when
  they run out, which is amortised O(log n);
- **bounded memory**: at most ``max_objects`` tracked objects. Past that the threshold is
  lowered to the largest tracked hash, which drops that object (and lowers ``R``) -- the
  fixed-size SHARDS variant; accesses sampled at a higher rate keep their weight ``1/R``
  of the time;
- the **curve** is a histogram of the weighted distances in geometric bins
  (``bins_per_octave`` per doubling of bytes); the hit ratio at size ``S`` is the weight of
  distances up to ``S`` over the weight of every sampled access (first accesses are misses
  at every size). Between bin edges it is interpolated linearly.

With ``rate=1`` and no more objects than ``max_objects`` the curve is exact at every bin
edge (``tests/test_mrc.py`` checks it against a brute-force LRU replay, and the sampled
estimate against the same replay within a stated tolerance).
"""

from __future__ import annotations

import heapq
import math

import xxhash

_SPACE = 2 ** 64


class Fenwick:
    """Prefix sums over ``n`` slots, point updates, O(log n) each."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tree = [0] * (n + 1)
        self.total = 0

    def add(self, i: int, v: int) -> None:
        self.total += v
        i += 1
        while i <= self.n:
            self.tree[i] += v
            i += i & -i

    def prefix(self, i: int) -> int:
        """Sum of slots ``[0, i)``."""
        s = 0
        while i > 0:
            s += self.tree[i]
            i -= i & -i
        return s

    def suffix(self, i: int) -> int:
        """Sum of slots ``[i, n)``."""
        return self.total - self.prefix(i)


class ShardsMRC:
    """The online miss-ratio curve of one access stream (see the module docstring)."""

    @property
    def tracked(self) -> int:
        """Objects tracked now (at most ``max_objects``)."""
        return len(self._objects)

    def __init__(self, rate: float = 0.1, max_objects: int = 8192, *, class_rates: tuple[float, ...] = (),
                 bins_per_octave: int = 16, min_bytes: int = 1024, max_bytes: int = 2 ** 44) -> None:
        rates = (rate, *class_rates)
        for r in rates:
            if not 0 < r <= 1:
                raise ValueError(f"sampling rate {r!r}: use a fraction in (0, 1]")
        if max_objects < 1:
            raise ValueError(f"max_objects {max_objects!r}: use a count >= 1")
        # class c is sampled at min(1, threshold * mult[c] / 2**64): lowering the threshold lowers
        # every class's rate in proportion
        self.threshold = float(rate * _SPACE)
        self.mults = [r / rate for r in rates]
        self.max_objects = int(max_objects)
        self.bins_per_octave = int(bins_per_octave)
        self.min_bytes = int(min_bytes)
        n_bins = int(math.ceil(math.log2(max_bytes / min_bytes) * bins_per_octave)) + 1
        self.edges = [self.min_bytes * 2 ** (i / bins_per_octave) for i in range(n_bins)]
        self.hist = [0.0] * n_bins        # weight of the distances in (edge[i-1], edge[i]]
        self.beyond = 0.0                 # weight of distances past the last edge
        self.cold = 0.0                   # weight of first accesses (misses at any size)
        self.accesses = 0                 # every access, sampled or not
        self.sampled = 0
        self._objects: dict[str, tuple[float, int, int, int]] = {}   # key -> (normalised hash, class, slot, size)
        self._by_hash: list[tuple[float, str]] = []                 # max-heap of tracked hashes (negated)
        self._slots = 4 * self.max_objects
        self._trees = [Fenwick(self._slots) for _ in rates]
        self._next = 0

    @property
    def rate(self) -> float:
        """The sampling rate of class 0 (every key not given another class) now."""
        return self.class_rate(0)

    def class_rate(self, cls: int) -> float:
        return min(1.0, self.threshold * self.mults[cls] / _SPACE)

    def access(self, key: str, nbytes: int, cls: int = 0) -> None:
        """One access to ``key``, an object of ``nbytes`` bytes now, of sampling class ``cls``
        (0: the base rate; others: ``class_rates``, for few objects many accesses touch, whose
        sampling at the base rate would leave the estimate to chance)."""
        self.accesses += 1
        u = xxhash.xxh3_64_intdigest(key.encode()) / self.mults[cls]
        if u >= self.threshold:
            return
        self.sampled += 1
        old = self._objects.pop(key, None)
        if old is None:
            self.cold += 1.0 / self.class_rate(cls)
            heapq.heappush(self._by_hash, (-u, key))
        else:
            _u, ocls, slot, size = old
            distance = sum(t.suffix(slot) / self.class_rate(c) for c, t in enumerate(self._trees))
            self._record(distance, 1.0 / self.class_rate(cls))
            self._trees[ocls].add(slot, -size)
        if self._next >= self._slots:
            self._compact()
        size = max(0, int(nbytes))
        self._objects[key] = (u, cls, self._next, size)
        self._trees[cls].add(self._next, size)
        self._next += 1
        while len(self._objects) > self.max_objects:
            self._lower_threshold()

    def _record(self, distance: float, weight: float) -> None:
        if distance <= self.min_bytes:
            self.hist[0] += weight
            return
        i = int(math.ceil(math.log2(distance / self.min_bytes) * self.bins_per_octave - 1e-9))
        if i < len(self.hist):
            self.hist[i] += weight
        else:
            self.beyond += weight

    def _lower_threshold(self) -> None:
        """Drop the tracked object of the largest (normalised) hash; the threshold becomes it."""
        neg, key = heapq.heappop(self._by_hash)
        u, cls, slot, size = self._objects.pop(key)
        self._trees[cls].add(slot, -size)
        self.threshold = u

    def _compact(self) -> None:
        """Renumber the tracked objects' slots 0..n-1 in access order, rebuild the trees."""
        items = sorted(self._objects.items(), key=lambda kv: kv[1][2])
        self._trees = [Fenwick(self._slots) for _ in self._trees]
        for i, (key, (u, cls, _slot, size)) in enumerate(items):
            self._objects[key] = (u, cls, i, size)
            self._trees[cls].add(i, size)
        self._next = len(items)

    # -- the curve -------------------------------------------------------------------------
    def total_weight(self) -> float:
        return sum(self.hist) + self.beyond + self.cold

    def curve(self) -> list[tuple[float, float]]:
        """``[(cache bytes, hit ratio)]`` at every bin edge (empty before any sampled access)."""
        total = self.total_weight()
        if total <= 0:
            return []
        out, acc = [], 0.0
        for edge, w in zip(self.edges, self.hist):
            acc += w
            out.append((edge, min(1.0, acc / total)))
        return out

    def hit_ratio(self, nbytes: float) -> float | None:
        """The estimated hit ratio of an LRU cache of ``nbytes``, interpolated between bin
        edges; None before any sampled access."""
        return interpolate(self.curve(), nbytes)


def interpolate(curve: list[tuple[float, float]], nbytes: float) -> float | None:
    """A curve's hit ratio at ``nbytes``, linear between its points (0 at 0 bytes)."""
    if not curve:
        return None
    if nbytes < curve[0][0]:
        return curve[0][1] * max(0.0, nbytes) / curve[0][0]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if nbytes <= x1:
            return y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0)
    return curve[-1][1]
