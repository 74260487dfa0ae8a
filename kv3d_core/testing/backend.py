"""An in-memory :class:`~kv3d_core.contracts.ExecutionBackend` for fast tests: no llama.cpp.

:class:`FakeBackend` implements the whole backend contract over a synthetic model, so the
prefix cache, the tier stack and the scheduler run their real logic in milliseconds.

What it models:

- **KV cells.** Each sequence holds cells, one per position, each with the token decoded
  there. Two layouts (``kv_unified``), as llama.cpp's: one pool of ``n_ctx`` cells shared by
  every sequence, where :meth:`~FakeBackend.seq_copy` shares cells (a cell is counted once
  however many sequences hold it, and freed when the last one lets go), or one stream of
  ``n_ctx_seq`` cells per sequence, where it copies them. When cells run out
  :meth:`~FakeBackend.decode` raises :class:`~kv3d_core.errors.KVCacheFullError` and
  :meth:`~FakeBackend.seq_state_set` raises :class:`~kv3d_core.errors.NoFreeCells`. A batch
  must continue each sequence at the position after the last one it holds.
- **K/V.** A cell's K and V rows (float16; ``n_head_kv`` heads of ``head_dim_k`` /
  ``head_dim_v`` per layer) are a deterministic function of its token, its position and the
  previous cell's K/V (so, through the chain, of every token before it): an elementwise,
  smooth recurrence with fixed pseudo-random weights. Sequences of equal tokens hold equal
  cells; a sequence continued after a restore computes from the restored values, so an exact
  restore continues exactly and a lossy one (an int8 codec) continues close by.
- **Logits.** A fixed pseudo-random projection of the sequence's last cell plus the mean of
  all its cells: a deterministic function of the cells (every token up to that position),
  independent of what else is in the batch. Any change of a stored value changes them.
- **State blobs** of its own layout (:class:`~kv3d_core.testing.state_layout.RowsLayout`, its
  :attr:`~FakeBackend.state_layout`: K/V rows as they are, after a JSON header), so the real
  codecs and tiers work on them through the layout contract alone; the round trip is exact.
- **Tokenizer.** Byte level: ids 0..255 are bytes, then ``<s>`` (BOS), ``</s>`` (EOS),
  ``<|im_start|>`` and ``<|im_end|>`` (the control tokens of the ChatML template the prompt
  renderer falls back to, as ``chat_template`` is None). The ids above those decode to one
  lowercase letter each, so sampled text is readable; tokenizing never produces them.
  ``</s>`` and ``<|im_end|>`` end generation.
- **Sampling.** Logit bias, repetition/frequency/presence penalties (last 64 tokens), then
  greedy argmax, or top-k, top-p, min-p, temperature and a draw from a seeded numpy
  Generator, in llama.cpp's order.

What it does not model: attention (there is none; K/V are synthetic), sliding-window layers,
quantized KV types, grammars (:meth:`~FakeBackend.make_sampler` refuses one, as the contract
asks of a backend that cannot honour it), threads (everything runs on the calling thread).

Counters for tests: :attr:`~FakeBackend.decode_calls`, :attr:`~FakeBackend.decoded_tokens`,
:attr:`~FakeBackend.state_gets`, :attr:`~FakeBackend.state_sets`; inspection:
:meth:`~FakeBackend.seq_kv`, :meth:`~FakeBackend.seq_tokens`, :meth:`~FakeBackend.cell_holders`,
:attr:`~FakeBackend.cells_used`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from typing import Sequence

import numpy as np

from kv3d_core.contracts.backend import BatchEntry, ExecutionBackend, ModelInfo, Sampler, SamplingParams
from kv3d_core.contracts.codec import KVArrays
from kv3d_core.errors import (BackendError, KVCacheFullError, ModelLoadError, NoFreeCells, StateFormatError,
                              StateRestoreError)
from kv3d_core.testing.state_layout import RowsLayout

BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
CONTROL_TOKENS: dict[str, int] = {"<s>": BOS, "</s>": EOS, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
FIRST_FILLER = 260
"""First id past the byte and control tokens: decodes to a letter, never produced by tokenizing."""
PENALTY_WINDOW = 64

_CONTROL_RE = re.compile("|".join(re.escape(t) for t in sorted(CONTROL_TOKENS, key=len, reverse=True)))
_MIX = 0.5                  # weight of the previous cell in the K/V recurrence
_LOGIT_SCALE = 0.5


class _Cell:
    """One KV cell: its position, the token decoded there (-1 when it came from a state blob,
    which holds no tokens), its K/V as one float16 row (every K layer, then every V layer),
    and the sequences holding it."""

    __slots__ = ("pos", "token", "kv", "holders")

    def __init__(self, pos: int, token: int, kv: np.ndarray, holder: int) -> None:
        self.pos = pos
        self.token = token
        self.kv = kv
        self.holders = {holder}


class FakeSampler(Sampler):
    """The fake's sampler chain; see the module docstring for what it applies."""

    def __init__(self, backend: "FakeBackend", params: SamplingParams) -> None:
        n_vocab = backend.info.n_vocab
        if params.grammar:
            raise BackendError("the fake backend has no grammar engine: it cannot honour a grammar")
        self._bias = np.zeros(n_vocab, np.float64)
        for tok, bias in params.logit_bias:
            if not 0 <= int(tok) < n_vocab:
                raise BackendError(f"logit_bias token {tok} is outside the vocabulary (0..{n_vocab - 1})")
            self._bias[int(tok)] += float(bias)
        self._backend: FakeBackend | None = backend
        self.params = params
        self._penalties = bool(params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1.0)
        #: sample() is a plain argmax over the logits row (no bias, no penalties): batchable
        self.plain_argmax = params.greedy and not (self._penalties or params.logit_bias)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self._rng = np.random.default_rng(seed & 0xFFFFFFFF)
        self._history: list[int] = []

    def _logits(self, output: int) -> np.ndarray:
        if self._backend is None:
            raise BackendError("the sampler was closed")
        return np.asarray(self._backend.logits(output), dtype=np.float64)

    def _record(self, token: int) -> None:
        self._history.append(int(token))
        if len(self._history) > PENALTY_WINDOW:
            del self._history[:-PENALTY_WINDOW]

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """Logit bias, then the penalties over the last tokens (llama.cpp's penalties sampler)."""
        out = logits + self._bias
        if self._penalties and self._history:
            p = self.params
            ids, counts = np.unique(np.asarray(self._history, np.int64), return_counts=True)
            sel = out[ids]
            sel = np.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
            out[ids] = sel - counts * p.frequency_penalty - p.presence_penalty
        return out

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        keep = np.isfinite(logits)
        if not keep.any():
            raise BackendError("every token was banned")
        if p.top_k > 0 and p.top_k < int(keep.sum()):
            cut = np.sort(logits[keep])[-p.top_k]
            keep &= logits >= cut
        if p.top_p < 1.0 or p.min_p > 0.0:
            z = np.where(keep, logits, -np.inf)
            probs = np.exp(z - z.max())
            probs /= probs.sum()
            if p.top_p < 1.0:
                order = np.argsort(-probs, kind="stable")
                cum = np.cumsum(probs[order])
                n_keep = int(np.searchsorted(cum, p.top_p)) + 1      # smallest set reaching top_p
                mask = np.zeros_like(keep)
                mask[order[:n_keep]] = True
                keep &= mask
            if p.min_p > 0.0:
                keep &= probs >= p.min_p * probs.max()
        z = np.where(keep, logits / p.temperature, -np.inf)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return int(self._rng.choice(probs.shape[0], p=probs))

    def sample(self, output: int) -> int:
        token = self._draw(self._adjusted(self._logits(output)))
        self._record(token)
        return token

    def accept(self, token: int) -> None:
        if self._backend is None:
            raise BackendError("the sampler was closed")
        self._record(token)

    def close(self) -> None:
        self._backend = None


def _check_shape(*, n_layer, n_head_kv, head_dim, head_dim_v, n_ctx_seq, max_batch_tokens, n_ctx_train,
                 n_seq_max, n_vocab) -> None:
    """:class:`FakeBackend`'s shape arguments, each refused with a ValueError naming it."""
    for name, value in (("n_layer", n_layer), ("n_head_kv", n_head_kv), ("head_dim", head_dim),
                        ("head_dim_v", head_dim_v), ("n_ctx_seq", n_ctx_seq),
                        ("max_batch_tokens", max_batch_tokens)):
        if int(value) < 1:
            raise ValueError(f"{name}={value!r}: must be at least 1")
    if n_ctx_train < n_ctx_seq:
        raise ValueError(f"n_ctx_train={n_ctx_train} is less than n_ctx_seq={n_ctx_seq}")
    if not 1 <= int(n_seq_max) <= MAX_SEQ:
        raise ValueError(f"n_seq_max={n_seq_max!r}: must be within 1..{MAX_SEQ}")
    if int(n_vocab) <= FIRST_FILLER:
        raise ValueError(f"n_vocab={n_vocab!r}: must be more than {FIRST_FILLER} (bytes and control tokens)")


MAX_SEQ = 256        # llama.cpp's LLAMA_MAX_SEQ: the same bound as the real backend


class FakeBackend(ExecutionBackend):
    """A synthetic model over in-memory KV cells (module docstring: what it models).

    Keyword arguments (defaults keep tests fast):

    - ``n_layer``, ``n_head_kv``, ``head_dim`` (``head_dim_v``: V's, default ``head_dim``),
      ``n_vocab`` (at least 261: bytes, control tokens, one filler), ``seed`` (the weights).
    - ``n_seq_max`` sequences; ``n_ctx_seq``: the most cells one sequence may hold
      (``info.n_ctx_seq``, where the scheduler ends a reply), the size of each stream when
      ``kv_unified`` is false; ``n_ctx``: cells of the unified pool
      (default ``n_seq_max * n_ctx_seq``, or from ``hot_mb`` when given); ``n_ctx_train``: the
      model's positions (default the larger of ``n_ctx_seq`` and 1024): a stream is full
      before its positions run out, as llama.cpp's are.
    - ``max_batch_tokens``: most tokens one :meth:`decode` takes.
    - ``add_bos``: ``tokenize(add_special=True)`` puts ``<s>`` first.
    - ``model_id``; ``model_path`` must be None (the fake has no model files); ``n_threads``
      is accepted for the engine's keyword set and unused (everything runs on the caller's thread).
    """

    def __init__(
        self,
        *,
        n_layer: int = 2,
        n_head_kv: int = 2,
        head_dim: int = 8,
        head_dim_v: int | None = None,
        n_vocab: int = 512,
        n_seq_max: int = 8,
        n_ctx_seq: int | None = 256,
        n_ctx: int | None = None,
        n_ctx_train: int | None = None,
        kv_unified: bool = True,
        max_batch_tokens: int = 64,
        add_bos: bool = False,
        seed: int = 0,
        model_id: str | None = None,
        model_path: str | None = None,
        hot_mb: float | None = None,
        n_threads: int | None = None,
    ) -> None:
        if model_path is not None:
            raise ModelLoadError(f"the fake backend loads no model files (got {model_path!r}); leave model.path unset")
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        n_ctx_seq = 256 if n_ctx_seq is None else int(n_ctx_seq)
        n_ctx_train = max(n_ctx_seq, 1024) if n_ctx_train is None else int(n_ctx_train)
        _check_shape(n_layer=n_layer, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v,
                     n_ctx_seq=n_ctx_seq, max_batch_tokens=max_batch_tokens, n_ctx_train=n_ctx_train,
                     n_seq_max=n_seq_max, n_vocab=n_vocab)
        self._unified = bool(kv_unified)
        self._n_layer, self._n_head_kv = int(n_layer), int(n_head_kv)
        self._wk, self._wv = int(n_head_kv) * int(head_dim), int(n_head_kv) * int(head_dim_v)
        self._dim = self._n_layer * (self._wk + self._wv)
        self._n_vocab = int(n_vocab)
        self._n_seq_max = int(n_seq_max)
        self._n_pos = n_ctx_train                # positions 0 .. n_ctx_train - 1
        self._max_batch = int(max_batch_tokens)
        self._add_bos = bool(add_bos)
        self._size_cells(n_ctx, n_ctx_seq, hot_mb)
        self._layout = RowsLayout()
        self._make_weights(int(seed))

        self._seqs: list[dict[int, _Cell]] = [{} for _ in range(self._n_seq_max)]
        self._used = 0
        self._rows: dict[int, np.ndarray] = {}
        self._closed = False
        #: :meth:`decode` calls that decoded at least one token
        self.decode_calls = 0
        #: tokens decoded (K/V computed) since construction or :meth:`reset_counters`
        self.decoded_tokens = 0
        self.state_gets = 0
        self.state_sets = 0
        self.info = self._model_info(model_id, int(head_dim), int(head_dim_v), n_ctx_seq, int(seed), n_threads)

    def _size_cells(self, n_ctx: int | None, n_ctx_seq: int, hot_mb: float | None) -> None:
        """The unified pool's cells (``n_ctx``, else from ``hot_mb``, else every sequence's
        context), or ``n_seq_max`` streams of ``n_ctx_seq`` cells."""
        if self._unified:
            if n_ctx is None:
                n_ctx = int(hot_mb * 2**20 // (2 * self._dim)) if hot_mb else self._n_seq_max * n_ctx_seq
            self._n_ctx = int(n_ctx)
            if self._n_ctx < 1:
                raise ValueError(f"n_ctx={n_ctx!r}: must be at least 1")
            self._stream_cells = self._n_ctx
        else:
            self._n_ctx = self._n_seq_max * n_ctx_seq
            self._stream_cells = n_ctx_seq

    def _make_weights(self, seed: int) -> None:
        """The synthetic weights (float64; the recurrence and the logits are elementwise
        operations and fixed-order sums, so results do not depend on memory alignment)."""
        rng = np.random.default_rng([seed, 0x6B7633])
        self._emb = rng.uniform(-1.0, 1.0, (self._n_vocab, self._dim))
        self._pos_emb = rng.uniform(-0.5, 0.5, (self._n_pos, self._dim))
        self._mix_a = rng.uniform(-1.0, 1.0, self._dim)
        self._mix_b = rng.uniform(-1.0, 1.0, self._dim)
        self._out = rng.uniform(-1.0, 1.0, (self._n_vocab, self._dim))
        self._zero = np.zeros(self._dim, np.float16)

    def _model_info(self, model_id: str | None, head_dim: int, head_dim_v: int, n_ctx_seq: int, seed: int,
                    n_threads: int | None) -> ModelInfo:
        """What the fake reports as its model; the fingerprint covers everything a state
        blob's layout depends on (the stream count too, in the streams layout)."""
        shape = dict(n_layer=self._n_layer, n_head_kv=self._n_head_kv, head_dim_k=head_dim,
                     head_dim_v=head_dim_v, n_vocab=self._n_vocab, n_ctx_train=self._n_pos, seed=seed,
                     layout=RowsLayout.name)
        if not self._unified:                    # blobs carry one section per stream: this layout only
            shape["streams"] = self._n_seq_max
        fp = hashlib.blake2b(json.dumps(shape, sort_keys=True).encode(), digest_size=16, person=b"kv3d-fake")
        return ModelInfo(
            model_id=model_id or "kv3d-fake",
            path="",
            architecture="fake",
            fingerprint=fp.hexdigest(),
            n_ctx_train=self._n_pos,
            n_ctx=self._n_ctx,
            n_ctx_seq=min(n_ctx_seq, self._n_ctx),
            n_seq_max=self._n_seq_max,
            n_layer=self._n_layer,
            n_vocab=self._n_vocab,
            n_head_kv=self._n_head_kv,
            head_dim_k=head_dim,
            head_dim_v=head_dim_v,
            kv_bytes_per_token=2 * self._dim,
            chat_template=None,
            bos_token="<s>",
            eos_token="</s>",
            add_bos=self._add_bos,
            build={"backend": "fake", "kv_unified": self._unified,
                   "n_threads": n_threads},
        )

    # -- inspection (tests) ------------------------------------------------------
    @property
    def cells_used(self) -> int:
        """Cells in use: in the unified pool a cell several sequences share counts once."""
        return self._used

    @property
    def cells_free(self) -> int:
        """Free cells of the unified pool (streams: of every stream together)."""
        return self._n_ctx - self._used

    def seq_tokens(self, seq: int) -> list[int]:
        """The token at each position ``seq`` holds, in position order (-1: restored from a blob)."""
        return [c.token for _, c in sorted(self._cells(seq).items())]

    def seq_kv(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions int32 ``[n]``, K/V float16 ``[n, dim]``) of ``seq``'s cells in position
        order; a row holds every K layer, then every V layer, as in the state blob."""
        items = sorted(self._cells(seq).items())
        pos = np.fromiter((p for p, _ in items), np.int32, len(items))
        kv = np.stack([c.kv for _, c in items]) if items else np.zeros((0, self._dim), np.float16)
        return pos, kv

    def cell_holders(self, seq: int, pos: int) -> frozenset[int]:
        """The sequences holding the cell ``seq`` holds at ``pos`` (empty: it holds none there)."""
        cell = self._cells(seq).get(int(pos))
        return frozenset(cell.holders) if cell is not None else frozenset()

    def reset_counters(self) -> None:
        self.decode_calls = self.decoded_tokens = self.state_gets = self.state_sets = 0

    # -- text ------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        out = [BOS] if add_special and self._add_bos else []
        if not parse_special:
            return out + list(text.encode("utf-8"))
        pos = 0
        for m in _CONTROL_RE.finditer(text):
            out += text[pos:m.start()].encode("utf-8")
            out.append(CONTROL_TOKENS[m.group(0)])
            pos = m.end()
        return out + list(text[pos:].encode("utf-8"))

    def control_tokens(self) -> dict[str, int]:
        return dict(CONTROL_TOKENS)

    def token_piece(self, token: int) -> bytes:
        t = int(token)
        if 0 <= t < 256:
            return bytes((t,))
        if BOS <= t < FIRST_FILLER:
            return b""
        if FIRST_FILLER <= t < self._n_vocab:
            return bytes((ord("a") + (t - FIRST_FILLER) % 26,))
        raise BackendError(f"token {token} is outside the vocabulary (0..{self._n_vocab - 1})")

    def is_eog(self, token: int) -> bool:
        return int(token) in (EOS, IM_END)

    # -- compute -----------------------------------------------------------------
    @property
    def max_batch_tokens(self) -> int:
        return self._max_batch

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("the backend is closed")

    def _cells(self, seq: int) -> dict[int, _Cell]:
        if not 0 <= int(seq) < self._n_seq_max:
            raise BackendError(f"sequence id {seq} is outside 0..{self._n_seq_max - 1}")
        return self._seqs[int(seq)]

    def _next_kv(self, prev: np.ndarray, token: int, pos: int) -> np.ndarray:
        """K/V of ``token`` at ``pos`` after a cell holding ``prev``: a squashed mix of the
        token's and the position's embedding and of the previous cell (elementwise)."""
        x = prev.astype(np.float64)
        z = self._emb[token] + self._pos_emb[pos] + _MIX * (x * self._mix_a + np.roll(x, 1) * self._mix_b)
        return (z / (1.0 + np.abs(z))).astype(np.float16)

    def _logits_of(self, seq: int) -> np.ndarray:
        """Logits after the last cell of ``seq``: the projection of that cell plus the mean
        of all its cells (summed in position order)."""
        _, kv = self.seq_kv(seq)
        x = kv.astype(np.float64)
        feat = x[-1] + x.sum(axis=0) / x.shape[0]
        row = ((self._out * feat).sum(axis=1) * _LOGIT_SCALE).astype(np.float32)
        row.flags.writeable = False
        return row

    def decode(self, entries: Sequence[BatchEntry]) -> list[int | None]:
        self._check_open()
        order = sorted(range(len(entries)), key=lambda i: entries[i].seq)   # as llama.cpp's batch
        total = sum(len(e.tokens) for e in entries)
        if total > self._max_batch:
            raise BackendError(f"batch of {total} tokens, more than max_batch_tokens={self._max_batch}")
        # check everything first: a refused batch leaves no trace
        next_pos: dict[int, int] = {}
        adds: Counter[int] = Counter()
        for i in order:
            e = entries[i]
            k = len(e.tokens)
            if k == 0:
                continue
            cells = self._cells(e.seq)
            bad = [int(t) for t in e.tokens if not 0 <= int(t) < self._n_vocab]
            if bad:
                raise BackendError(f"token {bad[0]} is outside the vocabulary (0..{self._n_vocab - 1})")
            expect = next_pos.get(e.seq, max(cells, default=-1) + 1)
            if e.pos0 != expect:
                raise BackendError(f"sequence {e.seq}: the batch starts at position {e.pos0}, the sequence "
                                   f"holds positions up to {expect - 1}: positions must continue it")
            if e.pos0 + k > self._n_pos:
                raise BackendError(f"sequence {e.seq}: position {e.pos0 + k - 1} is past the model's "
                                   f"{self._n_pos} positions")
            next_pos[e.seq] = e.pos0 + k
            adds[e.seq] += k
        if self._unified:
            if total > self.cells_free:
                raise KVCacheFullError(f"no free KV cells for the batch: {total} needed, {self.cells_free} free")
        else:
            for seq, k in adds.items():
                if len(self._seqs[seq]) + k > self._stream_cells:
                    raise KVCacheFullError(f"no free KV cells in the stream of sequence {seq}: "
                                           f"{len(self._seqs[seq])} of {self._stream_cells} used, {k} needed")
        if total == 0:
            return [None] * len(entries)
        outputs: list[int | None] = [None] * len(entries)
        rows: dict[int, np.ndarray] = {}
        n = 0
        for i in order:
            e = entries[i]
            if not e.tokens:
                continue
            cells = self._seqs[e.seq]
            prev = cells[e.pos0 - 1].kv if e.pos0 > 0 else self._zero
            for j, tok in enumerate(e.tokens):
                prev = self._next_kv(prev, int(tok), e.pos0 + j)
                cells[e.pos0 + j] = _Cell(e.pos0 + j, int(tok), prev, e.seq)
            self._used += len(e.tokens)
            n += len(e.tokens)
            if e.logits:
                outputs[i] = n - 1
                rows[n - 1] = self._logits_of(e.seq)
        self._rows = rows
        self.decode_calls += 1
        self.decoded_tokens += total
        return outputs

    def logits(self, output: int) -> np.ndarray:
        row = self._rows.get(int(output))
        if row is None:
            raise BackendError(f"no logits for output {output}")
        return row

    def make_sampler(self, params: SamplingParams) -> Sampler:
        return FakeSampler(self, params)

    def check_grammar(self, grammar: str) -> str | None:
        return "the fake backend has no grammar engine"

    def sample_many(self, samplers: Sequence[Sampler], outputs: Sequence[int]) -> list[int]:
        """Plain greedy samplers of this backend as one argmax over their rows; the rest one by one."""
        out = [0] * len(samplers)
        plain = [i for i, s in enumerate(samplers)
                 if isinstance(s, FakeSampler) and s.plain_argmax and s._backend is self]
        batched = set(plain)
        for i, s in enumerate(samplers):
            if i not in batched:
                out[i] = s.sample(outputs[i])
        if plain:
            picked = np.stack([self.logits(outputs[i]) for i in plain]).argmax(axis=1)
            for i, tok in zip(plain, picked.tolist()):
                samplers[i]._record(tok)
                out[i] = int(tok)
        return out

    # -- KV cells ------------------------------------------------------------------
    def _release(self, seq: int, cell: _Cell) -> None:
        cell.holders.discard(seq)
        if not cell.holders:
            self._used -= 1

    def seq_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Unified: ``dst`` shares ``src``'s cells in ``[p0, p1)`` (``p1 < 0``: to the end).
        Streams: ``dst``'s stream gets copies of them. ``dst`` must hold none of those positions."""
        self._check_open()
        src_cells, dst_cells = self._cells(src), self._cells(dst)
        if src == dst:
            return
        lo, hi = max(0, int(p0)), (int(p1) if int(p1) >= 0 else self._n_pos)
        picked = [c for p, c in src_cells.items() if lo <= p < hi]
        clash = [c.pos for c in picked if c.pos in dst_cells]
        if clash:
            raise BackendError(f"seq_copy({src}, {dst}): sequence {dst} already holds position {min(clash)}")
        if self._unified:
            for c in picked:
                c.holders.add(dst)
                dst_cells[c.pos] = c
            return
        if len(dst_cells) + len(picked) > self._stream_cells:
            raise KVCacheFullError(f"seq_copy({src}, {dst}): the stream of sequence {dst} has too few free cells")
        for c in picked:
            dst_cells[c.pos] = _Cell(c.pos, c.token, c.kv, dst)
        self._used += len(picked)

    def seq_remove(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        self._check_open()
        cells = self._cells(seq)
        lo, hi = max(0, int(p0)), (int(p1) if int(p1) >= 0 else self._n_pos)
        for p in [p for p in cells if lo <= p < hi]:
            self._release(seq, cells.pop(p))

    def seq_pos_max(self, seq: int) -> int:
        return max(self._cells(seq), default=-1)

    def seq_pos_min(self, seq: int) -> int:
        """Smallest position held by ``seq``; -1 when it holds none (llama.cpp's, beside the contract)."""
        return min(self._cells(seq), default=-1)

    @property
    def state_layout(self) -> RowsLayout:
        return self._layout

    def seq_state_get(self, seq: int) -> bytes:
        self._check_open()
        pos, kv = self.seq_kv(seq)
        L, wk, wv = self._n_layer, self._wk, self._wv
        arrays = KVArrays(pos, [kv[:, l * wk:(l + 1) * wk] for l in range(L)],
                          [kv[:, L * wk + l * wv:L * wk + (l + 1) * wv] for l in range(L)],
                          self.info.head_dim_k, self.info.head_dim_v,
                          {"seq_id": int(seq), "n_stream": 1 if self._unified else self._n_seq_max})
        self.state_gets += 1
        return self._layout.build(arrays)

    def seq_state_set(self, seq: int, blob: bytes | bytearray | memoryview) -> None:
        self._check_open()
        self.seq_remove(seq)
        self.state_sets += 1
        try:
            arrays = self._layout.parse(blob)
        except StateFormatError as exc:
            raise StateRestoreError(f"state blob refused: {exc}") from exc
        n = arrays.n_cells
        n_stream = arrays.extra.get("n_stream")
        if n_stream != (1 if self._unified else self._n_seq_max):
            raise StateRestoreError(f"state blob has {n_stream} streams, this context "
                                    f"{1 if self._unified else self._n_seq_max}")
        if n == 0:
            return
        if len(arrays.k) != self._n_layer or any(a.shape[1] != self._wk for a in arrays.k) or \
                any(a.shape[1] != self._wv for a in arrays.v):
            raise StateRestoreError("state blob K/V layers or widths differ from the model's")
        pos = np.asarray(arrays.positions, np.int64)
        if np.unique(pos).size != n or int(pos.max()) >= self._n_pos:
            raise StateRestoreError(f"state blob positions repeat or pass the model's {self._n_pos} positions")
        free = self.cells_free if self._unified else self._stream_cells
        if n > free:
            raise NoFreeCells(f"too few free KV cells for the state: {n} needed, {free} free")
        kv = np.concatenate([*arrays.k, *arrays.v], axis=1).astype(np.float16)    # a copy, off the blob
        kv.flags.writeable = False
        cells = self._seqs[int(seq)]
        for i, p in enumerate(pos.tolist()):
            cells[p] = _Cell(p, -1, kv[i], int(seq))
        self._used += n

    def reset_kv(self) -> None:
        for cells in self._seqs:
            cells.clear()
        self._used = 0

    def close(self) -> None:
        if self._closed:
            return
        self.reset_kv()
        self._rows = {}
        self._closed = True
