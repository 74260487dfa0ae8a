"""One choice of a response, built from the scheduler's events: OpenAI's chat and legacy
completions shapes, whole or as stream chunks.

A choice is fed the text the scheduler sends (with each token's logprobs when asked for)
and ends with a finish reason. A chat choice with tools runs its text through a
:class:`~kv3d_core.api.tools.ToolCallParser`: calls become ``tool_calls`` (streamed as
deltas carrying ``index``, ``id``, ``function.name``, then pieces of ``function.arguments``)
and a reply that made calls finishes with ``tool_calls``. The whole (non-stream) response is
the same parse run once over the whole text, so both ways give the same calls.
"""

from __future__ import annotations

from typing import Any

from kv3d_core.api.logprobs import CompletionLogprobs, Piece, chat_content, merge
from kv3d_core.api.tools import ToolCallParser


class ChatChoice:
    def __init__(self, index: int, piece: Piece, *, parser: ToolCallParser | None = None,
                 logprobs: bool = False) -> None:
        self.index = index
        self.piece = piece
        self.parser = parser
        self.logprobs = logprobs
        self.content: list[str] = []
        self.lp_entries: list[dict] = []
        self._lp_unsent: list[dict] = []
        self.calls: list[dict] = []

    @property
    def plain(self) -> bool:
        """Text only (no tool parsing, no logprobs): each chunk is :meth:`text_entry`."""
        return self.parser is None and not self.logprobs

    def text_entry(self, text: str) -> dict:
        """The stream entry of a plain choice for ``text``."""
        return {"index": self.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def record(self, text: str) -> None:
        """A plain choice's text, sent by the caller as :meth:`text_entry` chunks."""
        self.content.append(text)

    def first(self) -> dict:
        return {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def _chunk(self, delta: dict, reason: str | None = None) -> dict:
        c: dict[str, Any] = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": reason}
        if self.logprobs:
            c["logprobs"] = {"content": self._lp_unsent}
            self._lp_unsent = []
        return c

    def feed(self, text: str, lps: list | None = None) -> list[dict]:
        """Stream chunks (``choices`` entries) for new text."""
        if lps and self.logprobs:
            entries = chat_content(lps, self.piece)
            self.lp_entries += entries
            self._lp_unsent += entries
        if self.parser is None:
            self.content.append(text)
            return [self._chunk({"content": text})] if text or self._lp_unsent else []
        text, deltas = self.parser.push(text)
        return self._parsed(text, deltas)

    def _parsed(self, text: str, deltas: list) -> list[dict]:
        out = []
        if text:
            self.content.append(text)
            out.append(self._chunk({"content": text}))
        for d in deltas:
            if d.name is not None:
                call = {"index": d.index, "id": d.id, "type": "function",
                        "function": {"name": d.name, "arguments": d.arguments}}
                self.calls.append({"id": d.id, "type": "function", "function": {"name": d.name, "arguments": ""}})
            else:
                call = {"index": d.index, "function": {"arguments": d.arguments}}
            self.calls[d.index]["function"]["arguments"] += d.arguments
            out.append(self._chunk({"tool_calls": [call]}))
        return out

    def reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def end(self, reason: str) -> list[dict]:
        """The last stream chunks: what the parser held back, then the finish reason."""
        out = self._parsed(*self.parser.finish()) if self.parser is not None else []
        return out + [self._chunk({}, self.reason(reason))]

    def whole(self, reason: str) -> dict:
        """The non-stream ``choices`` entry (after every :meth:`feed` and :meth:`end`)."""
        text = "".join(self.content)
        msg: dict[str, Any] = {"role": "assistant", "content": text if (text or not self.calls) else None}
        if self.calls:
            msg["tool_calls"] = self.calls
        return {"index": self.index, "message": msg,
                "logprobs": {"content": self.lp_entries} if self.logprobs else None,
                "finish_reason": self.reason(reason)}


class CompletionChoice:
    def __init__(self, index: int, piece: Piece, *, echo: str = "", logprobs: bool = False) -> None:
        self.index = index
        self.echo = echo
        self.text: list[str] = [echo]
        self.lp = CompletionLogprobs(piece, offset=len(echo)) if logprobs else None
        self.lp_parts: list[dict] = []
        self._lp_unsent: list[dict] = []

    @property
    def plain(self) -> bool:
        """Text only (no logprobs): each chunk is :meth:`text_entry`."""
        return self.lp is None

    def text_entry(self, text: str) -> dict:
        return {"index": self.index, "text": text, "logprobs": None, "finish_reason": None}

    def record(self, text: str) -> None:
        self.text.append(text)

    def first(self) -> dict | None:
        if not self.echo:
            return None
        return {"index": self.index, "text": self.echo, "logprobs": None, "finish_reason": None}

    def _chunk(self, text: str, reason: str | None = None) -> dict:
        lp = None
        if self.lp is not None:
            lp = merge(self._lp_unsent)
            self._lp_unsent = []
        return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": reason}

    def feed(self, text: str, lps: list | None = None) -> list[dict]:
        if lps and self.lp is not None:
            part = self.lp.add(lps)
            self.lp_parts.append(part)
            self._lp_unsent.append(part)
        self.text.append(text)
        return [self._chunk(text)] if text or self._lp_unsent else []

    def end(self, reason: str) -> list[dict]:
        return [self._chunk("", reason)]

    def whole(self, reason: str) -> dict:
        return {"index": self.index, "text": "".join(self.text),
                "logprobs": merge(self.lp_parts) if self.lp is not None else None, "finish_reason": reason}
