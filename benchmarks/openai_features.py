"""What the OpenAI features cost or save, each against a baseline in the same run.

1. ``n`` > 1: one request for ``n`` choices of a long prompt vs ``n`` requests for the same
   prompt sent at once (distinct cache salts, so nothing is reused between them). Prompt tokens
   the model decoded (``kv3d_batch_tokens`` minus the choices' own tokens) and wall time.
2. Grammar sampling, in process on the backend: the cost per token of sampling with a JSON
   schema's grammar the way the backend does it (the chain's pick checked against the grammar,
   the whole vocabulary filtered only when it is refused) vs filtering the whole vocabulary every
   token, vs no grammar; the same forced token sequence each time, so only sampling differs.
3. Over HTTP: ms per completion token of json_schema replies vs free-text replies.

    python benchmarks/openai_features.py [--n 4] [--prompt-tokens 512] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
import time
from pathlib import Path

import httpx

from _common import Server, machine, text_of_tokens, tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                          "maxItems": 3}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}
PEOPLE = ["Alice from Paris", "Bob, a retired teacher", "a young programmer", "Carol, 42, from Berlin",
          "a fantasy hero", "a customer called Dan", "a football player", "someone who likes tea"]


def _post(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
    r.raise_for_status()
    return r.json()


def bench_n(srv: Server, prompt: str, n: int, max_tokens: int) -> dict:
    msgs = [{"role": "user", "content": prompt + "\n\nSummarize the text above in one sentence."}]

    def decoded(before: dict, after: dict) -> float:
        return after["kv3d_batch_tokens_sum"] - before["kv3d_batch_tokens_sum"]

    out = {}
    for mode in ("n_requests", "one_request", "n_requests", "one_request"):      # twice each, interleaved
        salt = f"{mode}-{time.monotonic_ns()}"
        before = srv.metrics()
        t0 = time.perf_counter()
        if mode == "one_request":
            r = _post(srv.url, {"model": srv.model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0.8,
                                "seed": 1, "n": n, "cache_salt": salt})
            completion = r["usage"]["completion_tokens"]
            prompt_tokens = r["usage"]["prompt_tokens"]
        else:
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                rs = list(pool.map(lambda i: _post(srv.url, {
                    "model": srv.model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1 + i,
                    "cache_salt": f"{salt}-{i}"}), range(n)))
            completion = sum(r["usage"]["completion_tokens"] for r in rs)
            prompt_tokens = rs[0]["usage"]["prompt_tokens"]
        wall = time.perf_counter() - t0
        after = srv.metrics()
        # every choice decodes its sampled tokens but the last; the rest of what was decoded is prompt
        prompt_decoded = decoded(before, after) - (completion - n)
        out.setdefault(mode, []).append({"wall_s": round(wall, 3), "prompt_tokens": prompt_tokens,
                                         "prompt_tokens_decoded": prompt_decoded, "completion_tokens": completion})
    best = {m: min(v, key=lambda x: x["wall_s"]) for m, v in out.items()}
    return {"runs": out, "prompt_decoded_ratio": best["one_request"]["prompt_tokens_decoded"]
            / best["n_requests"]["prompt_tokens_decoded"],
            "wall_ratio": best["one_request"]["wall_s"] / best["n_requests"]["wall_s"]}


def bench_sampling(tokens: int = 120) -> dict:
    """Per-token sampling cost with a grammar, forced along one JSON reply."""
    import llama_cpp as L
    import numpy as np

    from kv3d_core.api.structured import GrammarBuilder, schema_rule
    from kv3d_core.contracts.backend import BatchEntry, SamplingParams

    b = tokenizer()
    gb = GrammarBuilder()
    grammar = gb.grammar(schema_rule(gb, SCHEMA, "answer", "schema"))
    prompt = b.tokenize("<|im_start|>user\nDescribe Alice from Paris as JSON.<|im_end|>\n<|im_start|>assistant\n")
    # the reply to replay: greedy with the grammar
    out = b.decode([BatchEntry(0, prompt, 0, True)])[0]
    s = b.make_sampler(SamplingParams(temperature=0, grammar=grammar))
    reply, pos = [], len(prompt)
    while len(reply) < tokens:
        t = s.sample(out)
        if b.is_eog(t):
            break
        reply.append(t)
        out = b.decode([BatchEntry(0, [t], pos, True)])[0]
        pos += 1
    s.close()

    def replay(params: SamplingParams, force_full: bool) -> float:
        b.seq_remove(0)
        o = b.decode([BatchEntry(0, prompt, 0, True)])[0]
        smp = b.make_sampler(params)
        if force_full:                      # the grammar over the whole vocabulary every token
            def sample_full(output: int, smp=smp) -> int:
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(smp._ctx, output), shape=(smp._n_vocab,))
                tok = smp._apply(logits, grammar_first=True)
                L.llama_sampler_accept(smp._grammar, tok)
                L.llama_sampler_accept(smp._chain, tok)
                return tok
            smp.sample = sample_full
        spent, p = 0.0, len(prompt)
        for t in reply:
            t0 = time.perf_counter()
            smp.sample(o)
            spent += time.perf_counter() - t0
            o = b.decode([BatchEntry(0, [t], p, True)])[0]
            p += 1
        smp.close()
        return spent / len(reply) * 1000

    # replays sample greedily, which follows the recorded reply: the grammar state stays valid
    free = [replay(SamplingParams(temperature=0, top_k=40), False) for _ in range(3)]
    fast = [replay(SamplingParams(temperature=0, grammar=grammar), False) for _ in range(3)]
    full = [replay(SamplingParams(temperature=0, grammar=grammar), True) for _ in range(3)]
    b.close()
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {"reply_tokens": len(reply), "ms_per_token": {"no_grammar_chain": med(free), "grammar_checked_first": med(fast),
                                                          "grammar_whole_vocab": med(full)},
            "whole_vocab_over_checked_first": med(full) / med(fast)}


def bench_http_grammar(srv: Server, max_tokens: int) -> dict:
    def run(fmt: bool) -> dict:
        def one(i: int) -> dict:
            body = {"model": srv.model, "max_tokens": max_tokens, "temperature": 0, "cache_salt": f"g{fmt}{i}",
                    "messages": [{"role": "user", "content": f"Describe {PEOPLE[i]}."}]}
            if fmt:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
            t0 = time.perf_counter()
            r = _post(srv.url, body)
            return {"s": time.perf_counter() - t0, "tokens": r["usage"]["completion_tokens"]}
        rs = [one(i) for i in range(len(PEOPLE))]
        return {"ms_per_token": sum(r["s"] for r in rs) / sum(r["tokens"] for r in rs) * 1000,
                "tokens": sum(r["tokens"] for r in rs)}
    free, constrained = run(False), run(True)
    return {"free": free, "json_schema": constrained,
            "ratio": constrained["ms_per_token"] / free["ms_per_token"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report: dict = {"machine": machine(), "args": vars(args) | {"out": str(args.out)}}
    report["sampling"] = bench_sampling()
    print(json.dumps(report["sampling"], indent=1), flush=True)
    tok = tokenizer()
    prompt = text_of_tokens(tok, args.prompt_tokens, seed=7)
    tok.close()
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server([f"server.threads={args.threads}", "cache.gpu_hot_mb=128", "scheduler.n_seq_max=32",
                      "server.cached_tokens=exact"], Path(tmp) / "server.log")
        try:
            report["n"] = bench_n(srv, prompt, args.n, args.max_tokens)
            print(json.dumps({k: v for k, v in report["n"].items() if k != "runs"}, indent=1), flush=True)
            report["http_grammar"] = bench_http_grammar(srv, 120)
            print(json.dumps(report["http_grammar"], indent=1), flush=True)
        finally:
            srv.proc.terminate()
            srv.proc.wait(60)
    report["machine"]["load_avg_at_end"] = __import__("os").getloadavg()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
