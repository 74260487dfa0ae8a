"""The scheduler's own work per decode step, without the model (issue 15, per-step overhead).

``decode_overhead.py`` compares kv3d's serving path with raw batched ``llama_decode`` on the
real model; on a GPU its step split left 1-2 ms a step "other": Python work of the scheduler
thread around ``llama_decode`` and sampling. This measures that part alone, on any machine:
the real :class:`~kv3d_core.engine.scheduler.Scheduler` and
:class:`~kv3d_core.prefix.cache.PrefixCache` drive N requests that decode together, on a
stand-in backend whose ``decode`` and ``sample_many`` do no model work (the fake backend's
bookkeeping of positions and output rows, a fixed token). Each request's events go to a
plain list, as the API's outbox receives them. Reported: microseconds of the scheduler
thread's CPU time per step and per generated token (best of ``--reps`` runs; CPU time, not
wall time, so another process on the machine changes it little), and with ``--profile`` the functions
that take it.

    python benchmarks/scheduler_overhead.py --seqs 32,64 --gen 256
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import queue
import time
from typing import Sequence

from kv3d_core.contracts import BatchEntry, PromptView, SamplingParams
from kv3d_core.engine.events import Done
from kv3d_core.engine.scheduler import Job, Scheduler, SchedulerConfig
from kv3d_core.metrics import Metrics
from kv3d_core.prefix.cache import PrefixCache
from kv3d_core.prefix.detectors import ExactDetector
from kv3d_core.testing import FakeBackend

TOKEN = ord("a")      # a one-byte piece, never end-of-generation


class NoModel(FakeBackend):
    """The fake backend's checks and cell bookkeeping skipped too: ``decode`` hands out output
    rows, ``sample_many`` answers ``TOKEN``; what remains per step is the scheduler's."""

    def decode(self, entries: Sequence[BatchEntry]) -> list[int | None]:
        outputs: list[int | None] = [None] * len(entries)
        n = 0
        for i, e in enumerate(entries):
            n += len(e.tokens)
            if e.logits:
                outputs[i] = n - 1
        return outputs

    def sample_many(self, samplers, outputs) -> list[int]:
        return [TOKEN] * len(samplers)


def decode_together(b: FakeBackend, n: int, gen: int, prompt_tokens: int = 16) -> tuple[Scheduler, float, float]:
    """The real scheduler and prefix cache (no reuse) on backend ``b``: ``n`` requests of
    ``prompt_tokens`` distinct tokens decode ``gen`` tokens each, their events going to a list.
    Returns the stopped scheduler, the wall time and the scheduler thread's CPU time."""
    metrics = Metrics()
    cache = PrefixCache(b, ExactDetector(), metrics, enabled=False)
    sched = Scheduler(b, cache, metrics, SchedulerConfig(max_running=n, prefill_chunk=256))
    done: "queue.Queue[Done]" = queue.Queue()
    events: list = []

    def sink(ev) -> None:
        events.append(ev)
        if isinstance(ev, Done):
            done.put(ev)

    params = SamplingParams(temperature=0, ignore_eos=True)
    for i in range(n):
        view = PromptView([100 + (i + j) % 50 for j in range(prompt_tokens)], 0, b.info.model_id)
        sched.submit(Job(f"r{i}", view, ExactDetector().family(view), params, gen, [], sink))
    t0 = time.perf_counter()
    sched.start()
    clock = time.pthread_getcpuclockid(sched._thread.ident)
    c0 = time.clock_gettime(clock)
    for _ in range(n):
        done.get(timeout=3600)
    cpu = time.clock_gettime(clock) - c0      # the scheduler thread's CPU time: robust to other load
    wall = time.perf_counter() - t0
    sched.stop()
    return sched, wall, cpu


def run(n: int, gen: int) -> dict:
    b = NoModel(kv_unified=False, n_seq_max=n, n_ctx_seq=gen + 64, max_batch_tokens=max(512, 2 * n))
    sched, wall, cpu = decode_together(b, n, gen)
    return {"steps": sched.steps, "generated": n * gen, "wall_s": wall, "cpu_s": cpu,
            "us_per_step": cpu / sched.steps * 1e6, "us_per_token": cpu / (n * gen) * 1e6,
            "split_s": dict(sched.step_split)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="32,64")
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile one run per N (the scheduler thread)")
    ap.add_argument("--out")
    args = ap.parse_args()
    result = {}
    for n in [int(x) for x in args.seqs.split(",")]:
        runs = [run(n, args.gen) for _ in range(args.reps)]
        best = min(runs, key=lambda r: r["us_per_step"])
        result[n] = {"best": best, "us_per_step_all": [round(r["us_per_step"], 1) for r in runs]}
        print(f"{n} sequences: {best['us_per_step']:.0f} us/step, {best['us_per_token']:.2f} us/token "
              f"(runs: {result[n]['us_per_step_all']})")
        if args.profile:
            prof = cProfile.Profile()
            import threading
            threading.setprofile(lambda *a: None)
            original = Scheduler._step

            def profiled(self):
                prof.enable()
                try:
                    original(self)
                finally:
                    prof.disable()
            Scheduler._step = profiled
            try:
                run(n, args.gen)
            finally:
                Scheduler._step = original
                threading.setprofile(None)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            print(s.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
