#!/usr/bin/env python3
"""kv3d on a GPU: "more sessions per GPU" and warm-restore throughput, measured.

Run on the device machine after ``scripts/gpu/setup.sh install build`` (see
``scripts/gpu/device_run.sh``); it also runs on a CPU build with a tiny model
(``--n-gpu-layers 0``), which is how it is tested before spending device time.

Stages (``--stages``, in this order; each appends its figures to ``--out``, a
JSON file rewritten after every stage, so a run cut short keeps what it did):

``env``       nvidia-smi line, driver, CUDA, torch.
``h2d``       the physical limit for a restore: host->device copy rate of a
              large pinned buffer (torch), next to pageable memory and to
              copies of one layer's K rows of a session (the size llama.cpp
              copies at a time).
``state``     in-process backend on the GPU: prefill; ``seq_state_get`` /
              ``seq_state_set`` of a whole session (prefix + own tokens) and of
              its own tokens only, through ordinary memory (what kv3d does
              today) and through a pinned buffer (``gpu_state.py``), plus
              llama.cpp's on-device save/restore; every restore is checked
              against the live sequence (next-token logits).
``capacity``  sessions that fit in one fixed KV budget (``--capacity-mb``):
              plain llama.cpp (every session holds its own full prompt + reply,
              filled until llama_decode finds no cells) against ``kv3d serve``
              (same cells, sessions sent until it must evict: resident sessions
              counted from /debug/stats).
``serve``     ``kv3d serve`` against ``kv3d serve safe_mode=true`` (plain: no
              reuse, every prompt computed; same build, scheduler and HTTP):
              TTFT of hits and misses one request at a time, then aggregate
              generated tokens/s and TTFT with 32 and 64 sessions in flight.

The workload is the seed's: new sessions, ``--shared-ratio`` (0.8) of them
starting with one of ``--families`` (4) shared ``--prefix`` (1,024)-token
prefixes, the rest with a prefix of their own, each followed by ``--unique``
(128) tokens of its own; prompts are token ids on ``/v1/completions``, greedy.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS: dict = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(RESULTS, indent=2, default=float))
    tmp.replace(path)


def med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# -- workload ---------------------------------------------------------------------------------
class Workload:
    """Deterministic token-id prompts: families of shared prefixes and sessions."""

    def __init__(self, a: argparse.Namespace, n_vocab: int) -> None:
        self.rng = np.random.default_rng(a.seed)
        self.lo, self.hi = 300, n_vocab          # clear of the special and byte tokens
        self.a = a
        self.families = [self._ids(a.prefix) for _ in range(a.families)]
        self.n = 0

    def _ids(self, n: int) -> list[int]:
        return self.rng.integers(self.lo, self.hi, n).tolist()

    def session(self) -> tuple[list[int], int | None]:
        """The next new session's prompt and its family (None: a prefix of its own).
        Shared sessions are spread evenly and exactly: after n sessions, floor(n * shared_ratio)."""
        i = self.n
        self.n += 1
        r = self.a.shared_ratio
        shared = int((i + 1) * r + 1e-9) - int(i * r + 1e-9) == 1
        if shared:
            if self.families:
                f = i % len(self.families)
                return self.families[f] + self._ids(self.a.unique), f
        return self._ids(self.a.prefix) + self._ids(self.a.unique), None


# -- stages -------------------------------------------------------------------------------------
def stage_env(a) -> None:
    env: dict = {"python": sys.version.split()[0], "host_cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max,"
                            "pcie.link.width.max,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True)
        env["nvidia_smi_gpu"] = q.stdout.strip()
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout.splitlines()
        env["nvidia_smi_header"] = next((ln.strip(" |") for ln in head if "CUDA Version" in ln), "")
        env["nvidia_smi_L"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    if shutil.which("nvcc"):
        env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import llama_cpp
        env["llama_cpp_python"] = llama_cpp.__version__
        env["llama_system_info"] = llama_cpp.llama_print_system_info().decode()
        env["llama_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except ImportError:
        pass
    RESULTS["env"] = env
    log(f"env: {env.get('nvidia_smi_gpu', 'no GPU')} | {env.get('nvidia_smi_header', '')}")


def stage_h2d(a) -> None:
    try:
        import torch
    except ImportError:
        RESULTS["h2d"] = {"skipped": "no torch"}
        return
    if not torch.cuda.is_available():
        RESULTS["h2d"] = {"skipped": "no CUDA device"}
        return
    dev = torch.device("cuda")
    out: dict = {}

    def rate(src: "torch.Tensor", dst: "torch.Tensor", reps: int) -> float:
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src, non_blocking=True)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return src.numel() * src.element_size() / med(times) / 1e9

    n = 1 << 30
    host_pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    host_page = torch.empty(n, dtype=torch.uint8).random_(0, 255)
    gpu = torch.empty(n, dtype=torch.uint8, device=dev)
    out["pinned_h2d_GBps_1GiB"] = rate(host_pinned, gpu, 10)
    out["pinned_d2h_GBps_1GiB"] = rate(gpu, host_pinned, 10)
    out["pageable_h2d_GBps_1GiB"] = rate(host_page, gpu, 5)
    out["pageable_d2h_GBps_1GiB"] = rate(gpu, host_page, 5)
    # one layer's K (or V) rows of a 1,152-cell session of the 1.5B shape: 1,152 x 512 bytes
    chunk = 1152 * 512
    out["pinned_h2d_GBps_590KB_copies"] = rate(host_pinned[:chunk], gpu[:chunk], 200)
    out["pageable_h2d_GBps_590KB_copies"] = rate(host_page[:chunk], gpu[:chunk], 200)
    out["device_d2d_GBps_1GiB"] = rate(gpu[: n // 2], gpu[n // 2:], 10) * 2   # read + write
    RESULTS["h2d"] = out
    log("h2d: " + ", ".join(f"{k}={v:.1f}" for k, v in out.items()))
    del host_pinned, host_page, gpu
    torch.cuda.empty_cache()


def _backend(a, hot_mb: float | None = None, n_ctx: int | None = None, n_seq_max: int = 8, **extra):
    from kv3d_core.plugins import make_plugin_manager
    return make_plugin_manager().create(
        "backend", "llamacpp", model_path=a.model, hot_mb=hot_mb, n_ctx=n_ctx, n_seq_max=n_seq_max,
        n_threads=a.threads, n_gpu_layers=a.n_gpu_layers, n_batch=a.n_batch, n_ubatch=a.n_ubatch, **extra)


def stage_streams(a) -> None:
    """Why many sequences slow each other down: N sequences, each with a context of its own
    (prefix + unique tokens, nothing shared), in one unified KV cache (what kv3d and plain
    use) and in one KV stream per sequence (``kv_unified=false``). Measured: the time to
    prefill all of them one after the other, then decode steps of one token for each."""
    from kv3d_core.contracts.backend import BatchEntry
    out: dict = {}
    ctx = a.prefix + a.unique
    steps = 32
    for nseq in a.streams_seqs:
        per = (ctx + steps + 255) // 256 * 256
        for unified in (True, False):
            rng = np.random.default_rng(5)
            b = _backend(a, n_ctx=nseq * per, n_seq_max=nseq, kv_unified=unified)
            t0 = time.perf_counter()
            for s in range(nseq):
                _prefill(b, s, rng.integers(300, b.info.n_vocab, ctx).tolist())
            t_prefill = time.perf_counter() - t0
            last = [int(x) for x in rng.integers(300, b.info.n_vocab, nseq)]
            t0 = time.perf_counter()
            for i in range(steps):
                outs = b.decode([BatchEntry(s, [last[s]], ctx + i, True) for s in range(nseq)])
                last = [int(np.argmax(b.logits(o))) for o in outs]
            dt = time.perf_counter() - t0
            name = f"{nseq}_{'unified' if unified else 'streams'}"
            out[name] = {"prefill_s": t_prefill, "prefill_tokens_per_s": nseq * ctx / t_prefill,
                         "decode_tokens_per_s": nseq * steps / dt, "cells": nseq * (ctx + steps)}
            b.close()
            log(f"streams: {nseq} sequences x {ctx} own tokens, {'unified' if unified else 'per-sequence streams'}: "
                f"prefill {nseq * ctx / t_prefill:.0f} tok/s, decode {nseq * steps / dt:.0f} tok/s")
    RESULTS["streams"] = out


def _prefill(b, seq: int, tokens: list[int], pos0: int = 0, logits_last: bool = False) -> int | None:
    from kv3d_core.contracts.backend import BatchEntry
    out = None
    step = b.max_batch_tokens
    for s in range(0, len(tokens), step):
        chunk = tokens[s:s + step]
        last = logits_last and s + step >= len(tokens)
        (out,) = b.decode([BatchEntry(seq, chunk, pos0 + s, last)])
    return out


def _next_logits(b, seq: int, token: int, pos: int) -> np.ndarray:
    from kv3d_core.contracts.backend import BatchEntry
    (o,) = b.decode([BatchEntry(seq, [token], pos, True)])
    lg = b.logits(o).copy()
    b.seq_remove(seq, pos, -1)
    return lg


def stage_state(a) -> None:
    from kv3d_backend_llamacpp import gpu_state as G
    b = _backend(a, hot_mb=a.state_hot_mb, n_seq_max=8)
    out: dict = {"kv_bytes_per_token": b.info.kv_bytes_per_token, "cuda_build": G.cuda_build()}
    rng = np.random.default_rng(1)
    n_prefix, n_own = a.prefix, a.unique + a.gen
    toks = rng.integers(300, b.info.n_vocab, n_prefix + n_own + 1).tolist()
    probe = toks[-1]
    n_all = n_prefix + n_own
    # warm up the kernels, then time prefill of the prefix and of the 2,048-token case
    _prefill(b, 7, toks[:256])
    b.seq_remove(7)
    t0 = time.perf_counter()
    _prefill(b, 0, toks[:n_prefix])
    b.seq_pos_max(0)
    out["prefill_prefix_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    _prefill(b, 0, toks[n_prefix:n_all], n_prefix)
    out["prefill_own_ms"] = (time.perf_counter() - t0) * 1e3
    ref = _next_logits(b, 0, probe, n_all)

    def check(seq: int, what: str) -> None:
        got = _next_logits(b, seq, probe, n_all)
        out[f"{what}_max_abs_logit_diff"] = float(np.abs(got - ref).max())
        out[f"{what}_top1_same"] = bool(int(np.argmax(got)) == int(np.argmax(ref)))

    reps = a.reps
    # (1) whole session through ordinary memory: what the backend does today
    blob = b.seq_state_get(0)
    nbytes = len(blob)
    out["session_cells"], out["session_blob_bytes"] = n_all, nbytes
    tg, ts = [], []
    for _ in range(reps):
        t0 = time.perf_counter(); blob = b.seq_state_get(0); tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); b.seq_state_set(1, blob); ts.append(time.perf_counter() - t0)
    check(1, "pageable_restore")
    out["pageable_get_ms"], out["pageable_set_ms"] = med(tg) * 1e3, med(ts) * 1e3
    out["pageable_get_GBps"], out["pageable_set_GBps"] = nbytes / med(tg) / 1e9, nbytes / med(ts) / 1e9
    # (2) the same through one pinned buffer (gpu_state.py)
    pb = G.PinnedBuffer(nbytes)
    out["pinned_buffer_is_pinned"] = pb.pinned
    tg, ts = [], []
    for _ in range(reps):
        t0 = time.perf_counter(); n = G.state_get_into(b, 0, pb, size=nbytes); tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); G.state_set_from(b, 2, pb, n); ts.append(time.perf_counter() - t0)
    assert bytes(pb.view[:n]) == bytes(blob), "pinned and pageable blobs differ"
    check(2, "pinned_restore")
    out["pinned_get_ms"], out["pinned_set_ms"] = med(tg) * 1e3, med(ts) * 1e3
    out["pinned_get_GBps"], out["pinned_set_GBps"] = nbytes / med(tg) / 1e9, nbytes / med(ts) / 1e9
    # (3) llama.cpp's on-device save / restore (device to device)
    ds = G.DeviceSnapshots(b)
    tg, ts = [], []
    for _ in range(reps):
        t0 = time.perf_counter(); hdr = ds.save(0); tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); ds.restore(hdr, 3); ts.append(time.perf_counter() - t0)
    check(3, "device_restore")
    out["device_save_ms"], out["device_restore_ms"] = med(tg) * 1e3, med(ts) * 1e3
    out["device_restore_GBps"] = nbytes / med(ts) / 1e9
    # (4) kv3d's session restore: the session's own cells from host memory + seq_cp of the
    #     shared prefix from the sequence holding it (here seq 0), pageable vs pinned
    b.seq_copy(0, 4, 0, n_all)
    b.seq_remove(4, 0, n_prefix)                  # seq 4 holds only the session's own cells now
    own = b.seq_state_get(4)
    out["own_cells"], out["own_blob_bytes"] = n_own, len(own)
    pown = G.PinnedBuffer(len(own))
    n_o = G.state_get_into(b, 4, pown, size=len(own))
    b.seq_remove(4)
    for path in ("pageable", "pinned"):
        tr = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if path == "pageable":
                b.seq_state_set(5, own)
            else:
                G.state_set_from(b, 5, pown, n_o)
            b.seq_copy(0, 5, 0, n_prefix)
            tr.append(time.perf_counter() - t0)
            if _ != reps - 1:
                b.seq_remove(5)
        check(5, f"own_{path}_restore")
        b.seq_remove(5)
        out[f"own_{path}_restore_ms"] = med(tr) * 1e3
        out[f"own_{path}_restore_GBps"] = len(own) / med(tr) / 1e9
    out["miss_recompute_ms"] = out["prefill_prefix_ms"] + out["prefill_own_ms"]
    pb.close(); pown.close(); b.close()
    RESULTS["state"] = out
    log("state: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))


def stage_scale(a) -> None:
    """Restore rate against session length (pageable vs pinned), and the decode ceiling of
    the same build without kv3d's scheduler: one token for each of N sequences per
    llama_decode, greedy argmax on the host."""
    from kv3d_backend_llamacpp import gpu_state as G
    from kv3d_core.contracts.backend import BatchEntry
    b = _backend(a, hot_mb=a.state_hot_mb * 4, n_seq_max=130)
    out: dict = {}
    rng = np.random.default_rng(2)
    for cells in (1184, 4096, 16384):
        toks = rng.integers(300, b.info.n_vocab, cells).tolist()
        _prefill(b, 0, toks)
        blob = b.seq_state_get(0)
        pb = G.PinnedBuffer(len(blob))
        r: dict = {"bytes": len(blob)}
        for path in ("pageable", "pinned"):
            tg, ts = [], []
            for _ in range(max(3, a.reps // 2)):
                t0 = time.perf_counter()
                if path == "pageable":
                    blob = b.seq_state_get(0)
                else:
                    n = G.state_get_into(b, 0, pb, size=len(blob))
                tg.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                if path == "pageable":
                    b.seq_state_set(1, blob)
                else:
                    G.state_set_from(b, 1, pb, n)
                ts.append(time.perf_counter() - t0)
            r[f"{path}_get_GBps"] = len(blob) / med(tg) / 1e9
            r[f"{path}_set_GBps"] = len(blob) / med(ts) / 1e9
        pb.close()
        b.seq_remove(0)
        b.seq_remove(1)
        out[f"restore_{cells}_cells"] = r
        log(f"scale: {cells} cells {len(blob) / 1e6:.1f} MB: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items() if k != "bytes"))
    ctx = a.prefix + a.unique
    for nseq in (1, 32, 64, 128):
        base = rng.integers(300, b.info.n_vocab, ctx).tolist()
        _prefill(b, 0, base)
        for s in range(1, nseq):
            b.seq_copy(0, s, 0, ctx)                 # same context cells, own decode cells
        last = [base[-1]] * nseq
        steps = a.max_tokens
        t0 = time.perf_counter()
        for i in range(steps):
            outs = b.decode([BatchEntry(s, [last[s]], ctx + i, True) for s in range(nseq)])
            last = [int(np.argmax(b.logits(o))) for o in outs]
        dt = time.perf_counter() - t0
        out[f"direct_decode_{nseq}_seqs_tokens_per_s"] = nseq * steps / dt
        for s in range(nseq):
            b.seq_remove(s)
        log(f"scale: direct llama.cpp decode, {nseq} sequences x {steps} steps: {nseq * steps / dt:.0f} tok/s")
    b.close()
    RESULTS["scale"] = out


def _cells(mb: float, kv_bytes: int) -> int:
    """The backend's own rounding of a hot-tier budget to cells."""
    return max(256, (int(mb * 1024 * 1024 // kv_bytes) // 256) * 256)


def stage_capacity(a) -> None:
    from kv3d_core.errors import KVCacheFullError
    out: dict = {"budget_mb": a.capacity_mb}
    # plain llama.cpp: each session's own cells for its whole prompt + reply, one unified pool
    b = _backend(a, hot_mb=a.capacity_mb, n_seq_max=256)
    kvb = b.info.kv_bytes_per_token
    out["cells"] = b.info.n_ctx
    wl = Workload(a, b.info.n_vocab)
    n = 0
    t0 = time.perf_counter()
    try:
        while n < 256:
            p, _ = wl.session()
            _prefill(b, n, p + wl._ids(a.gen))
            n += 1
    except KVCacheFullError:
        b.seq_remove(n)
    out["plain_sessions"] = n
    out["plain_fill_s"] = time.perf_counter() - t0
    b.close()
    out["cells_per_plain_session"] = a.prefix + a.unique + a.gen
    budget_gib = out["cells"] * kvb / 2**30
    out["budget_gib"] = budget_gib
    out["plain_sessions_per_gib"] = n / budget_gib
    log(f"capacity: plain llama.cpp holds {n} sessions in {out['cells']} cells ({budget_gib:.3f} GiB)")

    # kv3d: sessions sent in waves of `capacity_concurrency`; after each wave /debug/stats says how
    # many sessions are resident (hot) and how many were spilled to host RAM (warm tier)
    # idle sessions stay hot until their cells are needed (cache.hot_idle_s=null): what is measured
    # here is how many fit in the GPU budget before any has to leave
    srv = Server(a, "kv3d-capacity", [f"cache.gpu_hot_mb={a.capacity_mb}", "scheduler.n_seq_max=256",
                                      f"scheduler.max_running={a.capacity_concurrency}", "cache.hot_idle_s=null",
                                      f"cache.ram_warm_mb={a.capacity_warm_mb}"])
    waves: list[dict] = []
    sessions: list[tuple[list[int], int | None]] = []
    with srv:
        wl = Workload(a, srv.n_vocab)
        for f in range(a.families):      # the families' first sessions, one at a time
            p = wl.families[f] + wl._ids(a.unique)
            srv.complete(p, a.gen)
            sessions.append((p, f))
        t0 = time.perf_counter()
        errors = 0
        while len(sessions) < a.capacity_sessions + a.families:
            wave = [wl.session() for _ in range(a.capacity_concurrency)]
            res = run_concurrent(srv, [p for p, _ in wave], a.gen, a.capacity_concurrency)
            errors += sum(1 for r in res if r.get("error"))
            sessions += wave
            st = srv.stats()
            ev = sum(v for k, v in srv.metrics().items() if k.startswith("kv3d_evictions"))
            waves.append({"sent": len(sessions), "hot": int(st["hot"]["sessions"]), "cells_used": int(st["hot"]["cells_used"]),
                          "warm": int(st.get("warm", {}).get("sessions", 0)), "evictions": ev})
        out["kv3d_fill_s"] = time.perf_counter() - t0
        # resume sessions spilled early (the first ones sent): their prompt + 16 new tokens
        early = sessions[a.families:]
        pick = ([s for s in early if s[1] is None][: a.resume_requests // 2]
                + [s for s in early if s[1] is not None][: a.resume_requests // 2])
        resumed = [dict(srv.complete(p + wl._ids(16), 1, stream=True), family=fam) for p, fam in pick]
        fresh = [srv.complete(wl._ids(a.prefix + a.unique + 16), 1, stream=True) for _ in range(3)]
        st = srv.stats()
        out["cache_metrics"] = cache_metrics(srv)
    hot = st.get("hot", {})
    out["kv3d_waves"] = waves
    out["kv3d_stats"] = st
    out["kv3d_sessions_sent"] = len(sessions)
    out["kv3d_max_resident_sessions"] = max(w["hot"] for w in waves) if waves else 0
    first_ev = next((w for w in waves if w["evictions"] > 0), None)
    out["kv3d_resident_at_first_eviction"] = first_ev["hot"] if first_ev else None
    out["kv3d_resident_sessions_end"] = waves[-1]["hot"] if waves else 0
    out["kv3d_warm_sessions_end"] = waves[-1]["warm"] if waves else 0
    out["kv3d_errors"] = errors
    out["kv3d_sessions_per_gib"] = out["kv3d_max_resident_sessions"] / budget_gib
    out["ratio_kv3d_over_plain"] = out["kv3d_max_resident_sessions"] / max(1, n)
    out["kv3d_resumable_sessions_per_gib"] = (waves[-1]["hot"] + waves[-1]["warm"]) / budget_gib if waves else 0
    out["resume_ttft_ms"] = [r.get("ttft_ms") for r in resumed]
    out["resume_cached_tokens"] = [r.get("cached") for r in resumed]
    out["resume_unique_prefix_ttft_ms_median"] = med([r["ttft_ms"] for r in resumed if r.get("family") is None and "ttft_ms" in r])
    out["resume_shared_prefix_ttft_ms_median"] = med([r["ttft_ms"] for r in resumed if r.get("family") is not None and "ttft_ms" in r])
    out["fresh_miss_ttft_ms_median"] = med([r["ttft_ms"] for r in fresh if "ttft_ms" in r])
    own = a.unique + a.gen
    full = a.prefix + own
    sr = a.shared_ratio
    per = sr * own + (1 - sr) * full
    out["expected_kv3d_sessions"] = (out["cells"] - a.families * a.prefix) / per
    out["expected_ratio"] = out["expected_kv3d_sessions"] / max(1, out["cells"] // full)
    RESULTS["capacity"] = out
    log(f"capacity: kv3d peak {out['kv3d_max_resident_sessions']} resident sessions "
        f"(at first eviction {out['kv3d_resident_at_first_eviction']}, end {out['kv3d_resident_sessions_end']} hot + "
        f"{out['kv3d_warm_sessions_end']} warm, {errors} errors); ratio {out['ratio_kv3d_over_plain']:.2f}x "
        f"(expected {out['expected_ratio']:.2f}x); resume TTFT unique {out['resume_unique_prefix_ttft_ms_median']:.1f} ms, "
        f"shared {out['resume_shared_prefix_ttft_ms_median']:.1f} ms vs miss {out['fresh_miss_ttft_ms_median']:.1f} ms "
        f"(cached {out['resume_cached_tokens']})")


def stage_serve(a) -> None:
    res_all: dict = {}
    common = [f"cache.gpu_hot_mb={a.serve_hot_mb}", "scheduler.n_seq_max=256",
              f"scheduler.max_running={max(a.concurrency)}"]
    systems = {"kv3d": [], "kv3d_idle_spill": ["cache.hot_idle_s=2"], "plain": ["safe_mode=true"]}
    for name, extra in ((n, systems[n]) for n in a.serve_systems.split(",")):
        out: dict = {}
        with Server(a, f"serve-{name}", common + extra) as srv:
            wl = Workload(a, srv.n_vocab)
            srv.complete(wl._ids(300), 4)                     # warm-up, shares nothing
            seq: list[dict] = []
            for f in range(a.families):                       # families' first sessions: misses
                r = srv.complete(wl.families[f] + wl._ids(a.unique), 1, stream=True)
                seq.append(dict(r, kind="family-first"))
            for _ in range(a.ttft_requests):
                p, fam = wl.session()
                r = srv.complete(p, 1, stream=True)
                seq.append(dict(r, kind="shared" if fam is not None else "unique"))
            hits = [r["ttft_ms"] for r in seq if r["cached"] > 0]
            misses = [r["ttft_ms"] for r in seq if r["cached"] == 0]
            out["ttft_seq_hit_ms_median"], out["ttft_seq_miss_ms_median"] = med(hits), med(misses)
            out["ttft_seq_hits"], out["ttft_seq_misses"] = len(hits), len(misses)
            out["ttft_seq_hit_cached_tokens_median"] = med([r["cached"] for r in seq if r["cached"] > 0])
            for c in a.concurrency:
                prompts = [wl.session()[0] for _ in range(a.rounds * c)]
                t0 = time.perf_counter()
                rs = run_concurrent(srv, prompts, a.max_tokens, c, stream=True)
                wall = time.perf_counter() - t0
                ok = [r for r in rs if not r.get("error")]
                gen = sum(r["completion"] for r in ok)
                h = [r["ttft_ms"] for r in ok if r["cached"] > 0]
                mi = [r["ttft_ms"] for r in ok if r["cached"] == 0]
                out[f"c{c}"] = {
                    "requests": len(rs), "errors": len(rs) - len(ok), "wall_s": wall,
                    "generated_tokens": gen, "gen_tokens_per_s": gen / wall,
                    "prompt_tokens": sum(r["prompt"] for r in ok),
                    "cached_tokens": sum(r["cached"] for r in ok),
                    "ttft_hit_ms_p50": pct(h, 50), "ttft_hit_ms_p95": pct(h, 95),
                    "ttft_miss_ms_p50": pct(mi, 50), "ttft_miss_ms_p95": pct(mi, 95),
                    "ttft_all_ms_p50": pct(h + mi, 50), "hits": len(h), "misses": len(mi),
                    "decode_tokens_per_s_per_session_p50": pct(
                        [(r["completion"] - 1) / max(1e-9, (r["total_ms"] - r["ttft_ms"]) / 1e3) for r in ok
                         if r["completion"] > 1], 50),
                }
                log(f"serve {name} c={c}: {gen / wall:.0f} generated tok/s, TTFT p50 hit "
                    f"{out[f'c{c}']['ttft_hit_ms_p50']:.0f} ms / miss {out[f'c{c}']['ttft_miss_ms_p50']:.0f} ms, "
                    f"{out[f'c{c}']['errors']} errors")
            out["stats"] = srv.stats()
            out["cache_metrics"] = cache_metrics(srv)
            out["gpu_memory_mib"] = srv.gpu_memory_mib()
        res_all[name] = out
        log(f"serve {name}: sequential TTFT hit {out['ttft_seq_hit_ms_median']:.1f} ms ({len(hits)}), "
            f"miss {out['ttft_seq_miss_ms_median']:.1f} ms ({len(misses)})")
        RESULTS["serve"] = res_all


def cache_metrics(srv: "Server") -> dict[str, float]:
    """The server's restore, spill and eviction counters, and mean restore time per tier."""
    m = srv.metrics()
    keep = ("kv3d_restore", "kv3d_spills", "kv3d_evictions", "kv3d_hot_idle_spills", "kv3d_sessions", "kv3d_kv_bytes")
    out = {k: v for k, v in m.items() if k.startswith(keep) and "_bucket" not in k and "_created" not in k}
    for tier in ("warm", "cold"):
        n = m.get(f'kv3d_restore_seconds_count{{tier="{tier}"}}', 0)
        if n:
            out[f"restore_mean_ms_{tier}"] = 1e3 * m[f'kv3d_restore_seconds_sum{{tier="{tier}"}}'] / n
    return out


# -- a kv3d server ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, a, name: str, overrides: list[str]) -> None:
        self.a, self.name = a, name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "kv3d_core.cli", "serve", f"server.port={self.port}",
                    f"model.path={a.model}", f"backend.n_gpu_layers={a.n_gpu_layers}",
                    f"backend.n_batch={a.n_batch}", f"backend.n_ubatch={a.n_ubatch}",
                    f"server.threads={a.threads}", "server.log_level=warning", *overrides]
        self.log_path = Path(a.workdir) / f"server-{name}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx
        env = dict(os.environ, KV3D_USER_CONFIG="none")
        self._log = open(self.log_path, "ab")
        log(f"server {self.name}: {' '.join(self.cmd[3:])}")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + self.a.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"server {self.name} not healthy in {self.a.start_timeout}s")
        log(f"server {self.name}: up in {time.perf_counter() - t0:.1f} s")
        self.client = httpx.Client(timeout=self.a.request_timeout,
                                   limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        self.n_vocab = int(self.stats().get("n_vocab") or self._n_vocab())
        return self

    def _n_vocab(self) -> int:
        import gguf
        r = gguf.GGUFReader(self.a.model)
        for t in r.tensors:
            if t.name == "token_embd.weight":
                return int(t.shape[1])
        raise RuntimeError("no token_embd.weight in the model")

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def stats(self) -> dict:
        return self.client.get(self.url + "/debug/stats").json() if hasattr(self, "client") else {}

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.client.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[k] = float(v)
        return out

    def gpu_memory_mib(self) -> float | None:
        if not shutil.which("nvidia-smi") or self.proc is None:
            return None
        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True).stdout
        for line in q.splitlines():
            pid, _, mem = line.partition(",")
            if pid.strip() == str(self.proc.pid):
                return float(mem)
        return None

    def complete(self, prompt: list[int], max_tokens: int, stream: bool = False) -> dict:
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        body["model"] = self.model_id
        t0 = time.perf_counter()
        if not stream:
            r = self.client.post(self.url + "/v1/completions", json=body)
            if r.status_code != 200:
                return {"error": f"{r.status_code} {r.text[:200]}"}
            u = r.json()["usage"]
            ms = (time.perf_counter() - t0) * 1e3
            return {"ttft_ms": ms, "total_ms": ms, "prompt": u["prompt_tokens"], "completion": u["completion_tokens"],
                    "cached": u["prompt_tokens_details"]["cached_tokens"]}
        body.update(stream=True, stream_options={"include_usage": True})
        ttft = None
        usage = None
        with self.client.stream("POST", self.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"{r.status_code} {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if ttft is None:
                    ttft = (time.perf_counter() - t0) * 1e3
                d = json.loads(line[6:])
                if d.get("usage"):
                    usage = d["usage"]
                if "error" in d:
                    return {"error": str(d["error"])[:200]}
        total = (time.perf_counter() - t0) * 1e3
        if usage is None:
            return {"error": "no usage chunk"}
        return {"ttft_ms": ttft, "total_ms": total, "prompt": usage["prompt_tokens"],
                "completion": usage["completion_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}

    @property
    def model_id(self) -> str:
        if not hasattr(self, "_model_id"):
            self._model_id = self.client.get(self.url + "/v1/models").json()["data"][0]["id"]
        return self._model_id


def run_concurrent(srv: Server, prompts: list[list[int]], max_tokens: int, concurrency: int,
                   stream: bool = False) -> list[dict]:
    srv.model_id
    with cf.ThreadPoolExecutor(concurrency) as ex:
        futs = [ex.submit(srv.complete, p, max_tokens, stream) for p in prompts]
        out = []
        for f in futs:
            try:
                out.append(f.result())
            except Exception as exc:                    # a failed request is counted, not fatal
                out.append({"error": f"{type(exc).__name__}: {exc}"[:200]})
    return out


STAGES = {"env": stage_env, "h2d": stage_h2d, "state": stage_state, "scale": stage_scale,
          "capacity": stage_capacity, "serve": stage_serve, "streams": stage_streams}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, required=True, help="results JSON (rewritten after every stage)")
    p.add_argument("--workdir", default="/tmp/kv3d-gpu")
    p.add_argument("--stages", default="env,h2d,state,capacity,serve")
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--n-batch", type=int, default=2048)
    p.add_argument("--n-ubatch", type=int, default=512)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--unique", type=int, default=128)
    p.add_argument("--gen", type=int, default=32, help="reply tokens per session in the state and capacity stages")
    p.add_argument("--families", type=int, default=4)
    p.add_argument("--shared-ratio", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--state-hot-mb", type=float, default=1024)
    p.add_argument("--capacity-mb", type=float, default=1024)
    p.add_argument("--capacity-sessions", type=int, default=240)
    p.add_argument("--capacity-concurrency", type=int, default=16)
    p.add_argument("--capacity-warm-mb", type=float, default=8192,
                   help="warm tier (host RAM) of the capacity server: large enough that every spilled session "
                        "stays resumable, so the resumes measure restores")
    p.add_argument("--resume-requests", type=int, default=8)
    p.add_argument("--serve-hot-mb", type=float, default=4096)
    p.add_argument("--ttft-requests", type=int, default=20)
    p.add_argument("--concurrency", default="32,64")
    p.add_argument("--streams-seqs", default="8,32,64", help="sequence counts of the streams stage")
    p.add_argument("--serve-systems", default="kv3d,kv3d_idle_spill,plain",
                   help="kv3d (defaults), kv3d_idle_spill (cache.hot_idle_s=2: idle sessions leave the hot "
                        "tier; runs 4-5 named this one kv3d and the default kv3d_keep_idle), plain (safe mode)")
    p.add_argument("--rounds", type=int, default=2, help="requests per concurrent slot in the throughput runs")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--start-timeout", type=float, default=300)
    a = p.parse_args(argv)
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x]
    a.streams_seqs = [int(x) for x in a.streams_seqs.split(",") if x]
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    if a.out.exists():
        RESULTS.update(json.loads(a.out.read_text()))
    RESULTS["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    rc = 0
    for name in a.stages.split(","):
        t0 = time.perf_counter()
        log(f"== stage {name}")
        try:
            STAGES[name](a)
        except Exception as exc:
            import traceback
            traceback.print_exc()
            RESULTS.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            rc = 1
        RESULTS.setdefault("stage_seconds", {})[name] = time.perf_counter() - t0
        save(a.out)
    log(f"done, rc={rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
