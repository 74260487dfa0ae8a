"""The online miss-ratio curve (kv3d_core/analytics/mrc.py) against an exact replay.

The access log is a seeded chat workload shaped like kv3d's: family snapshots (fixed size,
Zipf popularity) and conversations whose state grows turn by turn; each request touches its
family's snapshot and its own conversation. The exact curve is a brute-force LRU replay of
the same log at every size checked (evict the least recently used until what is held fits).

Tolerance (docs/ANALYTICS.md): conversations sampled at 10 % and snapshots at 100 %, with at
most 4096 tracked objects -- or 300, which lowers the rate to about 2 % over the run -- the
estimate is within 0.03 of the exact hit ratio on average over 25 sizes from 1 MiB to 4 GiB,
and within 0.07 at every one of them (measured: mean 0.019 / 0.022, max 0.047 / 0.060);
unsampled (rate 1) it is exact at every bin edge. Sampling the few family snapshots at the
conversations' 10 % instead is off by 0.10 on average: hence the sampling classes.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from kv3d_core.analytics.mrc import Fenwick, ShardsMRC

MEAN_TOLERANCE = 0.03
MAX_TOLERANCE = 0.07


def chat_log(seed: int, n_requests: int, n_families: int = 40, open_max: int = 400,
             bytes_per_token: int = 4096) -> list[tuple[str, int]]:
    """``[(key, bytes)]`` of ``n_requests`` chat requests: a request starts a conversation
    (its family drawn Zipf-like) or continues one of the open ones (recent ones likelier);
    a conversation lasts a few turns and grows each turn up to a 2048-token context. Each
    request touches its family snapshot, then its conversation."""
    rng = random.Random(seed)
    fam_len = [rng.randint(64, 1024) for _ in range(n_families)]
    fam_weight = [1 / (i + 1) ** 1.1 for i in range(n_families)]
    open_convs: list[list] = []               # [id, family, tokens, turns left]
    log, next_id = [], 0
    for _ in range(n_requests):
        if not open_convs or (len(open_convs) < open_max and rng.random() < 0.3):
            f = rng.choices(range(n_families), fam_weight)[0]
            open_convs.append([next_id, f, fam_len[f], 1 + int(rng.expovariate(1 / 4))])
            next_id += 1
            conv = open_convs[-1]
        else:
            conv = open_convs[min(len(open_convs) - 1, int(rng.expovariate(1 / 60)))]
        conv[2] = min(2048, conv[2] + rng.randint(20, 200))
        conv[3] -= 1
        log.append((f"snap:{conv[1]}", fam_len[conv[1]] * bytes_per_token))
        log.append((f"conv:{conv[0]}", (conv[2] - fam_len[conv[1]]) * bytes_per_token))
        if conv[3] <= 0:
            open_convs.remove(conv)
        elif rng.random() < 0.5:              # answered soon: back to the most recent end
            open_convs.remove(conv)
            open_convs.insert(0, conv)
    return log


def exact_hit_ratio(log: list[tuple[str, int]], capacity: float) -> float:
    """Brute-force LRU: an access hits when its key is held; then it is the most recent
    (at its new size) and the least recent go until what is held fits ``capacity``."""
    held: OrderedDict[str, int] = OrderedDict()
    used = hits = 0
    for key, size in log:
        if key in held:
            hits += 1
            used -= held.pop(key)
        held[key] = size
        used += size
        while used > capacity and held:
            _, s = held.popitem(last=False)
            used -= s
    return hits / len(log)


def test_fenwick_sums():
    f = Fenwick(10)
    for i, v in enumerate([3, 1, 4, 1, 5, 9, 2, 6, 5, 3]):
        f.add(i, v)
    assert f.prefix(0) == 0 and f.prefix(3) == 8 and f.suffix(7) == 14 and f.total == 39


def test_unsampled_curve_is_exact_at_every_bin_edge():
    log = chat_log(seed=1, n_requests=3000)
    # few tracked objects: the slots are compacted many times over
    mrc = ShardsMRC(rate=1.0, max_objects=1000, class_rates=(1.0,))   # 947 objects, 6000 accesses
    for key, size in log:
        mrc.access(key, size, 1 if key.startswith("snap:") else 0)
    assert mrc.sampled == mrc.accesses == len(log)
    curve = mrc.curve()
    edges = [x for x, _ in curve if 2 ** 20 <= x <= 2 ** 34][::8]
    for x in edges:
        assert mrc.hit_ratio(x) == pytest.approx(exact_hit_ratio(log, x), abs=1e-9), x


@pytest.mark.parametrize("max_objects", [4096, 300])
def test_sampled_estimate_is_within_the_stated_tolerance_of_an_exact_replay(max_objects):
    log = chat_log(seed=7, n_requests=60000)
    mrc = ShardsMRC(rate=0.1, max_objects=max_objects, class_rates=(1.0,))
    for key, size in log:
        mrc.access(key, size, 1 if key.startswith("snap:") else 0)
    assert mrc.rate <= 0.1 and len(mrc._objects) <= max_objects        # bounded memory
    sizes = [2 ** (20 + k / 2) for k in range(0, 25)]                    # 1 MiB .. 4 GiB
    errors = [abs(mrc.hit_ratio(s) - exact_hit_ratio(log, s)) for s in sizes]
    mean = sum(errors) / len(errors)
    print(f"MRC error vs exact replay: mean {mean:.4f}, max {max(errors):.4f}, rate now {mrc.rate:.4f}")
    assert mean <= MEAN_TOLERANCE and max(errors) <= MAX_TOLERANCE


def test_curve_is_monotone_and_bounded():
    mrc = ShardsMRC(rate=0.5, max_objects=64)
    for key, size in chat_log(seed=3, n_requests=2000):
        mrc.access(key, size)
    ys = [y for _, y in mrc.curve()]
    assert ys == sorted(ys) and 0 <= ys[0] and ys[-1] <= 1


@pytest.mark.parametrize("rate, objects", [(0, 10), (1.5, 10), (0.5, 0)])
def test_bad_settings_are_refused(rate, objects):
    with pytest.raises(ValueError):
        ShardsMRC(rate=rate, max_objects=objects)


def test_a_prompt_token_is_priced_at_its_marginal_step_time():
    """The ROI's price of a prompt token: prefill steps' time less as many mean decode-only
    steps, per prefill token; the whole prefill steps' time (an upper bound) before any
    decode-only step, and nothing before any prefill."""
    from kv3d_core.api.analytics import prefill_token_seconds

    def samples(steps_p, steps_d, secs_p, secs_d, tokens):
        return {("kv3d_llama_steps_total", (("kind", "prefill"),)): steps_p,
                ("kv3d_llama_steps_total", (("kind", "decode"),)): steps_d,
                ("kv3d_llama_step_seconds_total", (("kind", "prefill"),)): secs_p,
                ("kv3d_llama_step_seconds_total", (("kind", "decode"),)): secs_d,
                ("kv3d_prefill_tokens_total", ()): tokens}
    # 10 prefill steps of 0.5 s holding 4,000 prompt tokens; decode-only steps take 0.1 s
    assert prefill_token_seconds(samples(10, 50, 5.0, 5.0, 4000))[0] == pytest.approx((5.0 - 10 * 0.1) / 4000)
    assert prefill_token_seconds(samples(10, 50, 5.0, 5.0, 4000))[1] == "marginal"
    assert prefill_token_seconds(samples(10, 0, 5.0, 0.0, 4000)) == (5.0 / 4000, "upper bound")
    assert prefill_token_seconds(samples(0, 5, 0.0, 1.0, 0)) == (None, "no prefill yet")
    assert prefill_token_seconds(samples(1, 1, 0.05, 1.0, 10))[0] == 0.0    # never negative


def test_the_metric_window_ignores_a_sample_older_than_its_newest():
    """The endpoint's requests run on worker threads: one may add its sample after another
    request added a newer one. The older sample is dropped, so the window never spans
    backwards and its growth is never negative."""
    from kv3d_core.analytics.window import MetricWindow

    w = MetricWindow(window_s=60)
    x = ("x_total", ())
    w.add(0.0, {x: 0.0})
    w.add(2.0, {x: 20.0})
    w.add(1.0, {x: 10.0})                  # taken before the 2.0 one, added after it
    assert w.delta() == (2.0, {x: 20.0})
    w.add(3.0, {x: 30.0})
    assert w.delta() == (3.0, {x: 30.0})
