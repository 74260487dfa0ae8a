"""Turning sampled tokens into streamed text: UTF-8 reassembly and stop strings.

Token pieces may split a multi-byte character; an incremental decoder holds the
partial bytes back. Text that could be the start of a stop string is held back
too, so a stop string is never streamed and then retracted.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str] | None = None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in (stop or []) if s]
        self._pending = ""
        self.text = ""
        self.stopped = False

    def _hold_back(self) -> int:
        """Length of the longest suffix of pending text that starts a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that can be emitted now."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if self._stop:
            cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                out = self._pending[:cut]
                self._pending = ""
                self.stopped = True
                self.text += out
                return out
            keep = self._hold_back()
            out = self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep:]
        else:
            out, self._pending = self._pending, ""
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of generation: everything still held back."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        self.text += out
        return out
