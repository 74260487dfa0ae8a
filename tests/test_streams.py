"""The KV-stream layout (``cache.layout=streams``, the default): long conversations whose cells
leave their stream between turns stay correct, a request longer than a stream is refused
cleanly, and when every stream is busy the next request waits instead of failing."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from conftest import MODEL_ID, collect, engine_chat, running_server

SYSTEM = ("You are the front desk of the Alpine Hut Association. You book beds in mountain huts, explain "
          "the rules (half board only, quiet from 10 pm, boots stay in the boot room) and give the "
          "opening season of each hut. Answer in one or two sentences.")
TURNS = ["Which huts are open in June?", "Can I book two beds at the Lakeside hut?",
         "Is breakfast included?", "Where do I leave my boots?", "And when is it quiet?"]


def spy_on_spills(eng) -> list[tuple[str, int, int, int]]:
    """Record (kind, family prefix length, tokens, cells in the blob read) of every spill."""
    tiers, layout, seen = eng.cache.tiers, eng.backend.state_layout, []
    spill_blob = tiers.spill_blob

    def spy(e, blob, **kw):
        cells = layout.parse(blob).n_cells
        seen.append((e.kind, len(e.snapshot.tokens) if e.kind == "session" and e.snapshot is not None else 0,
                     len(e.tokens), cells))
        return spill_blob(e, blob, **kw)
    tiers.spill_blob = spy
    return seen


@pytest.mark.parametrize("staging", ["off", "on"])
def test_a_long_conversation_resumed_after_every_turn_left_its_stream(staging):
    """Five turns; after each one the session leaves its stream (``hot_sessions=0``) for the warm
    tier (int8 delta past the family prefix) and the next turn restores prefix + delta into a
    stream. Every turn's first greedy token equals a cold (safe-mode) run's, every resume
    reused the whole earlier conversation, and each spill read only the session's own cells
    from the device (the prefix is stored once, in the family snapshot). Each resume's state
    was decoded off the scheduler thread while its request waited, and admission loaded that
    blob. ``staging=on``: spills hand the staging buffer itself to the writer thread (the
    GPU default; ordinary memory here)."""
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    def converse(eng) -> list[tuple[str, dict]]:
        messages, out = [{"role": "system", "content": SYSTEM}], []
        for q in TURNS:
            messages.append({"role": "user", "content": q})
            text, usage = engine_chat(eng, messages, max_tokens=12)
            out.append((text, usage))
            messages.append({"role": "assistant", "content": text})
        return out

    common = ["server.threads=2", "cache.stream_ctx=1024", "scheduler.n_seq_max=4", "safety.quality_sample_every=0"]
    with Engine(compose([*common, "cache.hot_sessions=0", "+codec=int8", "cache.prepare_restores=on",
                         f"backend.state_staging={staging}"])) as eng:
        spills = spy_on_spills(eng)
        warm = converse(eng)
        restores = eng.metrics.restores.labels("warm")._value.get()
        split, admit_max = dict(eng.scheduler.step_split), eng.scheduler.admit_max_s
        assert eng.stats()["scheduler"]["admit_max_s"] >= admit_max
        prepared = {k: eng.metrics.restores_prepared.labels(k)._value.get() for k in ("started", "used")}
    assert prepared["started"] >= len(TURNS) - 1 and prepared["used"] == restores, (prepared, restores)
    # a session leaving its stream is read from the device without its family prefix
    sessions = [s for s in spills if s[0] == "session"]
    assert len(sessions) >= len(TURNS) and all(s[1] > 0 for s in sessions), spills
    assert all(cells == n - n_prefix for _, n_prefix, n, cells in sessions), spills
    with Engine(compose([*common, "safe_mode=true"])) as eng:
        cold = converse(eng)
    assert restores >= len(TURNS) - 1, "every later turn was restored from the warm tier"
    # admission (the restores among it) is timed apart from the rest of the scheduler's work
    assert split["admit"] > 0 and 0 < admit_max <= split["admit"], (split, admit_max)
    for i, ((w, wu), (c, cu)) in enumerate(zip(warm, cold)):
        assert w.split()[:1] == c.split()[:1], (i, w, c)
        if i:
            prev_prompt = warm[i - 1][1]["prompt_tokens"]
            assert wu["cached_tokens"] >= prev_prompt, (i, wu, prev_prompt)


@pytest.mark.parametrize("setting, expected", [("auto", False), ("on", True), ("off", False)])
def test_restores_are_prepared_ahead_only_when_the_cpu_has_room(setting, expected):
    """``cache.prepare_restores=auto`` prepares resumes off the scheduler thread only when the model
    runs on a GPU: on a CPU llama.cpp's threads take every core while they decode, so there is
    no core to decode a restore beside them (docs/BENCHMARKS.md). This machine has no GPU."""
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    with Engine(compose(["server.threads=2", "scheduler.n_seq_max=2", "cache.stream_ctx=512",
                         f"cache.prepare_restores={setting}"])) as eng:
        assert eng.backend.info.gpu_layers == 0
        assert eng.cache.prepare_restores is expected


def test_a_request_behind_a_restore_being_prepared_is_not_held_up(monkeypatch):
    """While a resume's state is decoded off the scheduler thread, the requests queued behind it
    are admitted and served; the resume then loads the prepared blob and answers as a cold
    server does."""
    import threading
    import time

    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    with Engine(compose(["server.threads=2", "cache.stream_ctx=1024", "scheduler.n_seq_max=4", "cache.prepare_restores=on",
                         "cache.hot_sessions=0", "+codec=int8", "safety.quality_sample_every=0"])) as eng:
        reply, _ = engine_chat(eng, first, max_tokens=12)
        eng.tiers.flush()
        gate, prepare = threading.Event(), eng.tiers._prepare

        def slow_prepare(*args):
            assert gate.wait(60), "the other request was never served"
            return prepare(*args)
        monkeypatch.setattr(eng.tiers, "_prepare", slow_prepare)
        second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": TURNS[1]}]
        resumed: dict = {}
        t = threading.Thread(target=lambda: resumed.update(out=engine_chat(eng, second, max_tokens=12)))
        t.start()
        started = eng.metrics.restores_prepared.labels("started")
        deadline = time.monotonic() + 30
        while started._value.get() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started._value.get() == 1, "the resume's restore was not prepared ahead"
        other, _ = engine_chat(eng, [{"role": "user", "content": "Name a colour."}], max_tokens=4)
        assert "out" not in resumed, "the resume finished before its restore was prepared"
        gate.set()
        t.join(120)
        text, usage = resumed["out"]
        assert eng.metrics.restores_prepared.labels("used")._value.get() == 1
        assert usage["cached_tokens"] > 0
    with Engine(compose(["server.threads=2", "safe_mode=true"])) as eng:
        expected, _ = engine_chat(eng, second, max_tokens=12)
    assert text.split()[:1] == expected.split()[:1]


def submit_together(eng, views, max_tokens: int = 8) -> list[tuple[str, dict]]:
    """Greedy requests admitted in one scheduler step: the scheduler thread is held (and the
    test waits until it is) while they are submitted. Returns [(text, usage)]."""
    import queue
    import threading

    from kv3d_core.contracts import SamplingParams

    held, gate = threading.Event(), threading.Event()
    eng.scheduler.call(lambda: (held.set(), gate.wait(30)))
    assert held.wait(30)
    queues = []
    for v in views:
        q: queue.Queue = queue.Queue()
        eng.submit(v, SamplingParams(temperature=0), max_tokens, [], q.put)
        queues.append(q)
    gate.set()
    return [(text, done.usage) for text, done in map(collect, queues)]


@pytest.mark.parametrize("layout", ["streams", "unified"])
def test_requests_of_a_new_family_arriving_together_compute_its_prefix_once(layout):
    """Four requests of a family whose snapshot does not exist yet are admitted in one step:
    the first computes the family prefix, the others wait for it and load its snapshot
    (``kv3d_snapshot_adoptions_total``), so the prefix is decoded once, not four times. Every
    reply equals a cold server's."""
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in TURNS[:4]]
    with Engine(compose(["server.threads=2", f"cache.layout={layout}", "scheduler.n_seq_max=6",
                         "scheduler.max_running=4", "cache.stream_ctx=512"])) as eng:
        views = [eng.prepare_chat(m) for m in chats]
        family = views[0].family.length
        assert family >= 32 and all(v.family == views[0].family for v in views)
        replies = submit_together(eng, views)
        decoded = eng.metrics.batch_tokens._sum.get()
        adopted = eng.metrics.snapshot_adoptions._value.get()
    prompts = sum(u["prompt_tokens"] for _, u in replies)
    generated = sum(u["completion_tokens"] for _, u in replies)
    assert adopted == 3, adopted
    assert decoded <= prompts - 3 * family + generated, (decoded, prompts, family, generated)
    assert sum(1 for _, u in replies if u["cached_tokens"] > 0) == 3
    with Engine(compose(["server.threads=2", "safe_mode=true"])) as cold:
        for (text, _), messages in zip(replies, chats):
            expected, _ = engine_chat(cold, messages, max_tokens=8)
            assert text.split()[:1] == expected.split()[:1], (text, expected)


def test_prefill_chunks_planned_for_fewer_passes_keep_every_reply_a_cold_servers():
    """``scheduler.microbatch_tokens`` on and ``prefill_seqs`` unlimited (as on a GPU): four raw completions of different
    lengths, admitted together into consecutive streams, prefill in chunks cut to one length
    where that saves passes of the model (tokens put off to later steps); each reply is a cold
    server's, and ``/debug/stats`` counts the passes (at least one per step)."""
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    prompts = [f"Question {i}: {q}\nAnswer:" + " Think." * (3 * i) for i, q in enumerate(TURNS[:4])]
    with Engine(compose(["server.threads=2", "scheduler.n_seq_max=6", "scheduler.max_running=4",
                         "cache.stream_ctx=512", "scheduler.prefill_chunk=16", "scheduler.prefill_seqs=0",
                         "scheduler.microbatch_tokens=64"])) as eng:
        assert eng.backend.info.build["kv_unified"] is False
        views = [eng.prepare_completion(p) for p in prompts]
        replies = submit_together(eng, views)
        plans = eng.stats()["scheduler"]["microbatches"]
        steps = eng.scheduler.steps
    assert plans["trimmed_tokens"] > 0, plans
    assert plans["passes"] >= steps > 0
    with Engine(compose(["server.threads=2", "safe_mode=true"])) as cold:
        for (text, _), p in zip(replies, prompts):
            expected, _ = submit_together(cold, [cold.prepare_completion(p)])[0]
            assert text.split()[:1] == expected.split()[:1], (text, expected)


@pytest.mark.parametrize("layout", ["streams", "unified"])
def test_raw_completions_sharing_a_prefix_arriving_together_compute_it_once(layout):
    """Four raw completions (no template, no declared family) that share a long beginning and
    are admitted in one step get one implicit family of their common prefix: the first
    computes it, the others load its snapshot (``scheduler.implicit_families=true``; off by
    default). Every reply equals a cold server's."""
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    prompts = [f"{SYSTEM}\n\nQuestion: {q}\nAnswer:" for q in TURNS[:4]]

    with Engine(compose(["server.threads=2", f"cache.layout={layout}", "scheduler.n_seq_max=6",
                         "scheduler.max_running=4", "cache.stream_ctx=512",
                         "scheduler.implicit_families=true"])) as eng:
        views = [eng.prepare_completion(p) for p in prompts]
        assert all(v.family.length == 0 for v in views)
        toks = [list(v.prompt.tokens) for v in views]
        common = min(next((i for i, (a, b) in enumerate(zip(toks[0], t)) if a != b), len(t)) for t in toks[1:])
        assert common >= 48
        replies = submit_together(eng, views)
        decoded = eng.metrics.batch_tokens._sum.get()
        adopted = eng.metrics.snapshot_adoptions._value.get()
    total = sum(u["prompt_tokens"] for _, u in replies)
    generated = sum(u["completion_tokens"] for _, u in replies)
    assert adopted == 3, adopted
    assert decoded <= total - 3 * common + generated, (decoded, total, common, generated)
    assert sum(1 for _, u in replies if u["cached_tokens"] > 0) == 3
    with Engine(compose(["server.threads=2", "safe_mode=true"])) as cold:
        for (text, _), p in zip(replies, prompts):
            expected, _ = submit_together(cold, [cold.prepare_completion(p)])[0]
            assert text.split()[:1] == expected.split()[:1], (text, expected)


def test_a_request_longer_than_a_stream_is_refused_not_crashed(tmp_path):
    with running_server(tmp_path, ["cache.stream_ctx=512"]) as srv:
        long_text = " ".join(["lantern meadow copper"] * 250)          # ~750 tokens
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": long_text}], "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "512" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
            "model": MODEL_ID, "prompt": "Count: 1, 2, 3,", "max_tokens": 600})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        ok = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert ok.status_code == 200


@pytest.mark.parametrize("hot_sessions", [0, 2])
def test_when_every_stream_is_busy_the_next_request_waits(tmp_path, hot_sessions):
    """Two streams, six concurrent requests: the extra ones queue and are served as streams free
    up (idle sessions leave theirs), none fails."""
    overrides = ["scheduler.n_seq_max=2", "scheduler.max_running=2", "scheduler.max_waiting=8", "scheduler.queue_timeout_s=600",
                 f"cache.hot_sessions={hot_sessions}", "cache.stream_ctx=512"]
    with running_server(tmp_path, overrides) as srv:
        def one(i: int) -> httpx.Response:
            return httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={
                "model": MODEL_ID, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[i % 5] + f" ({i})"}]})
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(one, range(6)))
        assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies if r.status_code != 200]
        stats = srv.stats()
        assert stats["layout"] == "streams" and stats["scheduler"]["running"] == 0
        assert stats["hot"]["free_sequences"] + stats["hot"]["sessions"] == 2


@pytest.mark.parametrize("layout", ["streams", "unified"])
def test_raw_prompts_sharing_a_prefix_get_an_implicit_family(layout):
    """Token-id completions have no system message to name a family. When one shares a long
    prefix with a cached conversation it does not continue, that prefix becomes a family of its
    own (snapshotted once): later prompts load it instead of restoring whole conversations, and
    conversations store only their deltas past it. A conversation going on without its reply
    resent (token-id follow-ups) shares its own prompt with its cached state: no family."""
    import queue

    from kv3d_core.config import compose
    from kv3d_core.contracts import SamplingParams
    from kv3d_core.engine.engine import Engine
    from kv3d_core.engine.events import Done, Token

    shared = list(range(1000, 1096))                 # a 96-token prefix, then 16 tokens of each request

    def complete(eng, tail: list[int]) -> dict:
        q: queue.Queue = queue.Queue()
        eng.submit(eng.prepare_completion(shared + tail), SamplingParams(temperature=0), 4, [], q.put)
        while True:
            ev = q.get(timeout=300)
            if isinstance(ev, Done):
                return ev.usage
            assert isinstance(ev, Token), ev

    cfg = ["server.threads=2", f"cache.layout={layout}", "cache.stream_ctx=512", "scheduler.n_seq_max=4",
           "cache.gpu_hot_mb=16", "cache.hot_sessions=0", "safety.quality_sample_every=0"]
    with Engine(compose(cfg)) as eng:
        first = complete(eng, list(range(2000, 2016)))
        assert first["cached_tokens"] == 0
        second = complete(eng, list(range(3000, 3016)))     # shares the prefix with the first
        assert second["cached_tokens"] == 96
        assert eng.metrics.derived_families._value.get() == 1
        snaps = eng.scheduler.call(lambda: [len(s.tokens) for s in eng.cache.snapshots.values()]).result(60)
        assert snaps == [96]
        restores_before = eng.metrics.restores.labels("warm")._value.get()
        third = complete(eng, list(range(4000, 4016)))      # loads the implicit family's snapshot
        assert third["cached_tokens"] == 96
        assert eng.metrics.restores.labels("warm")._value.get() == restores_before, "no conversation restored"
        assert eng.metrics.derived_families._value.get() == 1
        sessions = eng.scheduler.call(lambda: [e.n_prefix for e in eng.cache.entries()
                                               if e.kind == "session"]).result(60)
        assert 96 in sessions, "conversations after it store only their delta past the prefix"
        # the first conversation goes on, resending its prompt but not its reply: it resumes that
        # conversation, and its own prompt (one conversation's, not shared) makes no family
        fourth = complete(eng, list(range(2000, 2016)) + list(range(5000, 5016)))
        assert fourth["cached_tokens"] > 96, fourth
        assert eng.metrics.derived_families._value.get() == 1
        snaps = eng.scheduler.call(lambda: [len(s.tokens) for s in eng.cache.snapshots.values()]).result(60)
        assert snaps == [96]
