"""Log-probabilities in OpenAI's two shapes.

The figures are the model's own distribution at each position (log-softmax of the raw
logits: before logit_bias, penalties, temperature, top-k/top-p and any grammar), as the
backend's :meth:`~kv3d_core.contracts.backend.ExecutionBackend.token_logprob` gives them.

- chat: ``choices[].logprobs.content[]`` = ``{token, logprob, bytes, top_logprobs: [{token,
  logprob, bytes}]}`` (``top_logprobs`` alternatives, most likely first);
- completions: ``choices[].logprobs`` = ``{tokens, token_logprobs, top_logprobs, text_offset}``,
  ``top_logprobs`` a ``{token: logprob}`` per position holding the ``logprobs`` most likely
  tokens and the sampled one, ``text_offset`` each token's character offset in the choice's
  ``text`` (after an echoed prompt).
"""

from __future__ import annotations

import codecs
from typing import Callable

from kv3d_core.contracts.backend import TokenLogprob

Piece = Callable[[int], bytes]


def token_text(piece: bytes) -> str:
    """A token's text; a token that is part of a UTF-8 character is ``bytes:\\xe2\\x80``
    (OpenAI's form), its exact bytes being in ``bytes``."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def chat_content(lps: list[TokenLogprob], piece: Piece) -> list[dict]:
    out = []
    for lp in lps:
        p = piece(lp.token)
        out.append({"token": token_text(p), "logprob": lp.logprob, "bytes": list(p),
                    "top_logprobs": [{"token": token_text(piece(t)), "logprob": v, "bytes": list(piece(t))}
                                     for t, v in lp.top]})
    return out


class CompletionLogprobs:
    """The completions shape, built token by token (offsets count characters)."""

    def __init__(self, piece: Piece, offset: int = 0) -> None:
        self.piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = offset

    def add(self, lps: list[TokenLogprob]) -> dict:
        """The shape for ``lps`` (for a stream chunk; :func:`merge` joins chunks)."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            p = self.piece(lp.token)
            out["tokens"].append(token_text(p))
            out["token_logprobs"].append(lp.logprob)
            top = {token_text(self.piece(t)): v for t, v in lp.top}
            top.setdefault(token_text(p), lp.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._chars)
            self._chars += len(self._decoder.decode(p))
        return out


def merge(parts: list[dict]) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in out:
            out[k] += p[k]
    return out
