"""``kv3d scale-sim`` (plugins/tools/kv3d_tools/scale_sim.py), the capacity model of
docs/SCALING.md: deterministic for a seed, bounded shares, bandwidth that is the bytes it
moved, and the orderings any sane model of the setup must keep. No model is loaded."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from kv3d_tools.scale_sim import SimConfig, main, simulate

SMALL = SimConfig(sample_sessions=20_000, families=2_000)


def test_the_same_seed_gives_the_same_figures_and_another_seed_others():
    a, b = simulate(SMALL), simulate(SMALL)
    assert a.row() == b.row()
    c = simulate(replace(SMALL, seed=1))
    assert c.row() != a.row()
    assert abs(c.resume_hit_rate - a.resume_hit_rate) < 0.05     # another sample, the same model


@pytest.mark.parametrize("policy", ["family", "session", "random"])
@pytest.mark.parametrize("shared", [True, False])
def test_shares_are_bounded_and_complete(policy, shared):
    r = simulate(replace(SMALL, policy=policy, shared=shared))
    for name in ("resume_local", "resume_store", "resume_miss", "family_local", "family_store", "family_miss",
                 "prompt_tokens_computed_share", "spilled_share"):
        assert 0.0 <= getattr(r, name) <= 1.0, name
    assert r.resume_local + r.resume_store + r.resume_miss == pytest.approx(1.0)
    assert r.family_local + r.family_store + r.family_miss == pytest.approx(1.0)
    assert 0.0 <= r.resume_hit_rate <= 1.0
    if not shared:
        assert r.resume_store == r.family_store == 0.0
        assert r.store_read_bytes_s == r.store_write_bytes_s == r.store_memory_bytes == 0.0


@pytest.mark.parametrize("publish", ["spill", "turn"])
def test_store_bandwidth_is_the_sum_of_the_entry_bytes_moved(publish):
    r = simulate(replace(SMALL, publish=publish))
    s = r.sample
    reads = (s["prev_entry"] * s["store_hit"]).sum() + s["snapshot_bytes"] * s["fam_store"].sum()
    writes = (s["entry"] * s["written"]).sum() + s["snapshot_bytes"] * s["fam_miss"].sum()
    assert r.store_read_bytes_s == pytest.approx(reads * s["scale"])
    assert r.store_write_bytes_s == pytest.approx(writes * s["scale"])
    assert r.store_bandwidth_bytes_s == pytest.approx((reads + writes) * s["scale"])
    assert s["scale"] * len(s["k"]) == pytest.approx(r.requests_per_s)
    if publish == "turn":                         # write-through: every request's entry
        assert s["written"].all()
    assert r.store_memory_bytes <= r.store_capacity_bytes


@pytest.mark.parametrize("policy", ["family", "session"])
def test_more_replicas_never_raise_the_load_of_a_replica(policy):
    runs = [simulate(replace(SMALL, policy=policy, replicas=n, sessions_per_s=2_000.0)) for n in (10, 30, 100, 300)]
    means = [r.replica_load_mean for r in runs]
    maxes = [r.replica_load_max for r in runs]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert all(a >= b for a, b in zip(maxes, maxes[1:])), maxes
    assert all(r.requests_per_s == pytest.approx(runs[0].requests_per_s) for r in runs)
    assert all(r.replica_load_max >= r.replica_load_mean for r in runs)


def test_the_load_bound_caps_a_replica_under_family_routing():
    r = simulate(replace(SMALL, replicas=100))     # Zipf families: the hottest exceed a replica's share
    assert r.spilled_share > 0
    assert r.replica_load_max <= 1.5 * r.replica_load_mean * 1.0001 + r.spilled_share * r.requests_per_s / 100


def test_the_shared_store_and_routing_never_make_reuse_worse():
    base = replace(SMALL, store_gib_per_replica=64.0)
    shared, local = simulate(base), simulate(replace(base, shared=False))
    assert shared.resume_hit_rate >= local.resume_hit_rate
    assert shared.resume_store > 0                 # a store this big serves some resumes
    assert shared.prompt_tokens_computed_share <= local.prompt_tokens_computed_share
    assert shared.family_miss <= local.family_miss
    rr = simulate(replace(base, policy="random", shared=False))
    assert rr.resume_local < local.resume_local   # round robin rarely finds a session where it was
    small, big = (simulate(replace(SMALL, store_gib_per_replica=g)) for g in (4.0, 256.0))
    assert big.t_store_s > small.t_store_s and big.resume_hit_rate >= small.resume_hit_rate


def test_the_command_prints_tables_and_json(capsys):
    assert main(["--replicas", "10,30", "--compare-at", "10", "--sample-sessions", "5000"]) == 0
    out = capsys.readouterr().out
    assert "docs/BENCHMARKS.md" in out and "| 30 |" in out and "round robin, local tiers only" in out
    assert main(["--replicas", "10", "--compare-at", "0", "--sample-sessions", "5000", "--json",
                 "--policy", "session", "--shared", "false"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["policy"] == "session" and data["config"]["shared"] is False
    assert data["scale"][0]["replicas"] == 10 and data["scale"][0]["store_write_bytes_s"] == 0
    assert np.isfinite(data["scale"][0]["resume_hit_rate"])
