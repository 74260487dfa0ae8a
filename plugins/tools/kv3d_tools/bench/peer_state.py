"""What llama-cpp-python's RAM prompt cache stores per conversation, measured.

``llama_cpp.server`` with ``--cache true --cache_type ram`` keeps, after every
completion, ``Llama.save_state()`` of the whole context under the key
prompt + completion tokens (``LlamaRAMCache``): the llama.cpp state blob
(``llama_state_get_data``: every KV cell of the sequence plus the output
buffer) and numpy copies of the scores (logits rows) and input ids. Its byte
budget (``--cache_size``) counts only the state blob.

:func:`measure` loads the model in this process with the peer server's
settings, attaches a real ``LlamaRAMCache``, runs real chat completions on the
given conversations (messages the benchmark actually sent the peer), and
reads each new cache entry's sizes. Run as ``python -m
kv3d_tools.bench.peer_state SPEC.json`` it prints the result as one JSON line
(the benchmark runs it in a child process so its memory is returned).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any


def measure(model_path: str, conversations: list[list[dict]], *, n_ctx: int, n_batch: int, n_threads: int,
            logits_all: bool, max_tokens: int, temperature: float = 0.7, seed: int = 0) -> dict[str, Any]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                          n_threads_batch=n_threads, logits_all=logits_all, verbose=False)
    cache = llama_cpp.LlamaRAMCache(capacity_bytes=1 << 40)
    llm.set_cache(cache)
    entries = []
    for i, messages in enumerate(conversations):
        t = time.perf_counter()
        llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed + i)
        elapsed = time.perf_counter() - t
        state = next(reversed(cache.cache_state.values()))
        entries.append({
            "n_tokens": int(state.n_tokens),
            "llama_state_bytes": int(state.llama_state_size),
            "scores_bytes": int(state.scores.nbytes),
            "input_ids_bytes": int(state.input_ids.nbytes),
            "held_bytes": int(state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes),
            "completion_s": elapsed,
        })
    mean = {k: statistics.fmean(e[k] for e in entries) for k in entries[0]} if entries else {}
    return {
        "method": ("llama_cpp.Llama in-process with the peer server's settings (n_ctx, n_batch, logits_all) and a "
                   "LlamaRAMCache attached; chat completions on conversations the benchmark sent the peer; per "
                   "new cache entry: LlamaState.llama_state_size (KV cells + output buffer: what --cache_size "
                   "counts) and the numpy scores/input_ids copies held beside it"),
        "settings": {"n_ctx": n_ctx, "n_batch": n_batch, "logits_all": logits_all, "max_tokens": max_tokens},
        "entries": entries,
        "mean": mean,
        "kv_bytes_per_session": mean.get("llama_state_bytes"),
        "held_bytes_per_session": mean.get("held_bytes"),
        "tokens_per_session": mean.get("n_tokens"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    out = measure(spec.pop("model_path"), spec.pop("conversations"), **spec)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
