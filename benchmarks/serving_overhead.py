"""The serving path's cost per decode step, with the model's time held fixed (issue 15).

On the H100, ``decode_overhead.py`` left 1-2 ms of every decode step "other" at 32-64 streams,
while ``scheduler_overhead.py`` puts the scheduler thread's own work at 0.2-0.5 ms: the rest is
waiting, most likely for the GIL while the HTTP side (the event loop serialising and writing one
SSE chunk per stream per step) holds it. This measures that on any machine, with no GPU and no
model: the real ``kv3d serve`` (its API, event loop, engine and scheduler, started the way the CLI
starts them) on a stand-in backend whose ``decode`` sleeps ``--step-ms`` with the GIL released,
as ``llama_decode`` does through ctypes, and hands out one fixed token. Two runs per N, the same
backend and scheduler:

* **alone**: the scheduler in this process, events to a list (no HTTP): its step time is the
  sleep plus the scheduler's own work;
* **served**: the server in a child process, N streaming ``/v1/completions`` clients in this
  one (``--pin``: server on CPU 0, clients on the others, so they do not share a core).

Reported per N: each run's wall time per step, and ``served - alone``: what the HTTP side adds to
every step. Safe mode (no cache) in both, so the stand-in needs no KV: this is the decode loop's
cost, not the cache's (which runs at a request's start and end).

    python benchmarks/serving_overhead.py --seqs 32,64 --gen 256 --step-ms 5 --pin
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from _common import REPO, free_port, machine
from kv3d_core import hookimpl

HERE = Path(__file__).resolve().parent


def _stand_in():
    """The stand-in backend class (imported late: the child process builds it too)."""
    from scheduler_overhead import NoModel

    class StepSleep(NoModel):
        """``NoModel`` whose ``decode`` takes ``step_ms`` of wall time with the GIL released."""

        def __init__(self, *, step_ms: float, **kw) -> None:
            super().__init__(**kw)
            self._sleep = step_ms / 1000.0

        def decode(self, entries):
            out = super().decode(entries)
            time.sleep(self._sleep)
            return out

    return StepSleep


class StepSleepPlugin:
    """Registers the stand-in as backend ``stepsleep``; the llama.cpp backend's settings in the
    composed config are dropped (the stand-in has none of them)."""

    @hookimpl
    def register_backends(self, register) -> None:
        cls = _stand_in()
        keep = {"n_seq_max", "n_ctx_seq", "kv_unified", "hot_mb", "max_batch_tokens", "n_threads", "step_ms"}

        def factory(**kw):
            return cls(**{k: v for k, v in kw.items() if k in keep})

        register("stepsleep", factory)


def serve_child(a) -> None:
    """The child: ``kv3d serve`` as the CLI runs it, on the stand-in backend."""
    import kv3d_core.plugins as plugins
    from kv3d_core import cli

    if a.pin:
        os.sched_setaffinity(0, {0})
    real = plugins.make_plugin_manager

    def with_stand_in(**kw):
        return real(**{**kw, "extra": [*kw.get("extra", ()), ("stepsleep", StepSleepPlugin())]})

    plugins.make_plugin_manager = with_stand_in
    import kv3d_core.engine.engine as engine_mod
    engine_mod.make_plugin_manager = with_stand_in
    n = a.serve_seqs
    sys.exit(cli.main(["serve", f"server.port={a.port}", "server.log_level=warning", "model.path=null",
                       "backend.name=stepsleep", f"+backend.step_ms={a.step_ms}",
                       f"+backend.max_batch_tokens={max(512, 2 * n)}", "cache.layout=streams",
                       f"cache.stream_ctx={max(256, a.gen + 64)}", f"scheduler.n_seq_max={n}", f"scheduler.max_running={n}",
                       "scheduler.prefill_seqs=0", "safe_mode=true", *a.set]))   # as alone's scheduler


def alone(a, n: int) -> dict:
    """The same scheduler and stand-in in this process, events to a list."""
    from scheduler_overhead import decode_together

    b = _stand_in()(step_ms=a.step_ms, kv_unified=False, n_seq_max=n, n_ctx_seq=max(256, a.gen + 64),
                    max_batch_tokens=max(512, 2 * n))
    sched, wall, _ = decode_together(b, n, a.gen, a.prompt_tokens)
    return {"steps": sched.steps, "wall_s": wall, "step_ms": wall / sched.steps * 1e3,
            "split_ms": {k: v / sched.steps * 1e3 for k, v in sched.step_split.items()}}


def served(a, n: int, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(Path(__file__)), "--serve-port", str(port), "--serve-seqs", str(n),
           "--step-ms", str(a.step_ms), "--gen", str(a.gen), *(["--pin"] if a.pin else []),
           *[x for s in a.set for x in ("--set", s)]]
    env = dict(os.environ, KV3D_USER_CONFIG="none", PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]))
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stand-in server did not start; see {log}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]

        def one(i: int, max_tokens: int) -> int:
            body = {"model": model, "prompt": [100 + (i + j) % 50 for j in range(a.prompt_tokens)],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
            usage = None
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
            return int(usage["completion_tokens"])

        with concurrent.futures.ThreadPoolExecutor(n) as pool:      # warm-up: every stream once
            list(pool.map(lambda i: one(i, 4), range(n)))
        before = httpx.get(url + "/debug/stats", timeout=60).json()["scheduler"]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            generated = sum(pool.map(lambda i: one(i, a.gen), range(n)))
        wall = time.perf_counter() - t0
        after = httpx.get(url + "/debug/stats", timeout=60).json()["scheduler"]
    finally:
        proc.terminate()
        proc.wait(30)
    steps = after["steps"] - before["steps"]
    return {"steps": steps, "generated": generated, "wall_s": wall, "step_ms": wall / steps * 1e3,
            "split_ms": {k: (after["step_seconds"][k] - before["step_seconds"][k]) / steps * 1e3
                         for k in ("decode", "sample", "admit", "other")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="32,64")
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--step-ms", type=float, default=5.0, help="the stand-in llama_decode's wall time")
    ap.add_argument("--pin", action="store_true", help="server on CPU 0, the clients on the other CPUs")
    ap.add_argument("--set", action="append", default=[], help="more kv3d serve overrides")
    ap.add_argument("--out")
    ap.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-seqs", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_port:
        a.port = a.serve_port
        serve_child(a)
        return
    if a.pin:
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)) or {0})
    out = {"benchmark": "serving_overhead", "step_ms": a.step_ms, "gen": a.gen, "pin": a.pin,
           "machine": machine(), "runs": {}}
    log = Path("/tmp") / f"serving_overhead-{os.getpid()}.log"
    for n in (int(x) for x in a.seqs.split(",")):
        al = alone(a, n)
        sv = served(a, n, log)
        out["runs"][n] = {"alone": al, "served": sv, "added_ms": sv["step_ms"] - al["step_ms"]}
        print(f"{n} streams: alone {al['step_ms']:.2f} ms/step, served {sv['step_ms']:.2f} ms/step "
              f"(+{sv['step_ms'] - al['step_ms']:.2f} ms: {a.step_ms / sv['step_ms']:.0%} of the step is the model); "
              "split (decode, sample, other; the rest is between steps) alone "
              + ", ".join(f"{v:.2f}" for v in al["split_ms"].values()) + ", served "
              + ", ".join(f"{v:.2f}" for v in sv["split_ms"].values()), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
