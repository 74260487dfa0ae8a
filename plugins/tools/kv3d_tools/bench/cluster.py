"""Replicas behind a router, as systems of ``kv3d bench`` (issue 21's measured comparison):

* ``kv3d_cluster`` -- ``cluster.replicas`` kv3d replicas with ``tier=redis`` on one shared, real
  ``redis-server`` (started by the bench on a free loopback port, with a key prefix of its own
  for the run), behind HAProxy with the shipped ``deploy/router/haproxy.cfg``, started by
  ``deploy/router/run-haproxy.sh`` (consistent hashing on ``X-Session-Id``, else the first chat
  message);
* ``kv3d_rr`` -- the same replicas with their local tiers only (``tier=ram``: hot and warm RAM),
  behind HAProxy with the shipped configuration made round robin: generated from
  ``haproxy.cfg`` at each run (its ``balance`` line becomes ``balance roundrobin``, the hash
  lines go; the frontend, checks and retries stay), started with run-haproxy.sh's command line.

Every replica is a ``kv3d serve`` with the bench's serve overrides (give it
``server.threads=1`` on a small machine) except ``tier``: each system sets its own. The bench
drives the router's address like any server; after the run it reads every replica's
``/debug/stats`` and ``/metrics`` (KV memory summed, requests each replica served, restores by
tier) and the store's memory. :func:`resume_figures` says how many follow-up turns found their
session's earlier state, :func:`targets` gives issue 21's targets, :func:`markdown` the report's
section.

A system whose parts are missing (``haproxy``, ``redis-server``, the ``tier_redis`` plugin) is
skipped with the reason in the report (:func:`unavailable`); ``scripts/test.sh`` installs the
Debian packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from kv3d_tools.bench import metrics as figures
from kv3d_tools.bench import prom
from kv3d_tools.bench.systems import BenchError, ServerProcess, free_port, kv3d_server

KV3D_CLUSTER = "kv3d_cluster"
KV3D_RR = "kv3d_rr"
SYSTEMS = (KV3D_CLUSTER, KV3D_RR)
SESSION_HEADER = "X-Session-Id"

TARGET_RESUME_HIT_RATE = 0.95      # kv3d_cluster: resumes that find their session's state
TARGET_RESUME_TTFT_RATIO = 0.3     # kv3d_cluster's TTFT p50 of resumes <= 0.3x kv3d_rr's

CHAT_OK = 'kv3d_http_requests_total{endpoint="/v1/chat/completions",status="200"}'
COMPLETIONS_OK = 'kv3d_http_requests_total{endpoint="/v1/completions",status="200"}'
HEALTH_OK = 'kv3d_http_requests_total{endpoint="/health",status="200"}'


# -- what is needed ---------------------------------------------------------------------------------
def router_dir(cfg) -> Path:
    """``cluster.router_dir``, else the repository's ``deploy/router`` (next to this editable
    install), else ``./deploy/router``."""
    if cfg.cluster.router_dir:
        return Path(str(cfg.cluster.router_dir)).expanduser()
    here = Path(__file__).resolve().parents[4] / "deploy" / "router"
    return here if here.is_dir() else Path.cwd() / "deploy" / "router"


def _binary(setting, name: str) -> str | None:
    """The binary a setting names (None when it is not an executable file), else ``name`` on PATH."""
    if setting:
        p = Path(str(setting)).expanduser()
        return str(p) if p.is_file() and os.access(p, os.X_OK) else None
    return shutil.which(name)


def unavailable(name: str, cfg) -> str | None:
    """None when ``name`` can run here; else why not."""
    d = router_dir(cfg)
    if not (d / "haproxy.cfg").is_file() or not (d / "run-haproxy.sh").is_file():
        return f"no HAProxy configuration at {d} (set cluster.router_dir to deploy/router)"
    if _binary(cfg.cluster.haproxy, "haproxy") is None:
        return (f"haproxy is not installed{_at(cfg.cluster.haproxy)} (Debian: apt-get install haproxy; "
                "scripts/test.sh installs it)")
    if name == KV3D_CLUSTER:
        if _binary(cfg.cluster.redis_server, "redis-server") is None:
            return (f"redis-server is not installed{_at(cfg.cluster.redis_server)} (Debian: apt-get install "
                    "redis-server; scripts/test.sh installs it)")
        try:
            import kv3d_tier_redis  # noqa: F401
        except ImportError:
            return "the tier_redis plugin is not installed (pip install -e plugins/tier_redis)"
    return None


def _at(setting) -> str:
    return f" at {setting}" if setting else ""


def round_robin_config(text: str) -> str:
    """The shipped HAProxy configuration with its backend made round robin: the ``balance``
    line replaced, the consistent-hash lines removed, everything else as shipped."""
    out, replaced = [], False
    for line in text.splitlines():
        s = line.strip()
        indent = line[:len(line) - len(line.lstrip())]
        if s.startswith("balance "):
            out.append(f"{indent}balance roundrobin   # kv3d bench (kv3d_rr): generated from haproxy.cfg")
            replaced = True
        elif s.startswith(("hash-type ", "hash-balance-factor ")):
            continue
        else:
            out.append(line)
    if not replaced:
        raise BenchError("deploy/router/haproxy.cfg has no `balance` line to make round robin")
    return "\n".join(out) + "\n"


# -- the processes ----------------------------------------------------------------------------------
class RedisStore:
    """A real ``redis-server`` for one system run (kv3d_tier_redis.testing.RedisServer: loopback,
    free port, no persistence), with ``maxmemory`` above the tier's budget and no eviction of
    its own, as docs/SCALING.md asks."""

    def __init__(self, tmp: Path, capacity_mb: int, binary: str | None) -> None:
        from kv3d_tier_redis.testing import RedisServer

        self.server = RedisServer(tmp, extra=["--maxmemory", f"{int(capacity_mb * 1.25) + 64}mb",
                                              "--maxmemory-policy", "noeviction"])
        if binary:
            self.server.exe = binary
        self.prefix = f"kv3d-bench-{uuid.uuid4().hex[:12]}"

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> "RedisStore":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def figures(self) -> dict[str, Any]:
        """The store's memory and the entries under this run's prefix."""
        import redis

        try:
            client = redis.Redis.from_url(self.url, socket_timeout=5)
            info = client.info("memory")
            keys = sum(1 for _ in client.scan_iter(match=f"{self.prefix}*", count=1000))
            client.close()
        except Exception as exc:  # the figures are extras; the run is measured already
            return {"store_error": f"{type(exc).__name__}: {exc}"}
        return {"store_used_memory_bytes": int(info.get("used_memory", 0)), "store_keys": keys,
                "store_prefix": self.prefix}


class Cluster:
    """One system: the store (kv3d_cluster), the replicas, HAProxy. Has what the bench uses of a
    :class:`~kv3d_tools.bench.systems.ServerProcess` (``url``, ``argv``, ``start``, ``get_json``,
    ``rss``, ``rss_peak``, ``proc``, ``log_path``) plus :meth:`figures`."""

    def __init__(self, name: str, cfg, serve_overrides: list[str], out: Path) -> None:
        if name not in SYSTEMS:
            raise BenchError(f"{name} is not a cluster system")
        self.name, self.cfg, self.out = name, cfg, out
        self.n = int(cfg.cluster.replicas)
        if self.n < 1:
            raise BenchError(f"cluster.replicas={self.n}: at least one replica")
        self.shared = name == KV3D_CLUSTER
        # each system sets its tier: the shared store, or the local tiers only
        self.base_overrides = [o for o in serve_overrides if _key(o).split(".")[0] != "tier"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"{name}-haproxy.log"
        self.store: RedisStore | None = None
        self.replicas: list[ServerProcess] = []
        self.router: subprocess.Popen | None = None
        self.proc = None                 # the bench checks a server's exit code; the replicas are checked here
        # what the bench logs when it starts the system (the router's command line once started)
        self.argv: list[str] = [f"{self.n} x kv3d serve", "tier=redis (a new redis-server)" if self.shared
                                else "tier=ram", "behind haproxy"]
        self._tmp: str | None = None
        self._health_before: list[float] = []

    # what each replica runs with
    def replica_overrides(self) -> list[str]:
        if self.shared:
            assert self.store is not None
            tier = ["tier=redis", f"tier.url={self.store.url}", f"tier.prefix={self.store.prefix}",
                    f"tier.capacity_mb={int(self.cfg.cluster.store_mb)}"]
        else:
            tier = ["tier=ram"]
        return [*self.base_overrides, *tier]

    def routing(self) -> dict[str, Any]:
        header = bool(self.cfg.session_header)
        if self.shared:
            key = (f"{SESSION_HEADER} header (one key per bench session)" if header else
                   "first chat message (messages[0].content: the system prompt)")
            return {"router": "haproxy deploy/router/haproxy.cfg (run-haproxy.sh)", "balance": "consistent hash",
                    "route_key": key}
        return {"router": "haproxy, deploy/router/haproxy.cfg made round robin", "balance": "roundrobin",
                "route_key": "none (round robin" + (f"; the {SESSION_HEADER} header is sent and ignored)" if header
                                                    else ")")}

    def config(self) -> dict[str, Any]:
        return {"replicas": self.n, "tier": "redis (shared)" if self.shared else "ram (local)",
                **self.routing(), "replica_overrides": [o for o in self.replica_overrides()
                                                        if not o.startswith("tier.url=")],
                "store_mb": int(self.cfg.cluster.store_mb) if self.shared else None}

    def start(self, timeout_s: float = 300.0) -> "Cluster":
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        if self.shared:
            self.store = RedisStore(self.out / f"{self.name}-redis", int(self.cfg.cluster.store_mb),
                                    _binary(self.cfg.cluster.redis_server, "redis-server")).start()
        overrides = self.replica_overrides()
        self.replicas = [kv3d_server(f"{self.name}-r{i + 1}", overrides, self.out / f"{self.name}-r{i + 1}.log")
                         for i in range(self.n)]
        with ThreadPoolExecutor(self.n) as pool:       # they load the model at the same time
            list(pool.map(lambda r: r.start(timeout_s=timeout_s), self.replicas))
        self._health_before = [self._metric(r, HEALTH_OK) for r in self.replicas]
        self._start_router()
        self._wait_router(timeout_s=60)

    def _start_router(self) -> None:
        d = router_dir(self.cfg)
        haproxy = _binary(self.cfg.cluster.haproxy, "haproxy")
        addrs = [r.url.removeprefix("http://") for r in self.replicas]
        bind = f"127.0.0.1:{self.port}"
        env = {**os.environ, "HAPROXY": str(haproxy), "KV3D_ROUTER_BIND": bind}
        if self.shared:     # the shipped script and configuration, as a user runs them
            self.argv = [str(d / "run-haproxy.sh"), "--bind", bind, *addrs]
        else:               # run-haproxy.sh's command line on the round-robin variant
            self._tmp = tempfile.mkdtemp(prefix="kv3d-bench-rr-")
            cfg_path = Path(self._tmp) / "haproxy.cfg"
            text = round_robin_config((d / "haproxy.cfg").read_text())
            text += "".join(f"    server r{i + 1} {a}\n" for i, a in enumerate(addrs))
            cfg_path.write_text(text)
            (self.out / f"{self.name}-haproxy.cfg").write_text(text)
            check = subprocess.run([str(haproxy), "-c", "-q", "-f", str(cfg_path)], capture_output=True, text=True,
                                   env=env)
            if check.returncode != 0:
                raise BenchError(f"the round-robin HAProxy configuration does not check:\n{check.stderr[-2000:]}")
            self.argv = [str(haproxy), "-W", "-db", "-f", str(cfg_path)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.router = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)

    def _wait_router(self, timeout_s: float) -> None:
        """Up, and its health checks have reached every replica (HAProxy routes to them)."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.router is not None
            if self.router.poll() is not None:
                raise BenchError(f"HAProxy exited with {self.router.returncode}:\n{self.log_tail()}")
            try:
                up = httpx.get(self.url + "/router/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                up = False
            if up and all(self._metric(r, HEALTH_OK) > b for r, b in zip(self.replicas, self._health_before)):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"HAProxy did not probe every replica's /health in {timeout_s:.0f}s:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.3)

    @staticmethod
    def _metric(r: ServerProcess, name: str) -> float:
        try:
            return _sample(r.get_text("/metrics", timeout=10), name)
        except httpx.HTTPError:
            return 0.0

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def get_json(self, path: str, timeout: float = 30) -> dict:
        return httpx.get(self.url + path, timeout=timeout).raise_for_status().json()

    def rss(self) -> int | None:
        """The replicas' resident memory together (the store's is in :meth:`figures`)."""
        vals = [r.rss() for r in self.replicas]
        return sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None

    @property
    def rss_peak(self) -> int:
        return sum(r.rss_peak for r in self.replicas)

    def figures(self, run, workload, cached_tokens_rounding: int) -> dict[str, Any]:
        """After the run: every replica's KV memory (summed) and counters, the requests each
        served, the store's memory, the resume figures, the routing."""
        stats = [r.get_json("/debug/stats") for r in self.replicas]
        texts = [r.get_text("/metrics") for r in self.replicas]
        out: dict[str, Any] = {**figures.kv3d_memory(_merge_stats(stats)), **resume_figures(run, workload,
                                                                                          cached_tokens_rounding)}
        counters = [figures.kv3d_counters(t) for t in texts]
        out["restores"] = {t: sum(c["restores"].get(t) or 0.0 for c in counters) for t in ("warm", "cold")}
        out["restore_p95_warm_s"] = max((c["restore_p95_warm_s"] for c in counters
                                         if c["restore_p95_warm_s"] is not None), default=None)
        out["restore_p95_cold_s"] = max((c["restore_p95_cold_s"] for c in counters
                                         if c["restore_p95_cold_s"] is not None), default=None)
        out["requests_by_replica"] = [int(_sample(t, CHAT_OK) + _sample(t, COMPLETIONS_OK)) for t in texts]
        out.update(feed_figures(texts))
        out["replica_rss_bytes"] = [r.rss() for r in self.replicas]
        out["replica_exit_codes"] = [r.proc.poll() if r.proc else None for r in self.replicas]
        out.update(self.routing())
        out["cluster_config"] = self.config()
        if self.store is not None:
            out.update(self.store.figures())
            out["store_rss_bytes"] = _pid_rss(self.store.server.proc)
        out["server_stats"] = {r.name: s for r, s in zip(self.replicas, stats)}
        return out

    def stop(self) -> None:
        if self.router is not None and self.router.poll() is None:
            self.router.send_signal(signal.SIGTERM)
            try:
                self.router.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.router.pid, signal.SIGKILL)
                self.router.wait(10)
        for r in self.replicas:
            r.stop()
        if self.store is not None:
            self.store.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _pid_rss(proc) -> int | None:
    import psutil

    try:
        return int(psutil.Process(proc.pid).memory_info().rss) if proc is not None else None
    except psutil.Error:
        return None


def feed_figures(texts: list[str]) -> dict[str, Any]:
    """Summed over the replicas' ``/metrics``: entries each wrote to the shared tier while they
    stayed hot (``kv3d_tier_published``) and the others' entries each indexed from the tier's
    feed while running (``kv3d_tier_followed``), by kind. Empty without a shared tier."""
    out: dict[str, dict[str, float]] = {"tier_published": {}, "tier_followed": {}}
    for text in texts:
        for sample in prom.parse(text):
            for key, name in (("tier_published", "kv3d_tier_published_total"),
                              ("tier_followed", "kv3d_tier_followed_total")):
                if sample.name == name:
                    kind = sample.labels.get("kind", "")
                    out[key][kind] = out[key].get(kind, 0.0) + sample.value
    return out


def _merge_stats(stats: list[dict]) -> dict:
    """The replicas' ``/debug/stats`` as one: hot and warm tiers summed (each replica's own
    memory); a shared cold tier counted once (every replica reports the same store)."""
    merged: dict[str, Any] = {"enabled": any(s.get("enabled", True) for s in stats)}
    for tier in ("hot", "warm"):
        parts = [s[tier] for s in stats if isinstance(s.get(tier), dict) and "bytes" in s[tier]]
        if parts:
            merged[tier] = {k: sum(int(p.get(k) or 0) for p in parts)
                            for k in ("bytes", "sessions", "snapshots", "capacity_bytes")}
    colds = [s["cold"] for s in stats if isinstance(s.get("cold"), dict) and "bytes" in s["cold"]]
    if colds:
        merged["cold"] = max(colds, key=lambda c: int(c.get("bytes") or 0))
    return merged


# -- figures --------------------------------------------------------------------------------------
def cached_tokens_rounding(cfg) -> int:
    """How far below the truth a replica's ``cached_tokens`` may be (``server.cached_tokens=block``
    rounds down to ``cached_tokens_block``)."""
    return int(cfg.server.cached_tokens_block) if str(cfg.server.cached_tokens) == "block" else 0


def resume_figures(run, workload, rounding: int = 0) -> dict[str, Any]:
    """Follow-up turns (resumes): hit rate as the bench counts hits (``cached_tokens > 0``, which a
    family's system prompt alone gives), and the share that found their **session's state**: cached
    tokens covering the previous turn's whole prompt (less ``rounding``, the server's
    cached_tokens rounding), i.e. the conversation resumed, not only its system prompt."""
    by_index = {r.index: r for r in run.results}
    resumes = [r for r in run.ok if r.turn > 0 and r.prompt_tokens is not None]
    state = []
    for r in resumes:
        parent = by_index.get(workload.requests[r.index].parent)
        prev = parent.prompt_tokens if parent is not None else None
        state.append(prev is not None and (r.cached_tokens or 0) >= prev - rounding)
    prompt = sum(r.prompt_tokens for r in resumes)
    return {
        "resume_by_turn": resume_by_turn(resumes, state),
        "resume_uncached_tokens_p50": _p50([r.prompt_tokens - (r.cached_tokens or 0) for r in resumes]),
        "n_resume_usage": len(resumes),
        "resume_hit_rate": sum(bool(r.hit) for r in resumes) / len(resumes) if resumes else None,
        "resume_state_hit_rate": sum(state) / len(state) if state else None,
        "resume_cached_token_share": sum(r.cached_tokens or 0 for r in resumes) / prompt if prompt else None,
        "resume_state_hit_method": (f"cached_tokens >= the previous turn's prompt_tokens - {rounding} "
                                    "(the server's cached_tokens rounding)"),
    }


def _p50(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def resume_by_turn(resumes: list, state: list[bool]) -> dict[str, dict[str, Any]]:
    """The resumes (answered follow-up turns with usage) by their turn -- how long the conversation
    they resume is -- each with: how many, their TTFT p50, the p50 of their prompt tokens and of
    the tokens the server computed (prompt less cached), and the share that found their session's
    state (``state``: one flag per resume, as :func:`resume_figures` counts it)."""
    turns: dict[int, list[int]] = {}
    for k, r in enumerate(resumes):
        turns.setdefault(int(r.turn), []).append(k)
    out: dict[str, dict[str, Any]] = {}
    for t in sorted(turns):
        rs = [resumes[k] for k in turns[t]]
        ttft = [r.ttft_s for r in rs if r.ttft_s is not None]
        out[str(t)] = {"n": len(rs), "ttft_p50_s": _p50(ttft),
                       "prompt_tokens_p50": _p50([r.prompt_tokens for r in rs]),
                       "uncached_tokens_p50": _p50([r.prompt_tokens - (r.cached_tokens or 0) for r in rs]),
                       "state_hit_rate": sum(state[k] for k in turns[t]) / len(rs)}
    return out


RATIO_KEYS = {"ttft_p50_resume": "ttft_p50_resume_s", "ttft_p50": "ttft_p50_s", "tokens_per_s": "tokens_per_s",
              "hit_rate": "hit_rate", "resume_hit_rate": "resume_hit_rate",
              "resume_state_hit_rate": "resume_state_hit_rate"}


def comparison(results: dict[str, dict]) -> dict[str, Any] | None:
    """``report.json``'s ``cluster``: kv3d_cluster / kv3d_rr ratios (None where either figure
    is missing), or None when neither ran."""
    if not any(n in results for n in SYSTEMS):
        return None
    c, rr = results.get(KV3D_CLUSTER), results.get(KV3D_RR)
    ratios = {}
    for k, field in RATIO_KEYS.items():
        a, b = (c or {}).get(field), (rr or {}).get(field)
        ratios[k] = a / b if a is not None and b else None
    by_turn = {}
    ca, rb = (c or {}).get("resume_by_turn") or {}, (rr or {}).get("resume_by_turn") or {}
    for t in sorted(set(ca) & set(rb), key=int):
        row = {}
        for k, field in (("ttft_p50", "ttft_p50_s"), ("uncached_tokens_p50", "uncached_tokens_p50")):
            a, b = ca[t].get(field), rb[t].get(field)
            row[k] = a / b if a is not None and b else None
        by_turn[t] = row
    ratios["resume_uncached_tokens_p50"] = _ratio((c or {}).get("resume_uncached_tokens_p50"),
                                                  (rr or {}).get("resume_uncached_tokens_p50"))
    return {"ratios": ratios, "resume_by_turn": by_turn, "route_key": (c or rr or {}).get("route_key"), "systems": [n for n in SYSTEMS
                                                                                        if n in results]}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(results: dict[str, dict], skipped: dict[str, str] | None = None) -> dict[str, dict]:
    """Issue 21's targets, met/missed like the bench's others (empty when neither system ran)."""
    if not any(n in results for n in SYSTEMS) and not any(n in (skipped or {}) for n in SYSTEMS):
        return {}
    c, rr = results.get(KV3D_CLUSTER), results.get(KV3D_RR)
    why_c = (skipped or {}).get(KV3D_CLUSTER) or "kv3d_cluster was not among the systems run"
    why_rr = (skipped or {}).get(KV3D_RR) or "kv3d_rr was not among the systems run"
    out: dict[str, dict] = {}
    t: dict[str, Any] = {"goal": f"kv3d_cluster resume_state_hit_rate >= {TARGET_RESUME_HIT_RATE:g}",
                         "threshold": TARGET_RESUME_HIT_RATE}
    v = c.get("resume_state_hit_rate") if c else None
    if c is None:
        t.update(value=None, met=None, why=why_c)
    elif v is None:
        t.update(value=None, met=None, why="no follow-up turn with usage was answered")
    else:
        facts = (f"{v:.3f} of {c.get('n_resume_usage')} resumes found their session's state "
                 f"({c.get('resume_hit_rate', 0) or 0:.3f} had some cached prefix; requests by replica "
                 f"{c.get('requests_by_replica')}, restores warm {c.get('restores', {}).get('warm')}, "
                 f"from the store {c.get('restores', {}).get('cold')}; entries indexed from the store's feed "
                 f"{c.get('tier_followed')}; routed by {c.get('route_key')})")
        if rr and rr.get("resume_state_hit_rate") is not None:
            facts += f"; kv3d_rr {rr['resume_state_hit_rate']:.3f}"
        t.update(value=v, met=v >= TARGET_RESUME_HIT_RATE, why=facts)
    out["cluster_resume_hit_rate"] = t

    t = {"goal": f"kv3d_cluster ttft_p50_resume <= {TARGET_RESUME_TTFT_RATIO:g}x kv3d_rr's",
         "threshold": TARGET_RESUME_TTFT_RATIO, "against": KV3D_RR}
    a, b = (c or {}).get("ttft_p50_resume_s"), (rr or {}).get("ttft_p50_resume_s")
    if c is None or rr is None:
        t.update(value=None, met=None, why=why_c if c is None else why_rr)
    elif a is None or not b:
        t.update(value=None, met=None, why="no resume was answered by one of them")
    else:
        r = a / b
        facts = (f"{r:.2f}x: TTFT p50 of resumes {a * 1000:.0f} ms vs {b * 1000:.0f} ms (resumes with their "
                 f"session's state {c.get('resume_state_hit_rate')} vs {rr.get('resume_state_hit_rate')}; cached "
                 f"share of their prompt tokens {_f(c.get('resume_cached_token_share'))} vs "
                 f"{_f(rr.get('resume_cached_token_share'))})")
        facts += (f"; tokens computed p50 {_tok(c.get('resume_uncached_tokens_p50'))} vs "
                  f"{_tok(rr.get('resume_uncached_tokens_p50'))}")
        if r > TARGET_RESUME_TTFT_RATIO:
            facts += (". A round-robin resume that lands on its own replica costs what a routed one does, and one "
                      "on the other replica still finds its family's system prompt cached there, so round robin "
                      "recomputes only the conversation after it; both pay the same queueing behind other "
                      "requests' prefill (docs/BENCHMARKS.md, issue 21)")
        t.update(value=r, met=r <= TARGET_RESUME_TTFT_RATIO, why=facts)
    out["cluster_resume_ttft"] = t
    return out


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else (f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s")


def markdown(report: dict) -> list[str]:
    """The report's section on the replica systems (nothing when none ran or was skipped)."""
    comp = report.get("cluster")
    skipped = {n: w for n, w in (report.get("skipped") or {}).items() if n in SYSTEMS}
    if not comp and not skipped:
        return []
    lines = [f"## Replicas behind a router ({KV3D_CLUSTER} / {KV3D_RR})", ""]
    for n, why in skipped.items():
        lines.append(f"- **{n} skipped**: {why}")
    if skipped:
        lines.append("")
    rows = [s for s in report["systems"] if s["name"] in SYSTEMS]
    if rows:
        head = ("| system | replicas | tier | routed by | hit rate | resumes: hit (cached > 0) | resumes with their "
                "session's state | TTFT p50 resumes | TTFT p50 all | gen tok/s | requests by replica | restores "
                "warm / store | store memory |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for s in rows:
            cfg = s.get("config") or {}
            st = s.get("store_used_memory_bytes")
            lines.append("| " + " | ".join([
                s["name"], str(cfg.get("replicas")), str(cfg.get("tier")), str(s.get("route_key")),
                _f(s.get("hit_rate")), _f(s.get("resume_hit_rate")), _f(s.get("resume_state_hit_rate")),
                _ms(s.get("ttft_p50_resume_s")), _ms(s.get("ttft_p50_s")), _f(s.get("tokens_per_s")),
                str(s.get("requests_by_replica")),
                f"{(s.get('restores') or {}).get('warm')} / {(s.get('restores') or {}).get('cold')}",
                "n/a" if st is None else f"{st / 2**20:.1f} MiB"]) + " |")
        lines.append("")
        meth = next((s.get("resume_state_hit_method") for s in rows if s.get("resume_state_hit_method")), "")
        lines += [f"Resumes are the follow-up turns; one has its session's state when {meth}. "
                  f"{KV3D_CLUSTER}'s store is `redis` (`store` column: restores from it)."]
        lines += [f"{s['name']}: entries written to the store while hot {s.get('tier_published')}, the other "
                  f"replica's entries indexed from its feed {s.get('tier_followed')}." for s in rows
                  if s.get("tier_followed") or s.get("tier_published")]
        lines.append("")
        lines += ["Resumes by turn (the conversation's length): n, TTFT p50, tokens computed p50 "
                  "(prompt less cached), with their session's state:", ""]
        for s in rows:
            parts = [f"turn {t}: {v['n']}, {_ms(v['ttft_p50_s'])}, {_tok(v['uncached_tokens_p50'])} tok, "
                     f"{_f(v['state_hit_rate'])}" for t, v in (s.get("resume_by_turn") or {}).items()]
            lines.append(f"- {s['name']}: " + ("; ".join(parts) or "none"))
        lines.append("")
    if comp:
        lines.append(f"Ratios {KV3D_CLUSTER} / {KV3D_RR}: " + ", ".join(
            f"{k} {_f(v)}x" if v is not None else f"{k} n/a" for k, v in comp["ratios"].items()))
        if comp.get("resume_by_turn"):
            lines.append("By turn, TTFT p50 of resumes (tokens computed p50): " + ", ".join(
                f"turn {t} {_f(v['ttft_p50'])}x ({_f(v['uncached_tokens_p50'])}x)"
                for t, v in comp["resume_by_turn"].items()))
        lines.append("")
    return lines


def _tok(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"
