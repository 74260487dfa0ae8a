"""The hot tier: sequence ids and KV cells inside the backend's context.

llama.cpp does not report how many cells are in use, and with prefix sharing a
cell may belong to many sequences. :class:`CellLedger` keeps that account
exactly, from the only operations that change it: appending decoded tokens,
sharing a prefix (``seq_cp``), truncating and dropping a sequence.

Cells are grouped in *segments*: runs of consecutive positions created by one
sequence. A segment is referenced by every sequence sharing some prefix of it;
its live cells are ``[p0, max end over its references)``. A cell is free again
when no sequence references it -- the same rule llama.cpp applies.
"""

from __future__ import annotations

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


class SeqPool:
    """Free sequence ids of the context."""

    def __init__(self, n_seq_max: int) -> None:
        self.n_seq_max = n_seq_max
        self._free = list(range(n_seq_max - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, seq: int) -> None:
        if seq in self._free:
            raise ValueError(f"sequence {seq} released twice")
        self._free.append(seq)
