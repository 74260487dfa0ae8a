"""``kv3d scale-sim``: a seeded capacity model of 10 to 1,000 kv3d replicas behind the
consistent-hash router (deploy/router/) sharing one Valkey/Redis tier (docs/SCALING.md).

What it models (every assumption is a parameter; docs/SCALING.md states them):

- **Workload** (the bench's, ``kv3d bench``): sessions arrive as a Poisson process; a share
  ``shared_ratio`` of them open with one of ``families`` shared system prompts of
  ``prefix_tokens`` tokens, picked with Zipf(``zipf_s``) popularity, the rest with a prompt of
  their own of the same size; each turn adds ``user_tokens`` + ``reply_tokens``; a session
  continues after a turn with probability ``p_continue`` up to ``max_turns`` turns, after an
  exponential think time of mean ``think_s``.
- **Routing**: ``family`` (the router's default key, the first message: a family's sessions share
  a replica; own-prompt sessions spread by their own key), ``session`` (``X-Session-Id`` per
  conversation) or ``random`` (round robin). Keys hash onto a ring of ``vnodes`` points per
  replica; with bounded loads (``balance_factor``) a replica's requests above that multiple of
  the mean go to another replica.
- **Caches** as LRU with a characteristic time (Che's approximation): an entry stays in a
  replica's local tiers for T_local = local bytes / bytes of new entries per second there,
  and in the shared store for T_store = min(ttl, store bytes / bytes written per second).
  A resume is a local hit if its previous turn ran on the same replica less than T_local ago,
  else a store hit if less than T_store ago (``shared`` on), else a miss. A family's prefix is
  on a replica (in the store) with the probability that the family was used there (anywhere)
  in the last T_local (T_store): 1 - exp(-rate x T).
- **Store traffic**: every turn's session entry is written (``publish=turn``: kv3d's default
  ``cache.cold_write_through=true`` writes each spill to the persistent tier too), or only the
  entries that leave a replica's warm tier (``publish=spill``); a computed family prefix is
  published; a store hit reads the entry or snapshot.

Monte Carlo over a fixed sample of sessions (``sample_sessions``), rates analytic, so a run takes
the same few seconds at 10 or 1,000 replicas. Same seed, same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, replace

import numpy as np

MIB = 1024 ** 2
GIB = 1024 ** 3

#: per-replica figures measured in docs/BENCHMARKS.md (the section named in ``source``)
PROFILES = {
    "h100": dict(
        source="docs/BENCHMARKS.md, 'GPU, NVIDIA H100 80GB HBM3 ... fourth run': kv3d at 32 clients, "
               "1,498-1,529 generated tok/s (32 tokens a request), 159 resumable sessions per GiB; "
               "model qwen2.5-1.5b (28 layers x 2 KV heads x 128: 28,672 f16 KV bytes a token)",
        gen_tok_s=1498.0, reply_tokens=32, kv_bytes_per_token=28672, sessions_per_gib=159.0,
    ),
    "cpu": dict(
        source="docs/BENCHMARKS.md, 'CPU: the seed workload against llama-server, second run': kv3d "
               "12.1-12.4 generated tok/s (concurrency 8, 32 tokens a request) on 2 vCPUs, 187 "
               "sessions per GiB; SmolLM2-135M (23,040 f16 KV bytes a token)",
        gen_tok_s=12.1, reply_tokens=32, kv_bytes_per_token=23040, sessions_per_gib=187.0,
    ),
}
INT8_RATIO = 2.22   # docs/BENCHMARKS.md summary, issue 5: the int8 codec's measured compression ratio


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 100
    profile: str = "h100"
    utilization: float = 0.7          # offered load / the replicas' measured request rate
    sessions_per_s: float | None = None  # cluster-wide new sessions a second; None: from utilization
    policy: str = "family"            # family | session | random
    shared: bool = True               # the shared Valkey/Redis tier (tier=redis)
    publish: str = "turn"             # turn: every turn's entry is written to the store when its
                                      # session spills (cache.cold_write_through=true, the default);
                                      # spill: only when it leaves the replica's warm tier (=false)
    families: int = 10_000
    zipf_s: float = 1.0
    shared_ratio: float = 0.8
    prefix_tokens: int = 1024
    user_tokens: int = 128
    p_continue: float = 0.31          # the bench's turns=0.3 with max_turns=4
    max_turns: int = 4
    think_s: float = 120.0
    local_gib: float = 16.0           # a replica's warm tier (host RAM) for KV
    store_gib_per_replica: float = 4.0
    ttl_s: float = 604800.0           # tier_redis's ttl_s default
    vnodes: int = 160
    balance_factor: float = 1.5       # deploy/router/haproxy.cfg: hash-balance-factor 150
    body_bytes_per_token: float = 4.0  # JSON request bytes a prompt token (text ~ 4 characters a token)
    sample_sessions: int = 200_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.publish not in ("spill", "turn"):
            raise ValueError(f"publish must be spill or turn, not {self.publish!r}")
        if self.policy not in ("family", "session", "random"):
            raise ValueError(f"policy must be family, session or random, not {self.policy!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}")
        if self.replicas < 1 or self.sample_sessions < 1 or not 0 <= self.p_continue < 1:
            raise ValueError("replicas and sample_sessions must be >= 1, p_continue within [0, 1)")


@dataclass
class SimResult:
    config: SimConfig
    requests_per_s: float
    sessions_per_s: float
    replica_capacity_req_s: float
    replica_load_mean: float          # requests/s
    replica_load_max: float
    spilled_share: float              # requests moved off their hash replica by the load bound
    resume_local: float               # share of resumes served from the replica's own tiers
    resume_store: float               # ... from the shared store
    resume_miss: float
    family_local: float               # share of family-prefixed requests needing the prefix that had it locally
    family_store: float
    family_miss: float
    prompt_tokens_computed_share: float   # prompt tokens prefilled / prompt tokens sent
    store_read_bytes_s: float
    store_write_bytes_s: float
    store_memory_bytes: float
    store_capacity_bytes: float
    t_local_s_median: float
    t_store_s: float
    router_req_s: float
    router_body_bytes_s: float
    mean_entry_bytes: float
    store_bytes_for_95: float         # store bytes at which T_store covers 95 % of think times
    # the sampled requests' own figures, for checks
    sample: dict = field(default_factory=dict, repr=False)

    @property
    def resume_hit_rate(self) -> float:
        return self.resume_local + self.resume_store

    @property
    def store_bandwidth_bytes_s(self) -> float:
        return self.store_read_bytes_s + self.store_write_bytes_s

    def row(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("config", "sample")}
        d["resume_hit_rate"] = self.resume_hit_rate
        d["store_bandwidth_bytes_s"] = self.store_bandwidth_bytes_s
        d["replicas"] = self.config.replicas
        return d


def _ring(replicas: int, vnodes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    points = rng.random(replicas * vnodes)
    owner = np.repeat(np.arange(replicas), vnodes)
    order = np.argsort(points)
    return points[order], owner[order]


def _owner(points: np.ndarray, owner: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return owner[np.searchsorted(points, keys) % len(points)]


def simulate(cfg: SimConfig) -> SimResult:
    prof = PROFILES[cfg.profile]
    rng = np.random.default_rng(cfg.seed)
    reply = prof["reply_tokens"]
    cap = prof["gen_tok_s"] / reply                       # requests/s a replica served in the bench
    entry_per_token = prof["kv_bytes_per_token"] / INT8_RATIO
    snapshot_bytes = cfg.prefix_tokens * prof["kv_bytes_per_token"]

    # -- sessions and their requests (a sample; rates below are cluster-wide) --------------------
    n = cfg.sample_sessions
    u = rng.random((n, cfg.max_turns - 1))
    turns = 1 + np.argmax(np.concatenate([u >= cfg.p_continue, np.ones((n, 1), bool)], axis=1), axis=1)
    mean_turns = turns.mean()
    ranks = np.arange(1, cfg.families + 1, dtype=float)
    fam_p = ranks ** -cfg.zipf_s
    fam_p /= fam_p.sum()
    shared_session = rng.random(n) < cfg.shared_ratio
    family = np.where(shared_session, rng.choice(cfg.families, size=n, p=fam_p), -1)

    sess = np.repeat(np.arange(n), turns)
    starts = np.cumsum(turns) - turns
    k = np.arange(len(sess)) - starts[sess]               # turn index within the session
    fam = family[sess]
    gap = rng.exponential(cfg.think_s, size=len(sess))    # time since the previous turn (k > 0)
    prompt = cfg.prefix_tokens + k * (cfg.user_tokens + reply) + cfg.user_tokens
    own_tokens = (k + 1) * (cfg.user_tokens + reply) + np.where(fam < 0, cfg.prefix_tokens, 0)
    entry = own_tokens * entry_per_token                   # this turn's session entry (int8 delta)

    if cfg.sessions_per_s is not None:
        sessions_per_s = cfg.sessions_per_s
    else:
        sessions_per_s = cfg.utilization * cap * cfg.replicas / mean_turns
    req_s = sessions_per_s * mean_turns
    fam_req_s = req_s * cfg.shared_ratio * fam_p           # each family's request rate

    # -- routing: expected load per replica, and each sampled request's replica ------------------
    points, owner = _ring(cfg.replicas, cfg.vnodes, rng)
    arc = np.bincount(owner, weights=np.diff(np.concatenate([[points[-1] - 1.0], points])),
                      minlength=cfg.replicas)             # share of the key space each replica owns
    fam_key = rng.random(cfg.families)
    fam_home = _owner(points, owner, fam_key)
    own_req_s = req_s * (1 - cfg.shared_ratio)
    if cfg.policy == "family":
        load = arc * own_req_s + np.bincount(fam_home, weights=fam_req_s, minlength=cfg.replicas)
    elif cfg.policy == "session":
        load = arc * req_s
    else:
        load = np.full(cfg.replicas, req_s / cfg.replicas)
    mean_load = req_s / cfg.replicas
    bound = cfg.balance_factor * mean_load if cfg.policy != "random" else np.inf
    over = np.maximum(load - bound, 0.0)
    spilled = over.sum() / req_s
    keep = np.where(load > 0, np.minimum(load, bound) / np.maximum(load, 1e-300), 1.0)  # share kept home
    served = np.minimum(load, bound) + over.sum() / cfg.replicas   # what each then serves

    sess_key = rng.random(n)
    if cfg.policy == "family":
        home = np.where(family >= 0, fam_home[np.maximum(family, 0)], _owner(points, owner, sess_key))[sess]
    elif cfg.policy == "session":
        home = _owner(points, owner, sess_key)[sess]
    else:
        home = rng.integers(cfg.replicas, size=len(sess))
    spill = rng.random(len(sess)) >= keep[home]           # moved by the load bound
    replica = np.where(spill, rng.integers(cfg.replicas, size=len(sess)), home)
    prev_replica = np.concatenate([[-1], replica[:-1]])
    moved = (k > 0) & (replica != prev_replica)

    # -- characteristic times -------------------------------------------------------------------
    # bytes of entries arriving at a replica a second: a request whose session was not there
    # (a session's new state replaces its older one where it was; elsewhere it is all new bytes),
    # and the family snapshots it had to fetch or compute: T_local depends on the latter, which
    # depend on T_local (a fixed point, reached in a few rounds)
    prev_entry = np.maximum(own_tokens - (cfg.user_tokens + reply), 0) * entry_per_token
    inserted = np.where((k == 0) | moved, entry, entry - prev_entry)
    resume = k > 0
    f = np.maximum(fam, 0)
    if cfg.policy == "family":
        rate_here = np.where(replica == fam_home[f], fam_req_s[f] * keep[fam_home[f]],
                             fam_req_s[f] * (1 - keep[fam_home[f]]) / cfg.replicas)
    else:
        rate_here = fam_req_s[f] / cfg.replicas        # a family's requests reaching this replica
    snapshots_in = 0.0
    for _ in range(12):
        t_local = (cfg.local_gib * GIB) / np.maximum(served * (inserted.mean() + snapshots_in), 1e-300)
        local_hit = resume & ~moved & (gap < t_local[replica])
        # a request that does not resume local state needs its family's prefix on this replica
        needs_prefix = (fam >= 0) & ~local_hit
        p_local = 1 - np.exp(-rate_here * t_local[replica])
        snapshots_in = 0.5 * snapshots_in + 0.5 * snapshot_bytes * float((needs_prefix * (1 - p_local)).mean())
    # written to the store: every turn's entry, or (spill) those whose next turn does not find them
    # local (the session ended, or came back after T_local, or elsewhere)
    next_local = np.append(local_hit[1:], False)
    written = np.ones(len(sess), bool) if cfg.publish == "turn" else ~next_local
    written_prev = np.append(False, written[:-1])
    if cfg.publish == "spill":     # moved while the old replica still held it: not yet written
        prev_t_local = t_local[np.maximum(prev_replica, 0)]
        written_prev &= ~(moved & (gap < prev_t_local))
    store_cap = cfg.store_gib_per_replica * cfg.replicas * GIB
    session_write_s = req_s * float((entry * written).mean())
    t_store = min(cfg.ttl_s, store_cap / max(session_write_s, 1e-300)) if cfg.shared else 0.0

    # -- resumes ----------------------------------------------------------------------------------
    store_hit = resume & ~local_hit & written_prev & (gap < t_store)
    resume_miss = resume & ~local_hit & ~store_hit

    # -- family prefixes: on this replica, else in the store, else computed (and published) ------------
    p_store = 1 - np.exp(-fam_req_s[f] * t_store)
    draw = rng.random(len(sess))
    fam_local = needs_prefix & (draw < p_local)
    fam_store = needs_prefix & ~fam_local & (draw < p_local + (1 - p_local) * p_store)
    fam_miss = needs_prefix & ~fam_local & ~fam_store

    # -- tokens and bytes per sampled request --------------------------------------------------------
    prev_prompt_cached = prompt - cfg.user_tokens        # a resume hit: all but the new user message
    cached = np.where(local_hit | store_hit, prev_prompt_cached, 0)
    cached = np.where(needs_prefix & (fam_local | fam_store), np.maximum(cached, cfg.prefix_tokens), cached)
    read = np.where(store_hit, prev_entry, 0.0) + np.where(fam_store, snapshot_bytes, 0.0)
    write = np.where(cfg.shared & written, entry, 0.0) + np.where(cfg.shared & fam_miss, snapshot_bytes, 0.0)
    scale = req_s / len(sess)                            # sampled request -> requests/s

    sample = dict(read=read, write=write, scale=scale, cached=cached, prompt=prompt, store_hit=store_hit,
                  fam_store=fam_store, fam_miss=fam_miss, entry=entry, prev_entry=prev_entry,
                  snapshot_bytes=snapshot_bytes, replica=replica, k=k, session=sess, written=written)
    n_res, n_fam = max(int(resume.sum()), 1), max(int(needs_prefix.sum()), 1)
    store_mem = min(store_cap, (write.sum() * scale) * cfg.ttl_s) if cfg.shared else 0.0
    return SimResult(
        config=cfg, requests_per_s=req_s, sessions_per_s=sessions_per_s, replica_capacity_req_s=cap,
        replica_load_mean=float(served.mean()), replica_load_max=float(served.max()), spilled_share=float(spilled),
        resume_local=local_hit.sum() / n_res, resume_store=store_hit.sum() / n_res,
        resume_miss=resume_miss.sum() / n_res,
        family_local=fam_local.sum() / n_fam, family_store=fam_store.sum() / n_fam, family_miss=fam_miss.sum() / n_fam,
        prompt_tokens_computed_share=float(1 - cached.sum() / prompt.sum()),
        store_read_bytes_s=float(read.sum() * scale), store_write_bytes_s=float(write.sum() * scale),
        store_memory_bytes=float(store_mem), store_capacity_bytes=float(store_cap if cfg.shared else 0.0),
        t_local_s_median=float(np.median(t_local)), t_store_s=float(t_store),
        router_req_s=req_s, router_body_bytes_s=float(prompt.mean() * cfg.body_bytes_per_token * req_s),
        mean_entry_bytes=float(entry.mean()),
        store_bytes_for_95=float(session_write_s * cfg.think_s * np.log(20)) if cfg.shared else 0.0,
        sample=sample,
    )


# -- the command ------------------------------------------------------------------------------------
def _fmt_bytes(b: float) -> str:
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GIB), ("MiB", MIB)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b / 1024:,.1f} KiB"


def _rate(b: float) -> str:
    return _fmt_bytes(b) + "/s"


def scale_table(results: list[SimResult]) -> str:
    head = ("| replicas | requests/s | load per replica mean / max (req/s, capacity {cap:.1f}) | spilled | "
            "resume hits local + store | family prefix local / store / computed | prompt tokens computed | "
            "store read / write | store memory (for 95 % resumes) | T local / T store | router body bytes |")
    out = [head.format(cap=results[0].replica_capacity_req_s), "|" + "---|" * 11]
    for r in results:
        out.append(
            f"| {r.config.replicas:,} | {r.requests_per_s:,.0f} | {r.replica_load_mean:,.1f} / "
            f"{r.replica_load_max:,.1f} | {r.spilled_share:.1%} | {r.resume_local:.3f} + {r.resume_store:.3f} "
            f"= **{r.resume_hit_rate:.3f}** | {r.family_local:.3f} / {r.family_store:.3f} / {r.family_miss:.3f} | "
            f"{r.prompt_tokens_computed_share:.1%} | {_rate(r.store_read_bytes_s)} / {_rate(r.store_write_bytes_s)} | "
            f"{_fmt_bytes(r.store_capacity_bytes)} ({_fmt_bytes(r.store_bytes_for_95)}) | "
            f"{r.t_local_s_median:,.0f} s / {r.t_store_s:,.0f} s | {_rate(r.router_body_bytes_s)} |")
    return "\n".join(out)


def setups_table(results: list[tuple[str, SimResult]]) -> str:
    out = ["| setup | resume hits local + store | family prefix local / store / computed | prompt tokens computed | "
           "load max / mean | store read + write |", "|" + "---|" * 6]
    for name, r in results:
        out.append(
            f"| {name} | {r.resume_local:.3f} + {r.resume_store:.3f} = **{r.resume_hit_rate:.3f}** | "
            f"{r.family_local:.3f} / {r.family_store:.3f} / {r.family_miss:.3f} | "
            f"**{r.prompt_tokens_computed_share:.1%}** | {r.replica_load_max / r.replica_load_mean:.2f} | "
            f"{_rate(r.store_bandwidth_bytes_s)} |")
    return "\n".join(out)


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kv3d scale-sim", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="10,30,100,300,1000", help="comma-separated replica counts")
    p.add_argument("--compare-at", type=int, default=100,
                   help="replica count at which the routing and tier setups are compared (0: skip)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    for f in SimConfig.__dataclass_fields__.values():
        if f.name == "replicas":
            continue
        kind = {"bool": lambda v: v.lower() in ("1", "true", "yes", "on")}.get(str(f.type), None)
        typ = kind or (int if f.type in (int, "int") else str if f.type in (str, "str") else float)
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default, help=f"default {f.default}")
    ns = p.parse_args(args)
    base = SimConfig(**{f: getattr(ns, f) for f in SimConfig.__dataclass_fields__ if f != "replicas"})
    scale = [simulate(replace(base, replicas=int(r))) for r in ns.replicas.split(",")]
    setups = []
    if ns.compare_at:
        at = replace(base, replicas=ns.compare_at)
        for name, cfg in (("routing by family + shared store (deploy/router default)", at),
                          ("routing by session (X-Session-Id) + shared store", replace(at, policy="session")),
                          ("round robin + shared store", replace(at, policy="random")),
                          ("routing by family, local tiers only", replace(at, shared=False)),
                          ("round robin, local tiers only", replace(at, policy="random", shared=False))):
            setups.append((name, simulate(cfg)))
    if ns.json:
        json.dump({"config": asdict(base), "source": PROFILES[base.profile]["source"],
                   "scale": [r.row() for r in scale], "setups": {n: r.row() for n, r in setups}},
                  sys.stdout, indent=1, default=float)
        print()
        return 0
    print(f"kv3d scale-sim, profile {base.profile}: {PROFILES[base.profile]['source']}\n")
    print(scale_table(scale))
    if setups:
        print(f"\nSetups at {ns.compare_at} replicas, the same traffic:\n")
        print(setups_table(setups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
