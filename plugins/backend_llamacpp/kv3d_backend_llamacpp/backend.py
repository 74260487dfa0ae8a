"""The llama.cpp execution backend: one model, one context, many sequences.

Uses llama-cpp-python's low-level ctypes API (module ``llama_cpp``) directly:
the high-level ``Llama`` class serves one sequence at a time and hides the
calls kv3d is built on (``llama_memory_seq_cp`` to share a prefix's cells,
``llama_state_seq_get_data`` / ``set_data`` to move one sequence's cells).

Two KV layouts (``kv_unified``): one cell pool for all ``n_seq_max`` sequences (cells
shared by ``seq_cp``; every step attends over every used cell), or a KV stream per
sequence (``n_ctx_seq`` cells each; a step attends only to each sequence's own cells;
llama.cpp then batches consecutive sequence ids together, so batches are ordered by id).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from typing import Sequence

import numpy as np

import llama_cpp as L
from kv3d_core.contracts.backend import BatchEntry, ExecutionBackend, ModelInfo, Sampler, SamplingParams
from kv3d_core.errors import (BackendError, ConfigError, KVCacheFullError, ModelLoadError, NoFreeCells, StateRestoreError,
                              TokenizerMissing)
from kv3d_backend_llamacpp import ubatch
from kv3d_backend_llamacpp.model_files import resolve_model
from kv3d_backend_llamacpp.state_format import LlamaStateLayout

log = logging.getLogger("kv3d.backend.llamacpp")

_GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
_GGML_TYPE_BYTES = {0: 4.0, 1: 2.0, 30: 2.0, 8: 34 / 32, 2: 18 / 32, 3: 20 / 32, 6: 22 / 32, 7: 24 / 32}
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}

_init_lock = threading.Lock()
_initialized = False
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}  # ggml_log_level


# llama.cpp reports why it refused a call only in its log: a call that needs the reason
# collects this thread's warning and error lines in _capture.lines while it runs.
_capture = threading.local()


@L.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at INFO; route everything through logging (DEBUG below warnings).
    lvl = _LOG_LEVELS.get(level, logging.DEBUG)
    lines = getattr(_capture, "lines", None)
    if lines is not None and lvl >= logging.WARNING:
        lines.append(text.decode("utf-8", "replace").rstrip())
    if lvl >= logging.WARNING and log.isEnabledFor(lvl):
        msg = text.decode("utf-8", "replace").rstrip()
        if msg:
            log.log(lvl, "%s", msg)


def _ensure_backend_init() -> None:
    global _initialized
    with _init_lock:
        if not _initialized:
            L.llama_log_set(_log_callback, None)
            L.llama_backend_init()
            _initialized = True


def _meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    return buf.value.decode("utf-8", "replace")


def _file_fingerprint(path: str) -> str:
    """Cheap, content-based identity of a model file (size + head + tail)."""
    h = hashlib.blake2b(digest_size=16, person=b"kv3d-model")
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        if size > 8 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


class _Batch:
    """A ``llama_batch`` whose arrays are numpy buffers owned by Python.

    Filled with vectorized writes; every token belongs to exactly one sequence
    (``n_seq_id = 1``), its ``seq_id`` pointer pointing into one contiguous array.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.out_row: dict[int, int] = {}
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        ptr_size = ctypes.sizeof(ctypes.c_void_p)
        self.seq_ptrs = (self.seq.ctypes.data + 4 * np.arange(capacity, dtype=np.uint64)).astype(
            np.uint64 if ptr_size == 8 else np.uint32)
        self.struct = L.llama_batch()
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(L.llama_token))
        self.struct.embd = ctypes.POINTER(ctypes.c_float)()
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(L.llama_pos))
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(self.seq_ptrs.ctypes.data, ctypes.POINTER(ctypes.POINTER(L.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def fill(self, entries: Sequence[BatchEntry]) -> list[int | None]:
        """Write ``entries`` into the batch, ordered by sequence id (llama.cpp's per-stream
        layout puts only runs of consecutive ids into one micro-batch); returns each entry's
        output row, in the order given."""
        n = 0
        outputs: list[int | None] = [None] * len(entries)
        self.out_row = {}                   # batch index -> row of llama_get_logits' matrix
        order = sorted(range(len(entries)), key=lambda i: entries[i].seq)
        for i in order:
            e = entries[i]
            k = len(e.tokens)
            if k == 0:
                continue
            if n + k > self.capacity:
                raise BackendError(f"batch of more than {self.capacity} tokens")
            self.token[n:n + k] = e.tokens
            self.pos[n:n + k] = np.arange(e.pos0, e.pos0 + k, dtype=np.int32)
            self.seq[n:n + k] = e.seq
            self.logits[n:n + k] = 0
            if e.logits:
                self.logits[n + k - 1] = 1
                outputs[i] = n + k - 1
                self.out_row[n + k - 1] = len(self.out_row)
            n += k
        self.struct.n_tokens = n
        return outputs


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])   # llama_token_data


def _grammar_sampler(vocab, grammar: str):
    """llama.cpp's grammar sampler for ``grammar`` (root rule ``root``), or the reason it
    was refused (llama.cpp says why only in its log)."""
    _capture.lines = []
    try:
        g = L.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    finally:
        said, _capture.lines = _capture.lines, None
    if not g:
        return "; ".join(line for line in said if line) or "llama.cpp could not parse it"
    return g


class LlamaCppSampler(Sampler):
    """llama.cpp's sampler chain: logit bias, grammar, penalties, top-k, top-p, min-p,
    temperature, seeded distribution (or greedy). A plain greedy chain (no bias, grammar or
    penalties) is an argmax over the logits row instead (the chain would build an n_vocab
    candidate array per token).

    The grammar is kept beside the chain, as llama.cpp's own server does: checking every
    token of the vocabulary against it costs several times a small model's decode step, so
    the chain picks a token first and only when the grammar refuses that one is the choice
    made again with the grammar applied to every candidate (before the chain, so no
    truncating sampler can remove every token it allows). Both ways the token comes from
    the chain's distribution restricted to what the grammar allows."""

    def __init__(self, ctx, vocab, n_vocab: int, params: SamplingParams) -> None:
        self._ctx = ctx
        self._n_vocab = n_vocab
        penalties = bool(params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1.0)
        self._argmax = params.greedy and not (penalties or params.logit_bias or params.grammar)
        self.plain_argmax = self._argmax    # sample() is an argmax over the row: batchable
        self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._grammar = None
        try:
            self._build(vocab, n_vocab, params, penalties)
        except BaseException:
            self.close()
            raise

    def _build(self, vocab, n_vocab: int, params: SamplingParams, penalties: bool) -> None:
        chain = self._chain
        if params.logit_bias:
            arr = (L.llama_logit_bias * len(params.logit_bias))()
            for i, (tok, bias) in enumerate(params.logit_bias):
                if not 0 <= int(tok) < n_vocab:
                    raise BackendError(f"logit_bias token {tok} is outside the vocabulary (0..{n_vocab - 1})")
                arr[i].token = int(tok)
                arr[i].bias = float(bias)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), arr))
        if params.grammar:
            g = _grammar_sampler(vocab, params.grammar)
            if isinstance(g, str):
                raise BackendError(f"the grammar was refused: {g}")
            self._grammar = g
            self._cand = np.zeros(n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._cur = L.llama_token_data_array()
            self._one = (L.llama_token_data * 1)()
            self._one_arr = L.llama_token_data_array(self._one, 1, -1, False)
        if penalties:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                n_vocab, 64, params.repeat_penalty, params.frequency_penalty, params.presence_penalty))
        if params.greedy:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, output: int) -> int:
        if self._argmax:
            ptr = L.llama_get_logits_ith(self._ctx, output)
            if not ptr:
                raise BackendError(f"no logits for output {output}")
            return int(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).argmax())
        if self._grammar is None:
            return int(L.llama_sampler_sample(self._chain, self._ctx, output))
        ptr = L.llama_get_logits_ith(self._ctx, output)
        if not ptr:
            raise BackendError(f"no logits for output {output}")
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        token = self._apply(logits, grammar_first=False)
        if not self._allowed(token):
            token = self._apply(logits, grammar_first=True)
        L.llama_sampler_accept(self._grammar, token)
        L.llama_sampler_accept(self._chain, token)
        return token

    def _apply(self, logits: np.ndarray, grammar_first: bool) -> int:
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = logits
        cand["p"] = 0.0
        cur = self._cur
        cur.data = cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data))
        cur.size = self._n_vocab
        cur.selected = -1
        cur.sorted = False
        if grammar_first:
            L.llama_sampler_apply(self._grammar, ctypes.byref(cur))
        L.llama_sampler_apply(self._chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise BackendError("the sampler chain selected no token")
        return int(cur.data[cur.selected].id)

    def _allowed(self, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 1.0, 0.0
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        L.llama_sampler_apply(self._grammar, ctypes.byref(self._one_arr))
        return self._one[0].logit != float("-inf")

    def accept(self, token: int) -> None:
        L.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain is not None:
            L.llama_sampler_free(self._chain)
            self._chain = None
        if getattr(self, "_grammar", None) is not None:
            L.llama_sampler_free(self._grammar)
            self._grammar = None

    def __del__(self) -> None:  # safety net; the scheduler closes samplers explicitly
        try:
            self.close()
        except Exception:
            pass


def _gpu_count() -> int:
    """GPU devices in ggml's registry (the libggml llama-cpp-python loaded)."""
    from pathlib import Path

    libs = sorted((Path(L.__file__).parent / "lib").glob("libggml.so*"))
    if not libs:
        return 0
    lib = ctypes.CDLL(str(libs[0]))
    if not hasattr(lib, "ggml_backend_dev_count"):
        return 0
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    devices = (lib.ggml_backend_dev_get(i) for i in range(int(lib.ggml_backend_dev_count())))
    return sum(1 for d in devices if d and lib.ggml_backend_dev_type(d) in (1, 2))    # GPU, IGPU


def resolve_gpu_layers(value: int | str) -> int:
    """``auto``: every layer on the GPU when this llama.cpp build can offload and sees a GPU,
    else none; an integer as llama.cpp takes it (-1 = all)."""
    if isinstance(value, str):
        if value != "auto":
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"backend.n_gpu_layers={value!r}: use auto or a layer count (-1 = all)") from None
        if not L.llama_supports_gpu_offload():
            return 0
        return -1 if _gpu_count() else 0
    return int(value)


def _check_settings(n_seq_max: int, flash_attn: str, state_staging: str, type_k: str, type_v: str) -> None:
    """Refuse settings llama.cpp would reject or misread, naming the setting."""
    if not 1 <= int(n_seq_max) <= L.llama_max_parallel_sequences():
        raise ConfigError(f"n_seq_max={n_seq_max} must be within 1..{L.llama_max_parallel_sequences()}")
    if flash_attn not in _FLASH_ATTN:
        raise ConfigError(f"backend.flash_attn={flash_attn!r}: use auto, on or off")
    if state_staging not in ("auto", "on", "off"):
        raise ConfigError(f"backend.state_staging={state_staging!r}: use auto, on or off")
    for name, t in (("type_k", type_k), ("type_v", type_v)):
        if t not in _GGML_TYPES:
            raise ConfigError(f"backend.{name}={t!r}: use one of {', '.join(_GGML_TYPES)}")


def _cells(n_ctx: int | None, n_ctx_seq: int | None, n_seq_max: int, hot_mb: float | None, kv_bytes: int,
           kv_unified: bool) -> int:
    """The context's KV cells: ``n_ctx``, else as many as ``hot_mb`` holds; with a stream per
    sequence, ``n_ctx_seq`` cells per stream. Whole multiples of 256 (per stream)."""
    if not kv_unified and n_ctx_seq:
        # a stream per sequence: every stream holds n_ctx_seq cells
        n_ctx = max(256, int(n_ctx_seq) // 256 * 256) * n_seq_max
    if n_ctx is None:
        if not hot_mb or hot_mb <= 0:
            raise ConfigError("cache.gpu_hot_mb must be > 0 (or set backend.n_ctx)")
        n_ctx = int(hot_mb * 1024 * 1024 // kv_bytes)
    if kv_unified:
        return max(256, (int(n_ctx) // 256) * 256)
    return max(256, int(n_ctx) // n_seq_max // 256 * 256) * n_seq_max


def _context_params(n_ctx: int, n_batch: int, n_ubatch: int, n_seq_max: int, threads: int, flash_attn: str,
                    tk: int, tv: int, kv_unified: bool, swa_full: bool):
    """llama.cpp's context parameters for these settings."""
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = max(1, min(int(n_ubatch), n_batch))
    cparams.n_seq_max = n_seq_max
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.flash_attn_type = _FLASH_ATTN[flash_attn]
    cparams.type_k = tk
    cparams.type_v = tv
    # one cell pool for all sequences: what lets seq_cp share a prefix's cells. False gives
    # every sequence a KV stream of its own (n_ctx / n_seq_max cells; attention over its own
    # cells only; seq_cp between streams copies the whole stream)
    cparams.kv_unified = bool(kv_unified)
    cparams.swa_full = bool(swa_full)
    cparams.no_perf = True
    return cparams


def _staging_pool(state_staging: str, n_gpu_layers: int):
    """State blobs through pooled page-locked buffers when the KV cache is on a CUDA device
    (gpu_state.py: 4x faster restores, 20x faster spills on an H200); "on" uses the pool on
    any build (ordinary memory without CUDA: how CPU tests cover this path). None: off."""
    if state_staging == "on" or (state_staging == "auto" and n_gpu_layers != 0):
        from kv3d_backend_llamacpp.gpu_state import StagingPool, cuda_build
        if state_staging == "on" or cuda_build():
            return StagingPool()
    return None


def _fingerprint(path: str, type_k: str, type_v: str, flash_attn: str, swa_full: bool, kv_unified: bool,
                 n_seq_max: int) -> str:
    """What stored KV depends on: the model file, the KV types, attention settings, the llama.cpp
    build and, with a stream per sequence, the stream count (blobs carry one section per stream)."""
    fp = hashlib.blake2b(digest_size=16, person=b"kv3d-fp")
    fp.update(_file_fingerprint(path).encode())
    fp.update(f"{type_k}/{type_v}/{flash_attn}/{swa_full}/{L.__version__}".encode())
    if not kv_unified:
        fp.update(f"/streams={n_seq_max}".encode())
    return fp.hexdigest()


class LlamaCppBackend(ExecutionBackend):
    """Settings (all from the Hydra ``backend`` node, plus model/cache/scheduler keys
    the core passes in): see ``conf/backend/llamacpp.yaml`` of this package."""

    def __init__(
        self,
        *,
        model_path: str | None = None,
        model_id: str | None = None,
        hot_mb: float | None = 512,
        n_ctx: int | None = None,
        n_ctx_seq: int | None = None,
        n_seq_max: int = 64,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_gpu_layers: int | str = "auto",
        flash_attn: str = "auto",
        type_k: str = "f16",
        type_v: str = "f16",
        swa_full: bool = False,
        state_staging: str = "auto",
        kv_unified: bool = True,
        **unknown: object,
    ) -> None:
        if unknown:
            raise ConfigError(f"backend llamacpp: unknown settings {sorted(unknown)}")
        _check_settings(n_seq_max, flash_attn, state_staging, type_k, type_v)
        _ensure_backend_init()
        n_gpu_layers = resolve_gpu_layers(n_gpu_layers)
        path, served_id = resolve_model(model_path, model_id)
        self._closed = False
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = int(n_gpu_layers)
        self._model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        model = self._model
        self._vocab = L.llama_model_get_vocab(model)
        # A model without a tokenizer (tokenizer.ggml.model = "none", e.g. synthetic benchmark
        # models) takes token ids only: llama.cpp asserts on any text call for it.
        self._no_vocab = L.llama_vocab_type(self._vocab) == 0
        arch = _meta(model, "general.architecture") or "?"
        n_layer = L.llama_model_n_layer(model)
        n_head = max(1, L.llama_model_n_head(model))
        n_head_kv = max(1, L.llama_model_n_head_kv(model))
        n_embd = L.llama_model_n_embd(model)
        head_k = int(_meta(model, f"{arch}.attention.key_length") or n_embd // n_head)
        head_v = int(_meta(model, f"{arch}.attention.value_length") or n_embd // n_head)
        tk, tv = _GGML_TYPES[type_k], _GGML_TYPES[type_v]
        kv_bytes = int(round(n_layer * n_head_kv * (head_k * _GGML_TYPE_BYTES[tk] + head_v * _GGML_TYPE_BYTES[tv])))
        n_ctx_train = L.llama_model_n_ctx_train(model)
        n_ctx = _cells(n_ctx, n_ctx_seq, int(n_seq_max), hot_mb, kv_bytes, kv_unified)
        n_batch = max(1, int(n_batch))
        threads = int(n_threads) if n_threads else (os.cpu_count() or 1)
        cparams = _context_params(n_ctx, n_batch, n_ubatch, int(n_seq_max), threads, flash_attn, tk, tv,
                                  kv_unified, swa_full)
        self._ctx = L.llama_init_from_model(model, cparams)
        if not self._ctx:
            L.llama_model_free(model)
            raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} cells for {path}")
        self._mem = L.llama_get_memory(self._ctx)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._batch = _Batch(n_batch)
        self._n_ubatch = int(cparams.n_ubatch)
        self._streams = not kv_unified
        self._staging = _staging_pool(state_staging, int(n_gpu_layers))
        self._pieces: dict[int, bytes] = {}
        self._piece_lock = threading.Lock()
        self._control: dict[str, int] | None = None
        self._argmax_pool = None
        self._eog: dict[int, bool] = {}
        self.info = self._describe(
            served_id=served_id, path=path, arch=arch, n_layer=n_layer, n_head_kv=n_head_kv, head_k=head_k,
            head_v=head_v, kv_bytes=kv_bytes, n_ctx_train=n_ctx_train, n_seq_max=int(n_seq_max),
            n_gpu_layers=int(n_gpu_layers), threads=threads, flash_attn=flash_attn, type_k=type_k, type_v=type_v,
            swa_full=swa_full, kv_unified=kv_unified)
        self._layout = LlamaStateLayout(head_dim_k=head_k, head_dim_v=head_v, n_layer=n_layer)
        real_ctx = self.info.n_ctx
        log.info("loaded %s (%s, %d layers) with %d cells, %d sequences, %d threads",
                 path.name, arch, n_layer, real_ctx, n_seq_max, threads)

    def _describe(self, *, served_id: str, path, arch: str, n_layer: int, n_head_kv: int, head_k: int,
                  head_v: int, kv_bytes: int, n_ctx_train: int, n_seq_max: int, n_gpu_layers: int, threads: int,
                  flash_attn: str, type_k: str, type_v: str, swa_full: bool, kv_unified: bool) -> ModelInfo:
        """The :class:`ModelInfo` of the loaded model and context."""
        model = self._model
        template = _meta(model, "tokenizer.chat_template")
        bos_id, eos_id = L.llama_vocab_bos(self._vocab), L.llama_vocab_eos(self._vocab)
        gpu = bool(L.llama_supports_gpu_offload())
        return ModelInfo(
            model_id=served_id,
            path=str(path),
            architecture=arch,
            fingerprint=_fingerprint(str(path), type_k, type_v, flash_attn, swa_full, kv_unified, int(n_seq_max)),
            n_ctx_train=n_ctx_train,
            n_ctx=L.llama_n_ctx(self._ctx),
            n_ctx_seq=min(int(L.llama_n_ctx_seq(self._ctx)), n_ctx_train) if n_ctx_train > 0
            else int(L.llama_n_ctx_seq(self._ctx)),
            n_seq_max=int(n_seq_max),
            n_layer=n_layer,
            n_vocab=self._n_vocab,
            n_head_kv=n_head_kv,
            head_dim_k=head_k,
            head_dim_v=head_v,
            kv_bytes_per_token=kv_bytes,
            sliding_window=int(L.llama_model_n_swa(model) or 0),
            chat_template=template,
            bos_token=self._piece_text(bos_id) if bos_id >= 0 else "",
            eos_token=self._piece_text(eos_id) if eos_id >= 0 else "",
            add_bos=bool(L.llama_vocab_get_add_bos(self._vocab)),
            gpu_layers=int(n_gpu_layers) if gpu else 0,
            build={
                "llama_cpp_python": L.__version__,
                "gpu_offload": gpu,
                "system_info": L.llama_print_system_info().decode("utf-8", "replace").strip(),
                "n_threads": threads,
                "flash_attn": flash_attn,
                "type_k": type_k,
                "type_v": type_v,
                "state_staging": ("pinned" if self._staging.pinned else "pooled") if self._staging else "off",
                "kv_unified": bool(kv_unified),
            },
        )

    # -- text ----------------------------------------------------------------
    def _piece_text(self, token: int) -> str:
        if self._no_vocab:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(0, n)].decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        if self._no_vocab:
            raise TokenizerMissing("this model has no tokenizer: send the prompt as token ids")
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise BackendError("tokenization failed")
        return list(buf[:n])

    def control_tokens(self) -> dict[str, int]:
        if self._control is None and not self._no_vocab:
            # the tokens llama.cpp's parse_special toggles (control and unknown-type tokens)
            want = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN
            out: dict[str, int] = {}
            for t in range(self._n_vocab):
                if L.llama_vocab_get_attr(self._vocab, t) & want:
                    text = (L.llama_vocab_get_text(self._vocab, t) or b"").decode("utf-8", "replace")
                    if text:
                        out.setdefault(text, t)
            self._control = out
        return dict(self._control or {})

    def token_piece(self, token: int) -> bytes:
        if self._no_vocab:
            return b""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[: max(0, n)]
            with self._piece_lock:
                self._pieces[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        hit = self._eog.get(token)
        if hit is None:
            hit = self._eog[token] = bool(L.llama_vocab_is_eog(self._vocab, token))
        return hit

    # -- compute ---------------------------------------------------------------
    @property
    def max_batch_tokens(self) -> int:
        return self._batch.capacity

    def micro_batches(self, lengths: Sequence[tuple[int, int]]) -> int:
        return ubatch.count(lengths, self._n_ubatch, streams=self._streams)

    def decode(self, entries: Sequence[BatchEntry]) -> list[int | None]:
        outputs = self._batch.fill(entries)
        if self._batch.struct.n_tokens == 0:
            return outputs
        rc = L.llama_decode(self._ctx, self._batch.struct)
        if rc == 1:
            raise KVCacheFullError("no free KV cells for the batch")
        if rc != 0:
            # Fatal or aborted: processed ubatches may remain; drop the touched positions
            # so the caller's view of every sequence stays true.
            for e in entries:
                if e.tokens:
                    L.llama_memory_seq_rm(self._mem, e.seq, e.pos0, -1)
            raise BackendError(f"llama_decode failed with code {rc}")
        return outputs

    def logits(self, output: int) -> np.ndarray:
        ptr = L.llama_get_logits_ith(self._ctx, output)
        if not ptr:
            raise BackendError(f"no logits for output {output}")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def make_sampler(self, params: SamplingParams) -> Sampler:
        return LlamaCppSampler(self._ctx, self._vocab, self._n_vocab, params)

    def check_grammar(self, grammar: str) -> str | None:
        if self._no_vocab:
            return "this model has no tokenizer, so no grammar can constrain its text"
        g = _grammar_sampler(self._vocab, grammar)
        if isinstance(g, str):
            return g
        L.llama_sampler_free(g)
        return None

    def sample_many(self, samplers: Sequence[Sampler], outputs: Sequence[int]) -> list[int]:
        """Greedy rows (plain argmax samplers) in one pass over the logits matrix, split over
        threads when it is large (numpy's argmax runs without the GIL); chains one by one."""
        out: list[int] = [0] * len(samplers)
        greedy = [i for i, smp in enumerate(samplers) if isinstance(smp, LlamaCppSampler) and smp.plain_argmax]
        for i, smp in enumerate(samplers):
            if not (isinstance(smp, LlamaCppSampler) and smp.plain_argmax):
                out[i] = smp.sample(outputs[i])
        if not greedy:
            return out
        rows = [self._batch.out_row.get(outputs[i]) for i in greedy]
        ptr = L.llama_get_logits(self._ctx)
        if not ptr or any(r is None for r in rows):
            for i in greedy:
                out[i] = samplers[i].sample(outputs[i])
            return out
        n_out = max(self._batch.out_row.values()) + 1
        matrix = np.ctypeslib.as_array(ptr, shape=(n_out, self._n_vocab))
        idx = np.asarray(rows, np.int64)
        picked = self._argmax_rows(matrix, idx)
        for i, tok in zip(greedy, picked.tolist()):
            out[i] = tok
        return out

    def _argmax_rows(self, matrix: np.ndarray, idx: np.ndarray) -> np.ndarray:
        cells = idx.size * matrix.shape[1]
        if cells < 4_000_000 or (os.cpu_count() or 1) < 4:
            # every row asked for (the usual case): one argmax over the matrix, then in idx's order
            return matrix.argmax(axis=1)[idx] if idx.size == matrix.shape[0] else matrix[idx].argmax(axis=1)
        if self._argmax_pool is None:
            import concurrent.futures
            self._argmax_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(8, (os.cpu_count() or 2) // 2), thread_name_prefix="kv3d-argmax")
        parts = np.array_split(idx, self._argmax_pool._max_workers)
        res = list(self._argmax_pool.map(lambda p: matrix[p].argmax(axis=1) if p.size else np.empty(0, np.int64),
                                         parts))
        return np.concatenate(res)

    # -- KV cells ----------------------------------------------------------------
    def seq_copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        L.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_remove(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        if not L.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise BackendError(f"llama_memory_seq_rm({seq}, {p0}, {p1}) refused")

    def seq_pos_max(self, seq: int) -> int:
        return int(L.llama_memory_seq_pos_max(self._mem, seq))

    def seq_pos_min(self, seq: int) -> int:
        return int(L.llama_memory_seq_pos_min(self._mem, seq))

    def seq_state_get(self, seq: int) -> bytes | np.ndarray:
        size = L.llama_state_seq_get_size(self._ctx, seq)
        if self._staging is not None and size:
            # device -> page-locked memory, handed over as it is (no second host copy): the
            # pool takes the buffer back once the caller (the spill's writer thread) drops it
            stage = self._staging.lend(size)
            n = L.llama_state_seq_get_data(self._ctx, stage.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq)
            if n != size:
                raise BackendError(f"llama_state_seq_get_data wrote {n} of {size} bytes")
            return stage
        buf = bytearray(size)
        if size:
            n = L.llama_state_seq_get_data(self._ctx, (ctypes.c_uint8 * size).from_buffer(buf), size, seq)
            if n != size:
                raise BackendError(f"llama_state_seq_get_data wrote {n} of {size} bytes")
        return bytes(buf) if size < (1 << 16) else buf  # bytearray avoids a copy of large blobs

    @property
    def state_layout(self) -> LlamaStateLayout:
        """llama.cpp's per-sequence state format (:mod:`kv3d_backend_llamacpp.state_format`)."""
        return self._layout

    def state_buffer(self, nbytes: int) -> np.ndarray:
        if self._staging is None:
            return np.empty(int(nbytes), dtype=np.uint8)
        return self._staging.lend(nbytes)

    def seq_state_set(self, seq: int, blob: bytes) -> None:
        # llama.cpp drops the destination's cells only when the blob holds at least one cell;
        # the contract promises an emptied sequence either way.
        L.llama_memory_seq_rm(self._mem, seq, -1, -1)
        arr = np.frombuffer(blob, dtype=np.uint8)
        if self._staging is not None and arr.size and not self._staging.owns(blob):
            stage = self._staging.lend(arr.size)     # host copy, then one DMA per tensor
            stage[:] = arr
            arr = stage
        _capture.lines = []
        try:
            n = L.llama_state_seq_set_data(self._ctx, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), arr.size, seq)
        finally:
            said, _capture.lines = _capture.lines, None
        if n == 0:
            L.llama_memory_seq_rm(self._mem, seq, -1, -1)
            why = "; ".join(line for line in said if line)
            if any("available cells" in line for line in said):    # state_read_meta's find_slot failed
                raise NoFreeCells(f"too few free KV cells for a {arr.size}-byte state ({why})")
            raise StateRestoreError(f"llama_state_seq_set_data refused a {arr.size}-byte blob" + (f" ({why})" if why else ""))

    def reset_kv(self) -> None:
        L.llama_memory_clear(self._mem, True)

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if getattr(self, "_staging", None) is not None:
            self._staging.close()
        if getattr(self, "_argmax_pool", None) is not None:
            self._argmax_pool.shutdown(wait=False)
        L.llama_free(self._ctx)
        L.llama_model_free(self._model)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
