"""``kv3d quality``: how much a delta codec changes what the model predicts.

Usage::

    kv3d quality [HYDRA OVERRIDES...] [quality.limit=N] [quality.max_positions=N]
                 [quality.floor=true] [quality.prompts=FILE] [quality.n_ctx=CELLS]

Hydra overrides pick the model, backend and codec as for ``kv3d serve``
(``codec=int8``, ``model.path=...``, ``server.threads=1``); the ``quality.*``
options (also accepted as ``+quality.*``) belong to this command: ``limit`` (prompts
to run, taken round-robin over system prompts; 0 = all), ``max_positions``
(continuation tokens compared per prompt, default 32; 0 = all), ``floor`` (also
measure the noise floor: the same comparison for the delta with a 1-ulp change in
0.1% of its values; keys ``floor_*``), ``prompts`` (another prompt file of the same
shape), ``n_ctx`` (KV cells of the harness's context).

On SmolLM2-135M Q4_1 (CPU) that floor is a mean KL of about 3e-3 and a top-1
agreement of about 0.97: any restore that is not bit-exact moves the logits about that
much, whatever the codec (most likely because activations are re-quantized to 8 bits
before each quantized matmul, so a tiny change flips roundings that then propagate).

For every prompt of ``kv3d_tools/data/quality_prompts.json`` (or ``quality.prompts``),
on the real backend, following the server's path:

1. render it with :class:`~kv3d_core.engine.prompt.ChatPrompter`; the family prefix
   (system prompt) is decoded once per family into a snapshot sequence S;
2. the live sequence A gets the prefix by ``seq_copy(S, A)`` and decodes its own
   tokens in chunks (all but the prompt's last token);
3. *spill*: A's state is parsed (the backend's ``state_layout``), its delta
   (positions >= family length) encoded and decoded by the configured codec, rebuilt
   into a blob and restored into sequence B, which then gets the prefix from S;
4. the prompt's last token plus the held-out continuation (teacher forcing, its first
   ``quality.max_positions`` tokens) are fed to A and to B, and at every position the
   next-token distributions are compared: KL(live || restored) in float64, top-1
   agreement, and the perplexity of the continuation under each. The headline
   ``mean_kl``/``max_kl``/``top1_agreement`` are the NEXT-token figures: the first
   distribution computed on top of the restored KV, one per prompt; ``cont_*`` are
   the same over every compared continuation position.

A state layout the reader refuses (or any other cache-path fault) counts as a
fallback, as the server would recompute. The output is a short table and, as the
last line, one JSON object: ``codec, mean_kl, max_kl, top1_agreement, ppl_change,
ratio`` (f16 bytes of the deltas / encoded bytes), ``n_prompts, n_positions,
fallbacks, model, seconds`` and more. Targets are reported, not enforced: the exit
status is 0 whenever the run completed.
"""

from __future__ import annotations

import collections
import importlib.resources
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kv3d_core.contracts.backend import BatchEntry, ExecutionBackend
from kv3d_core.contracts.codec import BlockCodec, DeltaCodec, KVArrays
from kv3d_core.contracts.state import StateLayout
from kv3d_core.errors import CacheFault, ConfigError, StateFormatError

# Targets of a lossy delta codec (int8): mean KL, top-1 agreement, perplexity change, size ratio.
TARGETS = {"mean_kl": ("<=", 1e-3), "top1_agreement": (">=", 0.99), "ppl_change": ("<=", 0.005), "ratio": (">=", 2.2)}
def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(value)
    return v in ("1", "true", "yes", "on")


OPTIONS = {"limit": int, "prompts": str, "n_ctx": int, "max_positions": int, "floor": _flag}
SEQ_LIVE, SEQ_SNAPSHOT, SEQ_RESTORED, SEQ_FLOOR = 0, 1, 2, 3
FLOOR_FRACTION = 1e-3
BUCKETS = ((0, 128), (128, 256), (256, 1 << 30))
# Continuation tokens are fed in pieces of 2..32 tokens. llama.cpp's CPU flash attention
# then takes its per-row path, whose sums run over the cells in cache order and skip masked
# ones, so the result does not depend on where a sequence's cells lie in the cache: a
# lossless codec gives KL exactly 0. (Pieces of >= 64 queries take the tiled path and a
# single query over >= 512 cells the KV-split path; both group their sums by cell index,
# which alone moves logits by up to ~1 and KL to ~3e-3 between two copies of one sequence.)
TEACHER_CHUNK = 32


@dataclass(frozen=True)
class PromptCase:
    id: str
    messages: list[dict]
    continuation: str


@dataclass
class Totals:
    """Running sums over all compared positions."""

    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    nll_live: list[np.ndarray] = field(default_factory=list)
    nll_restored: list[np.ndarray] = field(default_factory=list)
    delta_len: list[int] = field(default_factory=list)
    f16_bytes: int = 0
    encoded_bytes: int = 0
    spill_s: float = 0.0
    floor_kl: list[np.ndarray] = field(default_factory=list)
    floor_top1: list[np.ndarray] = field(default_factory=list)
    floor_nll: list[np.ndarray] = field(default_factory=list)
    fallbacks: collections.Counter = field(default_factory=collections.Counter)


def split_args(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Hydra overrides and this command's ``quality.*`` options."""
    overrides: list[str] = []
    opts: dict[str, Any] = {"limit": 0, "prompts": None, "n_ctx": 4096, "max_positions": 32, "floor": False}
    for a in args:
        key, sep, value = a.lstrip("+").partition("=")
        if not key.startswith("quality."):
            overrides.append(a)
            continue
        name = key[len("quality."):]
        if not sep or name not in OPTIONS:
            raise ConfigError(f"unknown or incomplete option {a!r}; use quality.limit=N, quality.prompts=FILE, "
                              "quality.max_positions=N, quality.floor=true or quality.n_ctx=CELLS")
        try:
            opts[name] = OPTIONS[name](value)
        except ValueError:
            kind = "true or false" if name == "floor" else OPTIONS[name].__name__
            raise ConfigError(f"{a!r}: {name} must be {kind}") from None
    if opts["limit"] < 0 or opts["max_positions"] < 0 or opts["n_ctx"] < 256:
        raise ConfigError("quality.limit and quality.max_positions must be >= 0, quality.n_ctx >= 256")
    return overrides, opts


def load_prompts(path: str | None = None) -> list[PromptCase]:
    """The prompt set: each prompt's system prompt, its messages and held-out reply."""
    if path is None:
        text = importlib.resources.files("kv3d_tools").joinpath("data", "quality_prompts.json").read_text("utf-8")
    else:
        text = Path(path).expanduser().read_text("utf-8")
    try:
        data = json.loads(text)
        systems = data["systems"]
        cases = []
        for p in data["prompts"]:
            messages = [{"role": "system", "content": systems[p["system"]]}] if p.get("system") else []
            messages += [{"role": m["role"], "content": m["content"]} for m in p["messages"]]
            cases.append(PromptCase(str(p["id"]), messages, str(p["continuation"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"prompt file {path or 'quality_prompts.json'} is malformed: {exc!r}") from None
    if not cases:
        raise ConfigError("the prompt file holds no prompts")
    return cases


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def compare(live: np.ndarray, restored: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per position: KL(live || restored), top-1 agreement, NLL of the target under each."""
    lp, lq = log_softmax(live), log_softmax(restored)
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)
    top1 = live.argmax(axis=-1) == restored.argmax(axis=-1)
    rows = np.arange(targets.size)
    return kl, top1, -lp[rows, targets], -lq[rows, targets]


def decode_chunks(backend: ExecutionBackend, seq: int, tokens: Sequence[int], pos0: int, chunk: int) -> None:
    step = max(1, min(chunk, backend.max_batch_tokens))
    for i in range(0, len(tokens), step):
        backend.decode([BatchEntry(seq, tokens[i:i + step], pos0 + i, False)])


def teacher_pieces(n: int, size: int = TEACHER_CHUNK) -> list[tuple[int, int]]:
    """``[start, stop)`` pieces of ``n`` fed tokens: at most ``size`` long and, when
    ``n > 1``, never a single token (see :data:`TEACHER_CHUNK`)."""
    bounds = list(range(0, n, size)) + [n]
    pieces = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if len(pieces) > 1 and pieces[-1][1] - pieces[-1][0] == 1 and pieces[-2][1] - pieces[-2][0] > 2:
        (a, b), (_, d) = pieces[-2], pieces[-1]
        pieces[-2:] = [(a, b - 1), (b - 1, d)]
    return pieces


def teacher_logits(backend: ExecutionBackend, seq: int, tokens: Sequence[int], pos0: int) -> np.ndarray:
    """Logits after each of ``tokens`` (fed at ``pos0...``), float32 ``[len, n_vocab]``."""
    out = np.empty((len(tokens), backend.info.n_vocab), np.float32)
    for a, b in teacher_pieces(len(tokens), min(TEACHER_CHUNK, backend.max_batch_tokens)):
        rows = backend.decode([BatchEntry(seq, [t], pos0 + a + j, True) for j, t in enumerate(tokens[a:b])])
        for j, r in enumerate(rows):
            out[a + j] = backend.logits(r)  # type: ignore[arg-type]
    return out


def ulp_perturbed(arrays: KVArrays, rng: np.random.Generator, fraction: float = FLOOR_FRACTION) -> KVArrays:
    """A copy of ``arrays`` with the lowest mantissa bit of a random ``fraction`` of the
    K/V values flipped: the smallest change a float16 value can undergo (noise floor)."""
    def flip(x: np.ndarray) -> np.ndarray:
        y = np.array(x, dtype=np.float16, copy=True)
        bits = y.view(np.uint16)
        bits[rng.random(y.shape) < fraction] ^= np.uint16(1)
        return y

    return KVArrays(arrays.positions, [flip(x) for x in arrays.k], [flip(x) for x in arrays.v],
                    arrays.head_dim_k, arrays.head_dim_v, arrays.extra)


def restore_into(backend: ExecutionBackend, seq: int, blob: bytes, family_len: int) -> None:
    """Cells of ``blob`` into ``seq``, then the family prefix shared from the snapshot."""
    backend.seq_remove(seq)
    backend.seq_state_set(seq, blob)
    backend.seq_copy(SEQ_SNAPSHOT, seq, 0, family_len)


def layout_of(backend: ExecutionBackend) -> StateLayout:
    """The backend's state layout; a backend without one cannot be measured here."""
    if backend.state_layout is None:
        raise StateFormatError("the backend's state blobs have no K/V layout: no delta to measure")
    return backend.state_layout


def spill_restore(backend: ExecutionBackend, codec: DeltaCodec, family_len: int, totals: Totals) -> KVArrays:
    """A's delta through the codec into B; B gets the prefix from S. Returns the delta
    as read from A. Raises CacheFault."""
    layout = layout_of(backend)
    t0 = time.perf_counter()
    delta = layout.select(layout.parse(backend.seq_state_get(SEQ_LIVE)), family_len)
    if isinstance(codec, BlockCodec):
        restored, n_bytes = through_blocks(codec, delta)
    else:
        encoded = codec.encode(delta)
        restored, n_bytes = codec.decode(encoded), len(encoded)
    restore_into(backend, SEQ_RESTORED, layout.build(restored), family_len)
    totals.spill_s += time.perf_counter() - t0
    totals.f16_bytes += delta.f16_bytes()
    totals.encoded_bytes += n_bytes
    return delta


def through_blocks(codec: BlockCodec, delta: KVArrays) -> tuple[KVArrays, int]:
    """A block codec's path, as the tier stack takes it: the delta cut into whole blocks (every
    one new: nothing shared, so the bytes are one session's own) and a manifest, decoded back
    from them. (decoded delta, manifest and block bytes)."""
    keys = [f"{i:040x}" for i in range(delta.n_cells // codec.block_tokens)]
    manifest, blocks = codec.encode_blocks(delta, keys, lambda _k: False)

    def alloc(t: KVArrays) -> KVArrays:
        return KVArrays(t.positions.copy(), [np.empty(x.shape, np.float16) for x in t.k],
                        [np.empty(x.shape, np.float16) for x in t.v], t.head_dim_k, t.head_dim_v, t.extra)

    restored = codec.decode_blocks_into(manifest, blocks.__getitem__, alloc)
    return restored, len(manifest) + sum(len(b) for b in blocks.values())


def order_cases(cases: list[PromptCase], limit: int) -> list[PromptCase]:
    """The first ``limit`` prompts taken round-robin over system prompts (variety for small limits)."""
    if not limit or limit >= len(cases):
        return cases
    groups: dict[str, list[PromptCase]] = {}
    for c in cases:
        groups.setdefault(json.dumps(c.messages[:1]), []).append(c)
    out: list[PromptCase] = []
    depth = 0
    while len(out) < limit:
        for g in groups.values():
            if depth < len(g) and len(out) < limit:
                out.append(g[depth])
        depth += 1
    return out


def run(backend: ExecutionBackend, codec: DeltaCodec, cases: list[PromptCase], chunk: int,
        max_positions: int = 0, floor: bool = False) -> tuple[Totals, int]:
    """Measure every case (at most ``max_positions`` continuation tokens each, 0: all);
    returns the totals and the number of families.

    With ``floor``, a fourth sequence gets the delta with a 1-ulp change in 0.1% of
    its values (:func:`ulp_perturbed`): the KL it shows is the floor below which no
    non-bit-exact codec can go on this model and backend."""
    from kv3d_core.engine.prompt import ChatPrompter

    prompter = ChatPrompter.for_backend(backend)
    rendered = []
    for c in cases:
        p = prompter.chat(c.messages)
        cont = backend.tokenize(c.continuation, add_special=False, parse_special=False)
        if max_positions:
            cont = cont[:max_positions]
        rendered.append((c, p.tokens, p.family_len, cont))
    families: dict[tuple[int, ...], list] = {}
    for item in rendered:
        families.setdefault(tuple(item[1][:item[2]]), []).append(item)

    totals = Totals()
    rng = np.random.default_rng(0)
    n_restored = 2 if floor else 1
    for prefix, items in families.items():
        fam = len(prefix)
        # A clean cache per family: cells are allocated in position order, so the
        # live and restored sequences attend over their cells in the same order.
        backend.reset_kv()
        decode_chunks(backend, SEQ_SNAPSHOT, list(prefix), 0, chunk)
        for case, tokens, _, cont in items:
            need = len(tokens) + (1 + n_restored) * (len(tokens) - fam + len(cont))
            if not cont or len(tokens) <= fam or need > backend.info.n_ctx:
                totals.fallbacks["skipped"] += 1
                continue
            backend.seq_remove(SEQ_LIVE)
            backend.seq_remove(SEQ_RESTORED)
            backend.seq_copy(SEQ_SNAPSHOT, SEQ_LIVE, 0, fam)
            decode_chunks(backend, SEQ_LIVE, tokens[fam:-1], fam, chunk)
            try:
                delta = spill_restore(backend, codec, fam, totals)
                if floor:
                    restore_into(backend, SEQ_FLOOR, layout_of(backend).build(ulp_perturbed(delta, rng)), fam)
            except CacheFault as exc:
                totals.fallbacks[exc.reason] += 1
                continue
            feed = [tokens[-1]] + cont[:-1]
            live = teacher_logits(backend, SEQ_LIVE, feed, len(tokens) - 1)
            restored = teacher_logits(backend, SEQ_RESTORED, feed, len(tokens) - 1)
            kl, top1, nll_l, nll_r = compare(live, restored, np.asarray(cont))
            totals.kl.append(kl)
            totals.top1.append(top1)
            totals.nll_live.append(nll_l)
            totals.nll_restored.append(nll_r)
            if floor:
                perturbed = teacher_logits(backend, SEQ_FLOOR, feed, len(tokens) - 1)
                kl_f, top1_f, _, nll_f = compare(live, perturbed, np.asarray(cont))
                totals.floor_kl.append(kl_f)
                totals.floor_top1.append(top1_f)
                totals.floor_nll.append(nll_f)
            totals.delta_len.append(len(tokens) - 1 - fam)
        backend.reset_kv()
    return totals, len(families)


def summarize(totals: Totals) -> dict[str, Any]:
    """Headline ``mean_kl`` / ``max_kl`` / ``top1_agreement``: the NEXT-token distribution,
    i.e. the first one computed on top of the restored KV (one per prompt), as the issue
    defines them. ``cont_*``: the same over every compared continuation position
    (teacher forcing). ``ppl_change``: perplexity of the held-out continuations."""
    if not totals.kl:
        return {"mean_kl": None, "max_kl": None, "top1_agreement": None, "ppl_change": None,
                "ppl_live": None, "ppl_restored": None, "ratio": None, "n_positions": 0}
    kl = np.concatenate(totals.kl)
    next_kl = np.array([k[0] for k in totals.kl if k.size])
    next_top1 = np.array([t[0] for t in totals.top1 if t.size])
    ppl_l = math.exp(float(np.concatenate(totals.nll_live).mean()))
    ppl_r = math.exp(float(np.concatenate(totals.nll_restored).mean()))
    floor: dict[str, Any] = {}
    if totals.floor_kl:
        fkl = np.concatenate(totals.floor_kl)
        ppl_f = math.exp(float(np.concatenate(totals.floor_nll).mean()))
        fnext = np.array([k[0] for k in totals.floor_kl if k.size])
        floor = {"floor_mean_kl": float(fnext.mean()), "floor_max_kl": float(fnext.max()),
                 "floor_top1_agreement": float(np.mean([t[0] for t in totals.floor_top1 if t.size])),
                 "floor_cont_mean_kl": float(fkl.mean()),
                 "floor_cont_top1_agreement": float(np.concatenate(totals.floor_top1).mean()),
                 "floor_ppl_change": abs(ppl_f / ppl_l - 1.0)}
    return {
        "mean_kl": float(next_kl.mean()),
        "max_kl": float(next_kl.max()),
        "top1_agreement": float(next_top1.mean()),
        "ppl_change": abs(ppl_r / ppl_l - 1.0),
        "cont_mean_kl": float(kl.mean()),
        "cont_max_kl": float(kl.max()),
        "cont_top1_agreement": float(np.concatenate(totals.top1).mean()),
        "ppl_live": ppl_l,
        "ppl_restored": ppl_r,
        "ratio": totals.f16_bytes / totals.encoded_bytes if totals.encoded_bytes else None,
        "n_positions": int(kl.size),
        **floor,
    }


def targets_met(result: dict[str, Any]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for key, (op, bound) in TARGETS.items():
        v = result.get(key)
        out[key] = None if v is None else (v <= bound if op == "<=" else v >= bound)
    return out


def table(result: dict[str, Any], totals: Totals, n_families: int) -> str:
    met = targets_met(result)

    def fmt(key: str, spec: str) -> str:
        v = result.get(key)
        return "-" if v is None else format(v, spec)

    def tgt(key: str) -> str:
        op, bound = TARGETS[key]
        return f"{op} {bound:g}  " + {True: "ok", False: "MISS", None: "-"}[met[key]]

    lines = [
        f"kv3d quality: codec={result['codec']} model={result['model']} prompts={result['n_prompts']} "
        f"families={n_families} positions={result['n_positions']} fallbacks={result['fallbacks']} "
        f"({result['seconds']:.1f} s)",
        f"  {'metric':<22}{'value':>14}   target (lossy codecs)",
        f"  {'next-token mean KL':<22}{fmt('mean_kl', '.3e'):>14}   {tgt('mean_kl')}",
        f"  {'next-token max KL':<22}{fmt('max_kl', '.3e'):>14}",
        f"  {'next-token top-1':<22}{fmt('top1_agreement', '.4f'):>14}   {tgt('top1_agreement')}",
        f"  {'continuation mean KL':<22}{fmt('cont_mean_kl', '.3e'):>14}   (every compared position)",
        f"  {'continuation top-1':<22}{fmt('cont_top1_agreement', '.4f'):>14}",
        f"  {'ppl live / restored':<22}{fmt('ppl_live', '.4f') + ' / ' + fmt('ppl_restored', '.4f'):>14}",
        f"  {'ppl change':<22}{fmt('ppl_change', '.2e'):>14}   {tgt('ppl_change')}",
        f"  {'ratio f16 / encoded':<22}{fmt('ratio', '.3f'):>14}   {tgt('ratio')}",
    ]
    if "floor_mean_kl" in result:
        lines.append(f"  noise floor (1-ulp change in {FLOOR_FRACTION:.1%} of the delta's values): mean KL "
                     f"{result['floor_mean_kl']:.3e}, top-1 {result['floor_top1_agreement']:.4f}, "
                     f"ppl change {result['floor_ppl_change']:.2e}")
    if totals.kl:
        lines.append(f"  {'delta tokens':<22}{'prompts':>8}{'mean KL':>12}{'top-1':>9}")
        lens = np.asarray(totals.delta_len)
        for lo, hi in BUCKETS:
            sel = np.flatnonzero((lens >= lo) & (lens < hi))
            if sel.size:
                kl = np.concatenate([totals.kl[i] for i in sel])
                t1 = np.concatenate([totals.top1[i] for i in sel])
                label = f"{lo}-{hi - 1}" if hi < (1 << 30) else f">= {lo}"
                lines.append(f"  {label:<22}{sel.size:>8}{kl.mean():>12.3e}{t1.mean():>9.4f}")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    from kv3d_core.config import compose
    from kv3d_core.plugins import make_plugin_manager

    start = time.perf_counter()
    overrides, opts = split_args(args)
    plugins = make_plugin_manager()
    cfg = compose(overrides, plugins=plugins)
    cases = order_cases(load_prompts(opts["prompts"]), opts["limit"])
    codec_name = str(cfg.codec.name)
    codec = plugins.configure("codec", cfg.codec)
    backend_name, backend_settings = plugins.settings("backend", cfg.backend)
    backend_settings.update(model_path=cfg.model.path, model_id=cfg.model.id, n_ctx=opts["n_ctx"],
                            n_seq_max=4, n_threads=cfg.server.threads)
    backend = plugins.create("backend", backend_name, **backend_settings)
    try:
        model = backend.info.model_id
        totals, n_families = run(backend, codec, cases, int(cfg.scheduler.prefill_chunk), opts["max_positions"],
                                 opts["floor"])
    finally:
        backend.close()
    result: dict[str, Any] = {"codec": codec_name, "model": model}
    result.update(summarize(totals))
    result.update({
        "n_prompts": len(totals.kl),
        "fallbacks": int(sum(v for k, v in totals.fallbacks.items() if k != "skipped")),
        "fallback_reasons": dict(totals.fallbacks),
        "delta_tokens": int(sum(totals.delta_len)),
        "spill_ms_mean": 1e3 * totals.spill_s / max(1, len(totals.kl)),
        "seconds": round(time.perf_counter() - start, 2),
    })
    result["targets_met"] = all(v is True for v in targets_met(result).values())
    print(table(result, totals, n_families))
    sys.stdout.flush()
    print(json.dumps(result))
    return 0
