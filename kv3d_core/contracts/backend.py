"""Contract of the execution backend plugin kind.

An execution backend owns one model and one KV cache shared by many sequences
(llama.cpp's unified KV cache). The scheduler (``kv3d_core.engine.scheduler``)
is its only caller and calls it from a single thread: implementations need not
be thread-safe, except :meth:`ExecutionBackend.tokenize`,
:meth:`ExecutionBackend.token_piece` and :attr:`ExecutionBackend.info`, which the
API layer calls concurrently from worker threads.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from kv3d_core.contracts.state import StateLayout


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about the loaded model and context."""

    model_id: str
    """Name served in ``/v1/models`` and checked against a request's ``model``."""
    path: str
    architecture: str
    fingerprint: str
    """Hex digest that changes whenever stored KV would no longer be valid
    (weights, KV types, layout). Storage tiers refuse entries of another fingerprint."""
    n_ctx_train: int
    n_ctx: int
    """Cells in the KV cache (all sequences together). With a KV stream per sequence
    (``build["kv_unified"]`` false) every stream has ``n_ctx // n_seq_max`` cells, so such a
    backend reports ``n_ctx = n_seq_max * cells per stream``."""
    n_ctx_seq: int
    """Most positions one sequence may use (prompt + completion)."""
    n_seq_max: int
    n_layer: int
    n_vocab: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    kv_bytes_per_token: int
    """Bytes of K and V of one token over all layers, as stored in the cache."""
    sliding_window: int = 0
    """Window of sliding-window attention layers; 0 when the model has none."""
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    gpu_layers: int = 0
    """Layers offloaded to an accelerator (-1: all); 0 when the model runs on the CPU."""
    build: dict = field(default_factory=dict)
    """Free-form facts about the backend build (version, CPU/GPU, devices)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling settings; validated by the API layer."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before any other sampler; a bias of
    ``-inf`` bans the token (the API maps OpenAI's -100 to it)."""
    grammar: str | None = None
    """A GBNF grammar (llama.cpp's syntax, root rule ``root``) every sampled token must
    keep the output inside; once the grammar is complete only end-of-generation tokens
    remain. Applied after ``logit_bias`` and before every truncating sampler, so top-k/top-p
    never remove every allowed token."""
    ignore_eos: bool = False
    """Generate up to the token limit even past end-of-generation tokens (benchmarks; the
    ``ignore_eos`` extension of vLLM and llama-server)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one sampled token and the most likely alternatives at its
    position, from the model's own distribution (log-softmax of the raw logits: before
    logit bias, penalties, temperature, truncation and grammar)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """The ``n`` most likely tokens, most likely first: (token id, logprob)."""


@dataclass(frozen=True)
class BatchEntry:
    """Tokens of one sequence to decode in one step.

    ``tokens`` occupy positions ``pos0 .. pos0 + len(tokens) - 1`` of sequence ``seq``.
    When ``logits`` is true the backend keeps the output of the last token so the
    caller can sample from it or read it with :meth:`ExecutionBackend.logits`.
    """

    seq: int
    tokens: Sequence[int]
    pos0: int
    logits: bool = False


class Sampler(abc.ABC):
    """A per-sequence sampler chain (its own seed, temperature, top-p, top-k, penalties)."""

    @abc.abstractmethod
    def sample(self, output: int) -> int:
        """Sample the next token from output row ``output`` of the last decode and
        record it in the chain's state (penalties, RNG)."""

    @abc.abstractmethod
    def accept(self, token: int) -> None:
        """Record a token that was not sampled by this chain (a prompt token or a
        replayed one), for penalty samplers."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free native resources; the sampler is unusable afterwards."""


class ExecutionBackend(abc.ABC):
    """Runs one model over many sequences sharing one KV cache.

    Guarantees an implementation must give:

    - Sequence ids are ``0 .. info.n_seq_max - 1``. The backend never chooses them:
      the caller (the hot tier) allocates them.
    - :meth:`decode` either processes the whole batch, or raises and leaves the KV
      cache exactly as before the call (:class:`~kv3d_core.errors.KVCacheFullError`
      when no free cells were found; :class:`~kv3d_core.errors.BackendError` otherwise).
    - :meth:`seq_copy` shares cells, it never copies or recomputes KV: after
      ``seq_copy(src, dst, 0, n)`` both sequences see the same cells for positions
      ``[0, n)`` and a cell is freed only when no sequence holds it.
    - :meth:`seq_state_get` / :meth:`seq_state_set` round-trip a sequence's cells
      exactly; ``seq_state_set`` first drops every cell ``dst`` had and raises
      :class:`~kv3d_core.errors.StateRestoreError` when the blob is refused (the
      destination sequence is then empty).
    - Nothing here downloads anything; ``model_path=None`` selects the backend's
      embedded default model or raises :class:`~kv3d_core.errors.ModelLoadError`
      with a message that says how to install it.
    """

    info: ModelInfo

    # -- text ---------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``. ``parse_special`` turns control-token text such as
        ``<|im_start|>`` into its token (as a chat template's output needs)."""

    def control_tokens(self) -> dict[str, int]:
        """{text: id} of the tokens that ``parse_special=True`` turns text into (a chat
        template's markers such as ``<|im_start|>``). The prompt renderer splits template
        text at these and tokenizes everything between them -- template text and user data
        alike -- with special parsing off, so user text can never become a marker and
        ordinary prompts tokenize exactly as the whole rendered text would. The default
        (empty) makes the renderer tokenize each template and data piece on its own.
        Thread-safe."""
        return {}

    @abc.abstractmethod
    def token_piece(self, token: int) -> bytes:
        """Bytes the token stands for in generated text (control tokens: empty).
        Pieces may split a UTF-8 character; the caller reassembles them."""

    @abc.abstractmethod
    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ``<|im_end|>``...)."""

    # -- compute ------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, entries: Sequence[BatchEntry]) -> list[int | None]:
        """Decode one batch made of ``entries`` (at most ``max_batch_tokens`` tokens).

        Returns, per entry, the output row holding its last token's logits (for
        :meth:`Sampler.sample` and :meth:`logits`), or ``None`` when it asked for none.
        """

    @property
    @abc.abstractmethod
    def max_batch_tokens(self) -> int:
        """Most tokens one :meth:`decode` call accepts."""

    def micro_batches(self, lengths: Sequence[tuple[int, int]]) -> int:
        """How many micro-batches -- passes of the whole model, each with a fixed cost beyond
        its tokens (on a GPU, a launch of every layer's kernels) -- :meth:`decode` runs for a
        batch holding ``lengths``: ``(seq, n_tokens)`` of each sequence in it. The scheduler
        reports it (``kv3d_step_microbatches``) and plans steps with it: with a KV stream per
        sequence llama.cpp puts only sequences of consecutive ids, taking equally many tokens
        each, into one micro-batch, so which sequences prefill together, and how much, changes
        the count. The default: one pass per :attr:`max_batch_tokens`."""
        total = sum(int(n) for _, n in lengths)
        return -(-total // max(1, self.max_batch_tokens))

    @abc.abstractmethod
    def logits(self, output: int) -> np.ndarray:
        """Float32 logits (``n_vocab``) of output row ``output`` of the last decode.
        The array is a view valid until the next decode; copy it to keep it."""

    @abc.abstractmethod
    def make_sampler(self, params: SamplingParams) -> Sampler:
        """A fresh sampler chain for one sequence. Honours every field of ``params``
        (``logit_bias`` and ``grammar`` included): a backend that cannot must raise
        :class:`~kv3d_core.errors.BackendError` rather than sample without it."""

    def token_logprob(self, output: int, token: int, top_n: int = 0) -> TokenLogprob:
        """Log-probability of ``token`` at output row ``output`` of the last decode, and the
        ``top_n`` most likely tokens there (see :class:`TokenLogprob`). The default derives
        them from :meth:`logits`."""
        logits = np.asarray(self.logits(output), dtype=np.float64)
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        top: tuple[tuple[int, float], ...] = ()
        if top_n > 0:
            k = min(int(top_n), logits.shape[0])
            idx = np.argpartition(-logits, k - 1)[:k]
            idx = idx[np.lexsort((idx, -logits[idx]))]      # most likely first; ties by id
            top = tuple((int(i), float(logits[i] - lse)) for i in idx)
        return TokenLogprob(int(token), float(logits[token] - lse), top)

    def check_grammar(self, grammar: str) -> str | None:
        """Why ``grammar`` (see :attr:`SamplingParams.grammar`) cannot be used, or None when
        it can. Thread-safe: the API checks grammars on worker threads, before a request is
        queued, so a bad one is a 400 rather than a failed request. The default accepts
        every grammar (its :meth:`make_sampler` must then raise on a bad one)."""
        return None

    def sample_many(self, samplers: Sequence[Sampler], outputs: Sequence[int]) -> list[int]:
        """The next token of several sequences at once: ``samplers[i]`` samples from output
        row ``outputs[i]`` of the last decode, exactly as ``samplers[i].sample(outputs[i])``
        would (same tokens, same chain state). A backend may batch what can be batched
        (greedy rows as one argmax over the logits matrix); the default samples each in turn."""
        return [s.sample(o) for s, o in zip(samplers, outputs)]

    # -- KV cells -------------------------------------------------------------
    @abc.abstractmethod
    def seq_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Make the cells of ``src`` at positions ``[p0, p1)`` also belong to ``dst``."""

    @abc.abstractmethod
    def seq_remove(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        """Remove ``seq`` from its cells at positions ``[p0, p1)`` (``p1=-1``: to the end)."""

    @abc.abstractmethod
    def seq_pos_max(self, seq: int) -> int:
        """Largest position held by ``seq``; -1 when it holds none."""

    @abc.abstractmethod
    def seq_state_get(self, seq: int) -> bytes | bytearray | np.ndarray:
        """Serialize the cells of ``seq`` in the backend's own format (the core reads it only
        through :attr:`state_layout`; without one it stores the blob whole).

        Any bytes-like object: ``bytes``, ``bytearray``, or a 1-D uint8 array over memory
        the backend lends (e.g. a page-locked buffer from :meth:`state_buffer`'s pool, so a
        spill copies the cells off the device once); it is the caller's until dropped, and
        may be handed to another thread."""

    @abc.abstractmethod
    def seq_state_set(self, seq: int, blob: bytes | bytearray | memoryview) -> None:
        """Load a blob from :meth:`seq_state_get` (any bytes-like object) into ``seq``
        (emptied first).

        Raises :class:`~kv3d_core.errors.NoFreeCells` when the cache has too few free cells
        for the state (the caller may free cells and retry), and
        :class:`~kv3d_core.errors.StateRestoreError` when the blob is refused otherwise. In
        both cases ``seq`` is left empty."""

    @property
    def state_layout(self) -> "StateLayout | None":
        """How :meth:`seq_state_get`'s blobs map to K/V arrays
        (:class:`~kv3d_core.contracts.state.StateLayout`), or None: the core then keeps
        each session's state as one opaque blob -- no shared family prefix in the tiers, no
        delta codec. The default: None."""
        return None

    def state_buffer(self, nbytes: int) -> np.ndarray:
        """A writable, C-contiguous uint8 array of ``nbytes`` in which the caller builds a
        blob for :meth:`seq_state_set` (the restore path decodes KV straight into it).

        A backend whose KV cache lives on an accelerator returns memory it loads from
        fastest (page-locked host memory for CUDA: one DMA per tensor instead of the
        driver's bounce buffer); the memory is the caller's until the array and its views
        are dropped. The default: ordinary memory."""
        return np.empty(int(nbytes), dtype=np.uint8)

    def reset_kv(self) -> None:
        """Drop every cell of every sequence (optional; used by tests and benchmarks)."""
        for s in range(self.info.n_seq_max):
            self.seq_remove(s)

    @abc.abstractmethod
    def close(self) -> None:
        """Free the context and the model. Idempotent."""
