"""The hot tier: sequence ids and KV cells inside the backend's context.

llama.cpp does not report how many cells are in use. Two ledgers keep that account
exactly, one per KV layout, from the only operations that change it: appending
decoded tokens, sharing or copying a prefix, truncating and dropping a sequence.

- :class:`CellLedger` -- the unified layout: one cell pool, and with prefix sharing a
  cell may belong to many sequences.
- :class:`StreamLedger` -- a KV stream per sequence: each sequence owns the cells of
  its stream, nothing is shared, and a stream holds at most ``stream_cells``.

Cells are grouped in *segments*: runs of consecutive positions created by one
sequence. A segment is referenced by every sequence sharing some prefix of it;
its live cells are ``[p0, max end over its references)``. A cell is free again
when no sequence references it -- the same rule llama.cpp applies.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Segment:
    p0: int
    creator: int
    refs: dict[int, int] = field(default_factory=dict)  # seq -> end position (exclusive)

    @property
    def end(self) -> int:
        return max(self.refs.values()) if self.refs else self.p0

    @property
    def cells(self) -> int:
        return self.end - self.p0


class CellLedger:
    def __init__(self, n_cells: int) -> None:
        self.n_cells = n_cells
        self._segs: dict[int, list[_Segment]] = {}
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self.n_cells - self._used

    def length(self, seq: int) -> int:
        segs = self._segs.get(seq)
        return segs[-1].refs[seq] if segs else 0

    def _set_ref(self, seg: _Segment, seq: int, end: int | None) -> None:
        before = seg.cells
        if end is None or end <= seg.p0:
            seg.refs.pop(seq, None)
        else:
            seg.refs[seq] = end
        self._used += seg.cells - before

    def extend(self, seq: int, n: int) -> None:
        """``seq`` decoded ``n`` new tokens at its end."""
        if n <= 0:
            return
        segs = self._segs.setdefault(seq, [])
        end = segs[-1].refs[seq] if segs else 0
        last = segs[-1] if segs else None
        if last is not None and last.creator == seq and last.end == end:
            self._set_ref(last, seq, end + n)
        else:
            seg = _Segment(end, seq)
            segs.append(seg)
            self._set_ref(seg, seq, end + n)

    def share_prefix(self, src: int, dst: int, length: int) -> None:
        """``dst`` (empty) now shares ``src``'s cells at positions ``[0, length)``."""
        if self._segs.get(dst):
            raise ValueError(f"sequence {dst} is not empty")
        out: list[_Segment] = []
        for seg in self._segs.get(src, []):
            if seg.p0 >= length:
                break
            self._set_ref(seg, dst, min(seg.refs[src], length))
            out.append(seg)
        if out:
            self._segs[dst] = out

    def truncate(self, seq: int, length: int) -> None:
        """``seq`` keeps only positions ``[0, length)``."""
        segs = self._segs.get(seq, [])
        keep: list[_Segment] = []
        for seg in segs:
            if seg.p0 >= length:
                self._set_ref(seg, seq, None)
            else:
                self._set_ref(seg, seq, min(seg.refs[seq], length))
                keep.append(seg)
        if keep:
            self._segs[seq] = keep
        else:
            self._segs.pop(seq, None)

    def drop(self, seq: int) -> None:
        self.truncate(seq, 0)

    def own_cells(self, seq: int) -> int:
        """Cells that dropping ``seq`` would free."""
        return self.freed_by([seq])

    def freed_by(self, seqs) -> int:
        """Cells that dropping every sequence of ``seqs`` together would free (cells
        they share only among themselves included)."""
        drop = set(seqs)
        seen: set[int] = set()
        freed = 0
        for seq in drop:
            for seg in self._segs.get(seq, []):
                if id(seg) in seen:
                    continue
                seen.add(id(seg))
                others = [e for s, e in seg.refs.items() if s not in drop]
                rest = max(others) if others else seg.p0
                freed += max(0, seg.end - max(rest, seg.p0))
        return freed


class StreamLedger:
    """Cells of a layout with one KV stream per sequence (``stream_cells`` each).

    The same interface as :class:`CellLedger`; a prefix "shared" into another sequence is
    a copy there (``share_prefix`` gives the destination cells of its own). ``free`` is the
    cells of the whole context no sequence uses: a batch always fits (every sequence has its
    own stream, and requests are limited to a stream's size), so the scheduler never evicts
    for cells in this layout; what a new request needs is a free stream (:class:`SeqPool`)."""

    def __init__(self, n_streams: int, stream_cells: int) -> None:
        self.n_streams = n_streams
        self.stream_cells = stream_cells
        self.n_cells = n_streams * stream_cells
        self._len: dict[int, int] = {}
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self.n_cells - self._used

    def length(self, seq: int) -> int:
        return self._len.get(seq, 0)

    def _set(self, seq: int, n: int) -> None:
        if n > self.stream_cells:
            raise ValueError(f"sequence {seq} would hold {n} cells, its stream has {self.stream_cells}")
        self._used += n - self._len.get(seq, 0)
        if n:
            self._len[seq] = n
        else:
            self._len.pop(seq, None)

    def extend(self, seq: int, n: int) -> None:
        if n > 0:
            self._set(seq, self.length(seq) + n)

    def share_prefix(self, src: int, dst: int, length: int) -> None:
        if self._len.get(dst):
            raise ValueError(f"sequence {dst} is not empty")
        self._set(dst, min(length, self.length(src)))

    def truncate(self, seq: int, length: int) -> None:
        self._set(seq, min(self.length(seq), max(0, length)))

    def drop(self, seq: int) -> None:
        self._set(seq, 0)

    def own_cells(self, seq: int) -> int:
        return self.length(seq)

    def freed_by(self, seqs) -> int:
        return sum(self.length(s) for s in set(seqs))


class SeqPool:
    """Free sequence ids of the context, handed out lowest first: with a KV stream per
    sequence llama.cpp batches only runs of consecutive ids together, so running requests
    are kept packed at the low ids."""

    def __init__(self, n_seq_max: int) -> None:
        self.n_seq_max = n_seq_max
        self._free = list(range(n_seq_max))      # a heap
        self._is_free = set(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        if not self._free:
            return None
        seq = heapq.heappop(self._free)
        self._is_free.discard(seq)
        return seq

    def release(self, seq: int) -> None:
        if seq in self._is_free:
            raise ValueError(f"sequence {seq} released twice")
        heapq.heappush(self._free, seq)
        self._is_free.add(seq)
