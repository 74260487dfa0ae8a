"""``kv3d synth-model``: write a synthetic GGUF in a real model's shape.

Benchmarks on a GPU machine that cannot download weights need a model of the
right *shape* (layers, width, heads, KV heads, FFN, vocabulary), not of the
right *values*: KV bytes per token, prefill and decode cost, and state sizes
depend only on the shape. This tool writes such a model:

* architecture ``llama`` (no biases), every matrix F16 with random values of
  standard deviation ``--std`` (0.02), norm weights F32 = 1;
* a synthetic SentencePiece vocabulary (``--tokenizer spm``, the default):
  ``<unk> <s> </s>``, the 256 byte tokens ``<0x00>..<0xFF>`` and distinct
  ``▁word`` pieces up to ``--vocab`` tokens, so text prompts, chat templates
  and detokenization work; the output row of ``</s>`` is zero, so greedy
  decoding never stops early on a random model;
* or no vocabulary at all (``--tokenizer none``: ``tokenizer.ggml.model =
  "none"``, ``llama.vocab_size`` dummy tokens): llama.cpp loads it and decodes
  token ids, but aborts the process on any tokenize / token-to-text call.

Contract: ``main(args) -> int`` (0 on success), the file at ``--out`` is a
complete GGUF v3 that llama.cpp loads; the same ``--seed`` gives the same
bytes. Tensors are generated and written one at a time (peak memory is the
largest tensor, e.g. 0.2 GB for a 32,000 x 3,584 embedding, never the whole
model): values are slices, at random offsets, of one pool of 4 Mi random
normal values, which writes gigabytes per second instead of drawing every
value from the generator.

Needs the ``gguf`` package (``pip install gguf``), imported only when used.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from kv3d_core.errors import Kv3dError


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters of a llama-architecture decoder."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int = 32768
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    tied: bool = False          # output projection shares token_embd (no output.weight)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...], type]]:
        """(name, numpy shape [rows, cols], dtype) in file order."""
        e, hd, f = self.n_embd, self.head_dim, self.n_ff
        yield "token_embd.weight", (self.n_vocab, e), np.float16
        for i in range(self.n_layer):
            p = f"blk.{i}."
            yield p + "attn_norm.weight", (e,), np.float32
            yield p + "attn_q.weight", (self.n_head * hd, e), np.float16
            yield p + "attn_k.weight", (self.n_head_kv * hd, e), np.float16
            yield p + "attn_v.weight", (self.n_head_kv * hd, e), np.float16
            yield p + "attn_output.weight", (e, self.n_head * hd), np.float16
            yield p + "ffn_norm.weight", (e,), np.float32
            yield p + "ffn_gate.weight", (f, e), np.float16
            yield p + "ffn_up.weight", (f, e), np.float16
            yield p + "ffn_down.weight", (e, f), np.float16
        yield "output_norm.weight", (e,), np.float32
        if not self.tied:
            yield "output.weight", (self.n_vocab, e), np.float16

    def n_bytes(self) -> int:
        return sum(int(np.prod(s)) * np.dtype(t).itemsize for _, s, t in self.tensors())

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0) -> int:
        return int(self.n_layer * self.n_head_kv * self.head_dim * 2 * bytes_per_value)


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("tiny", n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, n_vocab=2048, n_ctx_train=8192),
    Shape("qwen2.5-0.5b", n_layer=24, n_embd=896, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=32000, tied=True),
    Shape("qwen2.5-1.5b", n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, n_ff=8960, n_vocab=32000, tied=True),
    Shape("qwen2.5-7b", n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, n_ff=18944, n_vocab=32000),
    Shape("llama3-8b", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=32000,
          n_ctx_train=8192, rope_theta=500_000.0, rms_eps=1e-5),
)}

UNK, BOS, EOS = 0, 1, 2
N_SPECIAL = 3
N_BYTES = 256


def _import_gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise Kv3dError("kv3d synth-model needs the 'gguf' package: pip install gguf") from exc
    return gguf


def _piece(i: int) -> str:
    """A distinct printable word for normal token ``i`` (base 26, lower-case)."""
    letters = []
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters.append(chr(ord("a") + r))
    return "\u2581" + "".join(reversed(letters))


def spm_vocab(n_vocab: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Tokens, scores and token types of a synthetic SentencePiece vocabulary."""
    if n_vocab < N_SPECIAL + N_BYTES + 1:
        raise Kv3dError(f"--vocab must be at least {N_SPECIAL + N_BYTES + 1} for --tokenizer spm")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(N_BYTES)]
    tokens += [_piece(i) for i in range(n_vocab - len(tokens))]
    scores = -np.arange(n_vocab, dtype=np.float32)
    types = np.full(n_vocab, 1, dtype=np.int32)           # NORMAL
    types[UNK] = 2                                        # UNKNOWN
    types[BOS] = types[EOS] = 3                           # CONTROL
    types[N_SPECIAL:N_SPECIAL + N_BYTES] = 6              # BYTE
    return tokens, scores, types


class _ValuePool:
    """Random normal F16 values, handed out as slices at random offsets."""

    def __init__(self, rng: np.random.Generator, std: float, size: int = 1 << 22) -> None:
        pool = (rng.standard_normal(size, dtype=np.float32) * std).astype(np.float16)
        self._pool2 = np.concatenate([pool, pool])       # any offset < size gives `size` contiguous values
        self._size = size
        self._rng = rng

    def fill(self, out: np.ndarray) -> np.ndarray:
        flat = out.reshape(-1)
        for s in range(0, flat.size, self._size):
            n = min(self._size, flat.size - s)
            o = int(self._rng.integers(0, self._size))
            flat[s:s + n] = self._pool2[o:o + n]
        return out


def write_model(shape: Shape, out: Path, *, seed: int = 0, std: float = 0.02, tokenizer: str = "spm") -> int:
    """Write ``shape`` as a GGUF at ``out``; returns the file size in bytes."""
    gguf = _import_gguf()
    if tokenizer not in ("spm", "none"):
        raise Kv3dError(f"--tokenizer {tokenizer!r}: use spm or none")
    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv:
        raise Kv3dError(f"shape {shape.name}: n_embd must divide by n_head and n_head by n_head_kv")
    rng = np.random.default_rng(seed)
    pool = _ValuePool(rng, std)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")

    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"kv3d-synthetic-{shape.name}")
    w.add_string("kv3d.synthetic.shape", shape.name)
    w.add_uint32("kv3d.synthetic.seed", seed)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_vocab_size(shape.n_vocab)
    w.add_file_type(1)                                   # LLAMA_FTYPE_MOSTLY_F16
    if tokenizer == "spm":
        tokens, scores, types = spm_vocab(shape.n_vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores.tolist())
        w.add_token_types(types.tolist())
        w.add_unk_token_id(UNK)
        w.add_bos_token_id(BOS)
        w.add_eos_token_id(EOS)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    else:
        w.add_tokenizer_model("none")

    specs = list(shape.tensors())
    for name, shp, dt in specs:
        w.add_tensor_info(name, shp, np.dtype(dt), int(np.prod(shp)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for name, shp, dt in specs:
            if dt is np.float32:                         # norm weights
                arr = np.ones(shp, dtype=np.float32)
            else:
                arr = pool.fill(np.empty(shp, dtype=np.float16))
                if tokenizer == "spm" and (name == "output.weight" or (shape.tied and name == "token_embd.weight")):
                    arr[EOS] = 0                         # logit of </s> is always 0: greedy never picks it
            w.write_tensor_data(arr)
            del arr
    finally:
        w.close()
    tmp.replace(out)
    return out.stat().st_size


def main(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kv3d synth-model", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="named model shape (default: tiny)")
    p.add_argument("--out", type=Path, help="GGUF file to write (required unless --list)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the shape's)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--tokenizer", default="spm", choices=("spm", "none"),
                   help="spm: synthetic SentencePiece vocabulary (default); none: no tokenizer, token ids only")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the random weights")
    p.add_argument("--list", action="store_true", help="print the known shapes and exit")
    ns = p.parse_args(args)
    if ns.list:
        for s in SHAPES.values():
            print(f"{s.name:14s} {s.n_layer:3d} layers  {s.n_embd:5d} wide  {s.n_head:3d} heads  {s.n_head_kv:2d} kv  "
                  f"ffn {s.n_ff:6d}  vocab {s.n_vocab:6d}  {s.n_bytes() / 1e9:6.2f} GB  "
                  f"{s.kv_bytes_per_token():7d} KV bytes/token")
        return 0
    if ns.out is None:
        p.error("--out is required")
    shape = SHAPES[ns.shape]
    if ns.vocab is not None:
        shape = replace(shape, n_vocab=int(ns.vocab))
    if ns.layers is not None:
        shape = replace(shape, n_layer=int(ns.layers))
    t0 = time.perf_counter()
    size = write_model(shape, ns.out, seed=ns.seed, std=ns.std, tokenizer=ns.tokenizer)
    dt = time.perf_counter() - t0
    print(f"wrote {ns.out} ({shape.name}, {size / 1e9:.3f} GB, {shape.kv_bytes_per_token()} KV bytes/token "
          f"at f16) in {dt:.1f} s", file=sys.stderr)
    return 0
